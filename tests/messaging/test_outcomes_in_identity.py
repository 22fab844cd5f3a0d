"""End to end with real identity and ingest: consent from identify traits, routing to the owning agent,
and every outcome event in the contact's timeline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from parley.common.v1 import event_pb2
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.identity.v1.identity_service_pb2_grpc import IdentityServiceStub
from parley.ingest.v1 import ingest_service_pb2 as ingest_pb
from parley.ingest.v1.ingest_service_pb2_grpc import IngestServiceStub
from parley.messaging.v1 import agent_service_pb2 as apb
from parley.messaging.v1 import messaging_service_pb2 as pb

from services.common.server import RunningServer, start
from services.messaging.app import Tuning
from tests.helpers import test_settings
from tests.messaging.conftest import Stack, StackFactory


def live_tuning() -> Tuning:
    """Background loops on, short waits: the whole pipeline runs by itself."""
    return Tuning(
        backoff_base=0.0, backoff_cap=0.0, poll_seconds=0.05, outbox_poll_seconds=0.05, policy_cache_seconds=0
    )


async def eventually(check: Callable[[], Awaitable[Any]], what: str, tries: int = 200) -> Any:
    """Poll ``check`` until it returns something truthy (the pipeline is asynchronous by design)."""
    for _ in range(tries):
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture(scope="module")
async def peers(db_url: str) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    from services.identity.module import MODULE as IDENTITY
    from services.ingest.module import MODULE as INGEST

    identity = await start(IDENTITY, test_settings(db_url), port=0)
    ingest = await start(INGEST, test_settings(db_url, identity_addr=f"127.0.0.1:{identity.port}"), port=0)
    yield identity, ingest
    await ingest.stop(0)
    await identity.stop(0)


@pytest.fixture(scope="module")
async def live(make_stack: StackFactory, peers: tuple[RunningServer, RunningServer]) -> Stack:
    identity, ingest = peers
    stack = await make_stack(
        tuning=live_tuning, identity_addr=f"127.0.0.1:{identity.port}", ingest_addr=f"127.0.0.1:{ingest.port}"
    )
    stack.twilio.callback_base = f"http://127.0.0.1:{stack.http_port}"
    # Real time here: identity stamps events with it, and consent compares times across services.
    stack.app.clock.offset = timedelta(0)
    await stack.set_policy(send_window_start="00:00", send_window_end="00:00")
    return stack


async def test_outcomes_reach_the_contacts_timeline(live: Stack, peers: tuple[RunningServer, RunningServer]) -> None:
    identity_srv, ingest_srv = peers
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{ingest_srv.port}") as ingest_ch,
        grpc.aio.insecure_channel(f"127.0.0.1:{identity_srv.port}") as identity_ch,
    ):
        ingest, identity = IngestServiceStub(ingest_ch), IdentityServiceStub(identity_ch)
        phone = "+12125550601"
        agent = (
            await live.agents.CreateAgent(
                apb.CreateAgentRequest(request_id="owner", name="Owner", queues=["loans"]), metadata=live.md
            )
        ).agent

        # The app identifies the user with a phone, an SMS opt-in and an owning agent.
        ident = event_pb2.Event(type=event_pb2.EVENT_TYPE_IDENTIFY, user_id="user-601")
        ident.traits.update(
            {"phone": "(212) 555-0601", "first_name": "Ada", "sms_opt_in": True, "owner_agent_id": agent.id}
        )
        resp = await ingest.Identify(ingest_pb.IdentifyRequest(event=ident), metadata=live.md)
        contact_id = resp.result.contact_id
        assert contact_id

        async def subscribed() -> bool:
            got = await live.messaging.GetConsent(pb.GetConsentRequest(phone=phone), metadata=live.md)
            return any(c.channel == pb.CHANNEL_SMS and c.subscribed for c in got.consents)

        await eventually(subscribed, "the identify trait's opt-in reaches messaging")

        # A marketing send by contact id: queued, handed to the provider, delivered by callback.
        msg = await live.send(request_id="e2e-1", contact_id=contact_id, body="Your loan is approved!")
        assert msg.phone == phone and msg.contact_id == contact_id

        async def delivered() -> bool:
            return (await live.get(msg.id)).status == pb.MESSAGE_STATUS_DELIVERED

        await eventually(delivered, "the message is delivered")

        # A reply is routed to the contact's owning agent; then STOP.
        await live.inbound(phone, "Great, thank you!", "SMe2e-in-1")
        convs = await live.messaging.ListConversations(pb.ListConversationsRequest(agent_id=agent.id), metadata=live.md)
        assert [c.phone for c in convs.conversations] == [phone]
        await live.inbound(phone, "STOP", "SMe2e-in-2")

        # A call task, claimed and completed.
        await live.messaging.CreateCallTask(
            pb.CreateCallTaskRequest(request_id="e2e-call", contact_id=contact_id, queue="loans"), metadata=live.md
        )
        task = (await live.agents.ClaimNextTask(apb.ClaimNextTaskRequest(agent_id=agent.id), metadata=live.md)).task
        await live.agents.CompleteTask(
            apb.CompleteTaskRequest(task_id=task.id, agent_id=agent.id, disposition="voicemail"), metadata=live.md
        )

        wanted = {
            "Contact Opted In",
            "SMS Sent",
            "SMS Delivered",
            "SMS Received",
            "Contact Opted Out",
            "Call Task Created",
            "Call Completed",
        }

        async def timeline() -> dict[str, list[dict[str, Any]]] | None:
            events = await identity.ListContactEvents(
                ipb.ListContactEventsRequest(contact_id=contact_id, page_size=100), metadata=live.md
            )
            by_name: dict[str, list[dict[str, Any]]] = {}
            for e in events.events:
                by_name.setdefault(e.event.name, []).append(json_format.MessageToDict(e.event.properties))
            return by_name if wanted <= set(by_name) else None

        by_name = await eventually(timeline, "every outcome is in the contact's timeline")
        assert [p["body"] for p in by_name["SMS Received"]] == ["STOP", "Great, thank you!"]
        assert by_name["Call Completed"][0]["disposition"] == "voicemail"
        assert by_name["SMS Delivered"][0]["message_id"] == msg.id
        assert len(by_name["SMS Sent"]) == 1

        # The agent's view of the task: the contact and its recent events, from identity.
        ctx = await live.agents.GetTaskContext(apb.GetTaskContextRequest(task_id=task.id), metadata=live.md)
        assert ctx.contact.id == contact_id and ctx.recent_events
        assert [m.body for m in ctx.messages][-2:] == ["Great, thank you!", "STOP"]
