"""Phone numbers: E.164 normalization and the time zone a number lives in."""

from __future__ import annotations

import functools
import zoneinfo

import phonenumbers
from phonenumbers import timezone as pn_timezone

from services.common.errors import InvalidArgument


def to_e164(raw: str, region: str, field: str = "phone") -> str:
    """``raw`` in E.164; INVALID_ARGUMENT naming ``field`` when it is no valid number."""
    if not raw or not raw.strip():
        raise InvalidArgument.field(field, "required")
    e164 = _parse(raw, region or "US")
    if e164 is None:
        raise InvalidArgument.field(field, "not a valid phone number")
    return e164


@functools.lru_cache(maxsize=65536)
def _parse(raw: str, region: str) -> str | None:
    # Parsing is the costliest step of a send; campaigns send to the same numbers again and again.
    try:
        parsed = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


@functools.lru_cache(maxsize=65536)
def zone_of(e164: str) -> str:
    """The IANA zone of a number (the first when several share it; "UTC" when unknown)."""
    try:
        zones = pn_timezone.time_zones_for_number(phonenumbers.parse(e164, None))
    except phonenumbers.NumberParseException:
        return "UTC"
    for zone in zones:
        if zone != pn_timezone.UNKNOWN_TIMEZONE:
            return zone
    return "UTC"


def check_zone(name: str, field: str = "time_zone") -> str:
    """``name`` when it is a known IANA zone, else INVALID_ARGUMENT."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidArgument.field(field, f"unknown time zone {name!r}") from exc
    return name
