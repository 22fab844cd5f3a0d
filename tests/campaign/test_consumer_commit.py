"""What the consumer's commit inserts decides what it reports and what it runs at once.

A batch may end a contact's enrollment and trigger the same campaign again; a trigger may meet
an active enrollment the unique index keeps; more fresh rows may arrive than the in-process queue
holds. In each case the count returned, the fresh queue and the timer fallback follow the rows
the commit actually wrote.
"""

from __future__ import annotations

import asyncio
from typing import Any

from parley.campaign.v1 import campaign_service_pb2 as pb

from services.campaign.engine import Engine
from tests.campaign.conftest import Stack, consume, track_event
from tests.campaign.test_fresh_runs import Wrapped, deliver, fstack, new_contact, replica, stored_sms

__all__ = ["fstack"]


async def _enrollments(s: Stack, contact_id: str) -> list[Any]:
    resp = await s.campaign.stub.ListEnrollments(
        pb.ListEnrollmentsRequest(contact_id=contact_id), metadata=s.campaign.md
    )
    return list(resp.enrollments)


async def test_exit_then_trigger_in_one_batch_enrolls_again(fstack: Stack, db_url: str) -> None:
    s = fstack
    engine, fx = replica(s)
    contact = await new_contact(s, 71)
    await deliver(s, engine, contact, "Signed Up")
    assert await engine.run_fresh_queued() == 1
    # The exit ends the running enrollment; the trigger after it (any_time) must enroll anew.
    n = await consume(engine, [track_event(s, contact, "Unsubscribed"), track_event(s, contact, "Signed Up")])
    assert n == 1
    rows = await _enrollments(s, contact)
    assert sorted((e.state, e.exit_reason) for e in rows) == sorted(
        [(pb.ENROLLMENT_STATE_EXITED, "exit_event:Unsubscribed"), (pb.ENROLLMENT_STATE_ACTIVE, "")]
    )
    # The new enrollment's first step runs at once, and sends.
    assert await engine.run_fresh_queued() == 1
    new = next(e for e in await _enrollments(s, contact) if e.state == pb.ENROLLMENT_STATE_ACTIVE)
    assert await stored_sms(db_url, f"{new.id}:hello:1") == 1 and len(fx.sent) == 2


async def test_a_trigger_the_unique_index_refuses_is_not_counted_or_queued(fstack: Stack) -> None:
    s = fstack
    engine, _ = replica(s)
    contact = await new_contact(s, 72)
    assert await consume(engine, [track_event(s, contact, "Signed Up")]) == 1
    assert await engine.run_fresh_queued() == 1
    # Active still: an any_time trigger's insert meets the index, so nothing was enrolled.
    assert await consume(engine, [track_event(s, contact, "Signed Up")]) == 0
    assert engine._fresh == []
    assert len(await _enrollments(s, contact)) == 1


async def test_fresh_queue_overflow_runs_once_through_the_timer_path(fstack: Stack, db_url: str) -> None:
    s = fstack
    fx = Wrapped(s.campaign.server.runtime.state["effects"])
    engine = Engine(s.campaign.server.runtime.pool, fx, s.clock, run_fresh=True, fresh_queue_max=1)
    contacts = [await new_contact(s, 80 + i) for i in range(3)]
    assert await consume(engine, [track_event(s, c, "Signed Up") for c in contacts]) == 3
    # One queued; the other two are left to the due timer rows.
    assert len(engine._fresh) == 1 and engine.fresh_dropped == 2
    assert await engine.run_fresh_queued() == 1
    assert await s.engine.run_due() == 2
    assert await s.engine.run_due() == 0 and await engine.run_fresh_queued() == 0
    for c in contacts:
        (e,) = await _enrollments(s, c)
        assert e.current_step_id == "later"
        assert await stored_sms(db_url, f"{e.id}:hello:1") == 1
        assert [(h.step_id, h.outcome) for h in e.history] == [("hello", "sent"), ("later", "waiting")]


class GatedReads(Wrapped):
    """Contact reads that wait for a gate, so a test can see whether they were cancelled."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.reads: list[asyncio.Task[Any]] = []
        self.read_gate = asyncio.Event()

    async def get_contact(self, workspace_id: str, contact_id: str, phone: str = "") -> Any:
        task = asyncio.current_task()
        assert task is not None
        self.reads.append(task)
        await self.read_gate.wait()
        return await super().get_contact(workspace_id, contact_id, phone)


async def test_the_contact_read_of_a_refused_trigger_is_cancelled(fstack: Stack) -> None:
    s = fstack
    first, _ = replica(s)
    contact = await new_contact(s, 73)
    assert await consume(first, [track_event(s, contact, "Signed Up")]) == 1
    assert await first.run_fresh_queued() == 1
    fx = GatedReads(s.campaign.server.runtime.state["effects"])
    engine = Engine(s.campaign.server.runtime.pool, fx, s.clock, run_fresh=True)
    try:
        # The read starts beside the commit; the insert then meets the active enrollment.
        assert await consume(engine, [track_event(s, contact, "Signed Up")]) == 0
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(fx.reads) == 1 and fx.reads[0].cancelled()
    finally:
        fx.read_gate.set()


COOLDOWN = {
    "trigger": {"event": {"name": "Joined Club"}},
    "re_entry": {"policy": "after_cooldown", "cooldown": "30d"},
    "send_window": {"start": "00:00", "end": "23:59"},
    "steps": [{"id": "hi", "send_sms": {"body": "Hi", "transactional": True}}],
}


async def test_the_contact_read_of_a_trigger_turned_away_by_re_entry_is_cancelled(fstack: Stack) -> None:
    s = fstack
    await s.campaign.live("cooldown", COOLDOWN)
    first, _ = replica(s)
    first.campaigns_changed()
    contact = await new_contact(s, 74)
    assert await consume(first, [track_event(s, contact, "Joined Club")]) == 1
    assert await first.run_fresh_queued() == 1
    fx = GatedReads(s.campaign.server.runtime.state["effects"])
    engine = Engine(s.campaign.server.runtime.pool, fx, s.clock, run_fresh=True)
    try:
        # Within the cooldown: the plan enrolls nobody, so the read started for it serves nothing.
        assert await consume(engine, [track_event(s, contact, "Joined Club")]) == 0
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(fx.reads) == 1 and fx.reads[0].cancelled()
    finally:
        fx.read_gate.set()
