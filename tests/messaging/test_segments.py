"""Segment counting: GSM-7 160/153 septets (extension characters count twice), UCS-2 70/67 units."""

from __future__ import annotations

import pytest

from services.messaging.segments import count_segments, is_gsm7


@pytest.mark.parametrize(
    ("body", "encoding", "segments"),
    [
        ("", "GSM-7", 0),
        ("a", "GSM-7", 1),
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),  # 160 septets
        ("€" * 81, "GSM-7", 2),  # 162 septets
        ("Ünïcode? no: ï is not GSM", "UCS-2", 1),
        ("é" * 160, "GSM-7", 1),  # é is in the basic table
        ("ç" * 70, "UCS-2", 1),  # lowercase ç is not (only Ç is)
        ("ç" * 71, "UCS-2", 2),
        ("ç" * 134, "UCS-2", 2),
        ("ç" * 135, "UCS-2", 3),
        ("😀" * 35, "UCS-2", 1),  # two UTF-16 units each
        ("😀" * 36, "UCS-2", 2),
    ],
)
def test_counts(body: str, encoding: str, segments: int) -> None:
    got = count_segments(body)
    assert (got.encoding, got.segments) == (encoding, segments)


def test_gsm7_detection() -> None:
    assert is_gsm7("Hello {name}, 50% off! @home ~ [ok]")
    assert not is_gsm7("Hello “quoted”")
