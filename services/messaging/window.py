"""The send window: when, in a contact's local time, a message may go out."""

from __future__ import annotations

import re
import zoneinfo
from datetime import datetime, time, timedelta

_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def parse_hhmm(value: str) -> time:
    """``"08:00"`` as a time; ValueError when malformed."""
    match = _HHMM.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not HH:MM")
    return time(int(match.group(1)), int(match.group(2)))


def next_send_time(now: datetime, zone: str, start: str, end: str) -> datetime | None:
    """None when ``now`` is inside the window in ``zone``; else the next window start (UTC-aware).

    A window whose end is before its start spans midnight (e.g. 20:00-02:00). Equal
    start and end mean "always open".
    """
    tz = zoneinfo.ZoneInfo(zone)
    local = now.astimezone(tz)
    s, e = parse_hhmm(start), parse_hhmm(end)
    if s == e:
        return None
    t = local.time().replace(tzinfo=None)
    inside = s <= t < e if s < e else (t >= s or t < e)
    if inside:
        return None
    day = local.date()
    if t >= s and s < e:
        day = day + timedelta(days=1)
    # Build the local wall time and let zoneinfo resolve DST; a start that falls in a
    # spring-forward gap resolves to the later offset, which is still inside the window.
    candidate = datetime.combine(day, s, tzinfo=tz)
    if candidate <= local:
        candidate = datetime.combine(day + timedelta(days=1), s, tzinfo=tz)
    return candidate.astimezone(zoneinfo.ZoneInfo("UTC"))
