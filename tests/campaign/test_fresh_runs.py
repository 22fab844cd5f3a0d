"""Fresh enrollments run right after the enrolling commit; the due timer row stays the crash-safe fallback.

A replica's consumer commits an enrollment, then runs its first steps at once through the
same claim (``SKIP LOCKED``) a timer worker uses. These tests stop that replica at each
point between the commit and its own commit of the step and check that another replica's
timer worker finishes the step with the same ``request_id``, so messaging stores one SMS.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from parley.campaign.v1 import campaign_service_pb2 as pb
from parley.common.v1 import event_pb2
from parley.identity.v1 import identity_service_pb2 as id_pb

from services.campaign import repository
from services.campaign.effects import Effects, Result
from services.campaign.engine import CONSUMER, Engine
from tests.campaign.conftest import Campaigns, Stack, feed, make_stack, stored

FLOW = {
    "trigger": {"event": {"name": "Signed Up"}},
    "re_entry": {"policy": "any_time"},
    "exit_events": [{"name": "Unsubscribed"}],
    "send_window": {"start": "00:00", "end": "23:59"},
    "steps": [
        {"id": "hello", "next": "later", "send_sms": {"body": "Welcome {{contact.first_name}}", "transactional": True}},
        {"id": "later", "wait": {"duration": "1d"}},
    ],
}


class Killed(BaseException):
    """The replica dies here (not an error the engine handles: nothing after it runs)."""


class Wrapped:
    """The real effects, with a hook around send_sms (a crash after it, or a gate before it)."""

    def __init__(self, inner: Effects) -> None:
        self.inner = inner
        self.sent: list[str] = []
        self.contact_reads = 0
        self.crash_after_send = False
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_contact(self, workspace_id: str, contact_id: str, phone: str = "") -> Any:
        self.contact_reads += 1
        return await self.inner.get_contact(workspace_id, contact_id, phone)

    async def send_sms(self, workspace_id: str, **kw: Any) -> Result:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        res = await self.inner.send_sms(workspace_id, **kw)
        self.sent.append(kw["request_id"])
        if self.crash_after_send:
            raise Killed
        return res


@pytest.fixture(scope="module")
async def fstack(db_url: str, make_workspace: Any) -> AsyncIterator[Stack]:
    # The stack's own engine plays the other replica's timer worker; no consumer runs.
    s = await make_stack(db_url, make_workspace, datetime(2026, 6, 2, 16, 0, tzinfo=UTC), consume=False)
    await s.campaign.live("fresh", FLOW)
    yield s
    await s.close()


def replica(s: Stack) -> tuple[Engine, Wrapped]:
    """A second engine on the same database that runs fresh enrollments in-process (as production does)."""
    fx = Wrapped(s.campaign.server.runtime.state["effects"])
    return Engine(s.campaign.server.runtime.pool, fx, s.clock, run_fresh=True), fx


async def new_contact(s: Stack, n: int) -> str:
    user = f"fresh-{n}-{uuid.uuid4().hex[:6]}"
    phone = f"+1212556{n:04d}"
    ev = s.event("", user=user, traits={"phone": phone, "first_name": f"F{n}"}, phone=phone)
    resp = await s.id_stub.RecordEvents(id_pb.RecordEventsRequest(events=[ev]), metadata=s.imd())
    return resp.results[0].contact_id


async def deliver(s: Stack, engine: Engine, contact_id: str, name: str) -> None:
    """Hand the engine one event of the contact as the stream would (the stored cursor moves on)."""
    ev = event_pb2.Event(type=event_pb2.EVENT_TYPE_TRACK, name=name, message_id=str(uuid.uuid4()))
    ev.timestamp.FromDatetime(s.clock.now())
    before = await repository.get_cursor(engine.pool, CONSUMER)
    stored = id_pb.StoredEvent(event=ev, workspace_id=s.workspace_id, contact_id=contact_id)
    await engine.handle_events([stored], before, f"{before}+1")


async def enrollment(s: Stack, contact_id: str) -> pb.Enrollment:
    resp = await s.campaign.stub.ListEnrollments(
        pb.ListEnrollmentsRequest(contact_id=contact_id), metadata=s.campaign.md
    )
    assert len(resp.enrollments) == 1
    return resp.enrollments[0]


async def stored_sms(db_url: str, request_id: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM messaging.messages WHERE request_id = $1", request_id))
    finally:
        await conn.close()


async def test_first_step_runs_right_after_the_enrolling_commit(fstack: Stack, db_url: str) -> None:
    s = fstack
    engine, fx = replica(s)
    contact = await new_contact(s, 1)
    await deliver(s, engine, contact, "Signed Up")
    assert await engine.run_fresh_queued() == 1
    e = await enrollment(s, contact)
    request_id = f"{e.id}:hello:1"
    assert fx.sent == [request_id] and await stored_sms(db_url, request_id) == 1
    # The contact was read once, beside the enrollment commit; the step waits at its timer now.
    assert fx.contact_reads == 1
    assert e.current_step_id == "later" and [(h.step_id, h.outcome) for h in e.history] == [
        ("hello", "sent"),
        ("later", "waiting"),
    ]
    # Nothing is left for a timer worker.
    assert await s.engine.run_due() == 0


async def test_crash_between_commit_and_send_is_sent_once_by_the_timer_fallback(fstack: Stack, db_url: str) -> None:
    s = fstack
    engine, fx = replica(s)
    contact = await new_contact(s, 2)
    await deliver(s, engine, contact, "Signed Up")
    # The replica dies before its fresh run claims the row: the enrollment is committed and due.
    engine._fresh.clear()
    assert await s.engine.run_due() == 1
    e = await enrollment(s, contact)
    assert fx.sent == [] and await stored_sms(db_url, f"{e.id}:hello:1") == 1
    assert [h.step_id for h in e.history] == ["hello", "later"]


async def test_crash_after_send_before_commit_is_not_sent_twice(fstack: Stack, db_url: str) -> None:
    s = fstack
    engine, fx = replica(s)
    fx.crash_after_send = True
    contact = await new_contact(s, 3)
    await deliver(s, engine, contact, "Signed Up")
    with pytest.raises(Killed):
        await engine.run_fresh_queued()
    e = await enrollment(s, contact)
    request_id = f"{e.id}:hello:1"
    # Messaging stored it; our transaction rolled back, so the step is still due at the same visit.
    assert fx.sent == [request_id] and await stored_sms(db_url, request_id) == 1
    assert e.current_step_id == "hello" and list(e.history) == []
    assert await s.engine.run_due() == 1
    e = await enrollment(s, contact)
    # The fallback sent with the same request id: messaging returned the first message.
    assert await stored_sms(db_url, request_id) == 1
    assert [(h.step_id, h.visit, h.outcome) for h in e.history] == [("hello", 1, "sent"), ("later", 1, "waiting")]


async def test_a_timer_worker_skips_a_row_the_fresh_run_holds(fstack: Stack, db_url: str) -> None:
    s = fstack
    engine, fx = replica(s)
    fx.gate = asyncio.Event()
    contact = await new_contact(s, 4)
    await deliver(s, engine, contact, "Signed Up")
    running = asyncio.create_task(engine.run_fresh_queued())
    try:
        await asyncio.wait_for(fx.entered.wait(), 10)
        # Mid-send, the row is locked: the other replica's worker passes it by.
        assert await s.engine.run_due() == 0
    finally:
        fx.gate.set()
    assert await running == 1
    assert await s.engine.run_due() == 0
    e = await enrollment(s, contact)
    assert await stored_sms(db_url, f"{e.id}:hello:1") == 1 and len(fx.sent) == 1


async def test_exit_event_before_the_fresh_run_stops_the_send(fstack: Stack, db_url: str) -> None:
    s = fstack
    engine, fx = replica(s)
    contact = await new_contact(s, 5)
    await deliver(s, engine, contact, "Signed Up")
    await deliver(s, engine, contact, "Unsubscribed")
    assert await engine.run_fresh_queued() == 0
    e = await enrollment(s, contact)
    assert e.state == pb.ENROLLMENT_STATE_EXITED and e.exit_reason == "exit_event:Unsubscribed"
    assert fx.sent == [] and await stored_sms(db_url, f"{e.id}:hello:1") == 0
    assert await s.engine.run_due() == 0


async def test_a_consumer_with_a_stale_cursor_commits_nothing(fstack: Stack) -> None:
    s = fstack
    engine, _ = replica(s)
    contact = await new_contact(s, 6)
    before = await repository.get_cursor(engine.pool, CONSUMER)
    await engine.handle_events([], before, f"{before}+0")
    ev = event_pb2.Event(type=event_pb2.EVENT_TYPE_TRACK, name="Signed Up", message_id=str(uuid.uuid4()))
    stale = id_pb.StoredEvent(event=ev, workspace_id=s.workspace_id, contact_id=contact)
    # Another consumer already moved the cursor past ``before``: this batch must not enroll anyone.
    with pytest.raises(repository.CursorMoved):
        await engine.handle_events([stale], before, f"{before}+1")
    resp = await s.campaign.stub.ListEnrollments(pb.ListEnrollmentsRequest(contact_id=contact), metadata=s.campaign.md)
    assert list(resp.enrollments) == []
    assert await engine.run_fresh_queued() == 0


AGAIN = {
    "trigger": {"event": {"name": "Visited"}},
    "re_entry": {"policy": "any_time"},
    "exit_events": [{"name": "Left v1"}],
    "steps": [{"id": "rest", "wait": {"duration": "1d"}}],
}


async def test_enrollments_are_read_only_where_they_matter_and_still_decide(campaigns_only: Campaigns) -> None:
    """An any_time trigger skips reading the contact's enrollments; exits of older versions still apply."""
    c = campaigns_only
    campaign = await c.live("again", AGAIN)
    await feed(c, stored(c, "a1", "Visited"))
    # A second trigger while the first enrollment is active: the insert meets it and enrolls nobody.
    await feed(c, stored(c, "a1", "Visited"))
    resp = await c.stub.ListEnrollments(pb.ListEnrollmentsRequest(campaign_id=campaign.id), metadata=c.md)
    assert [e.contact_id for e in resp.enrollments] == ["a1"]
    # Version 2 has no exit events; the running version-1 enrollment still exits on its own.
    changed = pb.Campaign(id=campaign.id, name="again", definition=campaign.definition)
    del changed.definition.exit_events[:]
    await c.stub.UpdateCampaign(pb.UpdateCampaignRequest(campaign=changed), metadata=c.md)
    await c.stub.PublishCampaign(pb.PublishCampaignRequest(campaign_id=campaign.id), metadata=c.md)
    await feed(c, stored(c, "a1", "Left v1"))
    e = (await c.stub.ListEnrollments(pb.ListEnrollmentsRequest(campaign_id=campaign.id), metadata=c.md)).enrollments
    assert len(e) == 1 and e[0].state == pb.ENROLLMENT_STATE_EXITED and e[0].exit_reason == "exit_event:Left v1"
    # Ended, so the next trigger enrolls again, on version 2.
    await feed(c, stored(c, "a1", "Visited"))
    e = (await c.stub.ListEnrollments(pb.ListEnrollmentsRequest(campaign_id=campaign.id), metadata=c.md)).enrollments
    assert sorted((x.version, x.state) for x in e) == [
        (1, pb.ENROLLMENT_STATE_EXITED),
        (2, pb.ENROLLMENT_STATE_ACTIVE),
    ]
