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
from services.identity.inflight import EarlierBatchBlocked, InFlight, group_events
from services.identity.resolve import ANONYMOUS, USER
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


async def test_a_claim_knows_the_earlier_batches_and_the_keys_it_shares_with_them() -> None:
    in_flight = InFlight()
    first = in_flight.claim("w", [1, 2])
    second = in_flight.claim("w", [2, 3])
    third = in_flight.claim("w", [4])
    assert (first.busy, second.busy, third.busy) == (set(), {2}, set())
    assert (first.earlier, second.earlier, third.earlier) == ([], [first], [first, second])

    async def not_blocked(pids: list[int]) -> bool:
        return False

    in_flight.release(first)
    assert first.done.done()
    waiting = asyncio.create_task(third.wait_for_earlier(not_blocked, within=5, poll=0.01))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the second batch is still running
    in_flight.release(second)
    await asyncio.wait_for(waiting, 1)
    in_flight.release(third)
    assert len(in_flight) == 0
    # The wait is bounded: a batch that never ends does not hold a later one forever.
    stuck = in_flight.claim("w", [9])
    later = in_flight.claim("w", [9])
    await asyncio.wait_for(later.wait_for_earlier(not_blocked, within=0.05, poll=0.01), 1)
    assert not stuck.done.done()


async def test_claims_see_their_own_workspace_only_and_forget_the_earlier_ones_when_released() -> None:
    in_flight = InFlight()
    first = in_flight.claim("w1", [1])
    other = in_flight.claim("w2", [2])
    second = in_flight.claim("w1", [3])
    assert (other.earlier, second.earlier) == ([], [first])
    # A released claim lets go of the ones before it, or under steady load each new claim would
    # keep every claim since the process was last idle alive.
    in_flight.release(first)
    in_flight.release(second)
    assert second.earlier == [] and len(in_flight) == 1
    in_flight.release(other)
    assert len(in_flight) == 0


async def test_a_batch_gives_way_when_an_earlier_one_waits_for_its_lock() -> None:
    in_flight = InFlight()
    earlier = in_flight.claim("w", [1])
    earlier.pid = 4242
    later = in_flight.claim("w", [2])
    asked: list[list[int]] = []

    async def blocked(pids: list[int]) -> bool:
        asked.append(pids)
        return True

    with pytest.raises(EarlierBatchBlocked):
        await asyncio.wait_for(later.wait_for_earlier(blocked, within=5, poll=0.01), 1)
    assert asked == [[4242]]


async def test_the_unshared_events_of_a_batch_are_written_while_an_earlier_batch_holds_the_shared_ones(
    identity: Identity, tenant: Tenant
) -> None:
    ws = tenant.workspace.id
    shared, alone = uid(), uid()
    # Locks are taken in key order: with the unshared user's key after the shared one's, a batch
    # that took all its locks at once would wait before it could take the unshared one.
    while record._lock_keys(ws)(USER, alone) < record._lock_keys(ws)(USER, shared):
        alone = uid()
    pool = await create_pool(identity.db_url, max_size=4)
    writer = record.BatchWriter(pool)
    in_flight = writer.in_flight
    try:
        async with pool.acquire() as earlier:
            # An earlier batch of this process: it claimed the shared user's key and holds its lock.
            key = record._lock_keys(ws)(USER, shared)
            claim = in_flight.claim(ws, [key])
            tx = earlier.transaction()
            await tx.start()
            await earlier.execute("SELECT pg_advisory_xact_lock($1)", key)
            batch = [track("Clicked", user_id=shared), identify({"plan": "gold"}, user_id=alone)]
            later = asyncio.create_task(writer.record(ws, batch))
            # The later batch locks and writes the unshared user's event, then waits for the earlier one.
            alone_key = record._lock_keys(ws)(USER, alone)
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
    setup = [[identify({}, anonymous_id="a", user_id="u", at=_at(0), message_id="s0")]]
    batch = [
        track("Later, no phone", anonymous_id="a", at=_at(20), message_id="b0"),
        identify({"n": 1}, user_id="u", phone=P1, at=_at(10), message_id="b1"),
    ]
    return setup, batch, "u"


def _a_join_and_a_third_id() -> tuple[list[list[Event]], list[Event], str]:
    """The batch joins a stored user into another; a second event names a third id of the joined one."""
    setup = [
        [event(EventType.EVENT_TYPE_ALIAS, anonymous_id="x1", previous_id="x3", at=_at(0), message_id="s0")],
        [identify({}, anonymous_id="x1", phone=P1, at=_at(1), message_id="s1")],
        [identify({}, user_id="y2", phone=P2, at=_at(10), message_id="s2")],
    ]
    batch = [
        identify({}, anonymous_id="x1", user_id="y2", at=_at(20), message_id="b0"),
        track("After the join", anonymous_id="x3", at=_at(30), message_id="b1"),
    ]
    return setup, batch, "y2"


def _stored_user_with_two_anonymous_ids() -> list[list[Event]]:
    return [
        [track("Seen", anonymous_id="a1", at=_at(0), message_id="s0")],
        [event(EventType.EVENT_TYPE_ALIAS, anonymous_id="a1", previous_id="a2", at=_at(1), message_id="s1")],
    ]


def _joined_into_a_new_user_then_a_phone() -> tuple[list[list[Event]], list[Event], str]:
    """The first part joins a stored user into a user it creates; the later part names the stored
    user's other id, which the join moved to the new user."""
    batch = [
        track("X", anonymous_id="a2", phone=P2, at=_at(10), message_id="b0"),
        identify({"k": 1}, user_id="u1", phone=P1, at=_at(20), message_id="b1"),
        track("Z", user_id="u1", anonymous_id="a1", at=_at(30), message_id="b2"),
    ]
    return _stored_user_with_two_anonymous_ids(), batch, "a2"


def _joined_into_a_new_user_then_another_user_id() -> tuple[list[list[Event]], list[Event], str]:
    batch = [
        identify({"who": "u2"}, user_id="u2", anonymous_id="a2", at=_at(10), message_id="b0"),
        identify({"who": "u1"}, user_id="u1", at=_at(20), message_id="b1"),
        track("Z", user_id="u1", anonymous_id="a1", at=_at(30), message_id="b2"),
    ]
    return _stored_user_with_two_anonymous_ids(), batch, "a2"


async def _snapshot(conn: asyncpg.Connection, ws: str, outcomes: list[Any]) -> dict[str, Any]:
    """Everything the batch decided, named by phones, ids and message ids (not generated keys)."""
    rows = await conn.fetch("SELECT kind, external_id, user_key FROM identity.identities WHERE workspace_id = $1", ws)
    names: dict[Any, list[str]] = {}
    for r in rows:
        names.setdefault(r["user_key"], []).append(f"{r['kind']}:{r['external_id']}")
    user = {k: tuple(sorted(v)) for k, v in names.items()}
    contacts = await conn.fetch("SELECT id, phone, properties FROM identity.contacts WHERE workspace_id = $1", ws)
    phone = {r["id"]: r["phone"] for r in contacts}
    users = await conn.fetch(
        """SELECT user_key, contact_id, identified, traits FROM identity.users
            WHERE workspace_id = $1 AND merged_into IS NULL""",
        ws,
    )
    events = await conn.fetch(
        """SELECT message_id, user_key, contact_id, recorded_contact_id FROM identity.events
            WHERE workspace_id = $1 ORDER BY xid, seq""",
        ws,
    )
    links = await conn.fetch("SELECT contact_id, user_key FROM identity.contact_users WHERE workspace_id = $1", ws)
    stream_by_user: dict[Any, list[str]] = {}
    stream_by_contact: dict[Any, list[str]] = {}
    for e in events:
        stream_by_user.setdefault(user.get(e["user_key"]), []).append(e["message_id"])
        stream_by_contact.setdefault(phone.get(e["recorded_contact_id"]), []).append(e["message_id"])
    return {
        "reported": [phone.get(o.contact_id) for o in outcomes],
        "events": sorted(
            (e["message_id"], phone.get(e["contact_id"]), phone.get(e["recorded_contact_id"]), user.get(e["user_key"]))
            for e in events
        ),
        "users": sorted(
            (user.get(u["user_key"]), phone.get(u["contact_id"]), u["identified"], u["traits"]) for u in users
        ),
        "contacts": sorted((c["phone"], str(c["properties"])) for c in contacts),
        "contact_users": sorted((phone.get(r["contact_id"]), user.get(r["user_key"])) for r in links),
        "stream_by_user": stream_by_user,
        "stream_by_contact": stream_by_contact,
    }


@pytest.mark.parametrize(
    ("scenario", "busy_kind"),
    [
        (_one_user_two_ids, USER),
        (_a_join_and_a_third_id, USER),
        (_joined_into_a_new_user_then_a_phone, ANONYMOUS),
        (_joined_into_a_new_user_then_another_user_id, ANONYMOUS),
    ],
)
async def test_groups_linked_by_stored_users_mean_what_the_whole_batch_means(
    identity: Identity, make_workspace: MakeWorkspace, scenario: Any, busy_kind: str
) -> None:
    """Groups share no id of the batch, yet stored users can link them: split, the later part
    would be resolved after the first whatever the event times. Such a batch runs unsplit."""

    async def run(with_earlier_batch: bool) -> dict[str, Any]:
        tenant = await identity.tenant(make_workspace)
        ws = tenant.workspace.id
        setup, batch, busy_id = scenario()
        pool = await create_pool(identity.db_url, max_size=3)
        try:
            writer = record.BatchWriter(pool)
            for b in setup:
                await writer.record(ws, b)
            if with_earlier_batch:  # one of the batch's ids is claimed for a moment
                claim = writer.in_flight.claim(ws, [record._lock_keys(ws)(busy_kind, busy_id)])
                asyncio.get_running_loop().call_later(0.2, writer.in_flight.release, claim)
            outcomes = await writer.record(ws, batch)
            async with pool.acquire() as conn:
                return await _snapshot(conn, ws, outcomes)
        finally:
            await pool.close()

    assert await run(with_earlier_batch=True) == await run(with_earlier_batch=False)


async def test_a_later_batch_gives_way_to_an_earlier_one_waiting_for_a_user_it_locked(
    identity: Identity, tenant: Tenant
) -> None:
    """The later batch reached a stored user through another id and locked it; the earlier batch
    then waits for that user while the later one waits for it to end. The later one must see
    this and give way at once, not after its bounded wait and a deadlock timeout."""
    ws = tenant.workspace.id
    pool = await create_pool(identity.db_url, max_size=4)
    try:
        writer = record.BatchWriter(pool)
        await writer.record(ws, [identify({}, anonymous_id="a", user_id="u")])
        async with pool.acquire() as conn:
            user_key = await conn.fetchval(
                "SELECT user_key FROM identity.identities WHERE workspace_id = $1 AND external_id = 'u'", ws
            )
        async with pool.acquire() as earlier:
            # An earlier batch of this process: it holds the key of user id "v" and will want user "u".
            v_key = record._lock_keys(ws)(USER, "v")
            claim = writer.in_flight.claim(ws, [v_key, record._lock_keys(ws)(USER, "u")])
            claim.pid = earlier.get_server_pid()
            tx = earlier.transaction()
            await tx.start()
            await earlier.execute("SELECT pg_advisory_xact_lock($1)", v_key)
            started = asyncio.get_running_loop().time()
            # The later batch: its "a" event goes ahead and locks the user; its "v" event waits.
            later = asyncio.create_task(writer.record(ws, [track("A", anonymous_id="a"), track("V", user_id="v")]))
            async with pool.acquire() as watcher:
                for _ in range(200):
                    locked = await watcher.fetchval(
                        """SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                                           WHERE c.relname = 'users' AND l.mode = 'RowShareLock' AND l.pid <> $1)""",
                        claim.pid,
                    )
                    if locked:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the later batch never locked the user")
            # Now the earlier batch wants the user the later one locked.
            await earlier.fetch(
                "SELECT 1 FROM identity.users WHERE workspace_id = $1 AND user_key = $2 FOR UPDATE", ws, user_key
            )
            gave_way = asyncio.get_running_loop().time() - started
            await tx.commit()
            writer.in_flight.release(claim)
        outcomes = await asyncio.wait_for(later, 30)
    finally:
        await pool.close()
    assert [o.duplicate for o in outcomes] == [False, False]
    assert gave_way < record.EARLIER_BATCH_WAIT  # without the check: the bounded wait, then a deadlock


async def test_ahead_of_an_earlier_batch_a_lock_wait_gives_up_and_the_batch_waits_its_turn(
    identity: Identity, tenant: Tenant
) -> None:
    """A later batch's event reaches, through an unclaimed id, a user an earlier batch of this
    process has locked: rather than queue in PostgreSQL (where it could close a cycle), it gives
    up within the ahead lock timeout and runs again once the earlier batch has ended."""
    ws = tenant.workspace.id
    pool = await create_pool(identity.db_url, max_size=4)
    try:
        writer = record.BatchWriter(pool)
        await writer.record(ws, [identify({}, anonymous_id="a", user_id="u")])
        async with pool.acquire() as earlier:
            claim = writer.in_flight.claim(ws, [record._lock_keys(ws)(USER, "u")])
            claim.pid = earlier.get_server_pid()
            tx = earlier.transaction()
            await tx.start()
            await earlier.execute(
                """SELECT 1 FROM identity.users u JOIN identity.identities i USING (workspace_id, user_key)
                    WHERE i.workspace_id = $1 AND i.external_id = 'u' FOR UPDATE OF u""",
                ws,
            )
            later = asyncio.create_task(writer.record(ws, [track("A", anonymous_id="a")]))
            await asyncio.sleep(0.5)  # ten lock timeouts
            async with pool.acquire() as watcher:
                queued = await watcher.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> $1", claim.pid
                )
            assert not later.done()
            assert queued == 0  # it waits for the earlier batch in the process, not in PostgreSQL
            await tx.commit()
            writer.in_flight.release(claim)
        [outcome] = await asyncio.wait_for(later, 30)
    finally:
        await pool.close()
    assert not outcome.duplicate


async def test_a_batch_run_wholly_ahead_commits_without_the_ahead_lock_timeout(
    identity: Identity, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT can wait for a lock too (a notifying transaction's): the 50 ms timeout is for the
    ahead part's own locks only."""
    ws = tenant.workspace.id
    seen: list[str] = []
    run = record._record

    async def checked(conn: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
        outcomes = await run(conn, *args, **kwargs)
        seen.append(await conn.fetchval("SHOW lock_timeout"))
        return outcomes

    monkeypatch.setattr(record, "_record", checked)
    pool = await create_pool(identity.db_url, max_size=2)
    try:
        writer = record.BatchWriter(pool)
        earlier = writer.in_flight.claim(ws, [12345])  # another batch in flight: this one runs ahead
        [outcome] = await writer.record(ws, [track("A", user_id=uid())])
        writer.in_flight.release(earlier)
    finally:
        await pool.close()
    assert not outcome.duplicate
    assert seen == ["0"]


def test_batches_stop_going_ahead_while_they_keep_giving_way_and_try_again_later() -> None:
    writer = record.BatchWriter(None)  # type: ignore[arg-type]  # no batch is stored here
    assert writer.goes_ahead("w")
    writer._note_ahead("w", gave_way=True)
    assert writer.goes_ahead("w")  # once is no pattern
    writer._note_ahead("w", gave_way=True)
    waited = 0
    while not writer.goes_ahead("w"):
        waited += 1
    assert 5 < waited < 50  # batches wait their turn for a while, then one goes ahead again
    assert writer.goes_ahead("other")  # per workspace
    for _ in range(30):
        writer._note_ahead("w", gave_way=False)
    assert writer._give_way == {}  # forgotten once it no longer happens
