"""Identity's SQL: set-based batch resolution, contact and timeline reads, and the resolved-event stream."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog
from parley.common.v1.event_pb2 import Event

from services.common.errors import Aborted
from services.identity.filters import Condition
from services.identity.resolve import (
    ContactState,
    Outcome,
    Plan,
    StoredState,
    UserState,
    lock_identities,
    resolve,
)
from services.identity.tokens import Cursor

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "parley_identity_events"
# A contact's id lists are for display; a contact with more ids than this lists the first ones.
MAX_IDS_PER_CONTACT = 100


# Read queries run on a pooled or a held connection alike.
Db = asyncpg.Pool | asyncpg.Connection


class RetryBatch(Exception):
    """The batch read a user that a concurrent batch joined into another; run it again."""


def _lock_key(workspace_id: str, kind: str, value: str) -> int:
    # A signed 64-bit advisory lock key per (workspace, kind, id); a collision only serializes more.
    digest = hashlib.blake2b(f"{workspace_id}\x00{kind}\x00{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us_to_dt(us: int) -> datetime:
    # Exact integer arithmetic: a float of epoch seconds can be off by a microsecond.
    return _EPOCH + timedelta(microseconds=us) if us else datetime.now(UTC)


# Every batch lookup probes an index once per key (LATERAL), whatever the statistics say: a hash
# join or a bitmap scan over the workspace's rows, which stale statistics on a growing table can
# make the planner pick, costs a batch time in proportion to the table instead of the batch.
_EXISTING_EVENTS = """
    SELECT m.message_id, e.contact_id
      FROM unnest($2::text[]) AS m(message_id)
      JOIN LATERAL (SELECT contact_id FROM identity.events e
                     WHERE e.workspace_id = $1 AND e.message_id = m.message_id) e ON true"""


async def record_events(conn: asyncpg.Connection, workspace_id: str, events: Sequence[Event]) -> list[Outcome]:
    """Store and resolve one batch inside the caller's transaction, in a fixed handful of statements.

    Locks first, in one global order so concurrent batches never deadlock: advisory locks on
    the batch's ids and phones (sorted), then the users rows they map to (sorted), then the
    contact rows (sorted). Everything after works on locked rows only.
    """
    ws = uuid.UUID(workspace_id)
    ids, phones = lock_identities(events)
    keys = sorted(
        {_lock_key(workspace_id, kind, value) for kind, value in ids}
        | {_lock_key(workspace_id, "phone", p) for p in phones}
    )
    # The events lock comes first, before this transaction has an xid: stream readers rely on
    # every transaction that can add events holding it whenever it has an xid.
    await conn.execute("LOCK TABLE identity.events IN ROW EXCLUSIVE MODE")
    await conn.execute("SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) AS k", keys)

    id_list = sorted(ids)
    rows = await conn.fetch(
        """SELECT q.kind, q.external_id, i.user_key
             FROM unnest($2::text[], $3::text[]) AS q(kind, external_id)
             JOIN LATERAL (SELECT user_key FROM identity.identities i
                            WHERE i.workspace_id = $1 AND i.kind = q.kind
                              AND i.external_id = q.external_id) i ON true""",
        ws,
        [k for k, _ in id_list],
        [v for _, v in id_list],
    )
    identities = {(r["kind"], r["external_id"]): r["user_key"] for r in rows}
    rows = await conn.fetch(
        # Rows are locked in the order of the sorted keys, one index probe each.
        """SELECT u.*
             FROM unnest($2::uuid[]) WITH ORDINALITY AS k(user_key, ord)
             JOIN LATERAL (SELECT user_key, contact_id, phone, phone_time, traits, trait_times, identified, merged_into
                             FROM identity.users u WHERE u.workspace_id = $1 AND u.user_key = k.user_key
                              FOR UPDATE) u ON true
            ORDER BY k.ord""",
        ws,
        sorted(set(identities.values())),
    )
    users: dict[uuid.UUID, UserState] = {}
    for r in rows:
        if r["merged_into"] is not None:
            raise RetryBatch
        users[r["user_key"]] = UserState(
            key=r["user_key"],
            contact_id=r["contact_id"],
            phone=r["phone"],
            phone_time=r["phone_time"],
            traits=r["traits"],
            trait_times=r["trait_times"],
            identified=r["identified"],
            stored=True,
        )
    if len(users) != len(set(identities.values())):
        raise RetryBatch  # an id pointed at a user another batch has just removed
    rows = await conn.fetch(
        """SELECT id, phone, properties, property_times, phone_time_zone
             FROM identity.contacts
            WHERE workspace_id = $1 AND (phone = ANY($2::text[]) OR id = ANY($3::uuid[]))
            ORDER BY id FOR UPDATE""",
        ws,
        sorted(phones),
        sorted({u.contact_id for u in users.values() if u.contact_id is not None}),
    )
    contacts = {
        r["id"]: ContactState(
            id=r["id"],
            phone=r["phone"],
            properties=r["properties"],
            property_times=r["property_times"],
            phone_time_zone=r["phone_time_zone"],
            stored=True,
        )
        for r in rows
    }
    rows = await conn.fetch(
        _EXISTING_EVENTS,
        ws,
        list({e.message_id for e in events}),
    )
    existing = {r["message_id"]: r["contact_id"] for r in rows}

    plan = resolve(events, StoredState(identities, users, contacts, existing))
    await _write(conn, ws, plan)
    return plan.outcomes


async def _write(conn: asyncpg.Connection, ws: uuid.UUID, plan: Plan) -> None:
    if plan.adopt:
        # Earlier events of a user become its first contact's (stream rows keep recorded_contact_id).
        await conn.execute(
            """UPDATE identity.events e SET contact_id = a.contact_id
                 FROM unnest($2::uuid[], $3::uuid[]) AS a(user_key, contact_id)
                WHERE e.workspace_id = $1 AND e.user_key = a.user_key AND e.contact_id IS NULL""",
            ws,
            [k for k, _ in plan.adopt],
            [c for _, c in plan.adopt],
        )
    if plan.merges:
        gone, into = [g for g, _ in plan.merges], [i for _, i in plan.merges]
        for table in ("identities", "events"):
            await conn.execute(
                f"""UPDATE identity.{table} t SET user_key = m.into_key
                      FROM unnest($2::uuid[], $3::uuid[]) AS m(gone, into_key)
                     WHERE t.workspace_id = $1 AND t.user_key = m.gone""",
                ws,
                gone,
                into,
            )
        await conn.execute(
            """WITH moved AS (
                   DELETE FROM identity.contact_users cu USING unnest($2::uuid[], $3::uuid[]) AS m(gone, into_key)
                    WHERE cu.workspace_id = $1 AND cu.user_key = m.gone
                RETURNING cu.contact_id, m.into_key)
               INSERT INTO identity.contact_users (workspace_id, contact_id, user_key)
               SELECT $1, contact_id, into_key FROM moved ON CONFLICT DO NOTHING""",
            ws,
            gone,
            into,
        )
    if plan.new_identities:
        await conn.execute(
            """INSERT INTO identity.identities (workspace_id, kind, external_id, user_key)
               SELECT $1, kind, external_id, user_key
                 FROM unnest($2::text[], $3::text[], $4::uuid[]) AS n(kind, external_id, user_key)
               ON CONFLICT DO NOTHING""",
            ws,
            [k for k, _, _ in plan.new_identities],
            [e for _, e, _ in plan.new_identities],
            [u for _, _, u in plan.new_identities],
        )
    if plan.users:
        us = plan.users
        await conn.execute(
            """INSERT INTO identity.users (workspace_id, user_key, contact_id, phone, phone_time, traits, trait_times,
                                  identified, merged_into)
               SELECT $1, k, c, p, pt, t::jsonb, tt::jsonb, idf, m
                 FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::int8[], $6::text[], $7::text[],
                             $8::bool[], $9::uuid[]) AS u(k, c, p, pt, t, tt, idf, m)
               ON CONFLICT (workspace_id, user_key) DO UPDATE
                  SET contact_id = EXCLUDED.contact_id, phone = EXCLUDED.phone, phone_time = EXCLUDED.phone_time,
                      traits = EXCLUDED.traits, trait_times = EXCLUDED.trait_times,
                      identified = EXCLUDED.identified, merged_into = EXCLUDED.merged_into, update_time = now()""",
            ws,
            [u.key for u in us],
            [u.contact_id for u in us],
            [u.phone for u in us],
            [u.phone_time for u in us],
            [json.dumps(u.traits) for u in us],
            [json.dumps(u.trait_times) for u in us],
            [u.identified for u in us],
            [u.merged_into for u in us],
        )
    if plan.contacts:
        cs = plan.contacts
        await conn.execute(
            """INSERT INTO identity.contacts (workspace_id, id, phone, properties, property_times, phone_time_zone)
               SELECT $1, i, p, pr::jsonb, pt::jsonb, tz
                 FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[]) AS c(i, p, pr, pt, tz)
               ON CONFLICT (workspace_id, id) DO UPDATE
                  SET properties = EXCLUDED.properties, property_times = EXCLUDED.property_times,
                      update_time = now()""",
            ws,
            [c.id for c in cs],
            [c.phone for c in cs],
            [json.dumps(c.properties) for c in cs],
            [json.dumps(c.property_times) for c in cs],
            [c.phone_time_zone for c in cs],
        )
    if plan.contact_users:
        await conn.execute(
            """INSERT INTO identity.contact_users (workspace_id, contact_id, user_key)
               SELECT $1, c, u FROM unnest($2::uuid[], $3::uuid[]) AS cu(c, u) ON CONFLICT DO NOTHING""",
            ws,
            [c for c, _ in plan.contact_users],
            [u for _, u in plan.contact_users],
        )
    if plan.events:
        # Inserted in event-time order so stream sequence numbers follow it within a batch.
        evs = sorted(plan.events, key=lambda e: (e.time_us, e.index))
        rows = await conn.fetch(
            """INSERT INTO identity.events (workspace_id, message_id, user_key, contact_id, recorded_contact_id,
                                   type, name, event_time, payload)
               SELECT $1, m, u, c, c, t, n, et, p
                 FROM unnest($2::text[], $3::uuid[], $4::uuid[], $5::int2[], $6::text[], $7::timestamptz[],
                             $8::bytea[]) WITH ORDINALITY AS e(m, u, c, t, n, et, p, ord)
                ORDER BY ord
               ON CONFLICT (workspace_id, message_id) DO NOTHING
               RETURNING message_id""",
            ws,
            [e.event.message_id for e in evs],
            [e.user_key for e in evs],
            [e.contact_id for e in evs],
            [int(e.event.type) for e in evs],
            [e.event.name for e in evs],
            [_us_to_dt(e.time_us) for e in evs],
            [e.event.SerializeToString() for e in evs],
        )
        inserted = {r["message_id"] for r in rows}
        if len(inserted) != len(evs):
            # Another batch stored the same message_id concurrently (it did not share our locks).
            raced = [e.event.message_id for e in evs if e.event.message_id not in inserted]
            current = {r["message_id"]: r["contact_id"] for r in await conn.fetch(_EXISTING_EVENTS, ws, raced)}
            for o in plan.outcomes:
                if o.new is not None and o.new.event.message_id in current:
                    o.duplicate = True
                    o.contact_id = current[o.new.event.message_id]
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(ws))


async def record_batch(
    pool: asyncpg.Pool, workspace_id: str, events: Sequence[Event], attempts: int = 8
) -> list[Outcome]:
    """Store one batch in one transaction; it commits whole or not at all. Retries lost races."""
    for attempt in range(attempts):
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await record_events(conn, workspace_id, events)
        except (RetryBatch, asyncpg.DeadlockDetectedError, asyncpg.UniqueViolationError) as exc:
            # Rare: a concurrent join of users, or a race the locks do not cover; the batch rolled back.
            if attempt == attempts - 1:
                raise Aborted("the batch kept losing races with concurrent batches; nothing was stored, retry") from exc
            log.info("record_retry", attempt=attempt + 1, reason=type(exc).__name__)
    raise AssertionError("unreachable")


# ---- reads -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContactRow:
    id: uuid.UUID
    workspace_id: uuid.UUID
    phone: str
    properties: dict[str, Any]
    phone_time_zone: str
    create_time: datetime
    update_time: datetime
    user_ids: list[str]
    anonymous_ids: list[str]


_CONTACT_COLUMNS = f"""
    c.id, c.workspace_id, c.phone, c.properties, c.phone_time_zone, c.create_time, c.update_time,
    ARRAY(SELECT i.external_id FROM identity.contact_users cu
            JOIN identity.identities i ON i.workspace_id = cu.workspace_id AND i.user_key = cu.user_key
           WHERE cu.workspace_id = c.workspace_id AND cu.contact_id = c.id AND i.kind = 'user'
           ORDER BY i.create_time, i.external_id LIMIT {MAX_IDS_PER_CONTACT}) AS user_ids,
    ARRAY(SELECT i.external_id FROM identity.contact_users cu
            JOIN identity.identities i ON i.workspace_id = cu.workspace_id AND i.user_key = cu.user_key
           WHERE cu.workspace_id = c.workspace_id AND cu.contact_id = c.id AND i.kind = 'anonymous'
           ORDER BY i.create_time, i.external_id LIMIT {MAX_IDS_PER_CONTACT}) AS anonymous_ids"""


def _contact(r: asyncpg.Record) -> ContactRow:
    return ContactRow(
        id=r["id"],
        workspace_id=r["workspace_id"],
        phone=r["phone"],
        properties=r["properties"],
        phone_time_zone=r["phone_time_zone"],
        create_time=r["create_time"],
        update_time=r["update_time"],
        user_ids=list(r["user_ids"]),
        anonymous_ids=list(r["anonymous_ids"]),
    )


async def contact_by_id(db: Db, workspace_id: str, contact_id: uuid.UUID) -> ContactRow | None:
    r = await db.fetchrow(
        f"SELECT {_CONTACT_COLUMNS} FROM identity.contacts c WHERE c.workspace_id = $1 AND c.id = $2",
        uuid.UUID(workspace_id),
        contact_id,
    )
    return _contact(r) if r else None


async def contact_by_phone(db: Db, workspace_id: str, phone: str) -> ContactRow | None:
    r = await db.fetchrow(
        f"SELECT {_CONTACT_COLUMNS} FROM identity.contacts c WHERE c.workspace_id = $1 AND c.phone = $2",
        uuid.UUID(workspace_id),
        phone,
    )
    return _contact(r) if r else None


def _condition_sql(cond: Condition, args: list[Any]) -> str:
    """SQL for one property condition; operands are bound parameters, never spliced text.

    jsonb parameters are passed as Python values: the pool's codec encodes them.
    """

    def bind(value: Any, cast: str) -> str:
        args.append(value)
        return f"${len(args)}::{cast}"

    p = f"(c.properties #> {bind(cond.path, 'text[]')})"
    op, v = cond.op, cond.value
    if op == "exists":
        return f"{p} IS NOT NULL"
    if op == "not_exists":
        return f"{p} IS NULL"
    if op == "eq":
        # Containment lets the GIN index narrow the rows; the equality makes it exact.
        nested: Any = v
        for key in reversed(cond.path):
            nested = {key: nested}
        return f"(c.properties @> {bind(nested, 'jsonb')} AND {p} = {bind(v, 'jsonb')})"
    if op == "neq":
        return f"{p} IS DISTINCT FROM {bind(v, 'jsonb')}"
    if op in ("gt", "gte", "lt", "lte"):
        sym = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}[op]
        if isinstance(v, (int, float)):
            return f"(jsonb_typeof({p}) = 'number' AND ({p})::numeric {sym} {bind(str(v), 'numeric')})"
        return f"(jsonb_typeof({p}) = 'string' AND ({p} #>> '{{}}') {sym} {bind(v, 'text')})"
    if op == "contains":
        text = bind(str(v).lower(), "text")
        return (
            f"((jsonb_typeof({p}) = 'string' AND strpos(lower({p} #>> '{{}}'), {text}) > 0)"
            f" OR (jsonb_typeof({p}) = 'array' AND {p} @> {bind([v], 'jsonb')}))"
        )
    if op == "in":
        return f"({p} IS NOT NULL AND jsonb_build_array({p}) <@ {bind(v, 'jsonb')})"
    raise ValueError(f"unknown operator {op}")


async def list_contacts(
    db: Db,
    workspace_id: str,
    conditions: Sequence[Condition],
    order_column: str,
    descending: bool,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[ContactRow]:
    """One page of the audience, keyset-paginated on (order_column, id)."""
    assert order_column in ("create_time", "update_time")
    args: list[Any] = [uuid.UUID(workspace_id)]
    where = ["c.workspace_id = $1"]
    where.extend(_condition_sql(c, args) for c in conditions)
    direction = "DESC" if descending else "ASC"
    if after is not None:
        args.extend(after)
        cmp = "<" if descending else ">"
        where.append(f"(c.{order_column}, c.id) {cmp} (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    rows = await db.fetch(
        f"""SELECT {_CONTACT_COLUMNS} FROM identity.contacts c WHERE {" AND ".join(where)}
             ORDER BY c.{order_column} {direction}, c.id {direction} LIMIT ${len(args)}""",
        *args,
    )
    return [_contact(r) for r in rows]


@dataclass(frozen=True)
class EventRow:
    workspace_id: uuid.UUID
    seq: int
    user_key: uuid.UUID | None
    contact_id: uuid.UUID | None
    event_time: datetime
    payload: bytes
    xid: int = 0


def _event(r: asyncpg.Record, contact_column: str = "contact_id") -> EventRow:
    return EventRow(
        workspace_id=r["workspace_id"],
        seq=r["seq"],
        user_key=r["user_key"],
        contact_id=r[contact_column],
        event_time=r["event_time"],
        payload=r["payload"],
        xid=int(r["xid"]),
    )


_EVENT_COLUMNS = (
    ", ".join(
        f"e.{c}" for c in ("workspace_id", "seq", "xid::text AS xid", "user_key", "contact_id", "recorded_contact_id")
    )
    + ", e.event_time, e.payload"
)


async def contact_exists(db: Db, workspace_id: str, contact_id: uuid.UUID) -> bool:
    return bool(
        await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM identity.contacts WHERE workspace_id = $1 AND id = $2)",
            uuid.UUID(workspace_id),
            contact_id,
        )
    )


async def contact_events(
    db: Db,
    workspace_id: str,
    contact_id: uuid.UUID,
    names: Sequence[str],
    start: datetime | None,
    end: datetime | None,
    limit: int,
    before: tuple[datetime, int] | None,
) -> list[EventRow]:
    """A contact's events, newest first, keyset-paginated on (event_time, seq)."""
    args: list[Any] = [uuid.UUID(workspace_id), contact_id]
    where = ["e.workspace_id = $1", "e.contact_id = $2"]
    if names:
        args.append(list(names))
        where.append(f"e.name = ANY(${len(args)}::text[])")
    if start is not None:
        args.append(start)
        where.append(f"e.event_time >= ${len(args)}")
    if end is not None:
        args.append(end)
        where.append(f"e.event_time < ${len(args)}")
    if before is not None:
        args.extend(before)
        where.append(f"(e.event_time, e.seq) < (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    rows = await db.fetch(
        f"""SELECT {_EVENT_COLUMNS} FROM identity.events e WHERE {" AND ".join(where)}
             ORDER BY e.event_time DESC, e.seq DESC LIMIT ${len(args)}""",
        *args,
    )
    return [_event(r) for r in rows]


@dataclass(frozen=True)
class UserRow:
    user_key: uuid.UUID
    contact_id: uuid.UUID | None
    phone: str | None
    traits: dict[str, Any]
    create_time: datetime
    user_ids: list[str]
    anonymous_ids: list[str]


async def user_by_identity(
    conn: asyncpg.Connection, workspace_id: str, kind: str, external_id: str, event_limit: int
) -> tuple[UserRow, list[EventRow]] | None:
    """A user by one of its ids, with its newest events (before and after it had a contact)."""
    ws = uuid.UUID(workspace_id)
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        r = await conn.fetchrow(
            """SELECT u.user_key, u.contact_id, u.phone, u.traits, u.create_time,
                      ARRAY(SELECT x.external_id FROM identity.identities x WHERE x.workspace_id = u.workspace_id
                             AND x.user_key = u.user_key AND x.kind = 'user' ORDER BY x.create_time, x.external_id)
                        AS user_ids,
                      ARRAY(SELECT x.external_id FROM identity.identities x WHERE x.workspace_id = u.workspace_id
                             AND x.user_key = u.user_key AND x.kind = 'anonymous'
                             ORDER BY x.create_time, x.external_id) AS anonymous_ids
                 FROM identity.identities i
                 JOIN identity.users u ON u.workspace_id = i.workspace_id AND u.user_key = i.user_key
                WHERE i.workspace_id = $1 AND i.kind = $2 AND i.external_id = $3""",
            ws,
            kind,
            external_id,
        )
        if r is None:
            return None
        rows = await conn.fetch(
            f"""SELECT {_EVENT_COLUMNS} FROM identity.events e WHERE e.workspace_id = $1 AND e.user_key = $2
                 ORDER BY e.event_time DESC, e.seq DESC LIMIT $3""",
            ws,
            r["user_key"],
            event_limit,
        )
    user = UserRow(
        user_key=r["user_key"],
        contact_id=r["contact_id"],
        phone=r["phone"],
        traits=r["traits"],
        create_time=r["create_time"],
        user_ids=list(r["user_ids"]),
        anonymous_ids=list(r["anonymous_ids"]),
    )
    return user, [_event(x) for x in rows]


# ---- the stream ----------------------------------------------------------------------------------


# The oldest transaction that may still add events: the oldest running transaction that holds
# the events table's ROW EXCLUSIVE lock (writers take it before they get an xid; readers,
# VACUUM and ANALYZE hold other modes), else the snapshot's xmax.
# Taken in its own statement, before the rows are read under a later snapshot.
_WRITERS_BOUND = """
WITH s AS (SELECT pg_current_snapshot() AS snap),
writers AS (
    SELECT t.transactionid
      FROM pg_locks r
      JOIN pg_locks t ON t.virtualtransaction = r.virtualtransaction
     WHERE r.locktype = 'relation' AND r.granted AND r.mode = 'RowExclusiveLock'
       AND r.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND r.relation = 'identity.events'::regclass
       AND t.locktype = 'transactionid' AND t.granted AND t.mode = 'ExclusiveLock')
SELECT LEAST(pg_snapshot_xmax(s.snap),
             (SELECT min(x) FROM pg_snapshot_xip(s.snap) AS x
               WHERE (x::text::numeric % 4294967296)::text::xid IN (SELECT transactionid FROM writers)))::text
  FROM s"""


async def stream_page(
    conn: asyncpg.Connection, workspace_id: str | None, cursor: Cursor, limit: int
) -> tuple[list[EventRow], bool]:
    """Events after ``cursor`` in (xid, seq) order whose writing transactions have all ended; and whether more wait.

    Fast path: only rows whose xid is below the snapshot's xmin — every transaction below it
    has ended, so no row can later appear before the last one returned. When that finds
    nothing but rows wait past the cursor (some older transaction is open), the bound is
    narrowed to the oldest open transaction that writes events (see ``_WRITERS_BOUND``), so
    a long transaction of another service on the same server does not hold the stream back.
    The second value is True when rows are still held back by an open event writer.
    """
    args: list[Any] = [str(cursor.xid), cursor.seq]
    scope = ""
    if workspace_id is not None:
        args.append(uuid.UUID(workspace_id))
        scope = "e.workspace_id = $3 AND"
    page = f"""SELECT {_EVENT_COLUMNS} FROM identity.events e
                WHERE {scope} (e.xid, e.seq) > ($1::text::xid8, $2::int8) AND e.xid < {{bound}}
                ORDER BY e.xid, e.seq LIMIT ${len(args) + 1}"""
    rows = await conn.fetch(page.format(bound="pg_snapshot_xmin(pg_current_snapshot())"), *args, limit)
    if rows:
        return [_event(r, "recorded_contact_id") for r in rows], False
    waiting = await conn.fetchval(
        f"""SELECT EXISTS (SELECT 1 FROM identity.events e
             WHERE {scope} (e.xid, e.seq) > ($1::text::xid8, $2::int8))""",
        *args,
    )
    if not waiting:
        return [], False
    bound = await conn.fetchval(_WRITERS_BOUND)
    rows = await conn.fetch(page.format(bound=f"${len(args) + 2}::text::xid8"), *args, limit, bound)
    if rows:
        return [_event(r, "recorded_contact_id") for r in rows], False
    return [], True
