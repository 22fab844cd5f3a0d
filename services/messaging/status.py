"""Message statuses and the one rule for moving between them: forward only."""

from __future__ import annotations

from parley.messaging.v1 import messaging_service_pb2 as pb

SCHEDULED, QUEUED, SENT, DELIVERED, UNDELIVERED, FAILED, BLOCKED, RECEIVED = (
    "scheduled",
    "queued",
    "sent",
    "delivered",
    "undelivered",
    "failed",
    "blocked",
    "received",
)
FINAL = frozenset({DELIVERED, UNDELIVERED, FAILED, BLOCKED, RECEIVED})

_RANK = {SCHEDULED: 0, QUEUED: 0, SENT: 1, DELIVERED: 2, UNDELIVERED: 2, FAILED: 2, BLOCKED: 2, RECEIVED: 2}

# Twilio's MessageStatus values (https://www.twilio.com/docs/messaging/api/message-resource#message-status-values)
# mapped to ours; the ones that say nothing new for an outbound message map to None.
_TWILIO = {
    "accepted": None,
    "scheduled": None,
    "queued": None,
    "sending": None,
    "sent": SENT,
    "delivered": DELIVERED,
    "read": DELIVERED,
    "undelivered": UNDELIVERED,
    "failed": FAILED,
    "canceled": FAILED,
}

TO_PROTO = {
    SCHEDULED: pb.MESSAGE_STATUS_SCHEDULED,
    QUEUED: pb.MESSAGE_STATUS_QUEUED,
    SENT: pb.MESSAGE_STATUS_SENT,
    DELIVERED: pb.MESSAGE_STATUS_DELIVERED,
    UNDELIVERED: pb.MESSAGE_STATUS_UNDELIVERED,
    FAILED: pb.MESSAGE_STATUS_FAILED,
    BLOCKED: pb.MESSAGE_STATUS_BLOCKED,
    RECEIVED: pb.MESSAGE_STATUS_RECEIVED,
}


def from_twilio(value: str) -> str | None:
    return _TWILIO.get(value.strip().lower())


def advances(current: str, new: str) -> bool:
    """True when ``new`` moves a message forward from ``current`` (never backwards or sideways)."""
    return _RANK.get(new, -1) > _RANK.get(current, 99)
