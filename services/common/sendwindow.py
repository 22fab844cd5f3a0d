"""The send window: the daily local-time hours in which a contact may be messaged.

One rule for every service that sends or schedules sends (campaign defers steps to the next
opening, messaging's gate defers messages), so they never disagree about a contact's hours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
# 08:00-21:00 local time: the hours the TCPA allows for telemarketing calls and texts.
DEFAULT_START = "08:00"
DEFAULT_END = "21:00"


def local_zone(*names: str | None) -> ZoneInfo:
    """The first of ``names`` that is a loadable IANA zone (a contact's, then a fallback), else UTC."""
    for name in names:
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError, OSError):
                continue
    return ZoneInfo("UTC")


def parse_hhmm(value: str) -> time:
    """``"08:00"`` as a time; ValueError unless HH:MM on a 24-hour clock."""
    match = _HHMM.match((value or "").strip())
    if not match:
        raise ValueError(f'not a time of day: {value!r} (use "HH:MM", 24-hour)')
    return time(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True)
class SendWindow:
    """A daily local-time window [start, end).

    An end before the start spans midnight (20:00-02:00); equal start and end mean always open.
    """

    start: time
    end: time

    @classmethod
    def parse(cls, start: str = "", end: str = "") -> SendWindow:
        """From ``"HH:MM"`` strings; an empty one takes the default (08:00-21:00)."""
        return cls(parse_hhmm(start or DEFAULT_START), parse_hhmm(end or DEFAULT_END))

    def is_open_at(self, local: time) -> bool:
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def next_opening(self, now: datetime, tz: ZoneInfo) -> datetime | None:
        """None when the window is open at ``now`` in ``tz``; else when it next opens (UTC)."""
        local = now.astimezone(tz)
        wall = local.time().replace(tzinfo=None)
        if self.is_open_at(wall):
            return None
        # Closed: before today's start, or (a same-day window) after today's end.
        day = local.date() if wall < self.start else local.date() + timedelta(days=1)
        # zoneinfo resolves DST: a start inside a spring-forward gap lands at the later offset,
        # which is still inside the window.
        candidate = datetime.combine(day, self.start, tzinfo=tz)
        if candidate <= local:
            candidate = datetime.combine(day + timedelta(days=1), self.start, tzinfo=tz)
        return candidate.astimezone(UTC)
