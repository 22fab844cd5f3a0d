"""Segment HTTP Tracking API messages, and Regal's event shape, read leniently into Parley events."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.event_pb2 import Event, EventType

from services.common.errors import Violation

TYPES: Mapping[str, EventType.ValueType] = {
    "track": EventType.EVENT_TYPE_TRACK,
    "page": EventType.EVENT_TYPE_PAGE,
    "screen": EventType.EVENT_TYPE_SCREEN,
    "identify": EventType.EVENT_TYPE_IDENTIFY,
    "alias": EventType.EVENT_TYPE_ALIAS,
    "group": EventType.EVENT_TYPE_GROUP,
}

# Event fields as a Segment client spells them, so violations the shared rules find name
# the field the client actually sent.
_JSON_NAMES = {
    "user_id": "userId",
    "anonymous_id": "anonymousId",
    "message_id": "messageId",
    "original_timestamp": "timestamp",
    "sent_at": "sentAt",
    "received_at": "receivedAt",
    "previous_id": "previousId",
    "group_id": "groupId",
}


_CATEGORIZED = (EventType.EVENT_TYPE_PAGE, EventType.EVENT_TYPE_SCREEN)


def json_field(event: Event, field: str) -> str:
    """The Segment name of an event field path (``user_id`` -> ``userId``; a track's name is ``event``)."""
    if field == "name" and event.type == EventType.EVENT_TYPE_TRACK:
        return "event"
    head, dot, rest = field.partition(".")
    return _JSON_NAMES.get(head, head) + dot + rest


def parse_time(value: str) -> Timestamp:
    """An ISO-8601 time (``Z`` or an offset; seconds, milliseconds or microseconds); naive means UTC."""
    text = value.strip()
    if text.endswith("z"):  # RFC 3339 allows a lower-case zone letter; fromisoformat does not
        text = text[:-1] + "Z"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    out = Timestamp()
    out.FromDatetime(dt)
    return out


class _Reader:
    """Collects violations while reading one message."""

    def __init__(self, item: Mapping[str, Any]) -> None:
        self.item = item
        self.violations: list[Violation] = []

    def text(self, key: str) -> str:
        value = self.item.get(key)
        if value is None:
            return ""
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                # JSON's "\ud800"-style escapes can leave a lone surrogate, which no protobuf string holds.
                self.violations.append(Violation(key, "not valid Unicode: a lone surrogate escape"))
                return ""
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            # SDKs send numeric ids; they are the same id as their decimal text. (An int of any
            # length is exact text; a too long one fails the shared length rules, on its event.)
            return str(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                # Python's JSON reader takes NaN and Infinity; no id or name is "nan" or "inf".
                self.violations.append(Violation(key, "must be a string or a finite number"))
                return ""
            return str(int(value)) if value.is_integer() else str(value)
        self.violations.append(Violation(key, "must be a string"))
        return ""

    def obj(self, key: str) -> dict[str, Any]:
        value = self.item.get(key)
        if value is None:
            return {}
        if isinstance(value, dict):
            return value
        self.violations.append(Violation(key, "must be an object"))
        return {}

    def time(self, key: str, target: Timestamp) -> bool:
        value = self.item.get(key)
        if value is None or value == "":
            return False
        if not isinstance(value, str):
            self.violations.append(Violation(key, "must be an ISO-8601 string"))
            return False
        try:
            target.CopyFrom(parse_time(value))
        except (ValueError, OverflowError):
            self.violations.append(Violation(key, "not an ISO-8601 time"))
            return False
        return True

    def struct(self, key: str, target: Struct, value: dict[str, Any]) -> None:
        if not value:
            return
        try:
            target.update(value)
        except (ValueError, TypeError, OverflowError):
            self.violations.append(Violation(key, "holds a value JSON objects cannot"))
        except RecursionError:
            self.violations.append(Violation(key, "nested too deeply to read"))


def from_segment(
    item: Any,
    *,
    kind: str | None = None,
    batch_context: Mapping[str, Any] | None = None,
    batch_integrations: Mapping[str, Any] | None = None,
    batch_sent_at: Timestamp | None = None,
) -> tuple[Event | None, list[Violation]]:
    """One Segment message as an event (None when it is no object), and what could not be read.

    ``kind`` is the call type when the endpoint fixes it (``/v1/track``); otherwise the
    message's ``type``. A batch's top-level context and integrations are merged under the
    message's own; the batch's ``sentAt`` applies when the message has none.
    """
    if not isinstance(item, dict):
        return None, [Violation("", "must be a JSON object")]
    event = Event()
    r = _Reader(item)
    type_name = kind or r.text("type").strip().lower()
    if type_name:
        event.type = TYPES.get(type_name, EventType.EVENT_TYPE_UNSPECIFIED)
    # An unknown or missing type is left unspecified: the shared rules reject it.

    event.message_id = r.text("messageId")
    event.anonymous_id = r.text("anonymousId")
    event.user_id = r.text("userId")
    event.previous_id = r.text("previousId")
    event.group_id = r.text("groupId")
    if event.type == EventType.EVENT_TYPE_TRACK:
        event.name = r.text("event")
    else:
        event.name = r.text("name")

    context = {**(batch_context or {}), **r.obj("context")}
    # Hints from the batch, then the message's context, then its own top level: the nearest wins
    # per destination, and none is lost (SDKs put them in either place).
    own = context.get("integrations")
    integrations = {
        **(batch_integrations or {}),
        **(own if isinstance(own, dict) else {}),
        **r.obj("integrations"),
    }
    if integrations:
        # Parley has no destinations to route to; the hints are kept with the context.
        context["integrations"] = integrations
    properties = r.obj("properties")
    traits = r.obj("traits")
    if event.type == EventType.EVENT_TYPE_IDENTIFY:
        ctx_traits = context.get("traits")
        if isinstance(ctx_traits, dict) and ctx_traits:
            traits = {**ctx_traits, **traits}
    elif event.type == EventType.EVENT_TYPE_GROUP:
        # A group's traits describe the account, not the person: they must not become
        # contact properties (nor make the group's phone a contact).
        properties = {**traits, **properties}
        traits = {}
    elif event.type in _CATEGORIZED and item.get("category") is not None and "category" not in properties:
        # Segment's SDKs send a page's or screen's category at the top level (analytics-python
        # sends null when there is none).
        properties = {**properties, "category": item["category"]}
    r.struct("properties", event.properties, properties)
    r.struct("traits", event.traits, traits)
    r.struct("context", event.context, context)

    if not r.time("originalTimestamp", event.original_timestamp):
        r.time("timestamp", event.original_timestamp)
    # Only messages a platform received before carry it (a Segment archive); see normalize. Their
    # stamps are that platform's: the batch's sentAt (the replaying client's clock) is not theirs.
    archived = r.time("receivedAt", event.received_at)
    if not r.time("sentAt", event.sent_at) and batch_sent_at is not None and not archived:
        event.sent_at.CopyFrom(batch_sent_at)
    return event, r.violations


def from_regal(item: Any) -> tuple[Event | None, list[Violation]]:
    """Regal's event shape (``userId``, ``traits``, ``name``, ``properties``, ``originalTimestamp``,
    ``eventSource``): a track event when named, else an identify; traits with a phone make a contact."""
    if not isinstance(item, dict):
        return None, [Violation("", "must be a JSON object")]
    name = item.get("name")
    kind = "track" if name not in (None, "") else "identify"
    message = dict(item)
    message["event"] = name
    source = item.get("eventSource")
    if source is not None:
        context = item.get("context") if isinstance(item.get("context"), dict) else {}
        message["context"] = {**context, "eventSource": source}
    return from_segment(message, kind=kind)
