"""Outcome events (what happened to an SMS, a consent or a call) as they are queued for ingest."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

SMS_SENT = "SMS Sent"
SMS_DELIVERED = "SMS Delivered"
SMS_FAILED = "SMS Failed"
SMS_RECEIVED = "SMS Received"
OPTED_OUT = "Contact Opted Out"
OPTED_IN = "Contact Opted In"
CALL_TASK_CREATED = "Call Task Created"
CALL_COMPLETED = "Call Completed"

# Deterministic message_id prefixes, so a retried delivery is stored once by ingest.
_PREFIX = {
    SMS_SENT: "sms-sent",
    SMS_DELIVERED: "sms-delivered",
    SMS_FAILED: "sms-failed",
    SMS_RECEIVED: "sms-received",
    OPTED_OUT: "opted-out",
    OPTED_IN: "opted-in",
    CALL_TASK_CREATED: "call-task-created",
    CALL_COMPLETED: "call-completed",
}


@dataclass(frozen=True)
class Outcome:
    workspace_id: str
    name: str
    # What makes this outcome unique (a message id, a task id, a consent change).
    key: str
    phone: str
    event_time: datetime
    contact_id: str = ""
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def message_id(self) -> str:
        return f"{_PREFIX[self.name]}:{self.key}"


_BY_STATUS = {
    "sent": SMS_SENT,
    "delivered": SMS_DELIVERED,
    "undelivered": SMS_FAILED,
    "failed": SMS_FAILED,
    "blocked": SMS_FAILED,  # refused at hand-off (opted out while it waited)
}


def for_status(status: str) -> str | None:
    """The outcome event a message status change produces, if any."""
    return _BY_STATUS.get(status)


def message_outcome(row: Any, status: str, at: datetime) -> Outcome | None:
    """The outcome of an outbound message row reaching ``status``."""
    name = for_status(status)
    if name is None:
        return None
    props: dict[str, Any] = {
        "message_id": str(row["id"]),
        "status": status,
        "segments": row["segments"],
    }
    if row["campaign_id"]:
        props["campaign_id"] = row["campaign_id"]
    if row["conversation_id"] is not None:
        props["conversation_id"] = str(row["conversation_id"])
    if name == SMS_FAILED:
        props["error_code"] = row["error_code"]
        props["error_message"] = row["error_message"]
    return Outcome(str(row["workspace_id"]), name, str(row["id"]), row["phone"], at, row["contact_id"], props)
