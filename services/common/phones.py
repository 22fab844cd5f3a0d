"""Phone numbers, the way every service reads them: E.164 via phonenumbers, and the zone a number lives in."""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Mapping, Sequence
from typing import Any

import phonenumbers
from phonenumbers import PhoneNumberType
from phonenumbers import timezone as phone_timezone

from services.common.errors import InvalidArgument


def _parsed(raw: str, region: str | None) -> phonenumbers.PhoneNumber | None:
    try:
        return phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None


def _valid_number(raw: str, region: str) -> phonenumbers.PhoneNumber | None:
    number = _parsed(raw, region or "US")
    return number if number is not None and phonenumbers.is_valid_number(number) else None


# Longest phone text parsed (libphonenumber's own MAX_INPUT_STRING_LENGTH). The parse caches
# below are keyed by the text as sent: without this bound one client could fill them with
# megabytes of text per entry.
MAX_PHONE_CHARS = 250


def _to_e164(raw: str, region: str) -> str | None:
    number = _valid_number(raw, region)
    return None if number is None else phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# Cached: parsing costs tens of microseconds, and the same numbers arrive again and again.
_cached_to_e164 = functools.lru_cache(maxsize=200_000)(_to_e164)


def to_e164(raw: str, region: str) -> str | None:
    """E.164 form of ``raw`` (any format, ``tel:`` URIs too) read in ``region``; None when no valid number
    (or longer than ``MAX_PHONE_CHARS``, which is never cached)."""
    return None if len(raw) > MAX_PHONE_CHARS else _cached_to_e164(raw, region)


def _e164_and_zone(raw: str, region: str) -> tuple[str, str] | None:
    """``to_e164`` and ``time_zone_of`` from one parse: (E.164, first known zone or ''), None when no valid number.

    The number's type is looked up once for a geographical number (most of the North American
    plan): ``is_valid_number`` is that type not being UNKNOWN, and ``time_zones_for_number``
    would look it up again (a fifth of the cost of a new number). Other types (toll free, and
    mobiles in many countries) take the country's zones through ``time_zones_for_number``, which
    does look it up again: the library's only public way to them.
    """
    number = _parsed(raw, region or "US")
    if number is None:
        return None
    kind = phonenumbers.number_type(number)
    if kind == PhoneNumberType.UNKNOWN:
        return None
    if phonenumbers.is_number_type_geographical(kind, number.country_code):
        zones = phone_timezone.time_zones_for_geographical_number(number)
    else:
        zones = phone_timezone.time_zones_for_number(number)  # the country's zones
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), _known_zone(zones, "")


_cached_e164_and_zone = functools.lru_cache(maxsize=200_000)(_e164_and_zone)


def e164_and_zone(raw: str, region: str) -> tuple[str, str] | None:
    """``_e164_and_zone``, cached; None for text longer than ``MAX_PHONE_CHARS``, which is never cached."""
    return None if len(raw) > MAX_PHONE_CHARS else _cached_e164_and_zone(raw, region)


def _known_zone(zones: Sequence[str], default: str) -> str:
    for zone in zones:
        if zone != phone_timezone.UNKNOWN_TIMEZONE:
            return zone
    return default


def require_e164(raw: str, region: str, field: str = "phone") -> str:
    """``raw`` in E.164; INVALID_ARGUMENT naming ``field`` when it is missing or no valid number."""
    if not raw or not raw.strip():
        raise InvalidArgument.field(field, "required")
    e164 = to_e164(raw, region)
    if e164 is None:
        raise InvalidArgument.field(field, "not a valid phone number")
    return e164


@functools.lru_cache(maxsize=65_536)
def time_zone_of(e164: str, default: str = "") -> str:
    """The first IANA zone phonenumbers knows for the number, else ``default``."""
    number = _parsed(e164, None)
    if number is None:
        return default
    return _known_zone(phone_timezone.time_zones_for_number(number), default)


@functools.lru_cache(maxsize=1)
def _iana_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def is_iana_zone(name: str) -> bool:
    return name in _iana_zones()


def check_zone(name: str, field: str = "time_zone") -> str:
    """``name`` when it is a known IANA zone, else INVALID_ARGUMENT naming ``field``."""
    if not is_iana_zone(name):
        raise InvalidArgument.field(field, f"unknown time zone {name!r}")
    return name


def contact_time_zone(properties: Mapping[str, Any], phone_zone: str) -> str:
    """A contact's zone: its ``time_zone`` (or ``timezone``) property if a valid IANA zone, else the phone's."""
    for key in ("time_zone", "timezone"):
        value = properties.get(key)
        if isinstance(value, str) and is_iana_zone(value):
            return value
    return phone_zone
