"""Batches of one process that share some users: the rest of the later batch goes ahead."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from parley.common.v1.event_pb2 import Event, EventType
from parley.identity.v1 import identity_service_pb2 as ipb

from services.common.db import create_pool
from services.identity import record
from services.identity.inflight import InFlight, group_events
from services.identity.resolve import USER
from tests.helpers import MakeWorkspace
from tests.identity.conftest import BASE_TIME, Identity, Tenant, event, identify, track, uid


def test_events_sharing_an_id_a_phone_or_a_message_id_form_one_group() -> None:
    # Keys: 1, 2 users; 3 a phone; 4, 5 other users. Event 2 links user 2 to the phone,
    # event 3 repeats event 0's message id, event 4 is on its own.
    groups = group_events([[1], [2], [2, 3], [4], [5]], ["m0", "m1", "m2", "m0", "m4"])
    g = groups.of_event
    assert g[1] == g[2] and g[0] == g[3]
    assert len({g[0], g[1], g[4]}) == 3
    assert groups.split(set()) == ([0, 1, 2, 3, 4], [])
    # The phone is busy: both events of its group wait, the rest goes ahead.
    assert groups.split({3}) == ([0, 3, 4], [1, 2])
    # A message id repeated across groups keeps its copies together.
    assert groups.split({4}) == ([1, 2, 4], [0, 3])


async def test_a_claim_knows_the_earlier_batches_it_shares_keys_with() -> None:
    in_flight = InFlight()
    first = in_flight.claim([1, 2])
    second = in_flight.claim([2, 3])
    third = in_flight.claim([3, 4])
    assert (first.busy, second.busy, third.busy) == (set(), {2}, {3})
    assert second.earlier == {first.done} and third.earlier == {second.done}
    in_flight.release(first)
    assert first.done.done()
    await asyncio.wait_for(second.wait_for_earlier(within=5), 1)
    in_flight.release(second)
    in_flight.release(third)
    assert len(in_flight) == 0
    # The wait is bounded: a batch that never ends does not hold a later one forever.
    stuck = in_flight.claim([9])
    later = in_flight.claim([9])
    await asyncio.wait_for(later.wait_for_earlier(within=0.05), 1)
    assert not stuck.done.done()


async def test_the_unshared_events_of_a_batch_are_written_while_an_earlier_batch_holds_the_shared_ones(
    identity: Identity, tenant: Tenant
) -> None:
    ws = tenant.workspace.id
    shared, alone = uid(), uid()
    # Locks are taken in key order: with the unshared user's key after the shared one's, a batch
    # that took all its locks at once would wait before it could take the unshared one.
    while record._lock_key(ws, USER, alone) < record._lock_key(ws, USER, shared):
        alone = uid()
    pool = await create_pool(identity.db_url, max_size=4)
    writer = record.BatchWriter(pool)
    in_flight = writer.in_flight
    try:
        async with pool.acquire() as earlier:
            # An earlier batch of this process: it claimed the shared user's key and holds its lock.
            key = record._lock_key(ws, USER, shared)
            claim = in_flight.claim([key])
            tx = earlier.transaction()
            await tx.start()
            await earlier.execute("SELECT pg_advisory_xact_lock($1)", key)
            batch = [track("Clicked", user_id=shared), identify({"plan": "gold"}, user_id=alone)]
            later = asyncio.create_task(writer.record(ws, batch))
            # The later batch locks and writes the unshared user's event, then waits for the earlier one.
            alone_key = record._lock_key(ws, USER, alone)
            async with pool.acquire() as watcher:
                for _ in range(200):
                    if await _holds_advisory_lock(watcher, alone_key):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the unshared part never took its lock while the earlier batch ran")
                await asyncio.sleep(0.1)
                assert not later.done()
                assert not await _holds_advisory_lock(
                    watcher, key, exclude=await earlier.fetchval("SELECT pg_backend_pid()")
                )
            await tx.commit()
            in_flight.release(claim)
        outcomes = await asyncio.wait_for(later, 30)
    finally:
        await pool.close()
    assert [o.duplicate for o in outcomes] == [False, False]
    users = await identity.stub.GetUser(_get_user(shared), metadata=tenant.md)
    assert [e.event.message_id for e in users.events] == [batch[0].message_id]
    other = await identity.stub.GetUser(_get_user(alone), metadata=tenant.md)
    assert [e.event.message_id for e in other.events] == [batch[1].message_id]


async def _holds_advisory_lock(conn: asyncpg.Connection, key: int, exclude: int = 0) -> bool:
    return bool(
        await conn.fetchval(
            """SELECT EXISTS (SELECT 1 FROM pg_locks
                               WHERE locktype = 'advisory' AND granted AND pid <> $2
                                 AND ((classid::int8 << 32) | objid::int8) = $1)""",
            key,
            exclude,
        )
    )


def _get_user(user_id: str) -> ipb.GetUserRequest:
    return ipb.GetUserRequest(user_id=user_id)


P1, P2 = "+14155550101", "+14155550102"


def _at(seconds: int) -> Any:
    return BASE_TIME + timedelta(seconds=seconds)


def _one_user_two_ids() -> tuple[list[list[Event]], list[Event], str]:
    """A stored user known by an anonymous id and a user id; the batch names each in its own event."""
    x, y = uid("a"), uid("u")
    setup = [[identify({}, anonymous_id=x, user_id=y, at=_at(0))]]
    batch = [track("Later, no phone", anonymous_id=x, at=_at(20)), identify({"n": 1}, user_id=y, phone=P1, at=_at(10))]
    return setup, batch, y


def _a_join_and_a_third_id() -> tuple[list[list[Event]], list[Event], str]:
    """The batch joins a stored user into another; a second event names a third id of the joined one."""
    x1, x3, y2 = uid("a"), uid("a"), uid("u")
    setup = [
        [event(EventType.EVENT_TYPE_ALIAS, anonymous_id=x1, previous_id=x3, at=_at(0))],
        [identify({}, anonymous_id=x1, phone=P1, at=_at(1))],
        [identify({}, user_id=y2, phone=P2, at=_at(10))],
    ]
    batch = [
        identify({}, anonymous_id=x1, user_id=y2, at=_at(20)),
        track("After the join", anonymous_id=x3, at=_at(30)),
    ]
    return setup, batch, y2


@pytest.mark.parametrize("scenario", [_one_user_two_ids, _a_join_and_a_third_id])
async def test_groups_linked_by_a_stored_user_mean_what_the_whole_batch_means(
    identity: Identity, make_workspace: MakeWorkspace, scenario: Any
) -> None:
    """Groups share no id of the batch, yet a stored user can link them: split, the later part
    would be resolved after the first whatever the event times. Such a batch runs unsplit."""

    async def run(with_earlier_batch: bool) -> list[tuple[str | None, str | None, str | None]]:
        tenant = await identity.tenant(make_workspace)
        ws = tenant.workspace.id
        setup, batch, busy_user = scenario()
        pool = await create_pool(identity.db_url, max_size=3)
        try:
            writer = record.BatchWriter(pool)
            for b in setup:
                await writer.record(ws, b)
            if with_earlier_batch:  # one of the batch's user ids is claimed for a moment
                claim = writer.in_flight.claim([record._lock_key(ws, USER, busy_user)])
                asyncio.get_running_loop().call_later(0.2, writer.in_flight.release, claim)
            outcomes = await writer.record(ws, batch)
            async with pool.acquire() as conn:
                rows = await conn.fetch(
                    """SELECT e.message_id, c.phone, rc.phone AS recorded
                         FROM identity.events e
                         LEFT JOIN identity.contacts c ON c.workspace_id = e.workspace_id AND c.id = e.contact_id
                         LEFT JOIN identity.contacts rc
                                ON rc.workspace_id = e.workspace_id AND rc.id = e.recorded_contact_id
                        WHERE e.workspace_id = $1::uuid""",
                    ws,
                )
                phones = dict(
                    await conn.fetch("SELECT id, phone FROM identity.contacts WHERE workspace_id = $1::uuid", ws)
                )
        finally:
            await pool.close()
        stored = {r["message_id"]: (r["phone"], r["recorded"]) for r in rows}
        return [(phones.get(o.contact_id), *stored[e.message_id]) for e, o in zip(batch, outcomes, strict=True)]

    assert await run(with_earlier_batch=True) == await run(with_earlier_batch=False)
