"""An injectable clock: real time plus an offset tests can set, so nothing sleeps to reach a window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """``now()`` in UTC; ``set()`` moves it to a chosen instant and lets it keep running from there."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def set(self, instant: datetime) -> None:
        self.offset = instant - datetime.now(UTC)

    def advance(self, delta: timedelta) -> None:
        self.offset += delta
