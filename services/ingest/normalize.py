"""Validation and normalization of one event: the single set of rules behind every ingest path."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from google.protobuf.struct_pb2 import ListValue, Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.event_pb2 import Event, EventType

from services.common.errors import Violation
from services.common.phones import to_e164

NANOS = 1_000_000_000
# Oldest event time accepted: 2000-01-01T00:00:00Z. Older stamps come from unset device clocks.
MIN_EVENT_SECONDS = 946_684_800
# How far past its arrival an event may claim to have happened (device clock set ahead).
MAX_FUTURE_SECONDS = 24 * 3600
# The range google.protobuf.Timestamp allows: 0001-01-01 .. 9999-12-31.
_TS_MIN, _TS_MAX = -62_135_596_800, 253_402_300_799

# Plain ints: enum attribute lookups are slow on this hot path.
TRACK = int(EventType.EVENT_TYPE_TRACK)
ALIAS = int(EventType.EVENT_TYPE_ALIAS)
GROUP = int(EventType.EVENT_TYPE_GROUP)
KNOWN_TYPES = frozenset(
    int(t)
    for t in (
        EventType.EVENT_TYPE_TRACK,
        EventType.EVENT_TYPE_PAGE,
        EventType.EVENT_TYPE_SCREEN,
        EventType.EVENT_TYPE_IDENTIFY,
        EventType.EVENT_TYPE_ALIAS,
        EventType.EVENT_TYPE_GROUP,
    )
)
_ID_FIELDS = ("message_id", "anonymous_id", "user_id", "previous_id", "group_id")
_CONTAINERS = frozenset({"struct_value", "list_value"})


@dataclass(frozen=True)
class Limits:
    """Per-event limits; the defaults are the documented ones."""

    max_event_bytes: int = 32 * 1024
    max_depth: int = 8
    max_name_chars: int = 200
    max_id_chars: int = 255


def too_deep(root: Struct, max_depth: int) -> bool:
    """True when ``root`` nests objects/lists more than ``max_depth`` levels (``root`` itself is level 1)."""
    stack: list[tuple[Struct | ListValue, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Struct):
            fields = node.fields
            values = [fields[key] for key in fields]
        else:
            values = list(node.values)
        for value in values:
            kind = value.WhichOneof("kind")
            if kind in _CONTAINERS:
                if depth >= max_depth:
                    return True
                stack.append((getattr(value, kind), depth + 1))
    return False


_context_depths: dict[tuple[bytes, int], bool] = {}


def _context_too_deep(context: Struct, max_depth: int) -> bool:
    """``too_deep`` for contexts, remembered: a sender's context (library, device) rarely changes."""
    key = (context.SerializeToString(), max_depth)
    known = _context_depths.get(key)
    if known is None:
        known = too_deep(context, max_depth)
        if len(_context_depths) >= 10_000:
            _context_depths.clear()
        _context_depths[key] = known
    return known


def _phone_text(value: Value) -> str | None:
    """The phone a trait value holds: strings as given, whole numbers as digits; '' for absent."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value.strip()
    if kind == "null_value" or kind is None:
        return ""
    if kind == "number_value" and value.number_value.is_integer() and value.number_value > 0:
        return str(int(value.number_value))
    return None


def _phone_sources(event: Event) -> list[tuple[str, Value]]:
    sources: list[tuple[str, Value]] = []
    if event.HasField("traits") and "phone" in event.traits.fields:
        sources.append(("traits.phone", event.traits.fields["phone"]))
    if event.HasField("context") and "traits" in event.context.fields:
        ctx_traits = event.context.fields["traits"]
        if ctx_traits.WhichOneof("kind") == "struct_value" and "phone" in ctx_traits.struct_value.fields:
            sources.append(("context.traits.phone", ctx_traits.struct_value.fields["phone"]))
    return sources


def _ts_nanos(ts: Timestamp) -> int:
    return ts.seconds * NANOS + ts.nanos


def _set_nanos(ts: Timestamp, nanos: int) -> None:
    ts.seconds, ts.nanos = divmod(nanos, NANOS)


def _check_timestamp(ts: Timestamp, field: str, received_nanos: int, out: list[Violation]) -> bool:
    if not (_TS_MIN <= ts.seconds <= _TS_MAX) or not (0 <= ts.nanos < NANOS):
        out.append(Violation(field, "not a valid timestamp"))
        return False
    if ts.seconds < MIN_EVENT_SECONDS:
        out.append(Violation(field, "before 2000-01-01T00:00:00Z"))
        return False
    if _ts_nanos(ts) > received_nanos + MAX_FUTURE_SECONDS * NANOS:
        out.append(Violation(field, "more than 24 hours after the event was received"))
        return False
    return True


def normalize_event(event: Event, region: str, received_at: Timestamp, limits: Limits = Limits()) -> list[Violation]:
    """Check ``event`` and normalize it in place; the violations, with paths relative to the event.

    Normalizing sets ``message_id`` (a UUID when absent), trims names and ids, sets ``phone``
    to the E.164 form of the traits' phone (the traits keep what the client sent), sets
    ``received_at`` and the skew-corrected ``timestamp``. An event with violations must
    not be stored.
    """
    out: list[Violation] = []
    size = event.ByteSize()
    if size > limits.max_event_bytes:
        out.append(Violation("", f"event is {size} bytes; the limit is {limits.max_event_bytes} bytes"))

    kind = event.type
    if kind not in KNOWN_TYPES:
        out.append(Violation("type", "unknown or unspecified event type"))

    name = event.name.strip() if event.name else ""
    if name != event.name:
        event.name = name
    if kind == TRACK and not name:
        out.append(Violation("name", "required for track events"))
    elif len(name) > limits.max_name_chars:
        out.append(Violation("name", f"longer than {limits.max_name_chars} characters"))

    for field in _ID_FIELDS:
        value = getattr(event, field)
        if value:
            trimmed = value.strip()
            if trimmed != value:
                setattr(event, field, trimmed)
            if len(trimmed) > limits.max_id_chars:
                out.append(Violation(field, f"longer than {limits.max_id_chars} characters"))
    if not event.message_id:
        event.message_id = str(uuid.uuid4())

    if event.HasField("properties") and too_deep(event.properties, limits.max_depth):
        out.append(Violation("properties", f"nested deeper than {limits.max_depth} levels"))
    if event.HasField("traits") and too_deep(event.traits, limits.max_depth):
        out.append(Violation("traits", f"nested deeper than {limits.max_depth} levels"))
    if event.HasField("context") and _context_too_deep(event.context, limits.max_depth):
        out.append(Violation("context", f"nested deeper than {limits.max_depth} levels"))

    phone = ""
    phone_given = False
    for field, value in _phone_sources(event):
        text = _phone_text(value)
        if text is None:
            out.append(Violation(field, "must be a string"))
            phone_given = True
            continue
        if not text:
            continue
        phone_given = True
        e164 = to_e164(text, region)
        if e164 is None:
            out.append(Violation(field, "not a valid phone number"))
        elif not phone:
            phone = e164
    event.phone = phone

    if kind == ALIAS:
        if not event.previous_id:
            out.append(Violation("previous_id", "required for alias events"))
        if not event.user_id:
            out.append(Violation("user_id", "required for alias events"))
    elif kind == GROUP and not event.group_id:
        out.append(Violation("group_id", "required for group events"))
    if not (event.user_id or event.anonymous_id or phone_given):
        out.append(Violation("user_id", "one of user_id, anonymous_id or traits.phone is required"))

    received = _ts_nanos(received_at)
    event.received_at.CopyFrom(received_at)
    has_original = event.HasField("original_timestamp")
    has_sent = event.HasField("sent_at")
    ok_original = has_original and _check_timestamp(event.original_timestamp, "original_timestamp", received, out)
    ok_sent = has_sent and _check_timestamp(event.sent_at, "sent_at", received, out)
    if ok_original and ok_sent:
        # Segment's clock-skew correction: the device's clock may be off, but the interval
        # between the event and its sending is measured on one clock.
        corrected = received - (_ts_nanos(event.sent_at) - _ts_nanos(event.original_timestamp))
        if corrected > received + MAX_FUTURE_SECONDS * NANOS:
            out.append(Violation("original_timestamp", "more than 24 hours after sent_at"))
        elif corrected < MIN_EVENT_SECONDS * NANOS:
            out.append(Violation("original_timestamp", "before 2000-01-01T00:00:00Z after clock-skew correction"))
        else:
            _set_nanos(event.timestamp, corrected)
    elif ok_original:
        event.timestamp.CopyFrom(event.original_timestamp)
    elif not has_original:
        event.timestamp.CopyFrom(received_at)
    return out
