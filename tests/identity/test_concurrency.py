"""Many concurrent writers on overlapping users, anonymous ids and phones: no duplicates, no failures."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest
from parley.common.v1.event_pb2 import Event, EventStatus, EventType
from parley.identity.v1 import identity_service_pb2 as ipb

from services.common.db import create_pool
from services.identity import record
from tests.identity.conftest import Identity, Tenant, event, identify, page, track, uid

WRITERS = 24
PHONES = ["+14155552671", "+14155550100", "+14155550101", "+14155550102"]


def batch(rng: random.Random, n: int) -> list[Event]:
    """A batch of events on a small shared set of users, devices and phones."""
    out: list[Event] = []
    for _ in range(n):
        user, anon, phone = f"user-{rng.randrange(8)}", f"device-{rng.randrange(10)}", rng.choice(PHONES)
        roll = rng.random()
        if roll < 0.25:
            out.append(page("Home", anonymous_id=anon))
        elif roll < 0.45:
            out.append(identify({"plan": rng.choice(["a", "b"])}, anonymous_id=anon, user_id=user))
        elif roll < 0.65:
            out.append(identify({"phone": phone, "n": rng.randrange(100)}, user_id=user, phone=phone))
        elif roll < 0.72:
            out.append(event(EventType.EVENT_TYPE_ALIAS, previous_id=anon, user_id=user))
        else:
            out.append(track("Clicked", user_id=user, anonymous_id=anon))
    return out


@pytest.mark.parametrize("seed", [7, 11])
async def test_concurrent_batches_on_overlapping_users_and_phones(
    identity: Identity, tenant: Tenant, seed: int
) -> None:
    rng = random.Random(seed)
    batches = [batch(rng, 30) for _ in range(WRITERS * 2)]
    # Half the batches are sent twice, concurrently with themselves: retries racing the original.
    sends = batches + batches[: WRITERS // 2]
    results = await asyncio.gather(*(identity.record(tenant, *b) for b in sends))
    statuses = [r.status for res in results for r in res.results]
    assert EventStatus.EVENT_STATUS_ACCEPTED in statuses
    sent = {e.message_id for b in batches for e in b}

    conn = await asyncpg.connect(identity.db_url)
    try:
        ws = tenant.workspace.id
        phones = await conn.fetch("SELECT phone FROM identity.contacts WHERE workspace_id = $1::uuid", ws)
        assert sorted(r["phone"] for r in phones) == sorted({e.phone for b in batches for e in b if e.phone})
        stored = await conn.fetch("SELECT message_id FROM identity.events WHERE workspace_id = $1::uuid", ws)
        assert sorted(r["message_id"] for r in stored) == sorted(sent)
        # Every id and event points at a live user; merged users keep nothing.
        assert not await conn.fetchval(
            """SELECT count(*) FROM identity.identities i JOIN identity.users u USING (workspace_id, user_key)
                WHERE i.workspace_id = $1::uuid AND u.merged_into IS NOT NULL""",
            ws,
        )
        assert not await conn.fetchval(
            """SELECT count(*) FROM identity.events e JOIN identity.users u USING (workspace_id, user_key)
                WHERE e.workspace_id = $1::uuid AND u.merged_into IS NOT NULL""",
            ws,
        )
        # Invariant 3: a user with a contact has no events left without one.
        assert not await conn.fetchval(
            """SELECT count(*) FROM identity.events e JOIN identity.users u USING (workspace_id, user_key)
                WHERE e.workspace_id = $1::uuid AND e.contact_id IS NULL AND u.contact_id IS NOT NULL""",
            ws,
        )
        # Each user id belongs to exactly one user (the key), and the 8 user ids were all seen (an
        # alias from a device id not seen before keeps that id as a user id too: not counted).
        users = await conn.fetchval(
            """SELECT count(*) FROM identity.identities
                WHERE workspace_id = $1::uuid AND kind = 'user' AND external_id LIKE 'user-%'""",
            ws,
        )
        assert users == 8
    finally:
        await conn.close()


async def test_a_message_id_stored_by_a_concurrent_batch_is_reported_duplicate(
    identity: Identity, tenant: Tenant
) -> None:
    """Message ids take no lock: a batch that loses the race on one rolls back whole and runs again."""
    phone = "+14155550199"
    shared = track("Clicked", user_id=uid())
    first = identify({"phone": phone}, user_id=shared.user_id, phone=phone)
    other = track("Viewed", user_id=uid())
    pool = await create_pool(identity.db_url, max_size=2)  # the codecs record_events expects
    try:
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            # This transaction stores `shared` (and its user's phone) and stays open ...
            await record.record_events(conn, tenant.workspace.id, [first, shared])
            # ... while a second batch with the same message id checks it (not there yet) and inserts
            # it: its insert waits on the open transaction's key, then fails once that one commits.
            # (Another user's event reusing the id: no lock of the open transaction stops it sooner.)
            reused = track("Clicked", user_id=uid(), message_id=shared.message_id)
            racing = asyncio.create_task(identity.record(tenant, other, reused))
            # Wait until its insert waits on this transaction: the check it made missed the event.
            xid = await conn.fetchval("SELECT (pg_current_xact_id()::text::int8 % 4294967296)::text")
            async with pool.acquire() as watcher:
                for _ in range(200):
                    if await watcher.fetchval(
                        """SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'transactionid'
                                             AND transactionid::text = $1 AND NOT granted)""",
                        xid,
                    ):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the racing batch never waited on the open transaction")
            assert not racing.done()
            await tx.commit()
        got = await asyncio.wait_for(racing, 30)
    finally:
        await pool.close()
    assert [r.status for r in got.results] == [EventStatus.EVENT_STATUS_ACCEPTED, EventStatus.EVENT_STATUS_DUPLICATE]
    contact = await identity.stub.GetContact(ipb.GetContactRequest(phone=phone), metadata=tenant.md)
    # The duplicate reports the contact the stored event belongs to; nothing of the retried batch is doubled.
    assert got.results[1].contact_id == contact.contact.id
    stored = await identity.stub.ListContactEvents(
        ipb.ListContactEventsRequest(contact_id=contact.contact.id), metadata=tenant.md
    )
    assert sorted(e.event.message_id for e in stored.events) == sorted([first.message_id, shared.message_id])
