"""A stored version that does not parse is logged and skipped: the consumer keeps going.

Versions are immutable, so such a row stays broken; what must not happen is the consumer
raising on every batch (the stream would stall for every campaign). Enrollments already on
that version are kept and retried, not ended.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from parley.campaign.v1 import campaign_service_pb2 as pb
from parley.common.v1 import event_pb2
from parley.identity.v1 import identity_service_pb2 as id_pb

from services.campaign import repository
from services.campaign.engine import CONSUMER, Engine
from tests.campaign.conftest import Stack
from tests.campaign.test_fresh_runs import Wrapped, fstack, new_contact

__all__ = ["fstack"]

BROKEN = {
    "trigger": {"event": {"name": "Broken Up"}},
    "re_entry": {"policy": "any_time"},
    "steps": [{"id": "rest", "wait": {"duration": "1d"}}],
}


@pytest.fixture
async def broken(fstack: Stack, db_url: str) -> AsyncIterator[pb.Campaign]:
    campaign = await fstack.campaign.live("broken", BROKEN)
    yield campaign
    original = _saved.pop(campaign.id, None)
    if original is None:
        return
    conn = await asyncpg.connect(db_url)
    try:
        # Put the row back as it was stored, for any engine that reads versions later.
        await conn.execute(
            "UPDATE campaign.campaign_versions SET definition = $1::jsonb WHERE campaign_id = $2",
            original,
            uuid.UUID(campaign.id),
        )
    finally:
        await conn.close()


_saved: dict[str, str] = {}


async def _corrupt(db_url: str, campaign: pb.Campaign) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        _saved[campaign.id] = await conn.fetchval(
            "SELECT definition::text FROM campaign.campaign_versions WHERE campaign_id = $1", uuid.UUID(campaign.id)
        )
        await conn.execute(
            """UPDATE campaign.campaign_versions SET definition = '{"steps": "not a list"}'::jsonb
               WHERE campaign_id = $1""",
            uuid.UUID(campaign.id),
        )
    finally:
        await conn.close()


def _ev(s: Stack, contact_id: str, name: str) -> id_pb.StoredEvent:
    ev = event_pb2.Event(type=event_pb2.EVENT_TYPE_TRACK, name=name, message_id=str(uuid.uuid4()))
    ev.timestamp.FromDatetime(s.clock.now())
    return id_pb.StoredEvent(event=ev, workspace_id=s.workspace_id, contact_id=contact_id)


async def _batch(engine: Engine, events: list[id_pb.StoredEvent]) -> int:
    before = await repository.get_cursor(engine.pool, CONSUMER)
    return await engine.handle_events(events, before, f"{before}+{len(events)}")


async def test_an_unparsable_version_is_skipped_not_fatal(fstack: Stack, broken: pb.Campaign, db_url: str) -> None:
    s = fstack
    pool = s.campaign.server.runtime.pool
    fx = Wrapped(s.campaign.server.runtime.state["effects"])
    # Enrolled while the version still parsed; a replica that reads it afterwards cannot.
    held = await new_contact(s, 95)
    assert await _batch(Engine(pool, fx, s.clock), [_ev(s, held, "Broken Up")]) == 1
    await _corrupt(db_url, broken)
    engine = Engine(pool, fx, s.clock)
    contact = await new_contact(s, 96)
    # Other campaigns still enroll; the broken one is skipped.
    assert await _batch(engine, [_ev(s, contact, "Signed Up"), _ev(s, contact, "Broken Up")]) == 1
    resp = await s.campaign.stub.ListEnrollments(pb.ListEnrollmentsRequest(contact_id=contact), metadata=s.campaign.md)
    assert [e.campaign_id for e in resp.enrollments] != [broken.id] and len(resp.enrollments) == 1
    # The enrollment on the broken version is kept and retried later, not ended.
    assert await engine.run_due() >= 1
    row = await pool.fetchrow(
        "SELECT state, attempts FROM campaign.enrollments WHERE campaign_id = $1 AND contact_id = $2",
        uuid.UUID(broken.id),
        held,
    )
    assert row["state"] == "active" and row["attempts"] >= 1
