"""Agent work: agents, their task queues, claiming (SKIP LOCKED), dispositions and replies."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
import structlog
from parley.common.v1 import contact_pb2, event_pb2

from services.common.context import Workspace
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Violation
from services.messaging import outcomes as oc
from services.messaging import repository as repo
from services.messaging.app import Messaging
from services.messaging.consent import change_consent
from services.messaging.outcomes import Outcome
from services.messaging.repository import ConsentChange
from services.messaging.sending import SendRequest, send_sms

log = structlog.get_logger(__name__)

DISPOSITIONS = ("connected", "voicemail", "no_answer", "wrong_number", "do_not_contact")


def _uuid_or_invalid(value: str, field: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise InvalidArgument.field(field, "required" if not value else "not an id") from exc


async def create_agent(app: Messaging, ws: Workspace, request_id: str, name: str, queues: list[str]) -> asyncpg.Record:
    out = []
    if not request_id.strip():
        out.append(Violation("request_id", "required"))
    if not name.strip():
        out.append(Violation("name", "required"))
    elif len(name) > 200:
        out.append(Violation("name", "longer than 200 characters"))
    for i, q in enumerate(queues):
        if not q.strip() or len(q) > 200:
            out.append(Violation(f"queues[{i}]", "must be 1..200 characters"))
    if out:
        raise InvalidArgument(out)
    return await repo.create_agent(app.pool, ws.id, request_id, name.strip(), [q.strip() for q in queues])


async def agent(app: Messaging, ws: Workspace, agent_id: str) -> asyncpg.Record:
    _uuid_or_invalid(agent_id, "agent_id")
    row = await repo.get_agent(app.pool, ws.id, agent_id)
    if row is None:
        raise NotFound(f"agent {agent_id!r} not found")
    return row


async def claim_next(app: Messaging, ws: Workspace, agent_id: str, queue: str) -> asyncpg.Record:
    """The agent's next task; NOT_FOUND when its queues are empty."""
    who = await agent(app, ws, agent_id)
    queues = list(who["queues"])
    if queue:
        if queues and queue not in queues:
            raise FailedPrecondition(f"agent does not work queue {queue!r}")
        queues = [queue]
    row = await repo.claim_next_task(app.pool, ws.id, str(who["id"]), queues, app.clock.now())
    if row is None:
        raise NotFound("no open task")
    return row


async def task(app: Messaging, ws: Workspace, task_id: str) -> asyncpg.Record:
    task_id = _uuid_or_invalid(task_id, "task_id")
    row = await repo.get_task(app.pool, ws.id, task_id)
    if row is None:
        raise NotFound(f"task {task_id!r} not found")
    return row


async def complete(
    app: Messaging, ws: Workspace, task_id: str, agent_id: str, disposition: str, notes: str
) -> asyncpg.Record:
    """Close a claimed task with its disposition; do_not_contact opts the phone out of texts and calls."""
    task_id = _uuid_or_invalid(task_id, "task_id")
    agent_id = _uuid_or_invalid(agent_id, "agent_id")
    disposition = disposition.strip().lower()
    if disposition not in DISPOSITIONS:
        raise InvalidArgument.field("disposition", "one of " + ", ".join(DISPOSITIONS))
    if len(notes) > 10_000:
        raise InvalidArgument.field("notes", "longer than 10,000 characters")
    now = app.clock.now()
    async with app.pool.acquire() as conn, conn.transaction():
        row = await repo.get_task(conn, ws.id, task_id, for_update=True)
        if row is None:
            raise NotFound(f"task {task_id!r} not found")
        if row["status"] == "completed" and row["agent_id"] == agent_id and row["disposition"] == disposition:
            return row
        if row["status"] != "claimed" or row["agent_id"] != agent_id:
            raise FailedPrecondition("the task is not claimed by this agent")
        done = await repo.complete_task(conn, ws.id, task_id, disposition, notes, now)
        props = {"task_id": task_id, "disposition": disposition, "agent_id": agent_id, "queue": done["queue"]}
        if done["campaign_id"]:
            props["campaign_id"] = done["campaign_id"]
        outcomes = [Outcome(ws.id, oc.CALL_COMPLETED, task_id, done["phone"], now, done["contact_id"], props)]
        if disposition == "do_not_contact":
            await repo.lock_phone(conn, ws.id, done["phone"])
            for channel in ("sms", "voice"):
                _, more = await change_consent(
                    conn,
                    ConsentChange(
                        ws.id, done["phone"], channel, False, now, "disposition", consent_text=notes[:500], live=True
                    ),
                )
                outcomes.extend(more)
            # Open tasks for the same phone would call someone who asked not to be contacted.
            await conn.execute(
                """UPDATE messaging.call_tasks SET status = 'cancelled', update_time = $3
                   WHERE workspace_id = $1 AND phone = $2 AND status = 'open'""",
                ws.id,
                done["phone"],
                now,
            )
        await repo.add_outcomes(conn, outcomes)
    app.wake_outbox()
    return done


async def reply(
    app: Messaging, ws: Workspace, conversation_id: str, agent_id: str, body: str, request_id: str
) -> asyncpg.Record:
    """An agent's SMS inside a conversation, through the same gate as every send."""
    _uuid_or_invalid(conversation_id, "conversation_id")
    if agent_id:
        await agent(app, ws, agent_id)
    return await send_sms(
        app, ws, SendRequest(request_id=request_id, body=body, conversation_id=conversation_id, is_reply=True)
    )


@dataclass
class TaskContext:
    task: asyncpg.Record
    contact: contact_pb2.Contact | None
    events: list[event_pb2.Event]
    conversation: asyncpg.Record | None
    messages: list[asyncpg.Record]


async def task_context(app: Messaging, ws: Workspace, task_id: str, event_limit: int) -> TaskContext:
    """The task, its contact with recent events (identity), and the phone's conversation."""
    if event_limit < 0 or event_limit > 100:
        raise InvalidArgument.field("event_limit", "must be 0..100")
    t = await task(app, ws, task_id)
    contact: contact_pb2.Contact | None = None
    events: list[event_pb2.Event] = []
    try:
        if t["contact_id"]:
            contact = await app.identity.contact(ws.id, contact_id=t["contact_id"])
        if contact is None:
            contact = await app.identity.contact(ws.id, phone=t["phone"])
        if contact is not None:
            events = await app.identity.recent_events(ws.id, contact.id, event_limit or 20)
    except Exception as exc:
        log.warning("task_context_identity_failed", error=type(exc).__name__)
    conv = await repo.conversation_by_phone(app.pool, ws.id, t["phone"])
    messages: list[asyncpg.Record] = []
    if conv is not None:
        newest = await repo.list_messages(app.pool, ws.id, conversation_id=str(conv["id"]), after=None, limit=100)
        messages = list(reversed(newest))
    return TaskContext(t, contact, events, conv, messages)
