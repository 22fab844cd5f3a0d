"""Validation and normalization of one event: the single set of rules behind every ingest path."""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from dataclasses import dataclass

from google.protobuf.struct_pb2 import ListValue, Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.event_pb2 import Event, EventType

from services.common.errors import Violation
from services.common.phones import MAX_PHONE_CHARS, e164_and_zone
from services.common.storable import NUL

NANOS = 1_000_000_000
# Oldest event time accepted: 2000-01-01T00:00:00Z. Older stamps come from unset device clocks.
MIN_EVENT_SECONDS = 946_684_800
# How far past its arrival an event may claim to have happened (device clock set ahead).
MAX_FUTURE_SECONDS = 24 * 3600
# The range google.protobuf.Timestamp allows: 0001-01-01 .. 9999-12-31.
_TS_MIN, _TS_MAX = -62_135_596_800, 253_402_300_799
_MIN_EVENT_NANOS = MIN_EVENT_SECONDS * NANOS
_MAX_FUTURE_NANOS = MAX_FUTURE_SECONDS * NANOS

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

# The most normalize_event (and a single-event RPC setting the type) adds to an event's serialized
# size, with each field's tag and length: received_at and the event time (Timestamps, ≤ 19 bytes
# each), a generated message_id (38), phone (≤ 18), its zone (≤ 40 for the longest IANA names),
# the type (2), and the event's own length prefix growing (≤ 2): 138, doubled for safety. A
# request's bytes plus this per event bound what ingest forwards without measuring each event.
MAX_NORMALIZED_GROWTH = 256
_CONTAINERS = frozenset({"struct_value", "list_value"})


@dataclass(frozen=True)
class Limits:
    """Per-event limits; the defaults are the documented ones."""

    max_event_bytes: int = 32 * 1024
    max_depth: int = 8
    max_name_chars: int = 200
    max_id_chars: int = 255


# A Value's number is tag 0x11 then 8 little-endian bytes; NaN and the infinities have every
# exponent bit set, so their last two bytes are [F0-FF] then 7F or FF. A serialization without
# this pattern holds no such number; other bytes may match too, and those take the walk.
_MAYBE_NON_FINITE = re.compile(rb"\x11[\x00-\xff]{6}[\xf0-\xff][\x7f\xff]")
# A nested object or list is a Value whose first byte is the tag of ``struct_value`` (0x2A) or
# ``list_value`` (0x32): known fields are written before unknown ones. The outermost of any
# nesting is the value of one of the object's own entries, written after that field's tag
# (0x12) and its length (a varint). Without this pattern there is no container; other bytes
# may match too, and those take the walk. (Starting with a fixed byte keeps the search fast.)
_MAYBE_CONTAINER = re.compile(rb"\x12[\x80-\xff]*[\x00-\x7f][\x2a\x32]")
_NO_PROBLEMS = (False, False, False)
_NUL_ONLY = (False, False, True)

# Serialized context -> ((too deep, non-finite number, NUL), has a "traits" key), per max depth.
_contexts: dict[int, dict[bytes, tuple[tuple[bool, bool, bool], bool]]] = {}
# Contexts this small are remembered by their bytes (a library/device/page context is a few
# hundred bytes to ~2 KiB), larger ones by a 128-bit digest, so the memory held is bounded: at
# most _MAX_CONTEXTS keys of at most this size, ~40 MiB at worst. Keyed by their bytes, large
# contexts would let a sender fill memory.
_MAX_CACHED_CONTEXT_BYTES = 4 * 1024
_MAX_CONTEXTS = 10_000


def _walk(root: Struct, max_depth: int, deep: bool, odd: bool, nul: bool) -> tuple[bool, bool, bool]:
    """(too deep: nests objects/lists more than ``max_depth`` levels, ``root`` being level 1;
    holds a NaN or infinite number; holds a NUL in a key or string) in one walk, each asked only
    when its flag is set (the others come back False). JSON, and so what identity stores, has
    no non-finite numbers, and Postgres text and jsonb cannot hold NUL: either would fail the
    whole batch there."""
    want_deep, want_odd, want_nul = deep, odd, nul
    deep = odd = nul = False
    isfinite = math.isfinite
    stack: list[tuple[Struct | ListValue, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Struct):
            fields = node.fields
            if want_nul and "\x00" in "".join(fields):
                nul, want_nul = True, False
            values = [fields[key] for key in fields]
        else:
            values = list(node.values)
        for value in values:
            kind = value.WhichOneof("kind")
            if kind == "string_value":
                if want_nul and "\x00" in value.string_value:
                    nul, want_nul = True, False
            elif kind == "number_value":
                if want_odd and not isfinite(value.number_value):
                    odd, want_odd = True, False
            elif kind in _CONTAINERS:
                if want_deep and depth >= max_depth:
                    deep, want_deep = True, False
                stack.append((getattr(value, kind), depth + 1))
        if not (want_deep or want_odd or want_nul):
            break
    return (deep, odd, nul) if deep or odd or nul else _NO_PROBLEMS


def _struct_problems(node: Struct, max_depth: int) -> tuple[bool, bool, bool]:
    """``_walk``'s three answers, skipping the walk for the common case,
    where it costs about half a microsecond per value. The serialization is screened first:
    containers (``_MAYBE_CONTAINER``), non-finite numbers (``_MAYBE_NON_FINITE``) and NUL,
    written as a 0x00 byte, can only be present where their pattern is. Without containers
    the object is flat and one loop over its values answers the rest; with them, one walk."""
    data = node.SerializeToString()
    odd = _MAYBE_NON_FINITE.search(data) is not None
    nul = b"\x00" in data
    if _MAYBE_CONTAINER.search(data) is not None:
        return _walk(node, max_depth, True, odd, nul)
    if not (odd or nul):
        return _NO_PROBLEMS
    # Flat. A value of another kind reads as "" and 0.0, so no kind needs asking. The zero
    # bytes are mostly a number's (1.0 is 3F F0 00 00 00 00 00 00), so this loop is common.
    fields = node.fields
    if not odd:
        for key in fields:
            if "\x00" in key or "\x00" in fields[key].string_value:
                return _NUL_ONLY
        return _NO_PROBLEMS
    isfinite = math.isfinite
    found_odd = found_nul = False
    for key in fields:
        value = fields[key]
        if not isfinite(value.number_value):
            found_odd = True
        if nul and ("\x00" in key or "\x00" in value.string_value):
            found_nul = True
    return (False, found_odd, found_nul) if found_odd or found_nul else _NO_PROBLEMS


def _context_facts(context: Struct, max_depth: int) -> tuple[tuple[bool, bool, bool], bool]:
    """(``_struct_problems``, has a ``traits`` key) for a context, remembered: a sender's
    context (library, device) rarely changes, and serializing it is cheaper than walking it."""
    data = context.SerializeToString()
    if len(data) > _MAX_CACHED_CONTEXT_BYTES:
        # Remembered by a digest: a few µs to hash against tens to walk (a mobile SDK's context
        # carries the user's traits, often past the bound), and a small key whatever the size.
        data = hashlib.blake2b(data, digest_size=16).digest()
    known_contexts = _contexts.get(max_depth)
    if known_contexts is None:
        known_contexts = _contexts[max_depth] = {}
    known = known_contexts.get(data)
    if known is None:
        known = (_struct_problems(context, max_depth), "traits" in context.fields)
        if len(known_contexts) >= _MAX_CONTEXTS:
            known_contexts.clear()
        known_contexts[data] = known
    return known


def _check_struct(field: str, problems: tuple[bool, bool, bool], max_depth: int, out: list[Violation]) -> None:
    deep, odd, nul = problems
    if deep:
        out.append(Violation(field, f"nested deeper than {max_depth} levels"))
    if odd:
        out.append(Violation(field, "holds a number that is NaN or infinite; JSON numbers are finite"))
    if nul:
        out.append(Violation(field, "holds a NUL character in a key or string; it cannot be stored"))


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


def _read_phone(field: str, value: Value, region: str, out: list[Violation]) -> tuple[str, str] | None:
    """(E.164, zone) of the phone ``value`` holds, ("", "") with a violation when it is no valid
    phone; None when it holds none (absent, null, blank)."""
    text = _phone_text(value)
    if text is None:
        out.append(Violation(field, "must be a string"))
        return "", ""
    if not text:
        return None
    if len(text) > MAX_PHONE_CHARS:
        # Refused before the (cached) parse: see MAX_PHONE_CHARS.
        out.append(Violation(field, f"not a valid phone number: longer than {MAX_PHONE_CHARS} characters"))
        return "", ""
    # The zone comes from the same parse: identity stores it on a contact it creates.
    found = e164_and_zone(text, region)
    if found is None:
        out.append(Violation(field, "not a valid phone number"))
        return "", ""
    return found


def _event_phone(
    traits: Struct | None, context: Struct | None, region: str, out: list[Violation]
) -> tuple[str, str, bool]:
    """(E.164, zone, a phone was given) of the event. ``traits.phone`` decides when it holds one;
    only otherwise is ``context.traits.phone`` read (Segment clients send either). ``context``
    is passed only when it has a ``traits`` key."""
    if traits is not None:
        fields = traits.fields
        if "phone" in fields:
            found = _read_phone("traits.phone", fields["phone"], region, out)
            if found is not None:
                return found[0], found[1], True
    if context is not None:
        ctx_traits = context.fields["traits"]
        if ctx_traits.WhichOneof("kind") == "struct_value" and "phone" in ctx_traits.struct_value.fields:
            found = _read_phone("context.traits.phone", ctx_traits.struct_value.fields["phone"], region, out)
            if found is not None:
                return found[0], found[1], True
    return "", "", False


def _check_ids(event: Event, ids: list[str], max_id: int, out: list[Violation]) -> list[str]:
    """The ids (in ``_ID_FIELDS`` order) trimmed, in the event too; their violations added to ``out``."""
    for i, value in enumerate(ids):
        if value:
            trimmed = value.strip()
            if trimmed != value:
                setattr(event, _ID_FIELDS[i], trimmed)
                ids[i] = value = trimmed
            if len(value) > max_id:
                out.append(Violation(_ID_FIELDS[i], f"longer than {max_id} characters"))
            if "\x00" in value:
                out.append(Violation(_ID_FIELDS[i], NUL))
    return ids


def _stamp(event: Event, field: str, ts: Timestamp, out: list[Violation]) -> tuple[bool, int | None]:
    """(whether the client set ``field``, its epoch nanoseconds when it is a valid timestamp); a
    violation added to ``out`` when it is set but not valid."""
    seconds, nanos = ts.seconds, ts.nanos
    # Presence is asked only of all-zero stamps: a set one at the epoch is still read.
    if not (seconds or nanos or event.HasField(field)):
        return False, None
    if _TS_MIN <= seconds <= _TS_MAX and 0 <= nanos < NANOS:
        return True, seconds * NANOS + nanos
    out.append(Violation(field, "not a valid timestamp"))
    return True, None


def _set_event_time(event: Event, received_at: Timestamp, out: list[Violation]) -> None:
    """Set ``received_at`` and the event time ``timestamp``; the timestamps' violations added to ``out``.

    ``original_timestamp`` and ``sent_at`` are read on the device's clock, which may be far off
    (set ahead, or reset to 1970): they need only be valid timestamps. The sanity limits (not
    before 2000, not more than 24 h after arrival) apply to the time the event is stored at: the
    skew-corrected one, or ``original_timestamp`` itself when there is no ``sent_at`` to correct it.
    """
    received = received_at.seconds * NANOS + received_at.nanos
    # A client may give an earlier received time: events a platform received before and kept
    # with its stamps (a Segment archive replayed through /v1/import), whose event time then comes
    # out as that platform corrected it. It is held to the event time's floor; a later one (a
    # clock a little ahead) is replaced by ingest's own, so it can never move the limits ahead.
    _, given = _stamp(event, "received_at", event.received_at, out)
    if given is not None and given < _MIN_EVENT_NANOS:
        out.append(Violation("received_at", "before 2000-01-01T00:00:00Z"))
    elif given is not None and given < received:
        received = given
    else:
        event.received_at.CopyFrom(received_at)
    has_original, original = _stamp(event, "original_timestamp", event.original_timestamp, out)
    has_sent, sent = _stamp(event, "sent_at", event.sent_at, out)
    if original is None:
        if not has_original:
            event.timestamp.CopyFrom(event.received_at)
        return
    if sent is not None:
        # Segment's clock-skew correction: the device's clock may be off, but the interval
        # between the event and its sending is measured on one clock.
        corrected = received - (sent - original)
        if corrected > received + _MAX_FUTURE_NANOS:
            out.append(Violation("original_timestamp", "more than 24 hours after sent_at"))
        elif corrected < _MIN_EVENT_NANOS:
            out.append(Violation("original_timestamp", "before 2000-01-01T00:00:00Z after clock-skew correction"))
        else:
            ts = event.timestamp
            ts.seconds, ts.nanos = divmod(corrected, NANOS)
    elif not has_sent:  # (an invalid sent_at already rejects the event)
        if original < _MIN_EVENT_NANOS:
            out.append(Violation("original_timestamp", "before 2000-01-01T00:00:00Z"))
        elif original > received + _MAX_FUTURE_NANOS:
            out.append(Violation("original_timestamp", "more than 24 hours after the event was received"))
        else:
            event.timestamp.CopyFrom(event.original_timestamp)


def normalize_event(event: Event, region: str, received_at: Timestamp, limits: Limits = Limits()) -> list[Violation]:
    """Check ``event`` and normalize it in place; the violations, with paths relative to the event.

    Normalizing sets ``message_id`` (a UUID when absent), trims names and ids, sets ``phone``
    to the E.164 form of the traits' phone (the traits keep what the client sent), sets
    ``received_at`` and the skew-corrected ``timestamp``. An event with violations must
    not be stored.
    """
    # Hot path (every event of every call): fields are read once into locals, since each
    # protobuf attribute read costs about as much as the check made with it.
    out: list[Violation] = []
    has = event.HasField
    size = event.ByteSize()
    oversized = size > limits.max_event_bytes
    if oversized:
        out.append(Violation("", f"event is {size} bytes; the limit is {limits.max_event_bytes} bytes"))

    kind = event.type
    if kind not in KNOWN_TYPES:
        out.append(Violation("type", "unknown or unspecified event type"))

    raw_name = event.name
    name = raw_name.strip() if raw_name else ""
    if name != raw_name:
        event.name = name
    if kind == TRACK and not name:
        out.append(Violation("name", "required for track events"))
    elif len(name) > limits.max_name_chars:
        out.append(Violation("name", f"longer than {limits.max_name_chars} characters"))
    if "\x00" in name:
        out.append(Violation("name", NUL))

    max_id = limits.max_id_chars
    message_id = event.message_id
    anonymous_id = event.anonymous_id
    user_id = event.user_id
    previous_id = event.previous_id
    group_id = event.group_id
    # Usually every id is short and clean, which one look at them all shows; else the rules per id.
    joined = message_id + anonymous_id + user_id + previous_id + group_id
    if (
        len(joined) > max_id
        or "\x00" in joined
        or message_id.strip() != message_id
        or anonymous_id.strip() != anonymous_id
        or user_id.strip() != user_id
        or previous_id.strip() != previous_id
        or group_id.strip() != group_id
    ):
        ids = _check_ids(event, [message_id, anonymous_id, user_id, previous_id, group_id], max_id, out)
        message_id, anonymous_id, user_id, previous_id, group_id = ids
    if not message_id:
        event.message_id = str(uuid.uuid4())

    phone = zone = ""
    # An oversized event is rejected whatever else it holds, so its structs are not walked (nor
    # its context remembered) and its phone is not parsed: work and memory a sender could make
    # ingest spend on megabytes it never stores. Its identity is not asked for either (its
    # phone is unread).
    phone_given = oversized
    if not oversized:
        max_depth = limits.max_depth
        if has("properties"):
            problems = _struct_problems(event.properties, max_depth)
            if problems is not _NO_PROBLEMS:
                _check_struct("properties", problems, max_depth, out)
        traits = event.traits if has("traits") else None
        if traits is not None:
            problems = _struct_problems(traits, max_depth)
            if problems is not _NO_PROBLEMS:
                _check_struct("traits", problems, max_depth, out)
        context = event.context if has("context") else None
        context_traits = False
        if context is not None:
            problems, context_traits = _context_facts(context, max_depth)
            if problems is not _NO_PROBLEMS:
                _check_struct("context", problems, max_depth, out)
        # A group's traits describe the account, not the person: a phone there is the account's
        # and must not make the caller a contact (the HTTP API keeps them as properties).
        person = traits if kind != GROUP else None
        phone, zone, phone_given = _event_phone(person, context if context_traits else None, region, out)
    if phone or event.phone:  # reading is cheaper than writing the usual ""
        event.phone = phone
    if zone or event.phone_time_zone:
        event.phone_time_zone = zone

    if kind == ALIAS:
        if not previous_id:
            out.append(Violation("previous_id", "required for alias events"))
        if not user_id:
            out.append(Violation("user_id", "required for alias events"))
    elif kind == GROUP and not group_id:
        out.append(Violation("group_id", "required for group events"))
    if not (user_id or anonymous_id or phone_given):
        out.append(Violation("user_id", "one of user_id, anonymous_id or traits.phone is required"))

    _set_event_time(event, received_at, out)
    return out
