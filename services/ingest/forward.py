"""Forwarding to identity: concurrent callers' events coalesce into few, large RecordEvents calls."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import grpc
import structlog
from parley.common.v1.event_pb2 import Event, EventResult
from parley.identity.v1.identity_service_pb2 import RecordEventsRequest
from parley.identity.v1.identity_service_pb2_grpc import IdentityServiceStub

from services.common.clients import MAX_MESSAGE_BYTES, internal_metadata
from services.common.context import Workspace
from services.common.errors import ParleyError, Unavailable

log = structlog.get_logger(__name__)

# identity's RecordEvents takes at most this many events per call.
MAX_FORWARD = 1000
# Each event in a RecordEventsRequest costs its serialized size plus its field's framing: a
# one-byte tag and the length as a varint (at most 5 bytes below 32 GiB, so 6 always covers it).
FRAMING_BYTES = 6
# The most bytes one RecordEvents request holds, framing included. The channel refuses a larger
# message than MAX_MESSAGE_BYTES (RESOURCE_EXHAUSTED), and a request is nothing but its events,
# so counting them exactly would do; the mebibyte left over is headroom for fields a request may gain.
MAX_FORWARD_BYTES = MAX_MESSAGE_BYTES - 1024 * 1024
# The fewest events waiting for a workspace that start another call beside a running one.
PARALLEL_MIN_EVENTS = 200
# Statuses after which the events are known not to be committed and a retry can succeed.
# RESOURCE_EXHAUSTED is among them for a transient shortage (a memory quota); a request over
# the message size limit is told apart by its details (``_TOO_LARGE``) and never retried.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# gRPC's details when a message is over the limit: "CLIENT: Sent message larger than max (…)" here,
# "SERVER: Received message larger than max (…)" from identity. The same request can only fail again.
_TOO_LARGE = "message larger than max"
# Unbound: a call per event without an attribute lookup per event.
_byte_size = Event.ByteSize


def _request(events: list[Event]) -> RecordEventsRequest:
    """``RecordEventsRequest(events=events)``, built by copying each event into an added one:
    a deep copy, about 40% cheaper than the constructor's per-event merge."""
    request = RecordEventsRequest()
    add = request.events.add
    for event in events:
        add().CopyFrom(event)
    return request


class IdentityFailed(ParleyError):
    """identity answered with an error a retry will not fix; nothing was acked."""


def _parts(events: list[Event], sizes: list[int]) -> list[tuple[list[Event], int]]:
    """``events`` cut, in order, into runs that each fit one call, with each run's bytes.

    A run is cut before the event that would take it over ``MAX_FORWARD`` events or
    ``MAX_FORWARD_BYTES``; an event over the byte budget by itself still makes a run of its own
    (the channel refuses it, and the caller gets that error rather than a loop of retries)."""
    parts: list[tuple[list[Event], int]] = []
    start = total = 0
    for i, size in enumerate(sizes):
        cost = size + FRAMING_BYTES
        if i > start and (i - start >= MAX_FORWARD or total + cost > MAX_FORWARD_BYTES):
            parts.append((events[start:i], total))
            start, total = i, 0
        total += cost
    parts.append((events[start:], total))
    return parts


@dataclass
class _Group:
    """Events of one or more callers that go to identity in one call (one transaction)."""

    workspace: Workspace
    events: list[Event] = field(default_factory=list)
    # The request's bytes so far: the events' serialized sizes and their framing.
    size: int = 0
    # Where each caller's events start in ``events``.
    starts: list[int] = field(default_factory=list)
    # Per caller: its results, or the error its call ends with.
    done: asyncio.Future[list[list[EventResult] | BaseException]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def slices(self) -> list[list[Event]]:
        ends = [*self.starts[1:], len(self.events)]
        return [self.events[a:b] for a, b in zip(self.starts, ends, strict=True)]


class Forwarder:
    """Sends events to identity's RecordEvents, coalescing concurrent callers per workspace.

    While ``max_in_flight`` calls of a workspace are running, later callers' events gather
    into the next call: one event per RPC when idle, large batches under load — the
    single-event RPCs get batch throughput. A call holds at most ``MAX_FORWARD`` events and
    ``MAX_FORWARD_BYTES``; a caller's events that do not fit the gathering call wait for the
    next one, so no call is ever refused for its size and fails callers that would each fit.

    A caller's events that fit one call are never split across calls, so they commit together
    or not at all. Only a caller whose own events exceed one call's limits (an HTTP body of
    large events; a gRPC batch's 500 KiB never does) is split, see :meth:`record`.
    """

    def __init__(
        self, identity: IdentityServiceStub, token: str, *, timeout: float = 30.0, max_in_flight: int = 1
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"PARLEY_FORWARD_IN_FLIGHT={max_in_flight}: at least one call must be allowed in flight")
        self._identity = identity
        self._token = token
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._waiting: dict[str, deque[_Group]] = {}
        self._in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Totals since start, for tests and the benchmark's profile.
        self.calls = 0
        self.events = 0

    async def record(
        self, events: list[Event], workspace: Workspace, size_bound: int | None = None
    ) -> list[EventResult]:
        """identity's results for ``events``, in order, once every one of them is committed.

        ``size_bound``, when given, is at least the events' bytes with their framing.

        Events over one call's limits go in several calls, one after another in their order
        (as one call would store them), and the results come after the last one commits. If a
        call fails, its error is raised and no event is reported stored: the events of the calls
        before it stay stored, and since identity dedupes by ``message_id`` the client's retry
        gets them back as ``DUPLICATE`` and stores the rest.
        """
        if size_bound is not None and len(events) <= MAX_FORWARD and size_bound <= MAX_FORWARD_BYTES:
            # The caller knows the events fit one call (``size_bound`` is at least their bytes):
            # measuring each would cost as much as serializing it (upb keeps no cached size).
            return await self._join(events, size_bound, workspace)
        sizes = list(map(_byte_size, events))
        size = sum(sizes) + FRAMING_BYTES * len(sizes)
        if len(events) <= MAX_FORWARD and size <= MAX_FORWARD_BYTES:
            return await self._join(events, size, workspace)
        results: list[EventResult] = []
        for part, part_size in _parts(events, sizes):
            try:
                results.extend(await self._join(part, part_size, workspace))
            except (Unavailable, IdentityFailed) as exc:
                if not results:
                    raise
                raise type(exc)(
                    f"{exc.message}; but {len(results)} of the {len(events)} events were stored by the calls"
                    " before, and a retry answers them as duplicates"
                ) from exc
        return results

    async def _join(self, events: list[Event], size: int, workspace: Workspace) -> list[EventResult]:
        """identity's results for ``events`` (within one call's limits, ``size`` bytes), sent in
        the gathering call of the workspace if they fit it, else in a new one."""
        key = workspace.id
        queue = self._waiting.setdefault(key, deque())
        if not queue or len(queue[-1].events) + len(events) > MAX_FORWARD or queue[-1].size + size > MAX_FORWARD_BYTES:
            queue.append(_Group(workspace))
        group = queue[-1]
        caller = len(group.starts)
        group.starts.append(len(group.events))
        group.events.extend(events)
        group.size += size
        running = self._in_flight.get(key, 0)
        # A further call in flight only for a group worth one: small ones (single events from
        # many callers) keep gathering while a call runs, and fewer, larger transactions are
        # cheaper than several small ones side by side.
        if running == 0 or (running < self._max_in_flight and len(group.events) >= PARALLEL_MIN_EVENTS):
            self._in_flight[key] = running + 1
            task = asyncio.create_task(self._run(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Shielded: one caller giving up must not cancel the call the others wait on.
        outcome = (await asyncio.shield(group.done))[caller]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _run(self, key: str) -> None:
        try:
            while True:
                queue = self._waiting.get(key)
                if not queue:
                    return
                group = queue.popleft()
                if not queue:
                    del self._waiting[key]
                try:
                    group.done.set_result(await self._send_group(group))
                except asyncio.CancelledError:
                    error = Unavailable("ingest is shutting down; the events were not acked, retry")
                    group.done.set_result([error] * len(group.starts))
                    raise
                except Exception as exc:  # a bug, not identity: still no caller may wait forever
                    log.exception("forward_failed")
                    group.done.set_result([exc] * len(group.starts))
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]

    async def _send_group(self, group: _Group) -> list[list[EventResult] | BaseException]:
        """Each caller's outcome. A rejection that a retry cannot fix is retried per caller,
        so one caller's events identity refuses never fail the others sharing the call."""
        try:
            results = await self._send(group.events, group.workspace)
        except IdentityFailed as exc:
            if len(group.starts) == 1:
                return [exc]
            outcomes: list[list[EventResult] | BaseException] = []
            for events in group.slices():
                try:
                    outcomes.append(await self._send(events, group.workspace))
                except ParleyError as one:
                    outcomes.append(one)
            return outcomes
        except ParleyError as exc:
            return [exc] * len(group.starts)
        ends = [*group.starts[1:], len(results)]
        return [results[a:b] for a, b in zip(group.starts, ends, strict=True)]

    async def _send(self, events: list[Event], workspace: Workspace) -> list[EventResult]:
        self.calls += 1
        self.events += len(events)
        try:
            response = await self._identity.RecordEvents(
                _request(events),
                metadata=internal_metadata(self._token, workspace.id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            code, details = err.code(), err.details() or ""
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in details:
                # Only an event over the byte budget by itself gets here (or identity taking less
                # than MAX_MESSAGE_BYTES): the same request can only fail again, so no retry.
                log.error("identity_request_too_large", detail=details, events=len(events))
                raise IdentityFailed(
                    "events could not be stored (RESOURCE_EXHAUSTED): the request to identity is over"
                    " its message size limit"
                ) from err
            if code in _RETRYABLE:
                log.warning("identity_unavailable", code=code.name, events=len(events))
                raise Unavailable(
                    "identity is unavailable; the events were not acked, retry (a retry stores each once)"
                ) from err
            log.error("identity_failed", code=code.name, detail=details, events=len(events))
            raise IdentityFailed(f"events could not be stored ({code.name})") from err
        if len(response.results) != len(events):
            raise IdentityFailed("identity answered with a result count that does not match")
        return list(response.results)
