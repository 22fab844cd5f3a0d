"""The one ingest path behind gRPC and HTTP: normalize, dedupe, forward to identity, report per event."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.event_pb2 import Event, EventResult, EventStatus, FieldViolation

from services.common.context import Workspace
from services.common.errors import Violation
from services.ingest.forward import Forwarder
from services.ingest.normalize import MAX_NORMALIZED_GROWTH, Limits, normalize_event

# Plain ints: enum attribute lookups are slow on this hot path.
_REJECTED = int(EventStatus.EVENT_STATUS_REJECTED)
_DUPLICATE = int(EventStatus.EVENT_STATUS_DUPLICATE)

# (index of the event in the caller's numbering, the event, field relative to it) -> field path.
Namer = Callable[[int, Event, str], str]


def batch_namer(prefix: str) -> Namer:
    """Names ``<prefix>[i].<field>``, e.g. ``events[3].traits.phone``."""

    def name(index: int, _event: Event, field: str) -> str:
        return f"{prefix}[{index}].{field}" if field else f"{prefix}[{index}]"

    return name


def single_namer(prefix: str) -> Namer:
    """Names ``<prefix>.<field>`` for single-event calls, e.g. ``event.name``."""

    def name(_index: int, _event: Event, field: str) -> str:
        return f"{prefix}.{field}" if field else prefix

    return name


class Ingestor:
    """Turns client events into committed, deduplicated events in identity."""

    def __init__(self, forwarder: Forwarder, limits: Limits) -> None:
        self._forwarder = forwarder
        self.limits = limits

    async def ingest(
        self,
        events: Sequence[Event | None],
        workspace: Workspace,
        namer: Namer,
        *,
        base_index: int = 0,
        prior: Mapping[int, Sequence[FieldViolation]] | None = None,
        request_bytes: int | None = None,
    ) -> list[EventResult]:
        """One result per event, in order, after every accepted event is committed by identity.

        ``prior`` holds violations found before normalization (e.g. unparseable JSON fields)
        by position in ``events``, already named; a None event is one that could not be read
        at all and is rejected with its ``prior`` violations only. Raises ``Unavailable`` when identity cannot
        be reached; then no event is reported stored. The events went to identity in one call, which
        committed nothing, unless they were too many or too large for one: then the calls before
        the failed one stay committed, and a retry answers their events as ``DUPLICATE``.

        ``request_bytes``, the serialized size of the request the events came in when the caller
        knows it, bounds the forwarded size with ``MAX_NORMALIZED_GROWTH`` per event, so the
        forwarder need not measure every event (a gRPC batch is far under a call's limit).
        """
        received = Timestamp()
        received.GetCurrentTime()
        region = workspace.default_region or "US"
        limits = self.limits
        results: list[EventResult | None] = [None] * len(events)
        forward: list[Event] = []
        forward_slots: list[int] = []
        first_seen: dict[str, int] = {}
        duplicates: list[tuple[int, int]] = []
        for slot, maybe in enumerate(events):
            if maybe is None:
                event = Event()
                violations: list[Violation] = []
            else:
                event = maybe
                violations = normalize_event(event, region, received, limits)
            earlier = prior.get(slot) if prior else None
            if violations or earlier:
                index = base_index + slot
                named = list(earlier or ())
                named.extend(
                    FieldViolation(field=namer(index, event, v.field), description=v.description) for v in violations
                )
                # The id echoed no longer than an id may be: a stream's one response holds up to
                # 10,000 results, and ids of up to 32 KiB would pass what clients accept.
                results[slot] = EventResult(
                    index=index, message_id=event.message_id[: limits.max_id_chars], status=_REJECTED, violations=named
                )
                continue
            message_id = event.message_id
            position = first_seen.get(message_id)
            if position is not None:
                duplicates.append((slot, position))
                continue
            first_seen[message_id] = len(forward)
            forward.append(event)
            forward_slots.append(slot)

        # The forwarder cuts what one identity call cannot hold (events or bytes) into several
        # calls and answers once all of them committed: one result per forwarded event, in order.
        size_bound = None if request_bytes is None else request_bytes + MAX_NORMALIZED_GROWTH * len(forward)
        committed = await self._forwarder.record(forward, workspace, size_bound) if forward else []
        if len(forward) == len(events) and len(committed) == len(forward):
            # Every event was forwarded, in order: identity's results are the answer as they are.
            for slot, result in enumerate(committed, base_index):
                result.index = slot
            return committed
        for slot, result in zip(forward_slots, committed, strict=True):
            result.index = base_index + slot
            results[slot] = result
        for slot, position in duplicates:
            results[slot] = EventResult(
                index=base_index + slot,
                message_id=forward[position].message_id,
                status=_DUPLICATE,
                contact_id=committed[position].contact_id,
            )
        return [r for r in results if r is not None]


def violations_of_result(result: EventResult) -> list[Violation]:
    """A rejected result's violations as chassis ``Violation``s (for ``InvalidArgument``)."""
    return [Violation(v.field, v.description) for v in result.violations]
