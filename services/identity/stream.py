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
    """Wakes every waiting subscriber of this process when a batch commits anywhere."""

    def __init__(self) -> None:
        self.generation = 0
        self._event = asyncio.Event()

    def poke(self) -> None:
        self.generation += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, seen: int, seconds: float) -> None:
        """Return once a poke happened after generation ``seen`` was read, or after ``seconds``."""
        if self.generation != seen:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)


async def listen(dsn: str, hub: EventHub) -> None:
    """Keep one dedicated connection LISTENing on the commit channel; reconnect when it drops."""
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(dsn)
            closed = asyncio.Event()
            conn.add_termination_listener(lambda _c, done=closed: done.set())
            await conn.add_listener(NOTIFY_CHANNEL, lambda *_args: hub.poke())
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
        seen = hub.generation
        async with reads.connection() as conn:
            rows, held_back = await repository.stream_page(conn, workspace_id, cursor, batch_size)
        # A prefix of the page: the cursor moves to its last row, and the next page goes on from there.
        rows = repository.within_payload_budget(rows)
        if rows:
            cursor = Cursor(rows[-1].xid, rows[-1].seq)
            yield rows, cursor
            continue
        await hub.wait(seen, HELD_BACK_POLL_SECONDS if held_back else IDLE_CHECK_SECONDS)
