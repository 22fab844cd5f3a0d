"""Campaign storage: definitions, versions, enrollments (the timer queue), step history, the stream cursor."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    from services.campaign.engine import _Plan

Conn = asyncpg.Connection | asyncpg.Pool

_CAMPAIGN_COLS = (
    "workspace_id, id, name, description, state, draft, live_version, create_time, update_time, publish_time"
)


class CursorMoved(Exception):
    """Another consumer advanced the stream cursor first; this batch must not commit."""


def _uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise InvalidArgument.field(field, "not a valid id") from None


def encode_token(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps([str(p) for p in parts]).encode()).decode()


def decode_token(token: str, n: int) -> list[str]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(parts, list) or len(parts) != n:
            raise ValueError
        return [str(p) for p in parts]
    except (ValueError, TypeError, RecursionError):  # RecursionError: JSON nested past the parser's depth
        raise InvalidArgument.field("page_token", "not a token from a previous response") from None


# ---------------------------------------------------------------------------------- campaigns


async def create_campaign(
    pool: asyncpg.Pool, ws: str, *, name: str, description: str, draft: dict[str, Any], request_id: str
) -> asyncpg.Record:
    async with pool.acquire() as conn, conn.transaction():
        if request_id:
            prior = await conn.fetchrow(
                f"SELECT {_CAMPAIGN_COLS} FROM campaign.campaigns WHERE workspace_id = $1 AND request_id = $2",
                ws,
                request_id,
            )
            if prior is not None:
                return prior
        try:
            row = await conn.fetchrow(
                f"""INSERT INTO campaign.campaigns (workspace_id, id, name, description, draft, request_id)
                    VALUES ($1, $2, $3, $4, $5, NULLIF($6, ''))
                    RETURNING {_CAMPAIGN_COLS}""",
                ws,
                uuid.uuid4(),
                name,
                description,
                draft,
                request_id,
            )
        except asyncpg.UniqueViolationError as exc:
            if "request_id" in str(exc.constraint_name or ""):
                return await conn.fetchrow(
                    f"SELECT {_CAMPAIGN_COLS} FROM campaign.campaigns WHERE workspace_id = $1 AND request_id = $2",
                    ws,
                    request_id,
                )
            raise AlreadyExists(f"a campaign named {name!r} already exists") from None
        assert row is not None
        return row


async def get_campaign(conn: Conn, ws: str, campaign_id: str, *, lock: bool = False) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"SELECT {_CAMPAIGN_COLS} FROM campaign.campaigns WHERE workspace_id = $1 AND id = $2"
        + (" FOR UPDATE" if lock else ""),
        ws,
        _uuid(campaign_id, "campaign_id"),
    )
    if row is None:
        raise NotFound(f"campaign {campaign_id} not found")
    return row


async def update_campaign(
    pool: asyncpg.Pool, ws: str, campaign_id: str, *, name: str, description: str, draft: dict[str, Any]
) -> asyncpg.Record:
    async with pool.acquire() as conn, conn.transaction():
        current = await get_campaign(conn, ws, campaign_id, lock=True)
        if current["state"] == "archived":
            raise FailedPrecondition("an archived campaign cannot change")
        try:
            row = await conn.fetchrow(
                f"""UPDATE campaign.campaigns SET name = $3, description = $4, draft = $5, update_time = now()
                    WHERE workspace_id = $1 AND id = $2 RETURNING {_CAMPAIGN_COLS}""",
                ws,
                current["id"],
                name or current["name"],
                description,
                draft,
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"a campaign named {name!r} already exists") from None
        assert row is not None
        return row


async def publish(
    pool: asyncpg.Pool, ws: str, campaign_id: str, definition: dict[str, Any]
) -> tuple[asyncpg.Record, int]:
    async with pool.acquire() as conn, conn.transaction():
        current = await get_campaign(conn, ws, campaign_id, lock=True)
        if current["state"] == "archived":
            raise FailedPrecondition("an archived campaign cannot be published")
        version = current["live_version"] + 1
        await conn.execute(
            "INSERT INTO campaign.campaign_versions (workspace_id, campaign_id, version, definition)"
            " VALUES ($1, $2, $3, $4)",
            ws,
            current["id"],
            version,
            definition,
        )
        row = await conn.fetchrow(
            f"""UPDATE campaign.campaigns SET live_version = $3, publish_time = now(), update_time = now(),
                       state = CASE WHEN state = 'draft' THEN 'live' ELSE state END
                WHERE workspace_id = $1 AND id = $2 RETURNING {_CAMPAIGN_COLS}""",
            ws,
            current["id"],
            version,
        )
        assert row is not None
        return row, version


async def change_state(
    pool: asyncpg.Pool, ws: str, campaign_id: str, *, allowed: Sequence[str], to: str, now: datetime
) -> asyncpg.Record:
    async with pool.acquire() as conn, conn.transaction():
        current = await get_campaign(conn, ws, campaign_id, lock=True)
        if current["state"] not in allowed:
            raise FailedPrecondition(f"campaign is {current['state']}; this needs it {' or '.join(allowed)}")
        row = await conn.fetchrow(
            f"""UPDATE campaign.campaigns SET state = $3, update_time = now()
                WHERE workspace_id = $1 AND id = $2 RETURNING {_CAMPAIGN_COLS}""",
            ws,
            current["id"],
            to,
        )
        if to == "paused":
            await conn.execute(
                "UPDATE campaign.enrollments SET paused = true"
                " WHERE workspace_id = $1 AND campaign_id = $2 AND state = 'active'",
                ws,
                current["id"],
            )
        elif to == "live":
            await conn.execute(
                "UPDATE campaign.enrollments SET paused = false"
                " WHERE workspace_id = $1 AND campaign_id = $2 AND state = 'active'",
                ws,
                current["id"],
            )
            await conn.execute("SELECT pg_notify('campaign_due', '')")
        elif to == "archived":
            ids = await conn.fetch(
                """UPDATE campaign.enrollments
                   SET state = 'exited', exit_reason = 'archived', end_time = $3, due_at = NULL, phase = 'done'
                   WHERE workspace_id = $1 AND campaign_id = $2 AND state = 'active' RETURNING id""",
                ws,
                current["id"],
                now,
            )
            await _close_pending(conn, [(ws, r["id"]) for r in ids], now, "exited")
        assert row is not None
        return row


async def list_campaigns(
    pool: asyncpg.Pool, ws: str, *, name: str, state: str, page_size: int, page_token: str
) -> tuple[list[asyncpg.Record], str]:
    after_time, after_id = decode_token(page_token, 2) if page_token else ("infinity", str(uuid.UUID(int=0)))
    rows = await pool.fetch(
        f"""SELECT {_CAMPAIGN_COLS} FROM campaign.campaigns
            WHERE workspace_id = $1 AND ($2 = '' OR name = $2) AND ($3 = '' OR state = $3)
              AND ($4 = '' OR (create_time, id) < ($5::text::timestamptz, $6::text::uuid))
            ORDER BY create_time DESC, id DESC LIMIT $7""",
        ws,
        name,
        state,
        page_token,
        after_time,
        after_id,
        page_size + 1,
    )
    token = ""
    if len(rows) > page_size:
        rows = rows[:page_size]
        token = encode_token(rows[-1]["create_time"].isoformat(), rows[-1]["id"])
    return list(rows), token


async def get_version(conn: Conn, ws: str, campaign_id: str, version: int) -> dict[str, Any] | None:
    return await conn.fetchval(
        "SELECT definition FROM campaign.campaign_versions"
        " WHERE workspace_id = $1 AND campaign_id = $2 AND version = $3",
        uuid.UUID(str(ws)),
        uuid.UUID(str(campaign_id)),
        version,
    )


async def live_campaigns(conn: Conn) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT workspace_id, id, live_version FROM campaign.campaigns WHERE state = 'live'")


async def all_versions(conn: Conn) -> list[asyncpg.Record]:
    """Every published version's key: which events can act on existing enrollments comes from these."""
    return await conn.fetch("SELECT workspace_id, campaign_id, version FROM campaign.campaign_versions")


async def get_versions(conn: Conn, keys: Sequence[tuple[Any, Any, int]]) -> list[asyncpg.Record]:
    """Definitions of these (workspace, campaign, version) keys, in one query."""
    return await conn.fetch(
        """SELECT v.workspace_id, v.campaign_id, v.version, v.definition FROM campaign.campaign_versions v
           JOIN unnest($1::uuid[], $2::uuid[], $3::int[]) AS k(workspace_id, campaign_id, version)
             ON v.workspace_id = k.workspace_id AND v.campaign_id = k.campaign_id AND v.version = k.version""",
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
    )


# ---------------------------------------------------------------------------------- the timer queue

_ENROLLMENT_COLS = """workspace_id, id, campaign_id, version, contact_id, state, step_id, visit, phase, due_at,
    wait_event, wait_key, wait_value, visits, cohorts, trigger_event, phone, time_zone, attempts, enroll_time,
    end_time, exit_reason, conversion_time"""


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in _ENROLLMENT_COLS.split(","))


async def claim_due(conn: asyncpg.Connection, now: datetime, limit: int) -> list[asyncpg.Record]:
    """Lock up to ``limit`` due enrollments for this transaction; rows other replicas hold are skipped.

    The ``paused`` flag keeps held rows out of the index scan; the campaign-state check also
    holds a row enrolled while a pause was committing.
    """
    return await conn.fetch(
        f"""SELECT {_prefixed("e")} FROM campaign.enrollments e
            WHERE e.state = 'active' AND NOT e.paused AND e.due_at <= $1
              AND EXISTS (SELECT 1 FROM campaign.campaigns c
                          WHERE c.workspace_id = e.workspace_id AND c.id = e.campaign_id AND c.state = 'live')
            ORDER BY e.due_at LIMIT $2 FOR UPDATE OF e SKIP LOCKED""",
        now,
        limit,
    )


async def claim_fresh(conn: asyncpg.Connection, keys: Sequence[tuple[Any, Any]], now: datetime) -> list[asyncpg.Record]:
    """Lock these enrollments if they are still due to enter a step, as ``claim_due`` would.

    Rows another worker holds are skipped; rows it already ran are no longer in phase
    ``enter`` (or are due later), so they are left alone too.
    """
    return await conn.fetch(
        f"""SELECT {_prefixed("e")} FROM campaign.enrollments e
            JOIN unnest($1::uuid[], $2::uuid[]) AS k(workspace_id, id)
              ON e.workspace_id = k.workspace_id AND e.id = k.id
            WHERE e.state = 'active' AND NOT e.paused AND e.phase = 'enter' AND e.due_at <= $3
              AND EXISTS (SELECT 1 FROM campaign.campaigns c
                          WHERE c.workspace_id = e.workspace_id AND c.id = e.campaign_id AND c.state = 'live')
            FOR UPDATE OF e SKIP LOCKED""",
        [k[0] for k in keys],
        [k[1] for k in keys],
        now,
    )


async def save_runs(conn: asyncpg.Connection, rows: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
    """Write back advanced enrollments and their step visits, set-based."""
    await conn.execute(
        """UPDATE campaign.enrollments e SET state = u.state, step_id = u.step_id, visit = u.visit, phase = u.phase,
                  due_at = u.due_at, wait_event = u.wait_event, wait_key = u.wait_key,
                  wait_value = u.wait_value::jsonb, visits = u.visits::jsonb, cohorts = u.cohorts::jsonb,
                  phone = u.phone, time_zone = u.time_zone, attempts = u.attempts, end_time = u.end_time,
                  exit_reason = u.exit_reason
           FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::text[], $7::timestamptz[],
                       $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                       $15::int[], $16::timestamptz[], $17::text[])
                AS u(workspace_id, id, state, step_id, visit, phase, due_at, wait_event, wait_key, wait_value,
                     visits, cohorts, phone, time_zone, attempts, end_time, exit_reason)
           WHERE e.workspace_id = u.workspace_id AND e.id = u.id""",
        [r["workspace_id"] for r in rows],
        [r["id"] for r in rows],
        [r["state"] for r in rows],
        [r["step_id"] for r in rows],
        [r["visit"] for r in rows],
        [r["phase"] for r in rows],
        [r["due_at"] for r in rows],
        [r["wait_event"] for r in rows],
        [r["wait_key"] for r in rows],
        [None if r["wait_value"] is None else json.dumps(r["wait_value"]) for r in rows],
        [json.dumps(r["visits"]) for r in rows],
        [json.dumps(r["cohorts"]) for r in rows],
        [r["phone"] for r in rows],
        [r["time_zone"] for r in rows],
        [r["attempts"] for r in rows],
        [r["end_time"] for r in rows],
        [r["exit_reason"] for r in rows],
    )
    if history:
        await conn.execute(
            """INSERT INTO campaign.step_history AS h
                   (workspace_id, enrollment_id, step_id, visit, campaign_id, version, kind, enter_time, end_time,
                    outcome, detail, message_id, task_id)
               SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::uuid[], $6::int[], $7::text[],
                                    $8::timestamptz[], $9::timestamptz[], $10::text[], $11::text[], $12::text[],
                                    $13::text[])
               ON CONFLICT (workspace_id, enrollment_id, step_id, visit) DO UPDATE
               SET end_time = EXCLUDED.end_time, outcome = EXCLUDED.outcome, detail = EXCLUDED.detail,
                   message_id = CASE WHEN EXCLUDED.message_id <> '' THEN EXCLUDED.message_id ELSE h.message_id END,
                   task_id = CASE WHEN EXCLUDED.task_id <> '' THEN EXCLUDED.task_id ELSE h.task_id END""",
            *[
                [h[k] for h in history]
                for k in (
                    "workspace_id",
                    "enrollment_id",
                    "step_id",
                    "visit",
                    "campaign_id",
                    "version",
                    "kind",
                    "enter_time",
                    "end_time",
                    "outcome",
                    "detail",
                    "message_id",
                    "task_id",
                )
            ],
        )


async def sms_sent_count(
    conn: Conn, ws: Any, campaign_id: Any, contact_id: str, since: datetime, *, exclude: tuple[Any, str, int]
) -> int:
    """SMS this campaign sent the contact since ``since`` (the frequency cap's count)."""
    return await conn.fetchval(
        """SELECT count(*) FROM campaign.step_history h JOIN campaign.enrollments e
                 ON e.workspace_id = h.workspace_id AND e.id = h.enrollment_id
           WHERE h.workspace_id = $1 AND h.campaign_id = $2 AND e.contact_id = $3 AND h.kind = 'send_sms'
             AND h.outcome = 'sent' AND h.end_time >= $4
             AND NOT (h.enrollment_id = $5 AND h.step_id = $6 AND h.visit = $7)""",
        ws,
        campaign_id,
        contact_id,
        since,
        *exclude,
    )


async def _close_pending(conn: asyncpg.Connection, ids: list[tuple[Any, Any]], now: datetime, outcome: str) -> None:
    if not ids:
        return
    await conn.execute(
        """UPDATE campaign.step_history h SET end_time = $3, outcome = $4
           FROM unnest($1::uuid[], $2::uuid[]) AS u(workspace_id, id)
           WHERE h.workspace_id = u.workspace_id AND h.enrollment_id = u.id AND h.end_time IS NULL""",
        [i[0] for i in ids],
        [i[1] for i in ids],
        now,
        outcome,
    )


# ---------------------------------------------------------------------------------- the event consumer


async def contact_enrollments(conn: Conn, pairs: Sequence[tuple[str, str]], since: datetime) -> list[asyncpg.Record]:
    """Enrollments of these (workspace, contact) pairs: active ones, and recent or latest per campaign."""
    if not pairs:
        return []
    return await conn.fetch(
        f"""SELECT {_prefixed("e")} FROM campaign.enrollments e
            JOIN unnest($1::uuid[], $2::text[]) AS p(workspace_id, contact_id)
              ON e.workspace_id = p.workspace_id AND e.contact_id = p.contact_id
            WHERE e.state = 'active' OR e.enroll_time >= $3
               OR e.id IN (SELECT DISTINCT ON (campaign_id) id FROM campaign.enrollments x
                           WHERE x.workspace_id = p.workspace_id AND x.contact_id = p.contact_id
                           ORDER BY campaign_id, enroll_time DESC)
            ORDER BY e.enroll_time DESC""",
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        since,
    )


# The partial unique index keeps one active enrollment per contact per campaign even against a
# concurrent writer: a conflicting row is simply not enrolled.
_INSERT_ENROLLMENTS = """INSERT INTO campaign.enrollments
       (workspace_id, id, campaign_id, version, contact_id, step_id, phase, due_at, trigger_event, phone,
        time_zone, enroll_time)
   SELECT u.workspace_id, u.id, u.campaign_id, u.version, u.contact_id, u.step_id, 'enter', u.enroll_time,
          u.trigger_event::jsonb, u.phone, u.time_zone, u.enroll_time
   FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int[], $5::text[], $6::text[], $7::text[],
               $8::text[], $9::text[], $10::timestamptz[])
        AS u(workspace_id, id, campaign_id, version, contact_id, step_id, trigger_event, phone, time_zone,
             enroll_time)"""


def _enrollment_args(e: Sequence[dict[str, Any]]) -> list[Any]:
    return [
        [r["workspace_id"] for r in e],
        [r["id"] for r in e],
        [r["campaign_id"] for r in e],
        [r["version"] for r in e],
        [r["contact_id"] for r in e],
        [r["step_id"] for r in e],
        [json.dumps(r["trigger_event"]) for r in e],
        [r["phone"] for r in e],
        [r["time_zone"] for r in e],
        [r["enroll_time"] for r in e],
    ]


def only_enrollments(plan: _Plan) -> bool:
    """Whether a batch decided nothing but new enrollments (the common case: ``commit_enrollments``)."""
    return not (plan.exits or plan.wakes or plan.conversions or plan.deliveries or plan.tasks_done)


async def commit_enrollments(
    conn: Conn, enrollments: Sequence[dict[str, Any]], consumer: str, before: str, after: str, *, notify: str = ""
) -> list[str] | None:
    """Insert enrollments and move the cursor (compare-and-set) in one statement, so one round trip.

    Returns the ids actually inserted (a row that met an active enrollment of its campaign is
    not). The insert happens only if the cursor moved; returns None (nothing written) when it
    did not, and the caller takes the general path, which tells a missing cursor row from a
    cursor another consumer moved.
    """
    args = _enrollment_args(enrollments)
    n = len(args)
    row = await conn.fetchrow(
        f"""WITH cur AS (UPDATE campaign.stream_cursors SET cursor = ${n + 3}, update_time = now()
                         WHERE consumer = ${n + 1} AND cursor = ${n + 2} RETURNING 1),
                 ins AS ({_INSERT_ENROLLMENTS} WHERE EXISTS (SELECT 1 FROM cur) ON CONFLICT DO NOTHING RETURNING id)
            SELECT EXISTS (SELECT 1 FROM cur) AND (${n + 4} = '' OR pg_notify(${n + 4}, '') IS NOT NULL) AS moved,
                   ARRAY(SELECT id::text FROM ins) AS inserted""",
        *args,
        consumer,
        before,
        after,
        notify,
    )
    if row is None or not row["moved"]:
        return None
    return list(row["inserted"])


async def apply_plan(conn: asyncpg.Connection, plan: _Plan, now: datetime) -> list[str]:
    """Write what one batch of events decided, in the caller's transaction; returns the ids inserted.

    Exits are written before the inserts: a batch that exits a contact's active enrollment and
    then triggers the same (``any_time``) campaign again must find the old row already ended,
    or the partial unique index would refuse the new one.
    """
    if plan.exits:
        rows = await conn.fetch(
            """UPDATE campaign.enrollments e SET state = 'exited', exit_reason = u.reason, end_time = $4, due_at = NULL,
                      phase = 'done'
               FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS u(workspace_id, id, reason)
               WHERE e.workspace_id = u.workspace_id AND e.id = u.id AND e.state = 'active'
               RETURNING e.workspace_id, e.id""",
            [x[0] for x in plan.exits],
            [x[1] for x in plan.exits],
            [x[2] for x in plan.exits],
            now,
        )
        await _close_pending(conn, [(r["workspace_id"], r["id"]) for r in rows], now, "exited")
    inserted: list[str] = []
    if plan.enrollments:
        rows = await conn.fetch(
            f"{_INSERT_ENROLLMENTS} ON CONFLICT DO NOTHING RETURNING id", *_enrollment_args(plan.enrollments)
        )
        inserted = [str(r["id"]) for r in rows]
    if plan.wakes:
        await conn.execute(
            """UPDATE campaign.enrollments e SET phase = 'event_arrived', due_at = $3
               FROM unnest($1::uuid[], $2::uuid[]) AS u(workspace_id, id)
               WHERE e.workspace_id = u.workspace_id AND e.id = u.id AND e.state = 'active' AND e.phase = 'event'""",
            [x[0] for x in plan.wakes],
            [x[1] for x in plan.wakes],
            now,
        )
    if plan.conversions:
        await conn.execute(
            """UPDATE campaign.enrollments e SET conversion_time = $3
               FROM unnest($1::uuid[], $2::uuid[]) AS u(workspace_id, id)
               WHERE e.workspace_id = u.workspace_id AND e.id = u.id AND e.conversion_time IS NULL""",
            [x[0] for x in plan.conversions],
            [x[1] for x in plan.conversions],
            now,
        )
    if plan.deliveries:
        await conn.execute(
            """UPDATE campaign.step_history h SET delivery = u.delivery
               FROM unnest($1::uuid[], $2::text[], $3::text[]) AS u(workspace_id, message_id, delivery)
               WHERE h.workspace_id = u.workspace_id AND h.message_id = u.message_id""",
            [x[0] for x in plan.deliveries],
            [x[1] for x in plan.deliveries],
            [x[2] for x in plan.deliveries],
        )
    if plan.tasks_done:
        await conn.execute(
            """UPDATE campaign.step_history h SET task_completed = true
               FROM unnest($1::uuid[], $2::text[]) AS u(workspace_id, task_id)
               WHERE h.workspace_id = u.workspace_id AND h.task_id = u.task_id""",
            [x[0] for x in plan.tasks_done],
            [x[1] for x in plan.tasks_done],
        )
    return inserted


async def get_cursor(conn: Conn, consumer: str) -> str:
    await conn.execute("INSERT INTO campaign.stream_cursors (consumer) VALUES ($1) ON CONFLICT DO NOTHING", consumer)
    return await conn.fetchval("SELECT cursor FROM campaign.stream_cursors WHERE consumer = $1", consumer)


async def advance_cursor(conn: asyncpg.Connection, consumer: str, before: str, after: str) -> None:
    """Compare-and-set: only the consumer that read ``before`` may move the cursor on."""
    done = await conn.fetchval(
        """UPDATE campaign.stream_cursors SET cursor = $3, update_time = now()
           WHERE consumer = $1 AND cursor = $2 RETURNING 1""",
        consumer,
        before,
        after,
    )
    if done is None:
        inserted = await conn.fetchval(
            "INSERT INTO campaign.stream_cursors (consumer, cursor) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING 1",
            consumer,
            after,
        )
        if inserted is None or before:
            raise CursorMoved(consumer)


# ---------------------------------------------------------------------------------- reads


async def list_enrollments(
    pool: asyncpg.Pool, ws: str, *, campaign_id: str, contact_id: str, page_size: int, page_token: str
) -> tuple[list[asyncpg.Record], list[asyncpg.Record], str]:
    after_time, after_id = decode_token(page_token, 2) if page_token else ("infinity", str(uuid.UUID(int=0)))
    cid = _uuid(campaign_id, "campaign_id") if campaign_id else None
    rows = await pool.fetch(
        f"""SELECT {_ENROLLMENT_COLS} FROM campaign.enrollments
            WHERE workspace_id = $1 AND ($2::uuid IS NULL OR campaign_id = $2) AND ($3 = '' OR contact_id = $3)
              AND ($4 = '' OR (enroll_time, id) < ($5::text::timestamptz, $6::text::uuid))
            ORDER BY enroll_time DESC, id DESC LIMIT $7""",
        ws,
        cid,
        contact_id,
        page_token,
        after_time,
        after_id,
        page_size + 1,
    )
    token = ""
    if len(rows) > page_size:
        rows = rows[:page_size]
        token = encode_token(rows[-1]["enroll_time"].isoformat(), rows[-1]["id"])
    history = await pool.fetch(
        """SELECT * FROM campaign.step_history WHERE workspace_id = $1 AND enrollment_id = ANY($2::uuid[])
           ORDER BY enter_time, seq""",
        ws,
        [r["id"] for r in rows],
    )
    return list(rows), list(history), token


async def stats(pool: asyncpg.Pool, ws: str, campaign_id: uuid.UUID) -> dict[str, list[asyncpg.Record]]:
    versions = await pool.fetch(
        """SELECT version,
                  count(*) AS entered,
                  count(*) FILTER (WHERE state = 'active') AS active,
                  count(*) FILTER (WHERE state = 'completed') AS completed,
                  count(*) FILTER (WHERE state = 'exited') AS exited_early,
                  count(*) FILTER (WHERE conversion_time IS NOT NULL) AS converted
           FROM campaign.enrollments WHERE workspace_id = $1 AND campaign_id = $2 GROUP BY version ORDER BY version""",
        ws,
        campaign_id,
    )
    steps = await pool.fetch(
        """SELECT version, step_id, min(kind) AS kind,
                  count(*) AS entered,
                  count(*) FILTER (WHERE end_time IS NULL) AS waiting,
                  count(*) FILTER (WHERE end_time IS NOT NULL) AS completed,
                  count(*) FILTER (WHERE outcome = 'sent') AS messages_sent,
                  count(*) FILTER (WHERE delivery = 'delivered') AS messages_delivered,
                  count(*) FILTER (WHERE kind = 'send_sms' AND (outcome = 'failed' OR delivery = 'failed'))
                      AS messages_failed,
                  count(*) FILTER (WHERE outcome = 'created') AS tasks_created,
                  count(*) FILTER (WHERE task_completed) AS tasks_completed
           FROM campaign.step_history WHERE workspace_id = $1 AND campaign_id = $2
           GROUP BY version, step_id ORDER BY version, step_id""",
        ws,
        campaign_id,
    )
    cohorts = await pool.fetch(
        """SELECT e.version, c.key AS step_id, c.value AS cohort, count(*) AS entered,
                  count(*) FILTER (WHERE e.conversion_time IS NOT NULL) AS converted
           FROM campaign.enrollments e, jsonb_each_text(e.cohorts) AS c
           WHERE e.workspace_id = $1 AND e.campaign_id = $2
           GROUP BY e.version, c.key, c.value ORDER BY e.version, c.key, c.value""",
        ws,
        campaign_id,
    )
    return {"versions": list(versions), "steps": list(steps), "cohorts": list(cohorts)}
