"""Identity's view of phones: the chassis' parsing, and '' for a number with no known zone."""

from __future__ import annotations

from services.common.phones import contact_time_zone, is_iana_zone, time_zone_of, to_e164

__all__ = ["contact_time_zone", "is_iana_zone", "parse_phone", "phone_time_zone"]


def parse_phone(raw: str, region: str) -> str | None:
    """E.164 form of ``raw`` read with ``region`` as the default country, or None when it is no valid number."""
    return to_e164(raw, region)


def phone_time_zone(e164: str) -> str:
    """The first IANA zone phonenumbers knows for the number, or '' when it knows none."""
    return time_zone_of(e164, "")
