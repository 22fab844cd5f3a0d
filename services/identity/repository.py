"""Identity's read SQL: contacts, timelines, users and the resolved-event stream (writes: ``record``)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.common.numeric import LIST_INDEX, NUMERIC_TEXT_SQL
from services.identity.filters import Condition
from services.identity.tokens import Cursor

NOTIFY_CHANNEL = "parley_identity_events"
# A contact's (and a user's) id lists are for display; one with more ids than this lists the first
# ones: a user can gather any number of anonymous ids, each up to 255 characters.
MAX_IDS_PER_CONTACT = 100


# Read queries run on a pooled or a held connection alike.
Db = asyncpg.Pool | asyncpg.Connection


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


# An id an alias named before it was ever seen is kept as both kinds (resolve.py): among user ids
# it comes after those sent as user ids in the same transaction, so a caller taking the first
# user id gets one sent as a user id.
_ALIAS_TWIN_LAST = """EXISTS (SELECT 1 FROM identity.identities t WHERE t.workspace_id = {i}.workspace_id
                             AND t.kind = 'anonymous' AND t.external_id = {i}.external_id
                             AND t.user_key = {i}.user_key)"""

_CONTACT_COLUMNS = f"""
    c.id, c.workspace_id, c.phone, c.properties, c.phone_time_zone, c.create_time, c.update_time,
    ARRAY(SELECT i.external_id FROM identity.contact_users cu
            JOIN identity.identities i ON i.workspace_id = cu.workspace_id AND i.user_key = cu.user_key
           WHERE cu.workspace_id = c.workspace_id AND cu.contact_id = c.id AND i.kind = 'user'
           ORDER BY i.create_time, {_ALIAS_TWIN_LAST.format(i="i")}, i.external_id
           LIMIT {MAX_IDS_PER_CONTACT}) AS user_ids,
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
        equal = f"{p} = {bind(v, 'jsonb')}"
        if any(LIST_INDEX.fullmatch(key) for key in cond.path):
            return equal  # the part may index an array, which a containment object cannot match
        # Containment lets the GIN index narrow the rows; the equality makes it exact.
        nested: Any = v
        for key in reversed(cond.path):
            nested = {key: nested}
        return f"(c.properties @> {bind(nested, 'jsonb')} AND {equal})"
    if op == "neq":
        return f"{p} IS DISTINCT FROM {bind(v, 'jsonb')}"
    # CASE, not AND: PostgreSQL may evaluate an AND's operands in any order, and the cast must
    # never meet a value of another type.
    if op in ("gt", "gte", "lt", "lte"):
        sym = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}[op]
        if isinstance(v, (int, float)):
            x = bind(str(v), "numeric")
            text = f"({p} #>> '{{}}')"
            return (
                f"(CASE jsonb_typeof({p}) WHEN 'number' THEN ({p})::numeric {sym} {x}"
                f" WHEN 'string' THEN CASE WHEN {text} ~ {bind(NUMERIC_TEXT_SQL, 'text')}"
                f" THEN {text}::numeric {sym} {x} END END)"
            )
        return f"(CASE WHEN jsonb_typeof({p}) = 'string' THEN ({p} #>> '{{}}') {sym} {bind(v, 'text')} END)"
    if op == "contains":
        # A list holding the operand; a string holding it, case-insensitively, when it is a string.
        member = f"(jsonb_typeof({p}) = 'array' AND {p} @> {bind([v], 'jsonb')})"
        if not isinstance(v, str):
            return member
        # Both sides lowered by PostgreSQL: Python's and the database's case rules differ beyond
        # ASCII (a string must always contain itself).
        substring = f"strpos(lower({p} #>> '{{}}'), lower({bind(v, 'text')})) > 0"
        return f"(CASE WHEN jsonb_typeof({p}) = 'string' THEN {substring} ELSE {member} END)"
    if op == "in":
        # Equal to one of the operand's elements (jsonb equality: 3 and 3.0 are equal).
        return f"EXISTS (SELECT 1 FROM jsonb_array_elements({bind(v, 'jsonb')}) AS o(v) WHERE o.v = {p})"
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


# The most event payload (or, for ListContacts, contact data) one response carries, whatever the
# page size asked: a page of 1,000 events of up to 32 KiB each would pass any message limit, and
# the call would fail (for a stream subscriber, again on every reconnect to the same cursor).
# 3 MiB keeps a page, with what else the response holds, within the 4 MiB a gRPC client accepts
# by default (grpcurl's too).
MAX_PAGE_PAYLOAD_BYTES = 3 * 1024 * 1024


def within_payload_budget(rows: list[EventRow]) -> list[EventRow]:
    """The longest prefix of ``rows`` whose payloads fit ``MAX_PAGE_PAYLOAD_BYTES``; at least one row."""
    total = 0
    for i, row in enumerate(rows):
        total += len(row.payload)
        if total > MAX_PAGE_PAYLOAD_BYTES and i > 0:
            return rows[:i]
    return rows


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
            f"""SELECT u.user_key, u.contact_id, u.phone, u.traits, u.create_time,
                      ARRAY(SELECT x.external_id FROM identity.identities x WHERE x.workspace_id = u.workspace_id
                             AND x.user_key = u.user_key AND x.kind = 'user'
                           ORDER BY x.create_time, {_ALIAS_TWIN_LAST.format(i="x")}, x.external_id
                           LIMIT {MAX_IDS_PER_CONTACT}) AS user_ids,
                      ARRAY(SELECT x.external_id FROM identity.identities x WHERE x.workspace_id = u.workspace_id
                             AND x.user_key = u.user_key AND x.kind = 'anonymous'
                             ORDER BY x.create_time, x.external_id LIMIT {MAX_IDS_PER_CONTACT}) AS anonymous_ids
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


async def next_transaction_id(db: Db) -> int:
    """The id the next transaction of this database will get: every stored event's is below it."""
    return int(await db.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8"))


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
