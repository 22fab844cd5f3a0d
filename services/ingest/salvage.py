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


@dataclass(frozen=True, slots=True)
class Problem:
    """Why one event could not be read: a field relative to the event ('' for the event itself)."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class SalvagedBatch:
    """A batch request some of whose events did not parse: those are None, with their problem."""

    events: list[Event | None]
    problems: dict[int, Problem]
    byte_size: int


@dataclass(frozen=True, slots=True)
class UnreadableEvent:
    """A single-event request whose event did not parse."""

    problem: Problem


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
                return Problem(fd.name, f"not a valid {fd.message_type.name}: a string in it may not be UTF-8")
    return Problem("", "not a valid event")


def _only_field(request_cls: type[Message], name: str) -> int:
    # Reading again keeps only this field: a request type that gains others must be handled here.
    fields = request_cls.DESCRIPTOR.fields_by_name
    if set(fields) != {name}:
        raise TypeError(f"{request_cls.DESCRIPTOR.full_name} has fields besides {name!r}")
    return int(fields[name].number)


def batch_parser(request_cls: type[Message]) -> Callable[[bytes], Any]:
    """``request_cls.FromString``, or a :class:`SalvagedBatch` when some of its ``events`` do not parse.

    A request whose wire structure itself is broken still raises ``DecodeError``.
    """
    number = _only_field(request_cls, "events")

    def parse(data: bytes) -> Message | SalvagedBatch:
        try:
            return request_cls.FromString(data)
        except DecodeError:
            fields = _fields(data)  # raises DecodeError again if the structure is broken
        events: list[Event | None] = []
        problems: dict[int, Problem] = {}
        for f in fields:
            if f.field_number != number or f.wire_type != _LENGTH_DELIMITED:
                continue  # not a field of the request: protobuf skips unknown fields too
            try:
                events.append(Event.FromString(f.data))
            except DecodeError:
                problems[len(events)] = _problem(f.data)
                events.append(None)
        return SalvagedBatch(events, problems, len(data))

    return parse


def single_parser(request_cls: type[Message]) -> Callable[[bytes], Any]:
    """``request_cls.FromString``, or an :class:`UnreadableEvent` naming why its ``event`` does not parse."""
    number = _only_field(request_cls, "event")

    def parse(data: bytes) -> Message | UnreadableEvent:
        try:
            return request_cls.FromString(data)
        except DecodeError:
            fields = _fields(data)
        # Repeated occurrences of a message field merge; the first that does not parse is named.
        for f in fields:
            if f.field_number == number and f.wire_type == _LENGTH_DELIMITED:
                try:
                    Event.FromString(f.data)
                except DecodeError:
                    return UnreadableEvent(_problem(f.data))
        raise DecodeError(f"{request_cls.DESCRIPTOR.full_name} does not parse")

    return parse
