"""Phone numbers and time zones: parsing lookups in any format, and a contact's IANA zone."""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Mapping
from typing import Any

import phonenumbers
from phonenumbers import timezone as phone_timezones

_UNKNOWN_ZONE = "Etc/Unknown"


def parse_phone(raw: str, region: str) -> str | None:
    """E.164 form of ``raw`` read with ``region`` as the default country, or None when it is no valid number."""
    try:
        number = phonenumbers.parse(raw, region or "US")
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@functools.lru_cache(maxsize=4096)
def phone_time_zone(e164: str) -> str:
    """The first IANA zone phonenumbers knows for the number, or '' when it knows none."""
    try:
        number = phonenumbers.parse(e164, None)
    except phonenumbers.NumberParseException:
        return ""
    zones = [z for z in phone_timezones.time_zones_for_number(number) if z != _UNKNOWN_ZONE]
    return zones[0] if zones else ""


@functools.lru_cache(maxsize=1)
def _iana_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def is_iana_zone(name: str) -> bool:
    return name in _iana_zones()


def contact_time_zone(properties: Mapping[str, Any], phone_zone: str) -> str:
    """A contact's zone: its ``time_zone`` (or ``timezone``) property if a valid IANA zone, else the phone's."""
    for key in ("time_zone", "timezone"):
        value = properties.get(key)
        if isinstance(value, str) and is_iana_zone(value):
            return value
    return phone_zone
