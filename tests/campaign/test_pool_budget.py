"""A run never waits for a second pool connection while its transaction holds enrollment row locks.

Timer batches and fresh runs claim rows FOR UPDATE and keep the connection until their commit.
If a step then needed another connection (the frequency cap's count, a version read on a cache
miss) and lock waiters held the rest of the pool, nothing could move, and Postgres would see no
cycle. These runs get a pool of one connection: they must finish anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from parley.campaign.v1 import campaign_service_pb2 as pb

from services.campaign.engine import Engine
from services.campaign.module import open_runs_budget
from services.common.db import create_pool
from tests.campaign.conftest import Stack, consume, track_event
from tests.campaign.test_fresh_runs import Wrapped, fstack, new_contact, stored_sms

__all__ = ["fstack"]

CAPPED = {
    "trigger": {"event": {"name": "Capped Up"}},
    "re_entry": {"policy": "any_time"},
    "exit_events": [{"name": "Capped Out"}],
    "send_window": {"start": "00:00", "end": "23:59"},
    "frequency_cap": {"max_messages": 1, "period": "1d"},
    "steps": [
        {"id": "hello", "next": "later", "send_sms": {"body": "Hi {{contact.first_name}}", "transactional": True}},
        {"id": "later", "wait": {"duration": "1d"}},
    ],
}


@pytest.fixture(scope="module")
async def capped(fstack: Stack) -> pb.Campaign:
    return await fstack.campaign.live("capped", CAPPED)


@pytest.fixture
async def one_conn(db_url: str) -> AsyncIterator[Any]:
    pool = await create_pool(db_url, min_size=1, max_size=1)
    yield pool
    await pool.close()


async def _mine(s: Stack, contact_id: str, campaign: pb.Campaign) -> list[pb.Enrollment]:
    resp = await s.campaign.stub.ListEnrollments(
        pb.ListEnrollmentsRequest(contact_id=contact_id, campaign_id=campaign.id), metadata=s.campaign.md
    )
    return list(resp.enrollments)


async def test_frequency_cap_is_counted_on_the_runs_own_connection(
    fstack: Stack, capped: pb.Campaign, one_conn: Any, db_url: str
) -> None:
    s = fstack
    fx = Wrapped(s.campaign.server.runtime.state["effects"])
    engine = Engine(one_conn, fx, s.clock)
    # The version is cached: the only read a step makes is the cap's count.
    assert await engine.graph(s.workspace_id, capped.id, capped.live_version) is not None
    contact = await new_contact(s, 91)
    assert await consume(engine, [track_event(s, contact, "Capped Up")]) == 1
    assert await asyncio.wait_for(engine.run_due(), 15) == 1
    (first,) = await _mine(s, contact, capped)
    assert await stored_sms(db_url, f"{first.id}:hello:1") == 1
    # Exit and enroll again in one batch: the new enrollment's SMS is over the cap, so skipped.
    assert await consume(engine, [track_event(s, contact, "Capped Out"), track_event(s, contact, "Capped Up")]) == 1
    assert await asyncio.wait_for(engine.run_due(), 15) == 1
    second = next(e for e in await _mine(s, contact, capped) if e.state == pb.ENROLLMENT_STATE_ACTIVE)
    assert [(h.step_id, h.outcome) for h in second.history] == [("hello", "skipped"), ("later", "waiting")]
    assert await stored_sms(db_url, f"{second.id}:hello:1") == 0


async def test_a_fresh_run_reads_an_uncached_version_on_its_own_connection(
    fstack: Stack, capped: pb.Campaign, one_conn: Any, db_url: str
) -> None:
    s = fstack
    fx = Wrapped(s.campaign.server.runtime.state["effects"])
    engine = Engine(one_conn, fx, s.clock, run_fresh=True)
    contact = await new_contact(s, 92)
    assert await consume(engine, [track_event(s, contact, "Capped Up")]) == 1
    # A replica started after the publish has no graph cached for the run.
    engine._graphs.clear()
    assert await asyncio.wait_for(engine.run_fresh_queued(), 15) == 1
    (e,) = await _mine(s, contact, capped)
    assert await stored_sms(db_url, f"{e.id}:hello:1") == 1 and len(fx.sent) == 1


def test_every_pool_size_leaves_a_connection_beside_the_open_runs() -> None:
    for size in range(4, 64):
        runs = open_runs_budget(size)
        # Listener, consumer lock, and at least one for the consumer's batches and the API.
        assert runs >= 1 and runs + 3 <= size
