"""Campaign test fixtures: the real campaign server, and (when present) real identity and messaging."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from parley.campaign.v1 import campaign_service_pb2 as pb
from parley.campaign.v1 import campaign_service_pb2_grpc as pb_grpc
from parley.common.v1 import event_pb2
from parley.identity.v1 import identity_service_pb2 as id_pb
from parley.identity.v1 import identity_service_pb2_grpc as id_grpc
from parley.messaging.v1 import messaging_service_pb2 as msg_pb
from parley.messaging.v1 import messaging_service_pb2_grpc as msg_grpc

from services.campaign.clock import ManualClock
from services.campaign.definition import from_dict
from services.campaign.engine import Engine
from services.campaign.module import make_module
from services.common.clients import channel, internal_metadata, key_metadata
from services.common.server import RunningServer, start
from tests.helpers import test_settings


def definition(data: dict[str, Any]) -> pb.CampaignDefinition:
    return from_dict(data, pb.CampaignDefinition(), "definition")  # type: ignore[return-value]


@dataclass
class Campaigns:
    """A campaign server and a stub with a workspace key."""

    server: RunningServer
    stub: pb_grpc.CampaignServiceStub
    md: tuple[tuple[str, str], ...]
    workspace_id: str

    @property
    def engine(self) -> Engine:
        return self.server.runtime.state["engine"]  # type: ignore[no-any-return]

    async def live(self, name: str, data: dict[str, Any]) -> pb.Campaign:
        created = await self.stub.CreateCampaign(
            pb.CreateCampaignRequest(campaign=pb.Campaign(name=name, definition=definition(data))), metadata=self.md
        )
        published = await self.stub.PublishCampaign(
            pb.PublishCampaignRequest(campaign_id=created.campaign.id), metadata=self.md
        )
        return published.campaign


@pytest.fixture(scope="module")
async def campaigns_only(db_url: str, make_workspace: Any) -> AsyncIterator[Campaigns]:
    """The campaign server alone (no consumer, no timer loop): definitions and lifecycle."""
    ws, key = await make_workspace(db_url)
    srv = await start(make_module(clock=ManualClock(), run_timers=False, consume=False), test_settings(db_url), port=0)
    ch = channel(f"127.0.0.1:{srv.port}")
    yield Campaigns(srv, pb_grpc.CampaignServiceStub(ch), key_metadata(key), ws.id)
    await ch.close()
    await srv.stop(0)


@dataclass
class Stack:
    """identity + messaging + campaign, in process, on one database; the campaign engine on a manual clock."""

    identity: RunningServer
    messaging: RunningServer
    ingest: RunningServer
    campaign: Campaigns
    clock: ManualClock
    id_stub: id_grpc.IdentityServiceStub
    msg_stub: msg_grpc.MessagingServiceStub
    token: str
    workspace_id: str
    _channels: list[grpc.aio.Channel]

    @property
    def engine(self) -> Engine:
        return self.campaign.engine

    def imd(self) -> tuple[tuple[str, str], ...]:
        return internal_metadata(self.token, self.workspace_id)

    async def record(self, *events: event_pb2.Event) -> list[str]:
        """Store events through identity (as ingest would) and wait until the campaign consumed them."""
        before = self.engine.events_seen
        resp = await self.id_stub.RecordEvents(id_pb.RecordEventsRequest(events=list(events)), metadata=self.imd())
        await self.caught_up(before + len(events))
        return [r.contact_id for r in resp.results]

    async def caught_up(self, seen: int) -> None:
        from services.campaign.engine import wait_until

        async def done() -> bool:
            return self.engine.events_seen >= seen

        await wait_until(done, 20.0)

    def event(
        self,
        name: str,
        *,
        user: str,
        props: dict[str, Any] | None = None,
        traits: dict[str, Any] | None = None,
        phone: str = "",
    ) -> event_pb2.Event:
        ev = event_pb2.Event(
            type=event_pb2.EVENT_TYPE_IDENTIFY if traits is not None and not name else event_pb2.EVENT_TYPE_TRACK,
            message_id=str(uuid.uuid4()),
            user_id=user,
            name=name,
            phone=phone,
        )
        if props:
            ev.properties.update(props)
        if traits:
            ev.traits.update(traits)
        now = self.clock.now()
        for f in ("original_timestamp", "sent_at", "received_at", "timestamp"):
            getattr(ev, f).FromDatetime(now)
        return ev

    async def contact(self, user: str, phone: str, *, consent: bool = True, **traits: Any) -> str:
        """Make a contact (an identify with a phone), opted in to SMS unless told not to; returns its id."""
        ids = await self.record(self.event("", user=user, traits={"phone": phone, **traits}, phone=phone))
        assert ids[0], "identity did not resolve a contact"
        if not consent:
            return ids[0]
        consent_msg = msg_pb.Consent(phone=phone, channel=msg_pb.CHANNEL_SMS, subscribed=True, source="api")
        consent_msg.consent_time.FromDatetime(datetime.now(UTC))
        await self.msg_stub.SetConsent(msg_pb.SetConsentRequest(consent=consent_msg), metadata=self.imd())
        return ids[0]

    async def messages(self, contact_id: str) -> list[msg_pb.Message]:
        resp = await self.msg_stub.ListMessages(msg_pb.ListMessagesRequest(contact_id=contact_id), metadata=self.imd())
        return [
            m
            for m in resp.messages
            if m.direction == msg_pb.MESSAGE_DIRECTION_OUTBOUND and m.status != msg_pb.MESSAGE_STATUS_BLOCKED
        ]

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()
        for srv in (self.campaign.server, self.ingest, self.messaging, self.identity):
            await srv.stop(0)


def _peer_modules() -> tuple[Any, Any, Any]:
    # A missing peer is a failure, never a skip: these tests are the cross-service proof.
    identity = importlib.import_module("services.identity.module")
    ingest = importlib.import_module("services.ingest.module")
    messaging = importlib.import_module("services.messaging.module")
    app = importlib.import_module("services.messaging.app")
    quiet = messaging.build_module(lambda: app.Tuning(consume_identity_stream=False, poll_seconds=0.05))
    return identity.MODULE, quiet, ingest.MODULE


async def make_stack(db_url: str, make_workspace: Any, start_time: datetime, *, consume: bool = True) -> Stack:
    identity_module, messaging_module, ingest_module = _peer_modules()
    ws, key = await make_workspace(db_url)
    base = test_settings(db_url)
    ident = await start(identity_module, base, port=0)
    msg = await start(messaging_module, base.replace(identity_addr=f"127.0.0.1:{ident.port}"), port=0)
    ingest = await start(ingest_module, base.replace(identity_addr=f"127.0.0.1:{ident.port}"), port=0)
    clock = ManualClock(start_time)
    settings = base.replace(
        identity_addr=f"127.0.0.1:{ident.port}",
        messaging_addr=f"127.0.0.1:{msg.port}",
        ingest_addr=f"127.0.0.1:{ingest.port}",
    )
    camp = await start(make_module(clock=clock, run_timers=False, consume=consume), settings, port=0)
    chans = [channel(f"127.0.0.1:{p}") for p in (camp.port, ident.port, msg.port)]
    campaigns = Campaigns(camp, pb_grpc.CampaignServiceStub(chans[0]), key_metadata(key), ws.id)
    return Stack(
        ident,
        msg,
        ingest,
        campaigns,
        clock,
        id_grpc.IdentityServiceStub(chans[1]),
        msg_grpc.MessagingServiceStub(chans[2]),
        camp.runtime.internal_token,
        ws.id,
        chans,
    )


@pytest.fixture(scope="module")
async def stack(db_url: str, make_workspace: Any) -> AsyncIterator[Stack]:
    # Noon in New York: inside the default send window for US numbers.
    s = await make_stack(db_url, make_workspace, datetime(2026, 6, 2, 16, 0, tzinfo=UTC))
    yield s
    await s.close()


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


async def seed(
    c: Campaigns,
    campaign: pb.Campaign,
    contact_ids: list[str],
    *,
    props: dict[str, Any] | None = None,
    when: datetime | None = None,
) -> None:
    """Enroll contacts directly (as the consumer would), for engine tests that need no identity."""
    from services.campaign import repository
    from services.campaign.engine import _Plan

    now = when or c.engine.clock.now()
    plan = _Plan()
    graph = await c.engine.graph(c.workspace_id, campaign.id, campaign.live_version)
    assert graph is not None
    for cid in contact_ids:
        plan.enrollments.append(
            {
                "workspace_id": c.workspace_id,
                "id": str(uuid.uuid4()),
                "campaign_id": campaign.id,
                "version": campaign.live_version,
                "contact_id": cid,
                "step_id": graph.start,
                "phone": "+12125550100",
                "time_zone": "America/New_York",
                "enroll_time": now,
                "trigger_event": {
                    "name": "seed",
                    "properties": props or {},
                    "message_id": f"seed-{cid}",
                    "timestamp": now.isoformat(),
                },
            }
        )
    pool = c.server.runtime.pool
    async with pool.acquire() as conn, conn.transaction():
        await repository.apply_plan(conn, plan, now)


def stored(c: Campaigns, contact_id: str, name: str, props: dict[str, Any] | None = None) -> id_pb.StoredEvent:
    ev = event_pb2.Event(type=event_pb2.EVENT_TYPE_TRACK, name=name, message_id=str(uuid.uuid4()))
    if props:
        ev.properties.update(props)
    return id_pb.StoredEvent(event=ev, workspace_id=c.workspace_id, contact_id=contact_id)


async def feed(c: Campaigns, *events: id_pb.StoredEvent) -> None:
    """Hand events to the consumer as the stream would (cursor moves on)."""
    from services.campaign import repository
    from services.campaign.engine import CONSUMER

    before = await repository.get_cursor(c.server.runtime.pool, CONSUMER)
    await c.engine.handle_events(list(events), before, f"{before}+{len(events)}")


def track_event(s: Stack, contact_id: str, name: str) -> id_pb.StoredEvent:
    """A stored track event of ``contact_id``, stamped with the stack's clock."""
    ev = event_pb2.Event(type=event_pb2.EVENT_TYPE_TRACK, name=name, message_id=str(uuid.uuid4()))
    ev.timestamp.FromDatetime(s.clock.now())
    return id_pb.StoredEvent(event=ev, workspace_id=s.workspace_id, contact_id=contact_id)


async def consume(engine: Any, events: list[id_pb.StoredEvent]) -> int:
    """Hand ``events`` to ``engine``'s consumer as one stream batch; what it returns (enrollments made)."""
    from services.campaign import repository
    from services.campaign.engine import CONSUMER

    before = await repository.get_cursor(engine.pool, CONSUMER)
    return int(await engine.handle_events(events, before, f"{before}+{len(events)}"))
