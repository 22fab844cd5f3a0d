"""Provider webhooks as domain actions: status callbacks and inbound SMS (keywords, consent, routing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from services.common.context import Workspace
from services.common.errors import InvalidArgument
from services.common.phones import require_e164, time_zone_of
from services.messaging import outcomes as oc
from services.messaging import repository as repo
from services.messaging.app import Messaging
from services.messaging.coalesce import Coalescer
from services.messaging.consent import change_consent
from services.messaging.keywords import Intent, classify
from services.messaging.outcomes import Outcome
from services.messaging.repository import ConsentChange
from services.messaging.segments import count_segments
from services.messaging.sending import SendRequest, Target, send_in_transaction
from services.messaging.status import from_twilio

log = structlog.get_logger(__name__)

# The contact property naming the agent who owns the contact.
OWNER_PROPERTY = "owner_agent_id"


@dataclass(frozen=True)
class StatusCallback:
    workspace_id: str
    sid: str
    raw_status: str
    error_code: str
    token: str

    @property
    def keys(self) -> list[str]:
        """Idempotency keys: Twilio's token for the delivery, and the (sid, status) pair itself."""
        return [f"status:{self.sid}:{self.raw_status.lower()}"] + ([f"token:{self.token}"] if self.token else [])


async def status_callback(app: Messaging, ws: Workspace, form: Mapping[str, str], token: str) -> str:
    """Apply a status callback once, forward only; returns what happened (for logs and tests)."""
    sid = form.get("MessageSid") or form.get("SmsSid") or ""
    raw = form.get("MessageStatus") or form.get("SmsStatus") or ""
    if not sid or not raw:
        raise InvalidArgument.field("MessageSid" if not sid else "MessageStatus", "required")
    result = await status_batcher(app).submit(StatusCallback(ws.id, sid, raw, form.get("ErrorCode", ""), token))
    if result not in ("duplicate", "ignored", "stale", "early"):
        app.wake_outbox()
    return result


async def apply_callbacks(app: Messaging, conn: asyncpg.Connection, cbs: Sequence[StatusCallback]) -> list[str]:
    """A batch of status callbacks in one transaction: each applied once, each message only forward.

    Two statements whatever the batch size: the provider ids' locks, then one statement that
    records the callbacks' idempotency keys, moves messages (set-based) and parks statuses of
    ids not recorded yet; then the outcome events, into the outbox in the same transaction.
    """
    now = app.clock.now()
    results = ["duplicate"] * len(cbs)
    seen: set[tuple[str, str]] = set()
    items: list[repo.CallbackItem] = []
    for n, cb in enumerate(cbs):
        keys = [(cb.workspace_id, k) for k in cb.keys]
        if any(k in seen for k in keys):
            continue  # the same delivery twice in one batch: the first one counts
        seen.update(keys)
        status = from_twilio(cb.raw_status)
        items.append(
            repo.CallbackItem(
                n, cb.workspace_id, cb.sid, status or "", cb.error_code, cb.keys[0], cb.keys[1] if cb.token else ""
            )
        )
    if not items:
        return results
    await repo.lock_provider_ids(conn, sorted({(i.workspace_id, i.sid) for i in items if i.status}))
    outcomes: list[Outcome] = []
    for row in await repo.apply_callbacks(conn, items, now):
        n = row["n"]
        if row["applied"]:
            results[n] = row["status"]
            if (o := oc.message_outcome(row, row["status"], now)) is not None:
                outcomes.append(o)
        elif row["parked"]:
            results[n] = "early"
        else:
            results[n] = "stale" if from_twilio(cbs[n].raw_status) else "ignored"
    await repo.add_outcomes(conn, outcomes)
    return results


def status_batcher(app: Messaging) -> Coalescer[StatusCallback, str]:
    """This process's coalescer of status callbacks."""
    found = app.extra.get("status_batcher")
    if found is None:

        async def handle(conn: asyncpg.Connection, items: Sequence[StatusCallback]) -> list[str]:
            return await apply_callbacks(app, conn, items)

        found = app.extra["status_batcher"] = Coalescer(app.pool, handle, linger=app.tuning.status_linger_seconds)
    return found


async def _route(app: Messaging, ws: Workspace, phone: str) -> tuple[str, str]:
    """(contact id, owning agent id) from identity; empty when unknown or identity is unreachable."""
    try:
        contact = await app.identity.contact(ws.id, phone=phone)
    except Exception as exc:
        log.warning("inbound_contact_lookup_failed", error=type(exc).__name__)
        return "", ""
    if contact is None:
        return "", ""
    owner = ""
    if contact.properties and OWNER_PROPERTY in contact.properties.fields:
        value = contact.properties.fields[OWNER_PROPERTY]
        candidate = value.string_value if value.WhichOneof("kind") == "string_value" else ""
        if candidate and await repo.get_agent(app.pool, ws.id, candidate) is not None:
            owner = candidate
    return contact.id, owner


async def receive_sms(app: Messaging, ws: Workspace, form: Mapping[str, str], token: str) -> str:
    """Keep an inbound SMS in its conversation once; act on keywords; returns the intent."""
    sid = form.get("MessageSid") or form.get("SmsSid") or ""
    if not sid:
        raise InvalidArgument.field("MessageSid", "required")
    phone = require_e164(form.get("From", ""), ws.default_region, "From")
    body = form.get("Body", "")
    intent = classify(body)
    contact_id, owner = await _route(app, ws, phone)
    now = app.clock.now()
    keys = [f"inbound:{sid}"] + ([f"token:{token}"] if token else [])
    outcomes: list[Outcome] = []
    help_row = None
    async with app.pool.acquire() as conn, conn.transaction():
        if not await repo.claim_receipts(conn, ws.id, keys):
            return "duplicate"
        await repo.lock_phone(conn, ws.id, phone)
        conv = await repo.upsert_inbound_conversation(conn, ws.id, phone, contact_id, owner, now)
        conv_id = str(conv["id"])
        seg = count_segments(body)
        msg = await repo.insert_inbound(
            conn, ws.id, conv_id, contact_id, phone, body, sid, seg.segments, seg.encoding, now
        )
        outcomes.append(
            Outcome(
                ws.id,
                oc.SMS_RECEIVED,
                str(msg["id"]),
                phone,
                now,
                contact_id,
                {"message_id": str(msg["id"]), "conversation_id": conv_id, "body": body, "intent": intent.value},
            )
        )
        channels: tuple[str, ...] = ()
        subscribed = False
        if intent in (Intent.OPT_OUT, Intent.OPT_OUT_PHRASE):
            channels = ("sms",)
        elif intent is Intent.OPT_OUT_ALL:
            channels = ("sms", "voice")
        elif intent is Intent.OPT_IN:
            channels, subscribed = ("sms",), True
        for channel in channels:
            _, more = await change_consent(
                conn,
                ConsentChange(ws.id, phone, channel, subscribed, now, "keyword", consent_text=body[:500], live=True),
            )
            outcomes.extend(more)
        if intent is Intent.OPT_OUT_PHRASE:
            await repo.flag_conversation(conn, ws.id, conv_id, body[:500])
        if intent is Intent.HELP:
            policy = await app.policy(ws.id)
            help_row = await send_in_transaction(
                app,
                conn,
                ws,
                SendRequest(
                    f"help:{sid}", policy.help_text, transactional=True, conversation_id=conv_id, is_reply=True
                ),
                Target(phone, contact_id, time_zone_of(phone, "UTC"), conv_id),
            )
        await repo.add_outcomes(conn, [_with_contact(o, contact_id) for o in outcomes])
    if help_row is not None and help_row["status"] == "queued":
        app.wake_dispatcher()
    app.wake_outbox()
    log.info("sms_received", intent=intent.value, conversation_id=conv_id)
    return intent.value


def _with_contact(o: Outcome, contact_id: str) -> Outcome:
    if o.contact_id or not contact_id:
        return o
    return Outcome(o.workspace_id, o.name, o.key, o.phone, o.event_time, contact_id, o.properties)
