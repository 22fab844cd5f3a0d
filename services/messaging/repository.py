"""SQL for the messaging schema (asyncpg, set-based on the send and dispatch paths)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.messaging.gate import Policy
from services.messaging.outcomes import Outcome

Conn = asyncpg.Connection | asyncpg.Pool


@dataclass(frozen=True)
class SendState:
    """What the gate needs to know about a phone, read under the phone's lock."""

    sms_subscribed: bool | None
    sent_last_24h: int
    conversation_id: str | None
    conversation_started_by_contact: bool


@dataclass(frozen=True)
class NewMessage:
    workspace_id: str
    phone: str
    body: str
    status: str
    segments: int
    encoding: str
    request_id: str | None
    contact_id: str = ""
    campaign_id: str = ""
    transactional: bool = False
    is_reply: bool = False
    time_zone: str = ""
    due_time: datetime | None = None
    error_code: str = ""
    error_message: str = ""
    conversation_id: str | None = None


@dataclass(frozen=True)
class DispatchResult:
    workspace_id: str
    id: str
    status: str
    provider_message_id: str
    error_code: str
    error_message: str
    due_time: datetime | None


@dataclass(frozen=True)
class ConsentChange:
    workspace_id: str
    phone: str
    channel: str
    subscribed: bool
    consent_time: datetime
    source: str
    consent_text: str = ""
    ip: str = ""
    # The contact's own act, happening now (a keyword reply, a call disposition): it applies in
    # arrival order even over a recorded consent whose (client-given) time is later.
    live: bool = False


# ---------------------------------------------------------------- policy


async def get_policy(conn: Conn, workspace_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM messaging.policies WHERE workspace_id = $1", workspace_id)


async def save_policy(conn: Conn, workspace_id: str, p: Policy) -> None:
    await conn.execute(
        """INSERT INTO messaging.policies (workspace_id, require_opt_in, help_text, send_window_start,
               send_window_end, rate_limit_per_second, daily_cap)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (workspace_id) DO UPDATE SET require_opt_in = $2, help_text = $3,
               send_window_start = $4, send_window_end = $5, rate_limit_per_second = $6, daily_cap = $7,
               update_time = now()""",
        workspace_id,
        p.require_opt_in,
        p.help_text,
        p.send_window_start,
        p.send_window_end,
        p.rate_limit_per_second,
        p.daily_cap,
    )


# ---------------------------------------------------------------- sending


async def lock_phone(conn: asyncpg.Connection, workspace_id: str, phone: str) -> None:
    """Serialize sends and consent changes of one phone for the rest of the transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{workspace_id}|{phone}")


async def lock_phones(conn: asyncpg.Connection, keys: Sequence[tuple[str, str]]) -> None:
    """Take every (workspace, phone) lock of a batch, in one sorted order so batches never deadlock."""
    ordered = sorted({f"{ws}|{phone}" for ws, phone in keys})
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest($1::text[]) AS k", ordered)


async def send_states(
    conn: asyncpg.Connection, keys: Sequence[tuple[str, str]], since: datetime
) -> dict[tuple[str, str], SendState]:
    """What the gate needs to know about each phone (consent, 24-hour count, conversation), in one statement."""
    unique = sorted(set(keys))
    # One join for the whole batch (a correlated count per phone would rescan the table per phone
    # whenever the planner thinks it small).
    rows = await conn.fetch(
        """WITH k AS (SELECT * FROM unnest($1::uuid[], $2::text[]) AS k(workspace_id, phone)),
           sent AS (
             SELECT m.workspace_id, m.phone, count(*) AS n FROM messaging.messages m
             JOIN k ON m.workspace_id = k.workspace_id AND m.phone = k.phone
             WHERE m.direction = 'outbound' AND m.status NOT IN ('blocked', 'failed') AND m.create_time > $3
             GROUP BY m.workspace_id, m.phone)
           SELECT k.workspace_id, k.phone, c.subscribed AS sms_subscribed, coalesce(sent.n, 0) AS sent_24h,
                  cv.id AS conversation_id, cv.started_by_contact
           FROM k
           LEFT JOIN messaging.consents c
             ON c.workspace_id = k.workspace_id AND c.phone = k.phone AND c.channel = 'sms'
           LEFT JOIN sent ON sent.workspace_id = k.workspace_id AND sent.phone = k.phone
           LEFT JOIN messaging.conversations cv ON cv.workspace_id = k.workspace_id AND cv.phone = k.phone""",
        [k[0] for k in unique],
        [k[1] for k in unique],
        since,
    )
    return {
        (str(r["workspace_id"]), r["phone"]): SendState(
            r["sms_subscribed"],
            int(r["sent_24h"]),
            str(r["conversation_id"]) if r["conversation_id"] else None,
            bool(r["started_by_contact"]),
        )
        for r in rows
    }


async def open_conversations(
    conn: asyncpg.Connection, items: Sequence[tuple[str, str, str]], now: datetime
) -> dict[tuple[str, str], str]:
    """The conversation of each (workspace, phone, contact id), created business-started when new."""
    unique = sorted({(ws, phone): contact for ws, phone, contact in items}.items())
    rows = await conn.fetch(
        """INSERT INTO messaging.conversations AS c
               (workspace_id, phone, contact_id, started_by_contact, last_message_time, create_time)
           SELECT ws, phone, contact, false, $4, $4
           FROM unnest($1::uuid[], $2::text[], $3::text[]) AS k(ws, phone, contact)
           ON CONFLICT (workspace_id, phone) DO UPDATE
               SET last_message_time = greatest(c.last_message_time, EXCLUDED.last_message_time),
                   contact_id = CASE WHEN c.contact_id = '' THEN EXCLUDED.contact_id ELSE c.contact_id END
           RETURNING workspace_id, phone, id""",
        [k[0][0] for k in unique],
        [k[0][1] for k in unique],
        [k[1] for k in unique],
        now,
    )
    return {(str(r["workspace_id"]), r["phone"]): str(r["id"]) for r in rows}


def _message_args(m: NewMessage) -> list[Any]:
    return [
        m.workspace_id,
        m.phone,
        m.contact_id,
        m.body,
        m.status,
        m.segments,
        m.encoding,
        m.error_code,
        m.error_message,
        m.due_time,
        m.request_id,
        m.campaign_id,
        m.transactional,
        m.is_reply,
        m.time_zone,
    ]


async def insert_outbound_many(
    conn: asyncpg.Connection, ms: Sequence[NewMessage], now: datetime
) -> list[asyncpg.Record]:
    """Insert messages; those whose request_id exists are skipped (not returned)."""
    cols = list(zip(*([*_message_args(m), m.conversation_id] for m in ms), strict=True))
    return await conn.fetch(
        f"""INSERT INTO messaging.messages ({_MESSAGE_COLUMNS})
            SELECT ws, conv, contact, phone, 'outbound', body, status, segments, encoding, error_code, error_message,
                   due_time, request_id, campaign_id, transactional, is_reply, time_zone, $17, $17
            FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[],
                        $8::text[], $9::text[], $10::timestamptz[], $11::text[], $12::text[], $13::bool[],
                        $14::bool[], $15::text[], $16::uuid[])
              AS k(ws, phone, contact, body, status, segments, encoding, error_code, error_message, due_time,
                   request_id, campaign_id, transactional, is_reply, time_zone, conv)
            ON CONFLICT (workspace_id, request_id) DO NOTHING
            RETURNING *""",
        *[list(c) for c in cols],
        now,
    )


async def messages_by_request(conn: Conn, keys: Sequence[tuple[str, str]]) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT m.* FROM messaging.messages m
           JOIN unnest($1::uuid[], $2::text[]) AS k(ws, rid) ON m.workspace_id = k.ws AND m.request_id = k.rid""",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )


_MESSAGE_COLUMNS = """workspace_id, conversation_id, contact_id, phone, direction, body, status, segments,
    encoding, error_code, error_message, due_time, request_id, campaign_id, transactional, is_reply,
    time_zone, create_time, update_time"""


async def get_message(conn: Conn, workspace_id: str, message_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM messaging.messages WHERE workspace_id = $1 AND id = $2::uuid", workspace_id, message_id
    )


async def list_messages(
    conn: Conn,
    workspace_id: str,
    *,
    contact_id: str = "",
    conversation_id: str = "",
    phone: str = "",
    after: tuple[datetime, str] | None,
    limit: int,
    oldest_first: bool = False,
) -> list[asyncpg.Record]:
    """Messages newest first (keyset by create_time, id), optionally of one contact/conversation/phone."""
    order = "ASC" if oldest_first else "DESC"
    cmp = ">" if oldest_first else "<"
    return await conn.fetch(
        f"""SELECT * FROM messaging.messages
            WHERE workspace_id = $1
              AND ($2 = '' OR contact_id = $2)
              AND ($3 = '' OR conversation_id = nullif($3, '')::uuid)
              AND ($4 = '' OR phone = $4)
              AND ($5::timestamptz IS NULL OR (create_time, id) {cmp} ($5, $6::uuid))
            ORDER BY create_time {order}, id {order}
            LIMIT $7""",
        workspace_id,
        contact_id,
        conversation_id,
        phone,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )


# ---------------------------------------------------------------- dispatch


async def claim_due(conn: asyncpg.Connection, now: datetime, limit: int, lease_seconds: float) -> list[asyncpg.Record]:
    """Lease up to ``limit`` due messages (SKIP LOCKED: replicas share the work), with their SMS consent."""
    return await conn.fetch(
        """WITH due AS (
             SELECT workspace_id, id FROM messaging.messages
             WHERE status IN ('queued', 'scheduled') AND due_time <= $1
               AND (lease_until IS NULL OR lease_until < clock_timestamp())
             ORDER BY due_time
             LIMIT $2
             FOR UPDATE SKIP LOCKED)
           UPDATE messaging.messages m
              SET lease_until = clock_timestamp() + make_interval(secs => $3), status = 'queued'
             FROM due
            WHERE m.workspace_id = due.workspace_id AND m.id = due.id
           RETURNING m.*,
             (SELECT subscribed FROM messaging.consents c
               WHERE c.workspace_id = m.workspace_id AND c.phone = m.phone AND c.channel = 'sms') AS sms_subscribed""",
        now,
        limit,
        lease_seconds,
    )


async def take_tokens(conn: asyncpg.Connection, workspace_id: str, rate: float, want: int) -> int:
    """Take up to ``want`` hand-offs from the workspace's bucket (refilled at ``rate``/s, burst one second)."""
    if rate <= 0:
        return want
    burst = max(1.0, rate)
    tokens = await conn.fetchval(
        """INSERT INTO messaging.rate_buckets AS b (workspace_id, tokens, refill_time)
           VALUES ($1, $2, clock_timestamp())
           ON CONFLICT (workspace_id) DO UPDATE
             SET tokens = least($2, b.tokens + extract(epoch FROM clock_timestamp() - b.refill_time) * $3),
                 refill_time = clock_timestamp()
           RETURNING tokens""",
        workspace_id,
        burst,
        rate,
    )
    granted = max(0, min(want, int(tokens)))
    if granted:
        await conn.execute(
            "UPDATE messaging.rate_buckets SET tokens = tokens - $2 WHERE workspace_id = $1", workspace_id, granted
        )
    return granted


async def release(conn: asyncpg.Connection, rows: Sequence[tuple[str, str, datetime]]) -> None:
    """Give leased messages back with a new due time (rate-limited ones)."""
    if not rows:
        return
    await conn.execute(
        """UPDATE messaging.messages m SET lease_until = NULL, due_time = r.due_time
           FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS r(workspace_id, id, due_time)
           WHERE m.workspace_id = r.workspace_id AND m.id = r.id""",
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
    )


async def reschedule(conn: asyncpg.Connection, rows: Sequence[tuple[str, str, datetime]]) -> None:
    """Put leased messages back as SCHEDULED for their next window start (the window closed meanwhile)."""
    if not rows:
        return
    await conn.execute(
        """UPDATE messaging.messages m SET lease_until = NULL, due_time = r.due_time, status = 'scheduled'
           FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS r(workspace_id, id, due_time)
           WHERE m.workspace_id = r.workspace_id AND m.id = r.id""",
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
    )


async def record_results(
    conn: asyncpg.Connection, results: Sequence[DispatchResult], now: datetime
) -> list[asyncpg.Record]:
    """Apply provider outcomes (forward-only) and count the attempt; returns rows whose status moved."""
    if not results:
        return []
    return await conn.fetch(
        """WITH r AS (
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                                  $7::timestamptz[])
               AS r(workspace_id, id, status, sid, error_code, error_message, due_time)),
           old AS (
             SELECT m.workspace_id, m.id, m.status FROM messaging.messages m
             JOIN r ON m.workspace_id = r.workspace_id AND m.id = r.id FOR UPDATE OF m)
           UPDATE messaging.messages m SET
             status = CASE WHEN messaging.status_rank(r.status) > messaging.status_rank(m.status)
                           THEN r.status ELSE m.status END,
             provider_message_id = coalesce(nullif(r.sid, ''), m.provider_message_id),
             error_code = r.error_code, error_message = r.error_message,
             attempts = m.attempts + CASE WHEN r.status = 'blocked' THEN 0 ELSE 1 END,
             lease_until = NULL,
             due_time = coalesce(r.due_time, m.due_time),
             update_time = $8
           FROM r, old
           WHERE m.workspace_id = r.workspace_id AND m.id = r.id
             AND old.workspace_id = m.workspace_id AND old.id = m.id
           RETURNING m.*, old.status AS old_status""",
        [r.workspace_id for r in results],
        [r.id for r in results],
        [r.status for r in results],
        [r.provider_message_id for r in results],
        [r.error_code for r in results],
        [r.error_message for r in results],
        [r.due_time for r in results],
        now,
    )


async def lock_provider_ids(conn: asyncpg.Connection, sids: Sequence[tuple[str, str]]) -> None:
    """Serialize recording a provider id with callbacks naming it, so an early callback is never lost.

    Without this, a callback whose transaction overlaps the dispatcher's could miss the id
    (not yet committed) and park its status after the dispatcher looked for parked ones.
    """
    keys = sorted(f"{ws}|{sid}" for ws, sid in sids)
    if keys:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('sid|' || k, 0)) FROM unnest($1::text[]) AS k", keys
        )


async def take_early_statuses(conn: asyncpg.Connection, sids: Sequence[tuple[str, str]]) -> list[asyncpg.Record]:
    """Status callbacks that arrived before these provider ids were recorded (and forget them)."""
    if not sids:
        return []
    return await conn.fetch(
        """DELETE FROM messaging.early_statuses e
           USING unnest($1::uuid[], $2::text[]) AS s(workspace_id, sid)
           WHERE e.workspace_id = s.workspace_id AND e.provider_message_id = s.sid
           RETURNING e.*""",
        [s[0] for s in sids],
        [s[1] for s in sids],
    )


# ---------------------------------------------------------------- webhooks


async def claim_receipts(conn: asyncpg.Connection, workspace_id: str, keys: Sequence[str]) -> bool:
    """Record webhook idempotency keys; False when any was seen before (a redelivery)."""
    inserted = await conn.fetch(
        """INSERT INTO messaging.webhook_receipts (workspace_id, key)
           SELECT $1, k FROM unnest($2::text[]) AS k
           ON CONFLICT DO NOTHING RETURNING key""",
        workspace_id,
        list(keys),
    )
    return len(inserted) == len(keys)


@dataclass(frozen=True)
class CallbackItem:
    """One status callback of a batch: its keys are unique within the batch (the caller sees to that)."""

    n: int
    workspace_id: str
    sid: str
    # Our status for Twilio's, or "" when it says nothing new (queued, sending, ...).
    status: str
    error_code: str
    key: str
    token_key: str


async def apply_callbacks(
    conn: asyncpg.Connection, items: Sequence[CallbackItem], now: datetime
) -> list[asyncpg.Record]:
    """Record a batch of status callbacks and apply them, in one statement; a row per callback that was new.

    Each row carries ``n`` (the callback's), ``parked`` (its provider id was not known yet: its
    status waits in ``early_statuses`` for the dispatcher), ``applied`` (it is the one callback
    that moved its message) and, when applied, the moved message's columns. A callback whose
    keys (``status:{sid}:{status}``, and the Twilio idempotency token) were recorded before
    gets no row: it is a redelivery and changes nothing. Of several new statuses of one
    message, only the furthest can move it; none moves a message backwards.

    The caller holds the provider ids' locks (``lock_provider_ids``, taken before this statement
    so its snapshot sees any hand-off recorded before the lock was granted).
    """
    return await conn.fetch(
        """WITH cb AS (
             SELECT * FROM unnest($1::int[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
               AS cb(n, ws, sid, status, error_code, key, token_key)),
           claimed AS (
             INSERT INTO messaging.webhook_receipts (workspace_id, key)
             SELECT cb.ws, k.key FROM cb CROSS JOIN LATERAL (VALUES (cb.key), (cb.token_key)) AS k(key)
             WHERE k.key <> ''
             ON CONFLICT DO NOTHING
             RETURNING workspace_id, key),
           fresh AS (
             SELECT cb.* FROM cb
             WHERE EXISTS (SELECT 1 FROM claimed c WHERE c.workspace_id = cb.ws AND c.key = cb.key)
               AND (cb.token_key = '' OR EXISTS (
                 SELECT 1 FROM claimed c WHERE c.workspace_id = cb.ws AND c.key = cb.token_key))),
           best AS (
             SELECT DISTINCT ON (ws, sid) * FROM fresh WHERE status <> ''
             ORDER BY ws, sid, messaging.status_rank(status) DESC, n),
           moved AS (
             UPDATE messaging.messages m SET status = b.status,
               error_code = CASE WHEN b.error_code = '' THEN m.error_code ELSE b.error_code END, update_time = $8
             FROM best b
             WHERE m.workspace_id = b.ws AND m.provider_message_id = b.sid
               AND messaging.status_rank(b.status) > messaging.status_rank(m.status)
             RETURNING b.n AS moved_n, m.*),
           unknown AS (
             SELECT b.* FROM best b WHERE NOT EXISTS (
               SELECT 1 FROM messaging.messages m WHERE m.workspace_id = b.ws AND m.provider_message_id = b.sid)),
           parked AS (
             INSERT INTO messaging.early_statuses (workspace_id, provider_message_id, status, error_code)
             SELECT ws, sid, status, error_code FROM unknown ON CONFLICT DO NOTHING)
           SELECT f.n, u.n IS NOT NULL AS parked, mv.moved_n IS NOT NULL AS applied, mv.*
           FROM fresh f
           LEFT JOIN moved mv ON mv.moved_n = f.n
           LEFT JOIN unknown u ON u.n = f.n""",
        [i.n for i in items],
        [i.workspace_id for i in items],
        [i.sid for i in items],
        [i.status for i in items],
        [i.error_code for i in items],
        [i.key for i in items],
        [i.token_key for i in items],
        now,
    )


async def upsert_inbound_conversation(
    conn: asyncpg.Connection, workspace_id: str, phone: str, contact_id: str, agent_id: str, now: datetime
) -> asyncpg.Record:
    """The phone's conversation (created as contact-started), routed to ``agent_id`` when it has no agent."""
    row = await conn.fetchrow(
        """INSERT INTO messaging.conversations AS c
               (workspace_id, phone, contact_id, agent_id, started_by_contact, last_message_time, create_time)
           VALUES ($1, $2, $3, $4, true, $5, $5)
           ON CONFLICT (workspace_id, phone) DO UPDATE SET
               last_message_time = greatest(c.last_message_time, EXCLUDED.last_message_time),
               contact_id = CASE WHEN c.contact_id = '' THEN EXCLUDED.contact_id ELSE c.contact_id END,
               agent_id = CASE WHEN c.agent_id = '' THEN EXCLUDED.agent_id ELSE c.agent_id END
           RETURNING *""",
        workspace_id,
        phone,
        contact_id,
        agent_id,
        now,
    )
    assert row is not None
    return row


async def flag_conversation(conn: asyncpg.Connection, workspace_id: str, conversation_id: str, text: str) -> None:
    await conn.execute(
        """UPDATE messaging.conversations SET opt_out_flagged = true, opt_out_flag_text = $3
           WHERE workspace_id = $1 AND id = $2::uuid""",
        workspace_id,
        conversation_id,
        text,
    )


async def insert_inbound(
    conn: asyncpg.Connection,
    workspace_id: str,
    conversation_id: str,
    contact_id: str,
    phone: str,
    body: str,
    sid: str,
    segments: int,
    encoding: str,
    now: datetime,
) -> asyncpg.Record:
    row = await conn.fetchrow(
        """INSERT INTO messaging.messages (workspace_id, conversation_id, contact_id, phone, direction, body,
               status, segments, encoding, provider_message_id, create_time, update_time)
           VALUES ($1, $2::uuid, $3, $4, 'inbound', $5, 'received', $6, $7, $8, $9, $9)
           RETURNING *""",
        workspace_id,
        conversation_id,
        contact_id,
        phone,
        body,
        segments,
        encoding,
        sid,
        now,
    )
    assert row is not None
    return row


# ---------------------------------------------------------------- conversations


async def get_conversation(conn: Conn, workspace_id: str, conversation_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM messaging.conversations WHERE workspace_id = $1 AND id = $2::uuid", workspace_id, conversation_id
    )


async def conversation_by_phone(conn: Conn, workspace_id: str, phone: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM messaging.conversations WHERE workspace_id = $1 AND phone = $2", workspace_id, phone
    )


async def list_conversations(
    conn: Conn, workspace_id: str, *, agent_id: str, unassigned: bool, after: tuple[datetime, str] | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT * FROM messaging.conversations
           WHERE workspace_id = $1
             AND ($2 = '' OR agent_id = $2)
             AND (NOT $3 OR agent_id = '')
             AND ($4::timestamptz IS NULL OR (last_message_time, id) < ($4, $5::uuid))
           ORDER BY last_message_time DESC, id DESC
           LIMIT $6""",
        workspace_id,
        agent_id,
        unassigned,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )


# ---------------------------------------------------------------- consent


async def apply_consent(conn: asyncpg.Connection, c: ConsentChange) -> tuple[asyncpg.Record | None, bool | None]:
    """Record ``c`` unless a newer consent is recorded: (row when applied, previous subscribed state)."""
    previous = await conn.fetchval(
        """SELECT subscribed FROM messaging.consents
           WHERE workspace_id = $1 AND phone = $2 AND channel = $3 FOR UPDATE""",
        c.workspace_id,
        c.phone,
        c.channel,
    )
    row = await conn.fetchrow(
        """INSERT INTO messaging.consents AS k
               (workspace_id, phone, channel, subscribed, consent_time, source, consent_text, ip)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (workspace_id, phone, channel) DO UPDATE SET
               subscribed = EXCLUDED.subscribed,
               consent_time = CASE WHEN $9
                                   THEN greatest(EXCLUDED.consent_time, k.consent_time + interval '1 microsecond')
                                   ELSE EXCLUDED.consent_time END,
               source = EXCLUDED.source, consent_text = EXCLUDED.consent_text, ip = EXCLUDED.ip,
               update_time = now()
           WHERE $9 OR k.consent_time <= EXCLUDED.consent_time
           RETURNING *""",
        c.workspace_id,
        c.phone,
        c.channel,
        c.subscribed,
        c.consent_time,
        c.source,
        c.consent_text,
        c.ip,
        c.live,
    )
    return row, previous


async def get_consents(conn: Conn, workspace_id: str, phone: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM messaging.consents WHERE workspace_id = $1 AND phone = $2 ORDER BY channel", workspace_id, phone
    )


async def get_consent(conn: Conn, workspace_id: str, phone: str, channel: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM messaging.consents WHERE workspace_id = $1 AND phone = $2 AND channel = $3",
        workspace_id,
        phone,
        channel,
    )


# ---------------------------------------------------------------- outbox


async def add_outcomes(conn: asyncpg.Connection, outcomes: Sequence[Outcome]) -> None:
    """Queue outcome events for ingest; a repeated message_id is kept once."""
    if not outcomes:
        return
    await conn.execute(
        """INSERT INTO messaging.outbox (workspace_id, message_id, name, phone, contact_id, properties, event_time)
           SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                                $7::timestamptz[])
           ON CONFLICT DO NOTHING""",
        [o.workspace_id for o in outcomes],
        [o.message_id for o in outcomes],
        [o.name for o in outcomes],
        [o.phone for o in outcomes],
        [o.contact_id for o in outcomes],
        [o.properties for o in outcomes],
        [o.event_time for o in outcomes],
    )


async def claim_outbox(conn: asyncpg.Connection, limit: int, lease_seconds: float) -> list[asyncpg.Record]:
    """Lease due outbox rows (SKIP LOCKED), oldest first."""
    return await conn.fetch(
        """WITH due AS (
             SELECT workspace_id, message_id FROM messaging.outbox
             WHERE next_attempt_time <= clock_timestamp()
             ORDER BY next_attempt_time LIMIT $1 FOR UPDATE SKIP LOCKED)
           UPDATE messaging.outbox o
              SET next_attempt_time = clock_timestamp() + make_interval(secs => $2), attempts = o.attempts + 1
             FROM due WHERE o.workspace_id = due.workspace_id AND o.message_id = due.message_id
           RETURNING o.*""",
        limit,
        lease_seconds,
    )


async def outbox_done(conn: Conn, workspace_id: str, message_ids: Sequence[str]) -> None:
    await conn.execute(
        "DELETE FROM messaging.outbox WHERE workspace_id = $1 AND message_id = ANY($2::text[])",
        workspace_id,
        list(message_ids),
    )


async def outbox_retry(conn: Conn, workspace_id: str, message_ids: Sequence[str], delay: float, error: str) -> None:
    await conn.execute(
        """UPDATE messaging.outbox SET next_attempt_time = clock_timestamp() + make_interval(secs => $3),
               last_error = $4
           WHERE workspace_id = $1 AND message_id = ANY($2::text[])""",
        workspace_id,
        list(message_ids),
        delay,
        error[:500],
    )


# ---------------------------------------------------------------- stream cursors


async def get_cursor(conn: Conn, name: str) -> str:
    return str(await conn.fetchval("SELECT cursor FROM messaging.stream_cursors WHERE name = $1", name) or "")


async def save_cursor(conn: Conn, name: str, cursor: str) -> None:
    await conn.execute(
        """INSERT INTO messaging.stream_cursors (name, cursor) VALUES ($1, $2)
           ON CONFLICT (name) DO UPDATE SET cursor = $2, update_time = now()""",
        name,
        cursor,
    )


# ---------------------------------------------------------------- agents and call tasks


async def create_agent(conn: Conn, workspace_id: str, request_id: str, name: str, queues: list[str]) -> asyncpg.Record:
    row = await conn.fetchrow(
        """WITH ins AS (
             INSERT INTO messaging.agents (workspace_id, name, queues, request_id) VALUES ($1, $2, $3, $4)
             ON CONFLICT (workspace_id, request_id) DO NOTHING RETURNING *)
           SELECT * FROM ins
           UNION ALL
           SELECT * FROM messaging.agents WHERE workspace_id = $1 AND request_id = $4
           LIMIT 1""",
        workspace_id,
        name,
        queues,
        request_id,
    )
    assert row is not None
    return row


async def get_agent(conn: Conn, workspace_id: str, agent_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM messaging.agents WHERE workspace_id = $1 AND id::text = $2", workspace_id, agent_id
    )


async def list_agents(conn: Conn, workspace_id: str, after: str | None, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT * FROM messaging.agents WHERE workspace_id = $1 AND ($2::uuid IS NULL OR id > $2::uuid)
           ORDER BY id LIMIT $3""",
        workspace_id,
        after,
        limit,
    )


async def insert_call_task(
    conn: asyncpg.Connection,
    workspace_id: str,
    request_id: str,
    contact_id: str,
    phone: str,
    queue: str,
    priority: int,
    notes: str,
    campaign_id: str,
    now: datetime,
) -> asyncpg.Record | None:
    """The new task; None when its request_id exists."""
    return await conn.fetchrow(
        """INSERT INTO messaging.call_tasks (workspace_id, request_id, contact_id, phone, queue, priority, notes,
               campaign_id, create_time, update_time)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
           ON CONFLICT (workspace_id, request_id) DO NOTHING RETURNING *""",
        workspace_id,
        request_id,
        contact_id,
        phone,
        queue,
        priority,
        notes,
        campaign_id,
        now,
    )


async def task_by_request(conn: Conn, workspace_id: str, request_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM messaging.call_tasks WHERE workspace_id = $1 AND request_id = $2", workspace_id, request_id
    )


async def get_task(conn: Conn, workspace_id: str, task_id: str, *, for_update: bool = False) -> asyncpg.Record | None:
    lock = " FOR UPDATE" if for_update else ""
    return await conn.fetchrow(
        f"SELECT * FROM messaging.call_tasks WHERE workspace_id = $1 AND id::text = $2{lock}", workspace_id, task_id
    )


async def list_open_tasks(
    conn: Conn, workspace_id: str, queue: str, after: tuple[int, datetime, str] | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT * FROM messaging.call_tasks
           WHERE workspace_id = $1 AND status = 'open' AND ($2 = '' OR queue = $2)
             AND ($3::int IS NULL OR (-priority, create_time, id) > (-$3::int, $4::timestamptz, $5::uuid))
           ORDER BY priority DESC, create_time, id
           LIMIT $6""",
        workspace_id,
        queue,
        after[0] if after else None,
        after[1] if after else None,
        after[2] if after else None,
        limit,
    )


async def claim_next_task(
    conn: Conn, workspace_id: str, agent_id: str, queues: list[str], now: datetime
) -> asyncpg.Record | None:
    """The highest-priority open task of ``queues`` (empty: any), claimed; SKIP LOCKED keeps claims apart."""
    return await conn.fetchrow(
        """WITH next AS (
             SELECT workspace_id, id FROM messaging.call_tasks
             WHERE workspace_id = $1 AND status = 'open' AND (cardinality($3::text[]) = 0 OR queue = ANY($3))
             ORDER BY priority DESC, create_time, id
             LIMIT 1 FOR UPDATE SKIP LOCKED)
           UPDATE messaging.call_tasks t SET status = 'claimed', agent_id = $2, update_time = $4
             FROM next WHERE t.workspace_id = next.workspace_id AND t.id = next.id
           RETURNING t.*""",
        workspace_id,
        agent_id,
        queues,
        now,
    )


async def complete_task(
    conn: asyncpg.Connection, workspace_id: str, task_id: str, disposition: str, notes: str, now: datetime
) -> asyncpg.Record:
    row = await conn.fetchrow(
        """UPDATE messaging.call_tasks SET status = 'completed', disposition = $3, disposition_notes = $4,
               update_time = $5
           WHERE workspace_id = $1 AND id::text = $2 RETURNING *""",
        workspace_id,
        task_id,
        disposition,
        notes,
        now,
    )
    assert row is not None
    return row
