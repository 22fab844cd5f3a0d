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

from services.common.context import current_workspace
from services.common.errors import InvalidArgument
from services.ingest.pipeline import Ingestor, batch_namer, single_namer, violations_of_result
from services.ingest.salvage import Unparsed, batch_events, salvage_batch, single_problem

MAX_BATCH_EVENTS = 1000
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
        return result

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
        request: pb.IngestBatchRequest | pb.IngestStreamRequest | Unparsed,
        *,
        base_index: int = 0,
        allow_empty: bool = False,
    ) -> tuple[Sequence[Event | None], dict[int, list[FieldViolation]] | None, int | None]:
        """A batch request's events, checked; the violations of those that did not parse; its bytes,
        as re-encoded, when they bound what is forwarded."""
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
        return pb.IngestBatchResponse(results=results, **_counts(results))

    async def IngestStream(
        self, request_iterator: AsyncIterator[pb.IngestStreamRequest | Unparsed], context: grpc.aio.ServicerContext
    ) -> pb.IngestStreamResponse:
        workspace = current_workspace()
        # Messages are validated and forwarded while the next ones arrive (a few at a time,
        # so consecutive messages can share identity calls); results keep stream order.
        pending: deque[asyncio.Task[list[EventResult]]] = deque()
        results: list[EventResult] = []
        received = 0
        try:
            async for request in request_iterator:
                events, prior, size = self._batch(request, base_index=received, allow_empty=True)
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
                    results.extend(await pending.popleft())
            while pending:
                results.extend(await pending.popleft())
        finally:
            for task in pending:
                if task.done() and not task.cancelled():
                    task.exception()  # the first failure already ends the call; these are moot
                task.cancel()
        return pb.IngestStreamResponse(results=results, **_counts(results))
