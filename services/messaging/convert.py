"""Rows to protos, and page tokens (opaque keyset positions)."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

import asyncpg
from parley.messaging.v1 import agent_service_pb2 as apb
from parley.messaging.v1 import messaging_service_pb2 as pb

from services.common.errors import InvalidArgument
from services.messaging.gate import Policy
from services.messaging.status import TO_PROTO

DEFAULT_PAGE, MAX_PAGE = 100, 1000

_TASK_STATUS = {
    "open": pb.CALL_TASK_STATUS_OPEN,
    "claimed": pb.CALL_TASK_STATUS_CLAIMED,
    "completed": pb.CALL_TASK_STATUS_COMPLETED,
    "cancelled": pb.CALL_TASK_STATUS_CANCELLED,
}
CHANNEL_TO_PROTO = {"sms": pb.CHANNEL_SMS, "voice": pb.CHANNEL_VOICE}
CHANNEL_FROM_PROTO = {v: k for k, v in CHANNEL_TO_PROTO.items()}


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(value or DEFAULT_PAGE, MAX_PAGE)


def encode_token(values: list[Any]) -> str:
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else v for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_token(token: str, kinds: str) -> list[Any] | None:
    """A page token's keyset values; ``kinds`` says each value's type ("t" time, "s" text, "i" int)."""
    if not token:
        return None
    try:
        values = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(values, list) or len(values) != len(kinds):
            raise ValueError
        out: list[Any] = []
        for kind, v in zip(kinds, values, strict=True):
            out.append(datetime.fromisoformat(v) if kind == "t" else int(v) if kind == "i" else str(v))
        return out
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise InvalidArgument.field("page_token", "not a page token from this list") from exc


def _ts(msg: Any, field: str, value: datetime | None) -> None:
    if value is not None:
        getattr(msg, field).FromDatetime(value)


def message(row: asyncpg.Record) -> pb.Message:
    m = pb.Message(
        id=str(row["id"]),
        workspace_id=str(row["workspace_id"]),
        conversation_id=str(row["conversation_id"] or ""),
        contact_id=row["contact_id"],
        phone=row["phone"],
        direction=pb.MESSAGE_DIRECTION_OUTBOUND if row["direction"] == "outbound" else pb.MESSAGE_DIRECTION_INBOUND,
        body=row["body"],
        status=TO_PROTO[row["status"]],
        segments=row["segments"],
        encoding=row["encoding"],
        provider_message_id=row["provider_message_id"] or "",
        error_code=row["error_code"],
        error_message=row["error_message"],
        request_id=row["request_id"] or "",
        campaign_id=row["campaign_id"],
        attempts=row["attempts"],
        transactional=row["transactional"],
        time_zone=row["time_zone"],
    )
    if row["status"] in ("scheduled", "queued"):
        _ts(m, "scheduled_time", row["due_time"])
    _ts(m, "create_time", row["create_time"])
    _ts(m, "update_time", row["update_time"])
    return m


def conversation(row: asyncpg.Record) -> pb.Conversation:
    c = pb.Conversation(
        id=str(row["id"]),
        workspace_id=str(row["workspace_id"]),
        contact_id=row["contact_id"],
        phone=row["phone"],
        agent_id=row["agent_id"],
        opt_out_flagged=row["opt_out_flagged"],
        started_by_contact=row["started_by_contact"],
        opt_out_flag_text=row["opt_out_flag_text"],
    )
    _ts(c, "last_message_time", row["last_message_time"])
    _ts(c, "create_time", row["create_time"])
    return c


def consent(row: asyncpg.Record) -> pb.Consent:
    c = pb.Consent(
        phone=row["phone"],
        channel=CHANNEL_TO_PROTO[row["channel"]],
        subscribed=row["subscribed"],
        source=row["source"],
        consent_text=row["consent_text"],
        ip=row["ip"],
    )
    _ts(c, "consent_time", row["consent_time"])
    return c


def call_task(row: asyncpg.Record) -> pb.CallTask:
    t = pb.CallTask(
        id=str(row["id"]),
        workspace_id=str(row["workspace_id"]),
        contact_id=row["contact_id"],
        phone=row["phone"],
        queue=row["queue"],
        priority=row["priority"],
        notes=row["notes"],
        status=_TASK_STATUS[row["status"]],
        agent_id=row["agent_id"],
        disposition=row["disposition"],
        disposition_notes=row["disposition_notes"],
        request_id=row["request_id"],
        campaign_id=row["campaign_id"],
    )
    _ts(t, "create_time", row["create_time"])
    _ts(t, "update_time", row["update_time"])
    return t


def agent(row: asyncpg.Record) -> apb.Agent:
    return apb.Agent(id=str(row["id"]), workspace_id=str(row["workspace_id"]), name=row["name"], queues=row["queues"])


def policy(p: Policy) -> pb.MessagingPolicy:
    return pb.MessagingPolicy(
        require_opt_in=p.require_opt_in,
        help_text=p.help_text,
        send_window_start=p.send_window_start,
        send_window_end=p.send_window_end,
        rate_limit_per_second=p.rate_limit_per_second,
        daily_cap=p.daily_cap,
    )
