"""Durations and wait_until math in the contact's time zone (the send window: services/common/sendwindow.py)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

_DURATION = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# A year bounds every duration: longer ones are typos, and keep timestamps in range.
_MAX_DURATION = timedelta(days=366)


def parse_duration(text: str) -> timedelta:
    """``"30m"``, ``"1d"``, ``"1h30m"`` → timedelta. ValueError when malformed, zero or over a year."""
    m = _DURATION.match(text.strip()) if text else None
    if not m or not any(m.groups()):
        raise ValueError(f'not a duration: {text!r} (use e.g. "30s", "30m", "2h", "1d", "1w", "1h30m")')
    w, d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    value = timedelta(weeks=w, days=d, hours=h, minutes=mi, seconds=s)
    if value <= timedelta(0):
        raise ValueError("duration must be positive")
    if value > _MAX_DURATION:
        raise ValueError("duration must be at most 366d")
    return value


def next_time_of_day(now: datetime, at: time, weekdays: Iterable[str], tz: ZoneInfo) -> datetime:
    """The first moment at or after ``now`` that is ``at`` local time on an allowed weekday (UTC)."""
    allowed = {WEEKDAYS.index(d) for d in weekdays} or set(range(7))
    local = now.astimezone(tz)
    for offset in range(8):
        day = local.date() + timedelta(days=offset)
        if day.weekday() not in allowed:
            continue
        candidate = datetime.combine(day, at, tzinfo=tz)
        if candidate >= local:
            return candidate.astimezone(UTC)
    raise AssertionError("unreachable: every week has an allowed day")
