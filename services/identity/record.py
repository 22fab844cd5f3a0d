"""Identity's write path: one batch of events stored and resolved in one transaction."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import structlog
from asyncpg.pgproto.pgproto import UUID as DbUUID
from parley.common.v1.event_pb2 import Event

from services.common.db import dumps_json
from services.common.errors import Aborted
from services.identity.inflight import Claim, EarlierBatchBlocked, Groups, InFlight, group_events
from services.identity.repository import NOTIFY_CHANNEL
from services.identity.resolve import (
    MAX_PROPERTIES_BYTES,
    ContactState,
    IdentityKey,
    Outcome,
    Plan,
    Prepared,
    StoredState,
    UserState,
    prepare,
    resolve,
)

log = structlog.get_logger(__name__)


class RetryBatch(Exception):
    """The batch read a user that a concurrent batch joined into another; run it again."""


class PartsOverlap(RetryBatch):
    """The batch's later part reached a user or contact its first part had: run it again unsplit."""


def _lock_keys(workspace_id: str) -> Callable[[str, str], int]:
    """The workspace's signed 64-bit advisory lock key per (kind, id): a hash of the three, where
    a collision only serializes more. The workspace's part is hashed once per batch."""
    base = hashlib.blake2b(f"{workspace_id}\x00".encode(), digest_size=8)

    def key(kind: str, value: str) -> int:
        h = base.copy()
        h.update(f"{kind}\x00{value}".encode())
        return int.from_bytes(h.digest(), "big", signed=True)

    return key


class _Ids:
    """Random (version 4) ids as asyncpg's own UUID type, which asyncpg writes, and ``str()``
    formats, without going through Python code. The random bytes are read 256 ids at a time:
    one ``os.urandom`` call per id was most of an id's cost."""

    _PER_READ = 256

    def __init__(self) -> None:
        self._ids: list[DbUUID] = []

    def forget(self) -> None:
        self._ids = []

    def __call__(self) -> DbUUID:
        if not self._ids:
            self._ids = self._read()
        return self._ids.pop()

    def _read(self) -> list[DbUUID]:
        raw = bytearray(os.urandom(16 * self._PER_READ))
        for at in range(0, len(raw), 16):
            raw[at + 6] = raw[at + 6] & 0x0F | 0x40
            raw[at + 8] = raw[at + 8] & 0x3F | 0x80
        data = bytes(raw)
        return [DbUUID(data[at : at + 16]) for at in range(0, len(data), 16)]


_new_id = _Ids()
# A forked child must not hand out the ids its parent read ahead.
os.register_at_fork(after_in_child=_new_id.forget)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us_to_dt(us: int) -> datetime:
    # Exact integer arithmetic: a float of epoch seconds can be off by a microsecond.
    return _EPOCH + timedelta(microseconds=us) if us else datetime.now(UTC)


def _json_list(values: Sequence[str] | Sequence[int]) -> str:
    """A list parameter as JSON text, read in SQL with ``json_array_elements_text($n::text::json)``.

    For lists of strings and numbers this costs the client far less than an array parameter:
    asyncpg checks each array element through Python-level ``isinstance`` calls against
    ``collections.abc`` classes (measured: ~1 µs per id of kind and value, against ~0.1-0.15 µs
    here), while PostgreSQL reads either in a fraction of a microsecond per element.
    """
    return orjson.dumps(values).decode()


# Every batch lookup probes an index once per key: a LATERAL subquery with a LIMIT, which the
# planner cannot flatten into a join. Without it, statistics that lag a growing table make
# it pick a hash join or bitmap scan over all the workspace's rows (measured: 16 ms against
# 2.7 ms for 500 message ids over 25k events), a cost that grows with the table, not the batch.
_EXISTING_EVENTS = """
    SELECT m.message_id, e.contact_id
      FROM unnest($2::text[]) AS m(message_id)
      JOIN LATERAL (SELECT contact_id FROM identity.events e
                     WHERE e.workspace_id = $1 AND e.message_id = m.message_id LIMIT 1) e ON true"""

# The batch's ids, then the users they map to, locked in user-key order (the CTE keeps the
# sorted order it was written in): one round trip. A user an id points at that is gone comes
# back with found = false.
_USERS_BY_IDS = """
    WITH ids AS MATERIALIZED (
        SELECT q.kind, q.external_id, i.user_key
          FROM ROWS FROM (json_array_elements_text($2::text::json), json_array_elements_text($3::text::json))
               AS q(kind, external_id)
          JOIN LATERAL (SELECT user_key FROM identity.identities i
                         WHERE i.workspace_id = $1 AND i.kind = q.kind AND i.external_id = q.external_id
                         LIMIT 1) i ON true),
    keys AS MATERIALIZED (
        SELECT user_key, array_agg(kind) AS kinds, array_agg(external_id) AS externals
          FROM ids GROUP BY user_key ORDER BY user_key)
    SELECT k.user_key, k.kinds, k.externals, u.user_key IS NOT NULL AS found,
           u.contact_id, u.phone, u.phone_time, u.traits, u.trait_times, u.identified, u.merged_into
      FROM keys k
      LEFT JOIN LATERAL (SELECT user_key, contact_id, phone, phone_time, traits, trait_times, identified, merged_into
                           FROM identity.users u WHERE u.workspace_id = $1 AND u.user_key = k.user_key
                          LIMIT 1 FOR UPDATE) u ON true"""

# The contacts of the batch's phones and of its users, locked in id order: one round trip.
_CONTACTS = """
    WITH ids AS MATERIALIZED (
        SELECT c.id
          FROM json_array_elements_text($2::text::json) AS p(phone)
          JOIN LATERAL (SELECT id FROM identity.contacts c
                         WHERE c.workspace_id = $1 AND c.phone = p.phone LIMIT 1) c ON true
        UNION
        SELECT unnest($3::uuid[])
        ORDER BY 1)
    SELECT c.*
      FROM ids
      JOIN LATERAL (SELECT id, phone, properties, property_times, phone_time_zone
                      FROM identity.contacts c WHERE c.workspace_id = $1 AND c.id = ids.id
                     LIMIT 1 FOR UPDATE) c ON true"""

_IDENTITY_COLUMNS = ("workspace_id", "kind", "external_id", "user_key")
_USER_COLUMNS = (
    "workspace_id",
    "user_key",
    "contact_id",
    "phone",
    "phone_time",
    "traits",
    "trait_times",
    "identified",
    "merged_into",
)
_CONTACT_COLUMNS = ("workspace_id", "id", "phone", "properties", "property_times", "phone_time_zone")
_EVENT_COLUMNS = (
    "workspace_id",
    "message_id",
    "user_key",
    "contact_id",
    "recorded_contact_id",
    "type",
    "name",
    "event_time",
    "payload",
)


async def _locked_state(
    conn: asyncpg.Connection, ws: uuid.UUID, ids: set[IdentityKey], phones: set[str]
) -> StoredState:
    """What the batch touches — ids, users, contacts — with users and contacts locked."""
    id_list = sorted(ids)
    rows = await conn.fetch(_USERS_BY_IDS, ws, _json_list([k for k, _ in id_list]), _json_list([v for _, v in id_list]))
    identities: dict[IdentityKey, uuid.UUID] = {}
    users: dict[uuid.UUID, UserState] = {}
    for r in rows:
        if not r["found"] or r["merged_into"] is not None:
            raise RetryBatch  # an id pointed at a user another batch has just joined into another
        key = r["user_key"]
        for kind, external in zip(r["kinds"], r["externals"], strict=True):
            identities[(kind, external)] = key
        users[key] = UserState(
            key=key,
            contact_id=r["contact_id"],
            phone=r["phone"],
            phone_time=r["phone_time"],
            traits=r["traits"],
            trait_times=r["trait_times"],
            identified=r["identified"],
            stored=True,
        )
    # The batch's phones are advisory-locked, so their contact ids cannot change under it;
    # the contact rows are then locked in id order.
    contact_ids = {u.contact_id for u in users.values() if u.contact_id is not None}
    rows = (
        await conn.fetch(_CONTACTS, ws, _json_list(sorted(phones)), list(contact_ids)) if phones or contact_ids else []
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
    return StoredState(identities, users, contacts, {})


class _Statement:
    """One statement built from parts: data-modifying CTEs run together in one round trip."""

    def __init__(self, ws: uuid.UUID) -> None:
        self.args: list[Any] = [ws]
        self.parts: list[str] = []
        self.select = "SELECT 1"

    def arg(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def add(self, sql: str) -> None:
        self.parts.append(f"w{len(self.parts)} AS ({sql})")

    def sql(self) -> str:
        return (f"WITH {', '.join(self.parts)} " if self.parts else "") + self.select


@dataclass
class _Writes:
    """A plan turned into statement arguments, ready to run."""

    # Every update and upsert, and the stream notification, in one statement: first, since
    # adopting a user's events goes by the user key the events had before any join.
    combined: _Statement | None = None
    # Then the joins of users, each its own statement.
    merges: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    # (table, columns, rows) of rows new to the database, in this order.
    copies: list[tuple[str, tuple[str, ...], list[tuple[Any, ...]]]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)


def _json_texts(values: list[dict[str, Any]]) -> list[str]:
    return [dumps_json(v).decode() for v in values]


def _writes(ws: uuid.UUID, plan: Plan, payloads: Sequence[bytes]) -> _Writes:
    out = _Writes()
    if plan.merges:
        gone, into = [g for g, _ in plan.merges], [i for _, i in plan.merges]
        for table in ("identities", "events"):
            out.merges.append(
                (
                    f"""UPDATE identity.{table} t SET user_key = m.into_key
                          FROM unnest($2::uuid[], $3::uuid[]) AS m(gone, into_key)
                         WHERE t.workspace_id = $1 AND t.user_key = m.gone""",
                    (ws, gone, into),
                )
            )
        out.merges.append(
            (
                """WITH moved AS (
                       DELETE FROM identity.contact_users cu USING unnest($2::uuid[], $3::uuid[]) AS m(gone, into_key)
                        WHERE cu.workspace_id = $1 AND cu.user_key = m.gone
                    RETURNING cu.contact_id, m.into_key)
                   INSERT INTO identity.contact_users (workspace_id, contact_id, user_key)
                   SELECT $1, contact_id, into_key FROM moved ON CONFLICT DO NOTHING""",
                (ws, gone, into),
            )
        )
    st = _Statement(ws)
    if plan.adopt:
        # Earlier events of a user become its first contact's (stream rows keep recorded_contact_id).
        st.add(
            f"""UPDATE identity.events e SET contact_id = a.contact_id
                  FROM unnest({st.arg([k for k, _ in plan.adopt])}::uuid[],
                              {st.arg([c for _, c in plan.adopt])}::uuid[]) AS a(user_key, contact_id)
                 WHERE e.workspace_id = $1 AND e.user_key = a.user_key AND e.contact_id IS NULL"""
        )
    us = [u for u in plan.users if u.stored]
    if us:
        # An upsert that always updates: one primary-key probe per row, whatever the planner
        # thinks of the table's size (an UPDATE … FROM unnest may pick a scan).
        st.add(
            f"""INSERT INTO identity.users (workspace_id, user_key, contact_id, phone, phone_time, traits,
                                           trait_times, identified, merged_into)
                SELECT $1, k, c, p, pt, t::jsonb, tt::jsonb, idf, m
                  FROM unnest({st.arg([u.key for u in us])}::uuid[], {st.arg([u.contact_id for u in us])}::uuid[],
                              {st.arg([u.phone for u in us])}::text[], {st.arg([u.phone_time for u in us])}::int8[],
                              {st.arg(_json_texts([u.traits for u in us]))}::text[],
                              {st.arg(_json_texts([u.trait_times for u in us]))}::text[],
                              {st.arg([u.identified for u in us])}::bool[],
                              {st.arg([u.merged_into for u in us])}::uuid[]) AS u(k, c, p, pt, t, tt, idf, m)
                ON CONFLICT (workspace_id, user_key) DO UPDATE
                   SET contact_id = EXCLUDED.contact_id, phone = EXCLUDED.phone, phone_time = EXCLUDED.phone_time,
                       traits = EXCLUDED.traits, trait_times = EXCLUDED.trait_times,
                       identified = EXCLUDED.identified, merged_into = EXCLUDED.merged_into,
                       update_time = now()"""
        )
    cs = [c for c in plan.contacts if c.stored]
    if cs:
        st.add(
            f"""INSERT INTO identity.contacts (workspace_id, id, phone, properties, property_times, phone_time_zone)
                SELECT $1, i, p, pr::jsonb, pt::jsonb, tz
                  FROM unnest({st.arg([c.id for c in cs])}::uuid[], {st.arg([c.phone for c in cs])}::text[],
                              {st.arg(_json_texts([c.properties for c in cs]))}::text[],
                              {st.arg(_json_texts([c.property_times for c in cs]))}::text[],
                              {st.arg([c.phone_time_zone for c in cs])}::text[]) AS c(i, p, pr, pt, tz)
                ON CONFLICT (workspace_id, id) DO UPDATE
                   SET properties = EXCLUDED.properties, property_times = EXCLUDED.property_times,
                       update_time = now()"""
        )
    if plan.contact_users:
        st.add(
            f"""INSERT INTO identity.contact_users (workspace_id, contact_id, user_key)
                SELECT $1, c, u FROM unnest({st.arg([c for c, _ in plan.contact_users])}::uuid[],
                                            {st.arg([u for _, u in plan.contact_users])}::uuid[]) AS cu(c, u)
                ON CONFLICT DO NOTHING"""
        )
    if plan.events:
        # Delivered to listeners when the transaction commits, with the events.
        st.select = f"SELECT pg_notify({st.arg(NOTIFY_CHANNEL)}, $1::uuid::text)"
    if st.parts or plan.events:
        out.combined = st
    # Rows new to the database go in by COPY (a plain insert, cheaper than INSERT … SELECT FROM
    # unnest): the batch's ids and phones are locked and were looked up under the locks, so
    # none can exist; the unique constraints are the backstop (the batch rolls back and retries).
    if plan.new_identities:
        out.copies.append(("identities", _IDENTITY_COLUMNS, [(ws, k, e, u) for k, e, u in plan.new_identities]))
    new_users = [u for u in plan.users if not u.stored]
    if new_users:
        out.copies.append(
            (
                "users",
                _USER_COLUMNS,
                [
                    (
                        ws,
                        u.key,
                        u.contact_id,
                        u.phone,
                        u.phone_time,
                        u.traits,
                        u.trait_times,
                        u.identified,
                        u.merged_into,
                    )
                    for u in new_users
                ],
            )
        )
    new_contacts = [c for c in plan.contacts if not c.stored]
    if new_contacts:
        out.copies.append(
            (
                "contacts",
                _CONTACT_COLUMNS,
                [(ws, c.id, c.phone, c.properties, c.property_times, c.phone_time_zone) for c in new_contacts],
            )
        )
    # In event-time order (the plan's), so stream sequence numbers follow it within a part of
    # the batch (and so for each user and contact, which are never in both parts).
    out.events = [
        (
            ws,
            e.event.message_id,
            e.user_key,
            e.contact_id,
            e.contact_id,
            e.event.type,
            e.event.name,
            _us_to_dt(e.time_us),
            payloads[e.index],
        )
        for e in plan.events
    ]
    return out


def _log_refused(ws: uuid.UUID, state: StoredState) -> None:
    """Say which contacts and users had trait keys left out for ``MAX_PROPERTIES_BYTES``."""
    contacts = {str(c.id): c.sized.refused for c in state.contacts.values() if c.sized.refused}
    users = {str(u.key): u.sized.refused for u in state.users.values() if u.sized.refused}
    if contacts or users:
        log.warning(
            "properties_over_limit",
            workspace_id=str(ws),
            limit_bytes=MAX_PROPERTIES_BYTES,
            refused_keys_by_contact=dict(list(contacts.items())[:20]),
            refused_keys_by_user=dict(list(users.items())[:20]),
        )


async def _run_writes(conn: asyncpg.Connection, writes: _Writes) -> None:
    if writes.combined is not None:
        await conn.execute(writes.combined.sql(), *writes.combined.args)
    for sql, args in writes.merges:
        await conn.execute(sql, *args)
    for table, columns, rows in writes.copies:
        await conn.copy_records_to_table(table, schema_name="identity", columns=columns, records=rows)
    if writes.events:
        # COPY, a plain insert: a message_id another batch stored concurrently (the message_id
        # check takes no lock) fails the transaction, and the retry reports it as a duplicate.
        await conn.copy_records_to_table(
            "events", schema_name="identity", columns=_EVENT_COLUMNS, records=writes.events
        )


@dataclass
class _Batch:
    """A batch with everything that needs no lock worked out before its transaction starts."""

    workspace: uuid.UUID
    prepared: Prepared
    # The advisory lock key of each id and ("phone", phone) of the batch.
    key_of: dict[IdentityKey, int]
    lock_keys: list[int]
    payloads: list[bytes]
    message_ids: list[str]
    groups: Groups

    def part(self, indexes: list[int]) -> _Part:
        if len(indexes) == len(self.payloads):
            return _Part(indexes, self.prepared, self.lock_keys, self.payloads)
        prepared = self.prepared.part(indexes)
        keys = {self.key_of[k] for k in prepared.ids} | {self.key_of[("phone", p)] for p in prepared.phones}
        return _Part(indexes, prepared, sorted(keys), [self.payloads[i] for i in indexes])


@dataclass
class _Part:
    """Events of a batch resolved and written together, at ``indexes`` in the batch."""

    indexes: list[int]
    prepared: Prepared
    lock_keys: list[int]
    payloads: list[bytes]


def _prepare(workspace_id: str, events: Sequence[Event], payloads: list[bytes] | None = None) -> _Batch:
    prepared = prepare(events)
    key_of: dict[IdentityKey, int] = {}
    lock_key = _lock_keys(workspace_id)

    def key(kind: str, value: str) -> int:
        k = key_of.get((kind, value))
        if k is None:
            k = key_of[(kind, value)] = lock_key(kind, value)
        return k

    event_keys = [
        [key(kind, value) for kind, value in ids] + ([key("phone", e.phone)] if e.phone else [])
        for e, ids in zip(events, prepared.event_ids, strict=True)
    ]
    message_ids = [e.message_id for e in events]
    return _Batch(
        DbUUID(workspace_id),
        prepared,
        key_of,
        sorted(set(key_of.values())),
        [e.SerializeToString() for e in events] if payloads is None else payloads,
        list(dict.fromkeys(message_ids)),
        group_events(event_keys, message_ids),
    )


async def record_events(conn: asyncpg.Connection, workspace_id: str, events: Sequence[Event]) -> list[Outcome]:
    """Store and resolve one batch inside the caller's transaction, in a fixed handful of statements."""
    return await _record(conn, _prepare(workspace_id, events), None, probe=True)


# How long a batch's transaction may sit idle (its process frozen, or cut off) before PostgreSQL
# ends it and frees its locks. Between its statements a batch only runs Python (milliseconds) or
# polls every EARLIER_BATCH_POLL; the margin is for a process starved of CPU.
BATCH_IDLE_TIMEOUT_MS = 10_000

# How long the events that wait for earlier batches of this process wait at most before they queue
# for their locks in PostgreSQL anyway, and how often they check that none of those waits for a
# lock they hold (see ``Claim.wait_for_earlier``).
EARLIER_BATCH_WAIT = 2.0
EARLIER_BATCH_POLL = 0.02
# The lock timeout of what a batch does ahead of earlier batches of this process.
AHEAD_LOCK_TIMEOUT_MS = 50

# Whether backend $1 holds a lock one of backends $2 waits for. pg_blocking_pids takes the lock
# manager's locks, so it is asked only of backends waiting for a lock at all.
_BLOCKS_ANY = """
    SELECT EXISTS (SELECT 1 FROM pg_stat_activity a
                    WHERE a.pid = ANY($2::int[])
                      AND CASE WHEN a.wait_event_type = 'Lock' THEN $1 = ANY(pg_blocking_pids(a.pid)) END)"""


async def _record(
    conn: asyncpg.Connection, batch: _Batch, claim: Claim | None, *, probe: bool, split: bool = True
) -> list[Outcome]:
    """Locks first, within each part in one global order: advisory locks on the part's ids and
    phones (sorted), then the users rows they map to (sorted), then the contact rows (sorted).
    Everything after works on locked rows only. A deadlock (possible across the two parts, and
    with batches of other processes) is detected by PostgreSQL and the batch runs again.

    Events untouched by the keys earlier batches of this process claimed go first, the rest
    once those batches have ended: see ``inflight``. When the later part reaches a user or
    contact the first had or created (stored links the batch does not show), the batch runs
    again whole, after the earlier batches (``split=False``).

    With ``probe``, the message ids stored before are read first (before any lock, while an
    earlier batch may still hold them: that read takes no lock anyway, see ``_run_writes``);
    without, the batch assumes there are none, and one that is stored fails the events' COPY.
    """
    ws = batch.workspace
    # The events lock comes first, before this transaction has an xid: stream readers rely on
    # every transaction that can add events holding it whenever it has an xid. In the same round
    # trip, a short idle timeout: a batch waits on nothing but its own statements, and one whose
    # process froze would otherwise hold its locks, which other replicas' batches wait for, for
    # the pool's 60 s.
    await conn.execute(
        f"SET LOCAL idle_in_transaction_session_timeout = {BATCH_IDLE_TIMEOUT_MS};"
        " LOCK TABLE identity.events IN ROW EXCLUSIVE MODE"
    )
    existing: dict[str, uuid.UUID | None] = {}
    if probe:
        rows = await conn.fetch(_EXISTING_EVENTS, ws, batch.message_ids)
        existing = {r["message_id"]: r["contact_id"] for r in rows}
    outcomes: list[Outcome | None] = [None] * len(batch.payloads)
    alone = claim is None or not claim.earlier
    if alone:
        now, later = list(range(len(batch.payloads))), []
    elif split:
        now, later = batch.groups.split(claim.busy)  # type: ignore[union-attr]
    else:  # all of it after the earlier batches, as the later part would be
        now, later = [], list(range(len(batch.payloads)))

    async def blocked_by_me(pids: list[int]) -> bool:
        return bool(await conn.fetchval(_BLOCKS_ANY, conn.get_server_pid(), pids))

    users: set[uuid.UUID] = set()
    contacts: set[uuid.UUID] = set()
    for indexes in (now, later):
        if not indexes:
            continue
        ahead = indexes is now and not alone
        if indexes is later and claim is not None:
            await claim.wait_for_earlier(blocked_by_me, EARLIER_BATCH_WAIT, EARLIER_BATCH_POLL)
        elif ahead:
            # Ahead of earlier batches of this process, a wait for a lock may close a cycle with
            # one of them (a user row reached through another id): give up soon, and run again
            # after them.
            await conn.execute(f"SET LOCAL lock_timeout = '{AHEAD_LOCK_TIMEOUT_MS}ms'")
        part = batch.part(indexes)
        # In the list's (sorted) order: a function scan returns the elements as they come.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(k::int8) FROM json_array_elements_text($1::text::json) AS k",
            _json_list(part.lock_keys),
        )
        state = await _locked_state(conn, ws, part.prepared.ids, part.prepared.phones)
        # The groups share no id, phone or message id of the batch, but stored users and contacts
        # can still link them (one user's anonymous and user ids in two groups, users sharing
        # a contact). Then the parts are not independent: the batch runs again, unsplit.
        if not users.isdisjoint(state.users) or not contacts.isdisjoint(state.contacts):
            raise PartsOverlap
        state.existing = existing
        plan = resolve(part.prepared, state, _new_id)
        _log_refused(ws, state)
        # After resolving: the users and contacts this part created count too (joining a stored
        # user into a new one moves the stored user's other ids to it).
        users.update(state.users)
        contacts.update(state.contacts)
        await _run_writes(conn, _writes(ws, plan, part.payloads))
        for i, outcome in zip(part.indexes, plan.outcomes, strict=True):
            outcomes[i] = outcome
        if ahead:
            # Off again before the later part, and before COMMIT, which may wait for a lock too.
            await conn.execute("SET LOCAL lock_timeout TO DEFAULT")
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


# The first pause before a batch that found PostgreSQL's lock table full runs again; it doubles
# with each attempt (up to a second), so eight attempts wait about 3.5 s in all.
OUT_OF_LOCKS_PAUSE = 0.05

# After a batch met a message id stored before, how long this process keeps reading the stored
# ids of every batch first: retries come in runs (a client resending after a timeout).
PROBE_AFTER_DUPLICATE = 30.0


# Going ahead of earlier batches is worth it while it seldom has to give way. Per workspace, a
# running share of the batches that went ahead and gave way; above the limit, batches wait for
# the earlier ones from the start, and each one that does so lowers the share, so going ahead is
# tried again after a while.
GIVE_WAY_WEIGHT = 0.25
GIVE_WAY_LIMIT = 0.3
GIVE_WAY_DECAY = 0.97


class BatchWriter:
    """Stores the batches of one identity process."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.in_flight = InFlight()
        self._probe_until = 0.0
        self._give_way: dict[str, float] = {}

    def goes_ahead(self, workspace_id: str) -> bool:
        """Whether a new batch of the workspace may go ahead of earlier ones (``GIVE_WAY_LIMIT``)."""
        share = self._give_way.get(workspace_id, 0.0)
        if share <= GIVE_WAY_LIMIT:
            return True
        self._give_way[workspace_id] = share * GIVE_WAY_DECAY
        return False

    def _note_ahead(self, workspace_id: str, gave_way: bool) -> None:
        share = self._give_way.get(workspace_id, 0.0)
        share += GIVE_WAY_WEIGHT * ((1.0 if gave_way else 0.0) - share)
        if share < 0.01:
            self._give_way.pop(workspace_id, None)
        else:
            self._give_way[workspace_id] = share

    async def record(
        self, workspace_id: str, events: Sequence[Event], attempts: int = 8, *, payloads: list[bytes] | None = None
    ) -> list[Outcome]:
        """Store one batch in one transaction; it commits whole or not at all. Retries lost races.

        A batch first goes without reading which of its message ids are stored: they almost
        never are (ids are generated per event, and a retry usually follows a failure that
        stored nothing), and the read cost PostgreSQL as much as a tenth of the batch. A stored
        one fails the events' COPY on the primary key, and the batch runs again with the read,
        which then reports those events as duplicates.
        """
        batch = _prepare(workspace_id, events, payloads)
        probe = time.monotonic() < self._probe_until
        split = self.goes_ahead(workspace_id)
        went_ahead = False
        pause = 0.0
        tables_full = 0
        for attempt in range(attempts):
            if pause:
                await asyncio.sleep(pause)
                pause = 0.0
            # Claimed from before the transaction starts until it has ended, so a later batch
            # knows which of its events must wait for this one.
            claim = self.in_flight.claim(workspace_id, batch.lock_keys)
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    claim.pid = conn.get_server_pid()
                    went_ahead = split and bool(claim.earlier)
                    outcomes = await _record(conn, batch, claim, probe=probe, split=split)
                if went_ahead and attempt == 0:
                    self._note_ahead(workspace_id, gave_way=False)
                return outcomes
            except (
                RetryBatch,
                EarlierBatchBlocked,
                asyncpg.DeadlockDetectedError,
                asyncpg.LockNotAvailableError,
                asyncpg.UniqueViolationError,
                asyncpg.OutOfMemoryError,
            ) as exc:
                # The batch rolled back: it met a stored message id, a concurrent join of users, a
                # deadlock, had to give way to an earlier batch of this process, or found
                # PostgreSQL's lock table full. It runs again.
                if isinstance(exc, asyncpg.OutOfMemoryError) and "shared memory" not in str(exc):
                    raise  # the server is out of memory itself: not a wait-and-retry matter
                if attempt == attempts - 1:
                    raise Aborted(
                        f"the batch could not be stored in {attempts} attempts (concurrent batches, or PostgreSQL's "
                        "lock table full); nothing was stored, retry"
                    ) from exc
                if isinstance(exc, asyncpg.OutOfMemoryError):
                    # "out of shared memory": the advisory locks of the batches in flight (one
                    # per id and phone) fill the lock table. They are released as those commit;
                    # this batch waits a little, then tries again.
                    pause = min(OUT_OF_LOCKS_PAUSE * 2**tables_full, 1.0) * random.uniform(0.5, 1.5)
                    tables_full += 1
                    log.warning(
                        "record_lock_table_full",
                        attempt=attempt + 1,
                        pause_s=round(pause, 3),
                        error=str(exc).splitlines()[0],
                    )
                    continue
                if isinstance(exc, (PartsOverlap, EarlierBatchBlocked, asyncpg.LockNotAvailableError)):
                    if split and went_ahead:
                        self._note_ahead(workspace_id, gave_way=True)
                    split = False  # run again after the earlier batches of this process
                if isinstance(exc, asyncpg.UniqueViolationError) and not probe:
                    probe = True
                    self._probe_until = time.monotonic() + PROBE_AFTER_DUPLICATE
                log.info("record_retry", attempt=attempt + 1, reason=type(exc).__name__)
            finally:
                self.in_flight.release(claim)
        raise AssertionError("unreachable")
