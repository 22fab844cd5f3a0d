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

from services.common.clients import internal_metadata
from services.common.context import Workspace
from services.common.errors import ParleyError, Unavailable

log = structlog.get_logger(__name__)

# identity's RecordEvents takes at most this many events per call.
MAX_FORWARD = 1000
# The fewest events waiting for a workspace that start another call beside a running one.
PARALLEL_MIN_EVENTS = 200
# Statuses after which the events are known not to be committed and a retry can succeed.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


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


@dataclass
class _Group:
    """Events of one or more callers that go to identity in one call (one transaction)."""

    workspace: Workspace
    events: list[Event] = field(default_factory=list)
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

    A caller's events are never split across calls, so each caller's events commit together
    or not at all. While ``max_in_flight`` calls of a workspace are running, later callers'
    events gather into the next call (up to ``MAX_FORWARD`` events): one event per RPC when
    idle, large batches under load — the single-event RPCs get batch throughput.
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

    async def record(self, events: list[Event], workspace: Workspace) -> list[EventResult]:
        """identity's results for ``events`` (at most ``MAX_FORWARD``), once they are committed."""
        key = workspace.id
        queue = self._waiting.setdefault(key, deque())
        if not queue or len(queue[-1].events) + len(events) > MAX_FORWARD:
            queue.append(_Group(workspace))
        group = queue[-1]
        caller = len(group.starts)
        group.starts.append(len(group.events))
        group.events.extend(events)
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
            if err.code() in _RETRYABLE:
                log.warning("identity_unavailable", code=err.code().name, events=len(events))
                raise Unavailable("identity is unavailable; the events were not stored, retry") from err
            log.error("identity_failed", code=err.code().name, detail=err.details(), events=len(events))
            raise IdentityFailed(f"events could not be stored ({err.code().name})") from err
        if len(response.results) != len(events):
            raise IdentityFailed("identity answered with a result count that does not match")
        return list(response.results)
