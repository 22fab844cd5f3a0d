"""Consent from identify traits: consumes identity's resolved-event stream with a durable cursor."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import grpc
import structlog
from google.protobuf.json_format import MessageToDict
from parley.common.v1 import event_pb2
from parley.identity.v1 import identity_service_pb2 as ipb

from services.common.errors import ParleyError
from services.messaging import repository as repo
from services.messaging.app import Messaging
from services.messaging.consent import change_consent, consents_from_traits
from services.messaging.outcomes import Outcome
from services.messaging.repository import ConsentChange

log = structlog.get_logger(__name__)

CURSOR_NAME = "identity-events"
LOCK_KEY = "messaging-identity-stream"
STANDBY_SECONDS = 5.0


def _event_time(event: event_pb2.Event) -> datetime:
    """When the event's consents were given: its time, but never after ingest received it (a
    device clock ahead may date an event up to a day later), so no consent outranks an opt-out
    recorded after the event arrived."""
    received = event.received_at.ToDatetime(tzinfo=UTC) if event.HasField("received_at") else None
    for ts in (event.timestamp, event.received_at, event.original_timestamp):
        if ts.seconds or ts.nanos:
            at = ts.ToDatetime(tzinfo=UTC)
            return min(at, received) if received is not None else at
    return datetime.now(UTC)


class IdentityStream:
    def __init__(self, app: Messaging) -> None:
        self.app = app

    async def run(self) -> None:
        """One replica at a time follows the stream (a session advisory lock elects it); the others
        stand by and take over within seconds when its connection goes away."""
        while True:
            try:
                async with self.app.pool.acquire() as conn:
                    if await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", LOCK_KEY):
                        try:
                            await self.follow_forever()
                        finally:
                            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", LOCK_KEY)
            except (asyncpg.PostgresError, OSError) as exc:
                log.info("identity_stream_lock_retry", error=type(exc).__name__)
            await asyncio.sleep(STANDBY_SECONDS)

    async def follow_forever(self) -> None:
        """Follow the stream; reconnects from the saved cursor after any failure."""
        delay = 0.5
        while True:
            try:
                await self.follow()
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, ParleyError, asyncpg.PostgresError, OSError) as exc:
                log.info("identity_stream_retry", error=type(exc).__name__, retry_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def follow(self) -> None:
        cursor = await repo.get_cursor(self.app.pool, CURSOR_NAME)
        async for resp in self.app.identity.subscribe(cursor):
            await self.apply(resp)

    async def apply(self, resp: ipb.SubscribeEventsResponse) -> int:
        """Record the consents a response's identify events carry, and its cursor, in one transaction."""
        changes: list[ConsentChange] = []
        for stored in resp.events:
            event = stored.event
            if event.type != event_pb2.EVENT_TYPE_IDENTIFY or not event.HasField("traits"):
                continue
            traits = MessageToDict(event.traits)
            if "sms_opt_in" not in traits and "voice_opt_in" not in traits:
                continue
            phone = event.phone
            if not phone and stored.contact_id:
                contact = await self.app.identity.contact(stored.workspace_id, contact_id=stored.contact_id)
                phone = contact.phone if contact is not None else ""
            if not phone:
                continue  # consent needs a phone; a later identify with one will carry it again
            ip = ""
            if event.HasField("context") and "ip" in event.context.fields:
                ip = event.context.fields["ip"].string_value
            for c in consents_from_traits(traits, _event_time(event), ip):
                changes.append(
                    ConsentChange(
                        stored.workspace_id,
                        phone,
                        c.channel,
                        c.subscribed,
                        c.consent_time,
                        c.source,
                        c.consent_text,
                        c.ip,
                    )
                )
        outcomes: list[Outcome] = []
        async with self.app.pool.acquire() as conn, conn.transaction():
            for change in changes:
                _, more = await change_consent(conn, change)
                outcomes.extend(more)
            await repo.add_outcomes(conn, outcomes)
            if resp.cursor:
                await repo.save_cursor(conn, CURSOR_NAME, resp.cursor)
        if outcomes:
            self.app.wake_outbox()
        return len(changes)
