"""SendSms and CreateCallTask: validation, the compliance gate, and the durable record of each send."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from services.common.context import Workspace
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ParleyError,
    ResourceExhausted,
    Violation,
)
from services.common.phones import check_zone, require_e164, time_zone_of
from services.messaging import gate
from services.messaging import outcomes as oc
from services.messaging import repository as repo
from services.messaging.app import Messaging
from services.messaging.coalesce import Coalescer
from services.messaging.outcomes import Outcome
from services.messaging.repository import NewMessage
from services.messaging.segments import MAX_BODY_CHARS, count_segments
from services.messaging.status import QUEUED, SCHEDULED

MAX_ID_CHARS = 200


@dataclass(frozen=True)
class SendRequest:
    request_id: str
    body: str
    phone: str = ""
    contact_id: str = ""
    transactional: bool = False
    campaign_id: str = ""
    time_zone: str = ""
    conversation_id: str = ""
    # Sent by Parley itself inside a conversation (HELP answers, agent replies).
    is_reply: bool = False


@dataclass(frozen=True)
class Target:
    """Where a send goes, resolved before the transaction."""

    phone: str
    contact_id: str
    zone: str
    conversation_id: str


def refusal(reason: str) -> ParleyError:
    """The error a caller gets for a gate refusal, with the reason in ErrorInfo."""
    message = gate.REASONS.get(reason, reason)
    err: ParleyError = ResourceExhausted(message) if reason == gate.DAILY_CAP else FailedPrecondition(message)
    err.reason = reason.upper()
    return err


def validate(req: SendRequest) -> None:
    out: list[Violation] = []
    if not req.request_id.strip():
        out.append(Violation("request_id", "required"))
    elif len(req.request_id) > MAX_ID_CHARS:
        out.append(Violation("request_id", f"longer than {MAX_ID_CHARS} characters"))
    if not req.body.strip():
        out.append(Violation("body", "required"))
    elif len(req.body) > MAX_BODY_CHARS:
        out.append(Violation("body", f"longer than {MAX_BODY_CHARS} characters"))
    for name in ("request_id", "body", "phone", "contact_id", "campaign_id", "time_zone", "conversation_id"):
        if "\x00" in getattr(req, name):
            out.append(Violation(name, "must not contain NUL characters"))
    if not (req.phone or req.contact_id or req.conversation_id):
        out.append(Violation("phone", "one of phone, contact_id or conversation_id is required"))
    if out:
        raise InvalidArgument(out)


async def resolve_target(app: Messaging, ws: Workspace, req: SendRequest) -> Target:
    """Phone, contact and zone of the send: from the request, the conversation, or identity."""
    phone = require_e164(req.phone, ws.default_region) if req.phone else ""
    zone = check_zone(req.time_zone) if req.time_zone else ""
    contact_id = req.contact_id
    conversation_id = ""
    if req.conversation_id:
        conv = await _conversation(app, ws.id, req.conversation_id)
        if phone and phone != conv["phone"]:
            raise InvalidArgument.field("conversation_id", "belongs to another phone")
        phone = conv["phone"]
        contact_id = contact_id or conv["contact_id"]
        conversation_id = str(conv["id"])
    if not phone:
        contact = await app.identity.contact(ws.id, contact_id=contact_id)
        if contact is None:
            raise NotFound(f"contact {contact_id!r} not found")
        if not contact.phone:
            raise FailedPrecondition(f"contact {contact_id!r} has no phone")
        phone = contact.phone
        zone = zone or contact.time_zone
    return Target(phone, contact_id, zone or time_zone_of(phone, "UTC"), conversation_id)


async def _conversation(app: Messaging, workspace_id: str, conversation_id: str) -> asyncpg.Record:
    try:
        conv = await repo.get_conversation(app.pool, workspace_id, conversation_id)
    except asyncpg.DataError as exc:
        raise InvalidArgument.field("conversation_id", "not a conversation id") from exc
    if conv is None:
        raise NotFound(f"conversation {conversation_id!r} not found")
    return conv


async def send_sms(app: Messaging, ws: Workspace, req: SendRequest) -> asyncpg.Record:
    """Record one SMS through the gate; the queued/scheduled row, or the refusal as an error."""
    validate(req)
    target = await resolve_target(app, ws, req)
    row = await batcher(app).submit(SendItem(ws, req, target))
    if row["status"] == "blocked":
        raise refusal(row["error_code"])
    if row["status"] == QUEUED:
        app.wake_dispatcher()
    return row


async def send_many(app: Messaging, ws: Workspace, reqs: Sequence[SendRequest]) -> list[asyncpg.Record | ParleyError]:
    """Several sends through one gate transaction; per item the row, or the error SendSms would raise."""
    out: list[asyncpg.Record | ParleyError | None] = [None] * len(reqs)
    items: list[tuple[int, SendItem]] = []
    for n, req in enumerate(reqs):
        try:
            validate(req)
            items.append((n, SendItem(ws, req, await resolve_target(app, ws, req))))
        except ParleyError as exc:
            out[n] = exc
    if items:
        async with app.pool.acquire() as conn, conn.transaction():
            rows = await gate_and_record(app, conn, [item for _, item in items])
        for (n, _), row in zip(items, rows, strict=True):
            out[n] = refusal(row["error_code"]) if row["status"] == "blocked" else row
        if any(not isinstance(r, ParleyError) and r["status"] == QUEUED for r in rows):
            app.wake_dispatcher()
    return [r for r in out if r is not None]


@dataclass(frozen=True)
class SendItem:
    workspace: Workspace
    request: SendRequest
    target: Target


async def send_in_transaction(
    app: Messaging, conn: asyncpg.Connection, ws: Workspace, req: SendRequest, target: Target
) -> asyncpg.Record:
    """The gate and the record for one send inside the caller's transaction; a refusal is a BLOCKED row."""
    [row] = await gate_and_record(app, conn, [SendItem(ws, req, target)])
    return row


async def gate_and_record(app: Messaging, conn: asyncpg.Connection, items: Sequence[SendItem]) -> list[asyncpg.Record]:
    """The compliance gate for a batch of sends, and their durable record, in the caller's transaction.

    Every outbound SMS passes here. Under the phones' locks it reads each phone's consent,
    24-hour count and conversation in one statement, decides in order (sends earlier in the
    batch count toward a phone's cap), and inserts every message — refused ones as BLOCKED
    with the reason — in one statement. A request_id seen before (in this batch or stored)
    returns the first message and changes nothing. Returns one row per item, in order.
    """
    now = app.clock.now()
    keys = [(i.workspace.id, i.target.phone) for i in items]
    await repo.lock_phones(conn, keys)
    states = await repo.send_states(conn, keys, now - timedelta(hours=24))
    counts = {k: s.sent_last_24h for k, s in states.items()}
    first: dict[tuple[str, str], int] = {}
    new: list[tuple[int, NewMessage]] = []
    for n, item in enumerate(items):
        ws, req, target = item.workspace, item.request, item.target
        if (ws.id, req.request_id) in first:
            continue
        first[(ws.id, req.request_id)] = n
        key = (ws.id, target.phone)
        state = states[key]
        decision = gate.decide(
            await app.policy(ws.id),
            gate.GateInput(
                sms_subscribed=state.sms_subscribed,
                transactional=req.transactional,
                reply_to_contact=state.conversation_started_by_contact
                and (bool(target.conversation_id) or req.is_reply),
                sent_last_24h=counts[key],
                now=now,
                zone=target.zone,
            ),
        )
        if decision.allowed:
            counts[key] += 1
        seg = count_segments(req.body)
        new.append(
            (
                n,
                NewMessage(
                    workspace_id=ws.id,
                    phone=target.phone,
                    body=req.body,
                    status="blocked" if not decision.allowed else (SCHEDULED if decision.scheduled else QUEUED),
                    segments=seg.segments,
                    encoding=seg.encoding,
                    request_id=req.request_id,
                    contact_id=target.contact_id,
                    campaign_id=req.campaign_id,
                    transactional=req.transactional,
                    is_reply=req.is_reply or bool(target.conversation_id),
                    time_zone=target.zone,
                    due_time=(decision.due_time or now) if decision.allowed else None,
                    error_code=decision.reason,
                    error_message=gate.REASONS.get(decision.reason, ""),
                    conversation_id=state.conversation_id,
                ),
            )
        )
    allowed = [(m.workspace_id, m.phone, m.contact_id) for _, m in new if m.status != "blocked"]
    conversations = await repo.open_conversations(conn, allowed, now) if allowed else {}
    messages = [
        dataclasses.replace(m, conversation_id=conversations[(m.workspace_id, m.phone)]) if m.status != "blocked" else m
        for _, m in new
    ]
    inserted = await repo.insert_outbound_many(conn, messages, now)
    by_request = {(str(r["workspace_id"]), r["request_id"]): r for r in inserted}
    missing = [k for k in first if k not in by_request]
    if missing:  # stored before, or by a concurrent batch
        for r in await repo.messages_by_request(conn, missing):
            by_request[(str(r["workspace_id"]), r["request_id"])] = r
    return [by_request[(i.workspace.id, i.request.request_id)] for i in items]


def batcher(app: Messaging) -> Coalescer[SendItem, asyncpg.Record]:
    """This process's coalescer of SendSms calls (one gate transaction for all calls in flight)."""
    found = app.extra.get("send_batcher")
    if found is None:

        async def handle(conn: asyncpg.Connection, items: Sequence[SendItem]) -> list[asyncpg.Record]:
            return await gate_and_record(app, conn, items)

        found = app.extra["send_batcher"] = Coalescer(app.pool, handle, linger=app.tuning.send_linger_seconds)
    return found


# ---------------------------------------------------------------- call tasks


@dataclass(frozen=True)
class CallTaskRequest:
    request_id: str
    phone: str = ""
    contact_id: str = ""
    queue: str = ""
    priority: int = 0
    notes: str = ""
    campaign_id: str = ""


async def create_call_task(app: Messaging, ws: Workspace, req: CallTaskRequest) -> asyncpg.Record:
    """A call task in its queue, unless the contact opted out of voice. Idempotent by request_id."""
    out: list[Violation] = []
    if not req.request_id.strip():
        out.append(Violation("request_id", "required"))
    if not (req.phone or req.contact_id):
        out.append(Violation("phone", "one of phone or contact_id is required"))
    if len(req.queue) > MAX_ID_CHARS:
        out.append(Violation("queue", f"longer than {MAX_ID_CHARS} characters"))
    if len(req.notes) > 10_000:
        out.append(Violation("notes", "longer than 10,000 characters"))
    if out:
        raise InvalidArgument(out)
    existing = await repo.task_by_request(app.pool, ws.id, req.request_id)
    if existing is not None:
        return existing
    target = await resolve_target(app, ws, SendRequest(req.request_id, "-", req.phone, req.contact_id))
    now = app.clock.now()
    async with app.pool.acquire() as conn, conn.transaction():
        await repo.lock_phone(conn, ws.id, target.phone)
        voice = await repo.get_consent(conn, ws.id, target.phone, "voice")
        if voice is not None and not voice["subscribed"]:
            raise FailedPrecondition("the contact opted out of calls")
        row = await repo.insert_call_task(
            conn,
            ws.id,
            req.request_id,
            target.contact_id,
            target.phone,
            req.queue.strip() or "default",
            req.priority,
            req.notes,
            req.campaign_id,
            now,
        )
        if row is None:
            row = await repo.task_by_request(conn, ws.id, req.request_id)
            assert row is not None
            return row
        props = {"task_id": str(row["id"]), "queue": row["queue"]}
        if req.campaign_id:
            props["campaign_id"] = req.campaign_id
        await repo.add_outcomes(
            conn, [Outcome(ws.id, oc.CALL_TASK_CREATED, str(row["id"]), target.phone, now, target.contact_id, props)]
        )
    app.wake_outbox()
    return row
