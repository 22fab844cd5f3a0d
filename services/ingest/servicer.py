"""gRPC IngestService: requests in, the shared ingest path, per-event results out."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from parley.common.v1.event_pb2 import Event, EventResult, EventStatus, EventType, FieldViolation
from parley.ingest.v1 import ingest_service_pb2 as pb
from parley.ingest.v1.ingest_service_pb2_grpc import IngestServiceServicer

from services.common import tenancy
from services.common.context import current_workspace, key_scope
from services.common.errors import InvalidArgument, Unavailable, Violation
from services.ingest.pipeline import Ingestor, batch_namer, single_namer, violations_of_result
from services.ingest.salvage import Oversized, Unparsed, batch_events, salvage_batch, single_problem

MAX_BATCH_EVENTS = 1000
# Events one IngestStream call takes in all: its one response holds a result per event, and
# gRPC clients take at most 4 MiB by default (a result is ~90 bytes with UUID ids, up to a few
# hundred with long ids or violations). A sender with more opens a new stream.
MAX_STREAM_EVENTS = 10_000
# What a stream's response may come to: 4 MiB, gRPC clients' default limit, less some room.
# Past it, results give up their echoed message ids, then all but their first violation (see
# _stream_response), which keeps 10,000 results well under it.
MAX_STREAM_RESPONSE_BYTES = 4 * 1024 * 1024 - 64 * 1024
_REJECTED = int(EventStatus.EVENT_STATUS_REJECTED)
# Stream messages being validated and forwarded at once.
STREAM_IN_FLIGHT = 4

_SINGLE = single_namer("event")
_BATCH = batch_namer("events")
# The namers' event argument, for an event that could not be read.
_NO_EVENT = Event()


# Plain ints: enum attribute lookups cost about a microsecond per result.
_ACCEPTED = int(EventStatus.EVENT_STATUS_ACCEPTED)
_DUPLICATE = int(EventStatus.EVENT_STATUS_DUPLICATE)


def _counts(results: Sequence[EventResult]) -> dict[str, int]:
    accepted = duplicate = 0
    for r in results:
        status = r.status
        if status == _ACCEPTED:
            accepted += 1
        elif status == _DUPLICATE:
            duplicate += 1
    return {
        "accepted_count": accepted,
        "duplicate_count": duplicate,
        "rejected_count": len(results) - accepted - duplicate,
    }


class IngestServicer(IngestServiceServicer):
    """Thin adapter over :class:`Ingestor`."""

    def __init__(self, ingestor: Ingestor, max_batch_bytes: int) -> None:
        self._ingestor = ingestor
        self._max_batch_bytes = max_batch_bytes

    async def _single(self, request: Any, expected: EventType.ValueType) -> EventResult:
        if isinstance(request, Oversized):
            raise InvalidArgument.field(
                "event",
                f"the request is {request.size} bytes; a request is at most {self._max_batch_bytes} bytes"
                f" and an event at most {self._ingestor.limits.max_event_bytes}",
            )
        if isinstance(request, Unparsed):
            raise self._unparsed_single(request.data)
        event: Event = request.event
        if event.type == EventType.EVENT_TYPE_UNSPECIFIED:
            event.type = expected
        elif event.type != expected:
            raise InvalidArgument.field("event.type", f"must be {EventType.Name(expected)} or unset")
        [result] = await self._ingestor.ingest([event], current_workspace(), _SINGLE)
        if result.status == EventStatus.EVENT_STATUS_REJECTED:
            raise InvalidArgument(violations_of_result(result))
        return _for_caller([result])[0]

    async def Track(self, request: pb.TrackRequest, context: grpc.aio.ServicerContext) -> pb.TrackResponse:
        return pb.TrackResponse(result=await self._single(request, EventType.EVENT_TYPE_TRACK))

    async def Page(self, request: pb.PageRequest, context: grpc.aio.ServicerContext) -> pb.PageResponse:
        return pb.PageResponse(result=await self._single(request, EventType.EVENT_TYPE_PAGE))

    async def Screen(self, request: pb.ScreenRequest, context: grpc.aio.ServicerContext) -> pb.ScreenResponse:
        return pb.ScreenResponse(result=await self._single(request, EventType.EVENT_TYPE_SCREEN))

    async def Identify(self, request: pb.IdentifyRequest, context: grpc.aio.ServicerContext) -> pb.IdentifyResponse:
        return pb.IdentifyResponse(result=await self._single(request, EventType.EVENT_TYPE_IDENTIFY))

    def _check_batch(self, count: int, size: int, *, allow_empty: bool = False) -> None:
        if count == 0 and not allow_empty:
            raise InvalidArgument.field("events", "at least one event is required")
        if count > MAX_BATCH_EVENTS:
            raise InvalidArgument.field("events", f"{count} events; the limit is {MAX_BATCH_EVENTS} per batch")
        if size > self._max_batch_bytes:
            raise InvalidArgument.field("events", f"batch is {size} bytes; the limit is {self._max_batch_bytes} bytes")

    def _unparsed_single(self, data: bytes) -> InvalidArgument:
        if len(data) <= self._max_batch_bytes:  # not worth reading again beyond that
            try:
                problem = single_problem(data)
                return InvalidArgument.field(_SINGLE(0, _NO_EVENT, problem.field), problem.description)
            except DecodeError:
                pass
        return InvalidArgument.field("event", "the request is not a valid message")

    def _batch(
        self,
        request: pb.IngestBatchRequest | pb.IngestStreamRequest | Unparsed | Oversized,
        *,
        base_index: int = 0,
        allow_empty: bool = False,
    ) -> tuple[Sequence[Event | None], dict[int, list[FieldViolation]] | None, int | None]:
        """A batch request's events, checked; the violations of those that did not parse; its bytes,
        as re-encoded, when they bound what is forwarded."""
        if isinstance(request, Oversized):
            self._check_batch(1, request.size)
        if not isinstance(request, Unparsed):
            size = request.ByteSize()
            self._check_batch(len(request.events), size, allow_empty=allow_empty)
            return request.events, None, size
        # Read again event by event, within the limits a parsed batch has: size, then count, first.
        self._check_batch(1, len(request.data))
        try:
            raw = batch_events(request.data)
        except DecodeError as exc:
            raise InvalidArgument.field("events", "the request is not a valid message") from exc
        self._check_batch(len(raw), len(request.data), allow_empty=allow_empty)
        salvaged = salvage_batch(raw)
        prior = {
            slot: [FieldViolation(field=_BATCH(base_index + slot, _NO_EVENT, p.field), description=p.description)]
            for slot, p in salvaged.problems.items()
        }
        # No bound for the forwarder from these bytes: re-encoded, events can come out larger
        # than they were sent (a map entry sent without its key and value); it measures them.
        return salvaged.events, prior, None

    async def IngestBatch(
        self, request: pb.IngestBatchRequest | Unparsed, context: grpc.aio.ServicerContext
    ) -> pb.IngestBatchResponse:
        events, prior, size = self._batch(request)
        results = await self._ingestor.ingest(events, current_workspace(), _BATCH, prior=prior, request_bytes=size)
        return pb.IngestBatchResponse(results=_for_caller(results), **_counts(results))

    async def IngestStream(
        self,
        request_iterator: AsyncIterator[pb.IngestStreamRequest | Unparsed | Oversized],
        context: grpc.aio.ServicerContext,
    ) -> pb.IngestStreamResponse:
        workspace = current_workspace()
        # Messages are validated and forwarded while the next ones arrive (a few at a time,
        # so consecutive messages can share identity calls); results keep stream order.
        pending: deque[asyncio.Task[list[EventResult]]] = deque()
        results: list[EventResult] = []
        received = 0
        message = -1
        try:
            async for request in request_iterator:
                message += 1
                try:
                    events, prior, size = self._batch(request, base_index=received, allow_empty=True)
                    if received + len(events) > MAX_STREAM_EVENTS:
                        raise InvalidArgument.field(
                            "events",
                            f"{len(events)} events would bring the stream to {received + len(events)}; the limit is "
                            f"{MAX_STREAM_EVENTS} per stream (send the rest in a new stream)",
                        )
                except InvalidArgument as exc:
                    stored = bool(results or pending)
                    # The messages before settle first, so a resend right after finds them stored.
                    await asyncio.gather(*pending, return_exceptions=True)
                    raise _in_stream_message(exc, message, received, stored=stored) from None
                if not events:
                    continue
                pending.append(
                    asyncio.create_task(
                        self._ingestor.ingest(
                            events, workspace, _BATCH, base_index=received, prior=prior, request_bytes=size
                        )
                    )
                )
                received += len(events)
                if len(pending) >= STREAM_IN_FLIGHT:
                    results.extend(await _after(pending.popleft(), stored=bool(results or pending)))
            while pending:
                results.extend(await _after(pending.popleft(), stored=bool(results or pending)))
        finally:
            for task in pending:
                if task.done() and not task.cancelled():
                    task.exception()  # the first failure already ends the call; these are moot
                task.cancel()
        return _stream_response(_for_caller(results))


_EARLIER_STORED = "events of the stream's earlier messages may be stored; resent, they come back DUPLICATE"


def _in_stream_message(exc: InvalidArgument, message: int, first_index: int, *, stored: bool) -> InvalidArgument:
    """``exc`` saying which stream message it is about (a sender cannot tell otherwise which one
    to fix) and, when earlier messages went to identity, that those may be stored."""
    where = f"stream message {message} (events from index {first_index})"
    tail = f"; {_EARLIER_STORED}" if stored else ""
    return InvalidArgument([Violation(v.field, f"{where}: {v.description}{tail}") for v in exc.violations])


async def _after(task: asyncio.Task[list[EventResult]], *, stored: bool) -> list[EventResult]:
    """The task's results; its UNAVAILABLE saying, when earlier messages were stored, that they were."""
    try:
        return await task
    except Unavailable as exc:
        if not stored:
            raise
        raise Unavailable(f"{exc.message}; {_EARLIER_STORED}") from exc


def _for_caller(results: list[EventResult]) -> list[EventResult]:
    """``results`` as the caller may see them: a write key (one a web page embeds, anyone can
    read it) learns nothing stored, not even which contact, if any, an event went to."""
    if key_scope() == tenancy.WRITE:
        for result in results:
            result.ClearField("contact_id")
    return results


def _stream_response(results: list[EventResult]) -> pb.IngestStreamResponse:
    """The stream's one response, within what clients accept (``MAX_STREAM_RESPONSE_BYTES``):
    stored events must be acked. When every result in full would pass it, accepted and duplicate
    results leave out their message ids (their index names the event); if that is not enough,
    rejected ones too, and keep only their first violation."""
    response = pb.IngestStreamResponse(results=results, **_counts(results))
    if response.ByteSize() <= MAX_STREAM_RESPONSE_BYTES:
        return response
    for r in response.results:
        if r.status != _REJECTED:
            r.ClearField("message_id")
    if response.ByteSize() <= MAX_STREAM_RESPONSE_BYTES:
        return response
    for r in response.results:
        r.ClearField("message_id")
        del r.violations[1:]
    return response
