"""Requests whose events do not all parse: each event read on its own, and the bad ones named.

protobuf refuses a whole message when one string in it is not UTF-8 (clients that set string
fields from raw bytes can send that), so one bad event would fail its batch with no field named.
These parsers read such a request again event by event: the events that parse go on, and each one
that does not is rejected alone, naming the field that broke it. The wire structure is read with
protobuf's own public API (a message of no fields keeps every field as an unknown one, undecoded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from parley.common.v1.event_pb2 import Event

_LENGTH_DELIMITED = 2
_EVENT_FIELDS = Event.DESCRIPTOR.fields_by_number
NOT_UTF8 = "not valid UTF-8 (protobuf string fields must be)"
# An event that parses alone but not inside its request: protobuf's nesting limit counts the request.
_TOO_DEEP = "not a valid event: it nests too deep"


@dataclass(frozen=True, slots=True)
class Problem:
    """Why one event could not be read: a field relative to the event ('' for the event itself)."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class Unparsed:
    """A request that did not parse, kept as bytes: read again by the handler, once the caller is
    authenticated and the request's size checked (reading it is work a stranger must not cause)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Oversized:
    """A request over the size any request of its method may have, left unread: gRPC reads
    messages up to 16 MiB, and decoding one costs tens of times its size in memory and time,
    all before the caller's key is checked. Only its size is kept, for the error."""

    size: int


@dataclass(frozen=True, slots=True)
class SalvagedBatch:
    """A batch request some of whose events did not parse: those are None, with their problem."""

    events: list[Event | None]
    problems: dict[int, Problem]


def _fields(data: bytes) -> UnknownFieldSet:
    return UnknownFieldSet(Empty.FromString(data))


def _problem(data: bytes) -> Problem:
    """The first field of an event's bytes that does not parse."""
    try:
        fields = _fields(data)
    except DecodeError as exc:
        return Problem("", f"not a valid event: {exc}")
    for f in fields:
        fd = _EVENT_FIELDS.get(f.field_number)
        if fd is None or f.wire_type != _LENGTH_DELIMITED:
            continue
        if fd.type == FieldDescriptor.TYPE_STRING:
            try:
                f.data.decode("utf-8")
            except UnicodeDecodeError:
                return Problem(fd.name, NOT_UTF8)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            try:
                message_factory.GetMessageClass(fd.message_type).FromString(f.data)
            except DecodeError:
                return Problem(
                    fd.name, f"not a valid {fd.message_type.name}: a string in it is not UTF-8, or it nests too deep"
                )
    return Problem("", _TOO_DEEP)


def _only_field(request_cls: type[Message], name: str) -> int:
    # Reading again keeps only this field: a request type that gains others must be handled here.
    fields = request_cls.DESCRIPTOR.fields_by_name
    if set(fields) != {name}:
        raise TypeError(f"{request_cls.DESCRIPTOR.full_name} has fields besides {name!r}")
    return int(fields[name].number)


def parser(request_cls: type[Message], field: str, max_bytes: int) -> Callable[[bytes], Any]:
    """``request_cls.FromString``; :class:`Oversized` for a request over ``max_bytes``, never
    read; :class:`Unparsed` when the bytes do not parse. ``field``, the request's only field,
    holds its event(s)."""
    if _only_field(request_cls, field) != 1:
        raise TypeError(f"{request_cls.DESCRIPTOR.full_name}.{field} is not field 1")

    def parse(data: bytes) -> Message | Unparsed | Oversized:
        if len(data) > max_bytes:
            return Oversized(len(data))
        try:
            return request_cls.FromString(data)
        except DecodeError:
            return Unparsed(data)

    return parse


def batch_events(data: bytes) -> list[bytes]:
    """A batch request's events (field 1, ``events``) as bytes, unparsed: cheap, so the caller can
    check their number before any is parsed. Raises ``DecodeError`` when the request's structure
    itself is broken."""
    return [f.data for f in _fields(data) if f.field_number == 1 and f.wire_type == _LENGTH_DELIMITED]


def salvage_batch(events: list[bytes]) -> SalvagedBatch:
    """Each event parsed on its own (``batch_events``): those that do not parse are None, with their problem."""
    parsed: list[Event | None] = []
    problems: dict[int, Problem] = {}
    for data in events:
        try:
            parsed.append(Event.FromString(data))
        except DecodeError:
            problems[len(parsed)] = _problem(data)
            parsed.append(None)
    return SalvagedBatch(parsed, problems)


def single_problem(data: bytes) -> Problem:
    """Why a single-event request's ``event`` (field 1) does not parse. Raises ``DecodeError`` when
    the request's structure itself is broken."""
    # Repeated occurrences of a message field merge; the first that does not parse is named.
    for f in _fields(data):
        if f.field_number == 1 and f.wire_type == _LENGTH_DELIMITED:
            try:
                Event.FromString(f.data)
            except DecodeError:
                return _problem(f.data)
    return Problem("", _TOO_DEEP)
