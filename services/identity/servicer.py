"""gRPC IdentityService: requests checked and mapped to the repository, rows mapped back to protos."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.contact_pb2 import Contact
from parley.common.v1.event_pb2 import Event, EventStatus, EventType
from parley.identity.v1 import identity_service_pb2 as pb
from parley.identity.v1.identity_service_pb2_grpc import IdentityServiceServicer

from services.common.context import current_workspace, is_internal, workspace_or_none
from services.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Violation,
)
from services.common.storable import NUL, UNSTORABLE, unstorable
from services.identity import record, repository
from services.identity.connections import HeldConnections
from services.identity.filters import conditions
from services.identity.phones import contact_time_zone, parse_phone
from services.identity.repository import ContactRow, EventRow
from services.identity.resolve import ANONYMOUS, USER
from services.identity.stream import EventHub, follow
from services.identity.tokens import (
    Cursor,
    decode_page_token,
    encode_page_token,
    fingerprint,
    time_and_id,
    time_and_seq,
    time_text,
)

MAX_BATCH_EVENTS = 1000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_STREAM_BATCH = 500
MAX_STREAM_BATCH = 1000

_ORDER_COLUMNS = {
    pb.ContactOrderBy.CONTACT_ORDER_BY_UNSPECIFIED: "create_time",
    pb.ContactOrderBy.CONTACT_ORDER_BY_CREATE_TIME: "create_time",
    pb.ContactOrderBy.CONTACT_ORDER_BY_UPDATE_TIME: "update_time",
}


def _page_size(
    value: int, field: str = "page_size", default: int = DEFAULT_PAGE_SIZE, limit: int = MAX_PAGE_SIZE
) -> int:
    if value < 0 or value > limit:
        raise InvalidArgument.field(field, f"must be between 0 and {limit} (0 means {default})")
    return value or default


def _uuid(value: str, field: str) -> uuid.UUID:
    if not value:
        raise InvalidArgument.field(field, "required")
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise InvalidArgument.field(field, "not a valid id") from exc


def _timestamp(dt: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


def _time(value: Timestamp, field: str) -> datetime:
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument.field(field, "not a valid timestamp (years 1-9999, nanos 0-999,999,999)") from exc


def _struct(data: dict[str, Any]) -> Struct:
    return json_format.ParseDict(data, Struct())


def contact_proto(row: ContactRow) -> Contact:
    return Contact(
        id=str(row.id),
        workspace_id=str(row.workspace_id),
        phone=row.phone,
        properties=_struct(row.properties),
        time_zone=contact_time_zone(row.properties, row.phone_time_zone),
        user_ids=row.user_ids,
        anonymous_ids=row.anonymous_ids,
        create_time=_timestamp(row.create_time),
        update_time=_timestamp(row.update_time),
    )


def stored_event(row: EventRow) -> pb.StoredEvent:
    return pb.StoredEvent(
        event=Event.FromString(row.payload),
        workspace_id=str(row.workspace_id),
        contact_id=str(row.contact_id) if row.contact_id else "",
        user_key=str(row.user_key) if row.user_key else "",
        sequence=row.seq,
    )


# Built once: EventType.values() makes a new list on every call.
_KNOWN_TYPES = frozenset(int(t) for t in EventType.values() if t != EventType.EVENT_TYPE_UNSPECIFIED)


# What a stored event may hold beyond the client's limit (PARLEY_MAX_EVENT_BYTES): ingest adds
# times, a generated message id, the E.164 phone and its zone (at most 256 bytes, see
# ingest's normalize.py). A larger event would pass what a stream page or a timeline can carry.
EVENT_BYTES_ADDED = 1024


def _check_batch(events: Sequence[Event], payloads: Sequence[bytes], max_event_bytes: int) -> None:
    if not events:
        raise InvalidArgument.field("events", "at least one event is required")
    if len(events) > MAX_BATCH_EVENTS:
        raise InvalidArgument.field("events", f"at most {MAX_BATCH_EVENTS} events per call")
    bad: list[Violation] = []
    for i, e in enumerate(events):
        if len(payloads[i]) > max_event_bytes:
            bad.append(Violation(f"events[{i}]", f"event is {len(payloads[i])} bytes; the limit is {max_event_bytes}"))
        message_id = e.message_id
        if not message_id:
            bad.append(Violation(f"events[{i}].message_id", "required"))
        if e.type not in _KNOWN_TYPES:
            bad.append(Violation(f"events[{i}].type", "required"))
        # Postgres text and jsonb cannot hold NUL; one would fail the whole batch in the database.
        # One scan of all the text fields; which holds it is asked only when one does.
        text = f"{message_id}{e.anonymous_id}{e.user_id}{e.name}{e.previous_id}{e.group_id}{e.phone}{e.phone_time_zone}"
        if "\x00" in text:
            bad.extend(Violation(f"events[{i}].{name}", NUL) for name in _TEXT_FIELDS if "\x00" in getattr(e, name))
        # Traits become jsonb, which holds neither NUL nor NaN and infinite numbers.
        if e.HasField("traits") and unstorable(e.traits):
            bad.append(Violation(f"events[{i}].traits", UNSTORABLE))
    if bad:
        raise InvalidArgument(bad)


# Open SubscribeEvents streams per workspace in one identity process. Each wakes on every commit
# of its workspace and reads a page: a key opening thousands would make every commit cost
# thousands of queries. Internal (all-workspace) subscribers, one per campaign or messaging
# replica, are not counted.
MAX_STREAMS_PER_WORKSPACE = 64

_ACCEPTED = int(EventStatus.EVENT_STATUS_ACCEPTED)
_DUPLICATE = int(EventStatus.EVENT_STATUS_DUPLICATE)

_TEXT_FIELDS = ("message_id", "anonymous_id", "user_id", "name", "previous_id", "group_id", "phone", "phone_time_zone")


class IdentityServicer(IdentityServiceServicer):
    """Thin adapter: proto in, repository and domain calls, proto out."""

    def __init__(
        self, pool: asyncpg.Pool, reads: HeldConnections, hub: EventHub, *, max_event_bytes: int = 33 * 1024
    ) -> None:
        self._max_event_bytes = max_event_bytes
        self._pool = pool
        self._reads = reads
        self._hub = hub
        self._writer = record.BatchWriter(pool)
        self._streams: dict[str, int] = {}

    async def RecordEvents(
        self, request: pb.RecordEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEventsResponse:
        if not is_internal():
            raise PermissionDenied("RecordEvents is for Parley services; send events to ingest")
        workspace = current_workspace()
        events = list(request.events)
        # Serialized once: measured here, stored as the events' payloads.
        payloads = [e.SerializeToString() for e in events]
        _check_batch(events, payloads, self._max_event_bytes)
        outcomes = await self._writer.record(workspace.id, events, payloads=payloads)
        # Built with add(), about 40% cheaper per result than a constructed list.
        response = pb.RecordEventsResponse()
        add = response.results.add
        for i, (e, o) in enumerate(zip(events, outcomes, strict=True)):
            status = _DUPLICATE if o.duplicate else _ACCEPTED
            if o.contact_id is None:
                add(index=i, message_id=e.message_id, status=status)
            else:
                add(index=i, message_id=e.message_id, status=status, contact_id=str(o.contact_id))
        return response

    async def GetContact(
        self, request: pb.GetContactRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetContactResponse:
        workspace = current_workspace()
        lookup = request.WhichOneof("lookup")
        if lookup == "contact_id":
            contact_id = _uuid(request.contact_id, "contact_id")
            async with self._reads.connection() as conn:
                row = await repository.contact_by_id(conn, workspace.id, contact_id)
        elif lookup == "phone":
            phone = parse_phone(request.phone, workspace.default_region)
            if phone is None:
                raise InvalidArgument.field("phone", "not a valid phone number")
            async with self._reads.connection() as conn:
                row = await repository.contact_by_phone(conn, workspace.id, phone)
        else:
            raise InvalidArgument.field("lookup", "one of contact_id or phone is required")
        if row is None:
            raise NotFound("no such contact in this workspace")
        return pb.GetContactResponse(contact=contact_proto(row))

    async def ListContacts(
        self, request: pb.ListContactsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListContactsResponse:
        workspace = current_workspace()
        conds = conditions(request.filters)
        order = _ORDER_COLUMNS.get(request.order_by)
        if order is None:
            raise InvalidArgument.field("order_by", "unknown order")
        size = _page_size(request.page_size)
        query = fingerprint(
            "contacts",
            workspace.id,
            order,
            request.descending,
            [f.SerializeToString(deterministic=True).hex() for f in request.filters],
        )
        position = decode_page_token(request.page_token, query)
        after = None if position is None else time_and_id(position)
        async with self._reads.connection() as conn:
            rows = await repository.list_contacts(conn, workspace.id, conds, order, request.descending, size + 1, after)
        # Up to the page size and the byte budget of one response (a contact's properties can be
        # large); at least one contact, and the token after the last one sent.
        contacts: list[Contact] = []
        total = 0
        for row in rows[:size]:
            contact = contact_proto(row)
            total += contact.ByteSize()
            if total > repository.MAX_PAGE_PAYLOAD_BYTES and contacts:
                break
            contacts.append(contact)
        token = ""
        if len(rows) > len(contacts):
            last = rows[len(contacts) - 1]
            token = encode_page_token(query, [time_text(getattr(last, order)), str(last.id)])
        return pb.ListContactsResponse(contacts=contacts, next_page_token=token)

    async def ListContactEvents(
        self, request: pb.ListContactEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListContactEventsResponse:
        workspace = current_workspace()
        contact_id = _uuid(request.contact_id, "contact_id")
        start = _time(request.start_time, "start_time") if request.HasField("start_time") else None
        end = _time(request.end_time, "end_time") if request.HasField("end_time") else None
        if start is not None and end is not None and end < start:
            raise InvalidArgument.field("end_time", "must not be before start_time")
        size = _page_size(request.page_size)
        names = sorted(set(request.names))
        query = fingerprint("timeline", workspace.id, str(contact_id), names, start, end)
        position = decode_page_token(request.page_token, query)
        before = None if position is None else time_and_seq(position)
        async with self._reads.connection() as conn:
            rows = await repository.contact_events(conn, workspace.id, contact_id, names, start, end, size + 1, before)
            exists = bool(rows) or await repository.contact_exists(conn, workspace.id, contact_id)
        if not exists:
            raise NotFound("no such contact in this workspace")
        token = ""
        page = repository.within_payload_budget(rows[:size])
        if len(page) < len(rows):
            token = encode_page_token(query, [time_text(page[-1].event_time), page[-1].seq])
        return pb.ListContactEventsResponse(events=[stored_event(r) for r in page], next_page_token=token)

    async def GetUser(self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext) -> pb.GetUserResponse:
        workspace = current_workspace()
        lookup = request.WhichOneof("lookup")
        if lookup == "anonymous_id" and request.anonymous_id:
            kind, external = ANONYMOUS, request.anonymous_id
        elif lookup == "user_id" and request.user_id:
            kind, external = USER, request.user_id
        else:
            raise InvalidArgument.field("lookup", "one of anonymous_id or user_id is required")
        limit = _page_size(request.event_limit, "event_limit")
        async with self._reads.connection() as conn:
            found = await repository.user_by_identity(conn, workspace.id, kind, external, limit)
        if found is None:
            raise NotFound(f"no user with this {lookup} in this workspace")
        user, events = found
        return pb.GetUserResponse(
            user=pb.User(
                user_key=str(user.user_key),
                anonymous_ids=user.anonymous_ids,
                user_ids=user.user_ids,
                contact_id=str(user.contact_id) if user.contact_id else "",
                create_time=_timestamp(user.create_time),
                traits=_struct(user.traits),
                phone=user.phone or "",
            ),
            # Newest first, up to event_limit and the payload budget of one response.
            events=[stored_event(r) for r in repository.within_payload_budget(events)],
        )

    async def SubscribeEvents(
        self, request: pb.SubscribeEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeEventsResponse]:
        workspace = workspace_or_none()
        if workspace is None and not is_internal():
            raise Unauthenticated("this call needs a workspace")
        size = _page_size(request.batch_size, "batch_size", DEFAULT_STREAM_BATCH, MAX_STREAM_BATCH)
        start = Cursor.decode(request.cursor)
        if start.xid:
            async with self._reads.connection() as conn:
                next_xid = await repository.next_transaction_id(conn)
            if start.xid >= next_xid:
                # No transaction has that id yet: a cursor from another database (or one restored
                # from a dump, whose transaction counter starts lower) would skip every new event
                # until the counter caught up.
                raise InvalidArgument.field(
                    "cursor", "ahead of this database's transactions: not a cursor of this stream's database"
                )
        key = workspace.id if workspace else None
        if key is not None:
            if self._streams.get(key, 0) >= MAX_STREAMS_PER_WORKSPACE:
                raise ResourceExhausted(
                    f"at most {MAX_STREAMS_PER_WORKSPACE} SubscribeEvents streams of a workspace are open at once"
                    " (per identity replica); close one, or follow the stream from fewer places"
                )
            self._streams[key] = self._streams.get(key, 0) + 1
        try:
            async for rows, after in follow(self._reads, self._hub, key, start, size):
                yield pb.SubscribeEventsResponse(events=[stored_event(r) for r in rows], cursor=after.encode())
        finally:
            if key is not None:
                left = self._streams[key] - 1
                if left:
                    self._streams[key] = left
                else:
                    del self._streams[key]
