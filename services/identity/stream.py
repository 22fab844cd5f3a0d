"""The resolved-event stream: LISTEN/NOTIFY wake-ups and the gap-safe read loop behind SubscribeEvents."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import structlog

from services.identity import repository
from services.identity.connections import HeldConnections
from services.identity.repository import NOTIFY_CHANNEL, EventRow
from services.identity.tokens import Cursor

log = structlog.get_logger(__name__)

# Committed rows held back by an older open transaction are looked for again this often; the
# transaction that holds them back may belong to another service and send no notification.
HELD_BACK_POLL_SECONDS = 0.05
# A subscriber with nothing to read re-checks this often even without a notification
# (a safety net for a listener reconnecting; normal wake-ups come from NOTIFY).
IDLE_CHECK_SECONDS = 2.0


class EventHub:
    """Wakes this process's waiting subscribers when a batch commits: those of the batch's
    workspace and those of every workspace. The notification carries the workspace id; a
    subscriber of another workspace has nothing new to read, and waking it would cost a page
    query per subscriber per commit."""

    def __init__(self) -> None:
        # Per workspace id, and None for subscribers of every workspace: a counter of wake-ups
        # and the event their waiters wait on. Made when a subscriber first asks.
        self._generations: dict[str | None, int] = {}
        self._events: dict[str | None, asyncio.Event] = {}

    def generation(self, workspace_id: str | None) -> int:
        """The wake-up count a subscriber reads before its query and then waits past."""
        if workspace_id not in self._events:
            self._events[workspace_id] = asyncio.Event()
            self._generations[workspace_id] = 0
        return self._generations[workspace_id]

    def _wake(self, key: str | None) -> None:
        event = self._events.get(key)
        if event is not None:
            self._generations[key] += 1
            self._events[key] = asyncio.Event()
            event.set()

    def poke(self, workspace_id: str | None = None) -> None:
        """A batch of ``workspace_id`` committed; None: anything may have (wake everyone)."""
        if workspace_id is None:
            for key in list(self._events):
                self._wake(key)
            return
        self._wake(workspace_id)
        self._wake(None)

    async def wait(self, workspace_id: str | None, seen: int, seconds: float) -> None:
        """Return once a wake-up for ``workspace_id`` happened after generation ``seen`` was
        read, or after ``seconds``."""
        if self.generation(workspace_id) != seen:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._events[workspace_id].wait(), seconds)


async def listen(dsn: str, hub: EventHub) -> None:
    """Keep one dedicated connection LISTENing on the commit channel; reconnect when it drops."""
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(dsn)
            closed = asyncio.Event()
            conn.add_termination_listener(lambda _c, done=closed: done.set())
            await conn.add_listener(NOTIFY_CHANNEL, lambda _c, _pid, _channel, payload: hub.poke(payload or None))
            hub.poke()  # whatever committed while no one was listening
            await closed.wait()
            log.warning("event_listener_lost")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("event_listener_failed", error=repr(exc))
            await asyncio.sleep(1.0)
        finally:
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close(timeout=2))


async def follow(
    reads: HeldConnections, hub: EventHub, workspace_id: str | None, cursor: Cursor, batch_size: int
) -> AsyncIterator[tuple[list[EventRow], Cursor]]:
    """Pages of events after ``cursor`` for ever: the backlog first, then each commit as it lands."""
    while True:
        seen = hub.generation(workspace_id)
        async with reads.connection() as conn:
            rows, held_back = await repository.stream_page(conn, workspace_id, cursor, batch_size)
        # A prefix of the page: the cursor moves to its last row, and the next page goes on from there.
        rows = repository.within_payload_budget(rows)
        if rows:
            cursor = Cursor(rows[-1].xid, rows[-1].seq)
            yield rows, cursor
            continue
        await hub.wait(workspace_id, seen, HELD_BACK_POLL_SECONDS if held_back else IDLE_CHECK_SECONDS)
