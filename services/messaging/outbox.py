"""The outbox: outcome events delivered into ingest as track events, durably and retried until stored."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import asyncpg
import grpc
import structlog
from parley.common.v1 import event_pb2
from parley.ingest.v1 import ingest_service_pb2 as ingest_pb
from parley.ingest.v1.ingest_service_pb2_grpc import IngestServiceStub

from services.common.clients import channel, internal_metadata
from services.messaging import repository as repo
from services.messaging.app import Messaging
from services.messaging.dispatcher import backoff_delay

log = structlog.get_logger(__name__)

LIBRARY = {"name": "parley-messaging", "version": "1"}


def to_event(row: asyncpg.Record) -> event_pb2.Event:
    """A track event filed by phone: identity puts it on the contact with that E.164 phone."""
    event = event_pb2.Event(
        type=event_pb2.EVENT_TYPE_TRACK, message_id=row["message_id"], name=row["name"], phone=row["phone"]
    )
    props = dict(row["properties"])
    if row["contact_id"]:
        props["contact_id"] = row["contact_id"]
    event.properties.update(props)
    event.traits.update({"phone": row["phone"]})
    event.context.update({"library": LIBRARY})
    event.original_timestamp.FromDatetime(row["event_time"])
    return event


class OutboxDeliverer:
    def __init__(self, app: Messaging) -> None:
        self.app = app
        self._channel: grpc.aio.Channel | None = None
        self._pause = 0.0

    def _stub(self) -> IngestServiceStub:
        if self._channel is None:
            self._channel = channel(self.app.settings.ingest_addr)
        return IngestServiceStub(self._channel)

    async def run(self) -> None:
        while True:
            try:
                handled = await self.deliver_once()
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("outbox_failed", error=repr(exc))
                handled = 0
                await asyncio.sleep(1.0)
            if self._pause > 0:
                # Ingest is unreachable: stay away for a while instead of churning through the backlog.
                await asyncio.sleep(self._pause)
            elif handled == 0:
                self.app.outbox_wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.app.outbox_wakeup.wait(), self.app.tuning.outbox_poll_seconds)

    async def deliver_once(self) -> int:
        """Send one leased batch per workspace; stored (or duplicate) rows leave the outbox."""
        app = self.app
        async with app.pool.acquire() as conn, conn.transaction():
            rows = await repo.claim_outbox(conn, app.tuning.outbox_batch, 30.0)
        if not rows:
            return 0
        by_ws: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for row in rows:
            by_ws[str(row["workspace_id"])].append(row)
        for ws, group in by_ws.items():
            ids = [r["message_id"] for r in group]
            try:
                resp = await self._stub().IngestBatch(
                    ingest_pb.IngestBatchRequest(events=[to_event(r) for r in group]),
                    metadata=internal_metadata(app.internal_token, ws),
                    timeout=10.0,
                )
            except grpc.aio.AioRpcError as err:
                attempts = max(r["attempts"] for r in group)
                delay = backoff_delay(attempts, 1.0, 300.0)
                await repo.outbox_retry(app.pool, ws, ids, delay, f"{err.code().name}: {err.details()}")
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self._pause = min(30.0, max(0.5, self._pause * 2))
                log.warning("outbox_ingest_unavailable", code=err.code().name, events=len(ids), retry_s=round(delay, 1))
                continue
            for result in resp.results:
                if result.violations:
                    log.error(
                        "outbox_event_rejected",
                        message_id=result.message_id,
                        violations=[f"{v.field}: {v.description}" for v in result.violations],
                    )
            await repo.outbox_done(app.pool, ws, ids)
            self._pause = 0.0
        return len(rows)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
