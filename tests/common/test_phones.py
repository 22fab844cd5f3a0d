"""Reading a phone's E.164 form and zone in one pass gives what the library's plain calls give."""

from __future__ import annotations

import random

import phonenumbers
import pytest
from phonenumbers import timezone as phone_timezone

from services.common import phones

# The uncached parse: the cache would make repeated inputs prove nothing.
_parse = phones._e164_and_zone


def _plain(raw: str, region: str) -> tuple[str, str] | None:
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    zones = [z for z in phone_timezone.time_zones_for_number(number) if z != phone_timezone.UNKNOWN_TIMEZONE]
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), zones[0] if zones else ""


_FIXED = [
    "(415) 555-2671",
    "+1 415-555-2671",
    "4155552671",
    "tel:+1-415-555-2671",
    "(268) 464-1234",  # Antigua, inside the North American plan
    "+1 800 555 0199",  # toll free: not geographical
    "+1 900 555 0199",
    "+1 684 622 1234",
    "+44 20 7946 0958",
    "+44 7911 123456",  # a UK mobile: its zone comes from the country
    "+33 1 42 68 53 00",
    "+49 30 123456",
    "+81 3-1234-5678",
    "+61 2 9876 5432",
    "+800 1234 5678",  # non-geographic entities
    "+882 1234 5678",
    "+870 773 111 632",
    "+979 123456789",
    "911",
    "12",
    "+1 555 555 5555",
    "not a phone",
    "",
]


def _library_examples() -> list[tuple[str, str]]:
    """(number, region to read it in): every region's example number of every type, in national
    and international form, and with its last digit changed (valid or not, often another type)."""
    out: list[tuple[str, str]] = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in range(12):  # every PhoneNumberType but UNKNOWN
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
            e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
            out += [(national, region), (e164, "US")]
            out += [(e164[:-1] + digit, "US") for digit in "29"]
    for code in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS:
        example = phonenumbers.example_number_for_non_geo_entity(code)
        if example is not None:
            out.append((phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164), "US"))
    return out


def test_e164_and_zone_agrees_with_the_plain_calls_on_every_kind_of_number() -> None:
    examples = _library_examples()
    assert len(examples) > 5_000
    geographical = other = 0
    for raw, region in examples:
        found = _parse(raw, region)
        assert found == _plain(raw, region), (raw, region)
        if found is not None:
            number = phonenumbers.parse(raw, region)
            kind = phonenumbers.number_type(number)
            if phonenumbers.is_number_type_geographical(kind, number.country_code):
                geographical += 1
            else:
                other += 1
    assert geographical > 1_000 and other > 1_000  # both ways to a zone are exercised


@pytest.mark.parametrize("region", ["US", "GB", "DE", "IN"])
def test_e164_and_zone_agrees_with_the_plain_calls(region: str) -> None:
    rng = random.Random(region)
    samples = list(_FIXED)
    codes = [1, 7, 33, 44, 49, 55, 61, 81, 86, 91, 234, 254, 800, 808, 870, 878, 881, 882, 883, 888, 979]
    samples += [f"+{rng.choice(codes)} {rng.randrange(10**5, 10**11)}" for _ in range(1500)]
    samples += [str(rng.randrange(10**6, 10**11)) for _ in range(500)]  # national forms, read in the region
    for raw in samples:
        assert _parse(raw, region) == _plain(raw, region), raw
