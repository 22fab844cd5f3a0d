"""The one send-window rule campaign and messaging share."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from services.common.sendwindow import SendWindow, local_zone, parse_hhmm

NY = ZoneInfo("America/New_York")
DEFAULT = SendWindow.parse()


def test_inside_is_open_now() -> None:
    assert DEFAULT.next_opening(datetime(2026, 6, 15, 16, 0, tzinfo=UTC), NY) is None  # 12:00 in New York


def test_before_opens_today_after_opens_tomorrow() -> None:
    # 05:00 New York (EDT, UTC-4): 08:00 local, 12:00 UTC the same day.
    assert DEFAULT.next_opening(datetime(2026, 6, 15, 9, 0, tzinfo=UTC), NY) == datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
    # 22:30 New York: 08:00 tomorrow.
    assert DEFAULT.next_opening(datetime(2026, 6, 16, 2, 30, tzinfo=UTC), NY) == datetime(
        2026, 6, 16, 12, 0, tzinfo=UTC
    )
    # The end is exclusive: 21:00 sharp is closed.
    assert DEFAULT.next_opening(datetime(2026, 6, 16, 1, 0, tzinfo=UTC), NY) == datetime(2026, 6, 16, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("zone", ["America/New_York", "America/Los_Angeles", "Europe/London"])
def test_23_local_opens_at_8_next_morning(zone: str) -> None:
    tz = ZoneInfo(zone)
    opening = DEFAULT.next_opening(datetime(2026, 3, 10, 23, 0, tzinfo=tz).astimezone(UTC), tz)
    assert opening is not None and opening.astimezone(tz) == datetime(2026, 3, 11, 8, 0, tzinfo=tz)


def test_across_midnight_and_always_open() -> None:
    noon_ny = datetime(2026, 6, 15, 16, 0, tzinfo=UTC)
    late = SendWindow.parse("20:00", "02:00")
    assert late.next_opening(noon_ny, NY) == datetime(2026, 6, 16, 0, 0, tzinfo=UTC)
    assert late.next_opening(datetime(2026, 6, 16, 5, 0, tzinfo=UTC), NY) is None  # 01:00 New York
    assert SendWindow.parse("00:00", "00:00").next_opening(noon_ny, NY) is None


def test_start_in_a_spring_forward_gap_lands_inside_the_window() -> None:
    # 2026-03-08 02:00-03:00 does not exist in New York; a 02:30 opening resolves to 03:30 EDT.
    window = SendWindow.parse("02:30", "05:00")
    opening = window.next_opening(datetime(2026, 3, 8, 6, 0, tzinfo=UTC), NY)  # 01:00 EST
    assert opening is not None
    assert window.next_opening(opening, NY) is None


@pytest.mark.parametrize("bad", ["", "8:00", "24:00", "08:60", "0800", "eight"])
def test_malformed_times_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="HH:MM"):
        parse_hhmm(bad)


def test_local_zone_takes_the_first_that_loads_else_utc() -> None:
    assert local_zone("America/Chicago", "Europe/London").key == "America/Chicago"
    assert local_zone("Mars/Olympus_Mons", "", None, "Europe/London").key == "Europe/London"
    assert local_zone("../etc/passwd", "not a zone").key == "UTC"
    assert local_zone().key == "UTC"
