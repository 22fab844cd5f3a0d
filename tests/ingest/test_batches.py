"""Batches end to end through real identity: partial acceptance, idempotency, phones, streams."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.event_pb2 import Event, EventResult, EventStatus, EventType, FieldViolation
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.ingest.v1 import ingest_service_pb2 as pb

from services.common.errors import Violation, field_violations
from services.ingest import servicer
from services.ingest.forward import Forwarder
from tests.ingest.conftest import Stack, StackFactory, struct, track

ACCEPTED, DUPLICATE, REJECTED = (
    EventStatus.EVENT_STATUS_ACCEPTED,
    EventStatus.EVENT_STATUS_DUPLICATE,
    EventStatus.EVENT_STATUS_REJECTED,
)


async def user_events(stack: Stack, user_id: str) -> list[ipb.StoredEvent]:
    got = await stack.identity_stub.GetUser(ipb.GetUserRequest(user_id=user_id, event_limit=1000), metadata=stack.md)
    return list(got.events)


async def test_one_bad_event_is_rejected_alone(stack: Stack) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    events = [
        track("First", user_id=user),
        track("Second", user_id=user, traits={"phone": "not-a-phone"}),
        track("", user_id=user),
        track("Fourth", user_id=user),
    ]
    response = await stack.stub.IngestBatch(pb.IngestBatchRequest(events=events), metadata=stack.md)
    assert [r.status for r in response.results] == [ACCEPTED, REJECTED, REJECTED, ACCEPTED]
    assert [r.index for r in response.results] == [0, 1, 2, 3]
    assert [v.field for v in response.results[1].violations] == ["events[1].traits.phone"]
    assert [v.field for v in response.results[2].violations] == ["events[2].name"]
    assert (response.accepted_count, response.duplicate_count, response.rejected_count) == (2, 0, 2)
    stored = await user_events(stack, user)
    assert sorted(e.event.name for e in stored) == ["First", "Fourth"]


async def test_duplicates_in_a_batch_and_across_retries_are_stored_once(stack: Stack) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    events = [
        track("A", user_id=user, message_id="dup-a"),
        track("A", user_id=user, message_id="dup-a"),
        track("B", user_id=user, message_id="dup-b"),
    ]
    first = await stack.stub.IngestBatch(pb.IngestBatchRequest(events=events), metadata=stack.md)
    assert [r.status for r in first.results] == [ACCEPTED, DUPLICATE, ACCEPTED]
    retry = await stack.stub.IngestBatch(pb.IngestBatchRequest(events=events), metadata=stack.md)
    assert [r.status for r in retry.results] == [DUPLICATE, DUPLICATE, DUPLICATE]
    assert retry.duplicate_count == 3
    single = await stack.stub.Track(
        pb.TrackRequest(event=track("A", user_id=user, message_id="dup-a")), metadata=stack.md
    )
    assert single.result.status == DUPLICATE
    stored = await user_events(stack, user)
    assert sorted(e.event.message_id for e in stored) == ["dup-a", "dup-b"]


async def test_generated_message_ids_are_returned(stack: Stack) -> None:
    response = await stack.stub.Track(pb.TrackRequest(event=track(anonymous_id="anon-1")), metadata=stack.md)
    assert uuid.UUID(response.result.message_id)


async def test_phone_formats_make_one_contact_and_keep_the_original(stack: Stack) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    formats = ["(415) 555-2671", "+1 415-555-2671", "4155552671", "tel:+1-415-555-2671"]
    events = [Event(type=EventType.EVENT_TYPE_IDENTIFY, user_id=user, traits=struct({"phone": raw})) for raw in formats]
    response = await stack.stub.IngestBatch(pb.IngestBatchRequest(events=events), metadata=stack.md)
    assert response.accepted_count == 4
    contact = await stack.identity_stub.GetContact(ipb.GetContactRequest(phone="+14155552671"), metadata=stack.md)
    assert contact.contact.phone == "+14155552671"
    assert {r.contact_id for r in response.results} == {contact.contact.id}
    stored = await user_events(stack, user)
    assert {e.event.phone for e in stored} == {"+14155552671"}
    assert {e.event.traits.fields["phone"].string_value for e in stored} == set(formats)


async def test_timestamps_are_corrected_for_clock_skew(stack: Stack) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    device_now = datetime.now(UTC) - timedelta(hours=2)  # the device clock is two hours behind
    original, sent = Timestamp(), Timestamp()
    original.FromDatetime(device_now - timedelta(minutes=10))
    sent.FromDatetime(device_now)
    await stack.stub.Track(
        pb.TrackRequest(event=track(user_id=user, original_timestamp=original, sent_at=sent)), metadata=stack.md
    )
    [stored] = await user_events(stack, user)
    event = stored.event
    assert event.original_timestamp == original and event.sent_at == sent
    skew = event.received_at.ToDatetime(UTC) - event.timestamp.ToDatetime(UTC)
    assert skew == timedelta(minutes=10)


async def test_stream_reports_every_event_with_stream_indexes(stack: Stack) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"

    async def requests() -> AsyncIterator[pb.IngestStreamRequest]:
        for chunk in range(3):
            yield pb.IngestStreamRequest(events=[track(f"S{chunk}-{i}", user_id=user) for i in range(4)])
        yield pb.IngestStreamRequest(events=[track("", user_id=user)])

    response = await stack.stub.IngestStream(requests(), metadata=stack.md)
    assert [r.index for r in response.results] == list(range(13))
    assert (response.accepted_count, response.rejected_count) == (12, 1)
    assert [v.field for v in response.results[12].violations] == ["events[12].name"]
    assert len(await user_events(stack, user)) == 12


async def stream_refused(stack: Stack, requests: AsyncIterator[pb.IngestStreamRequest]) -> Violation:
    """The one violation, on ``events``, of a stream refused INVALID_ARGUMENT."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.stub.IngestStream(requests, metadata=stack.md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [violation] = await field_violations(info.value)
    assert violation.field == "events"
    return violation


async def test_a_stream_takes_a_bounded_number_of_events(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its one response holds a result per event: unbounded, it would pass what clients accept.
    monkeypatch.setattr(servicer, "MAX_STREAM_EVENTS", 10)
    user = f"u-{uuid.uuid4().hex[:8]}"

    async def requests() -> AsyncIterator[pb.IngestStreamRequest]:
        for chunk in range(3):
            yield pb.IngestStreamRequest(events=[track(f"S{chunk}-{i}", user_id=user) for i in range(4)])

    violation = await stream_refused(stack, requests())
    assert violation.description.startswith("stream message 2 (events from index 8): 4 events would bring the stream")
    assert "limit is 10 per stream" in violation.description and "DUPLICATE" in violation.description
    # The messages before went to identity, and were settled before the answer.
    stored = await user_events(stack, user)
    assert len(stored) == 8


async def test_a_rejected_result_echoes_at_most_an_ids_length_of_its_message_id(stack: Stack) -> None:
    # A stream's one response holds up to 10,000 results: 32 KiB ids echoed back would pass 4 MiB.
    long_id = "m" * 30_000
    response = await stack.stub.IngestBatch(
        pb.IngestBatchRequest(events=[track(user_id="u", message_id=long_id)]), metadata=stack.md
    )
    [result] = response.results
    assert result.status == EventStatus.EVENT_STATUS_REJECTED
    assert [v.field for v in result.violations] == ["events[0].message_id"]
    assert result.message_id == long_id[:255]


def test_a_streams_response_stays_within_what_clients_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stored events must be acked: past the limit (made small here), results give up their
    # message ids (accepted and duplicate ones first), then all but their first violation.
    accepted = [EventResult(index=i, message_id="€" * 255, status=EventStatus.EVENT_STATUS_ACCEPTED) for i in range(10)]
    rejected = [
        EventResult(
            index=10 + i,
            message_id=f"bad-{i}",
            status=EventStatus.EVENT_STATUS_REJECTED,
            violations=[
                FieldViolation(field="name", description="required"),
                FieldViolation(field="x", description="y"),
            ],
        )
        for i in range(3)
    ]
    results = accepted + rejected
    full = servicer._stream_response(results)
    assert full.results[0].message_id and full.ByteSize() > 5_000
    monkeypatch.setattr(servicer, "MAX_STREAM_RESPONSE_BYTES", 5_000)
    lighter = servicer._stream_response(results)
    assert lighter.ByteSize() <= 5_000
    assert not any(r.message_id for r in lighter.results[:10])
    assert [(r.message_id, len(r.violations)) for r in lighter.results[10:]] == [(f"bad-{i}", 2) for i in range(3)]
    monkeypatch.setattr(servicer, "MAX_STREAM_RESPONSE_BYTES", 150)
    lightest = servicer._stream_response(results)
    assert lightest.ByteSize() <= 150
    assert [(r.index, r.message_id, len(r.violations)) for r in lightest.results[10:]] == [
        (i, "", 1) for i in (10, 11, 12)
    ]
    assert (lightest.accepted_count, lightest.rejected_count) == (10, 3)


async def test_a_bad_stream_message_is_named(stack: Stack) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"

    async def requests() -> AsyncIterator[pb.IngestStreamRequest]:
        yield pb.IngestStreamRequest(events=[track("A", user_id=user) for _ in range(3)])
        yield pb.IngestStreamRequest(events=[track("B", user_id=user) for _ in range(1001)])

    violation = await stream_refused(stack, requests())
    assert violation.description.startswith("stream message 1 (events from index 3): 1001 events; the limit is 1000")


async def test_concurrent_single_events_share_identity_calls(stack: Stack) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    forwarder = stack.ingest.runtime.state["forwarder"]
    calls_before = forwarder.calls
    responses = await asyncio.gather(
        *(
            stack.stub.Track(
                pb.TrackRequest(event=track(f"C{i}", user_id=user, message_id=f"{user}-{i}")), metadata=stack.md
            )
            for i in range(64)
        )
    )
    assert all(r.result.status == ACCEPTED for r in responses)
    assert forwarder.calls - calls_before < 64
    assert len(await user_events(stack, user)) == 64


async def test_phones_are_read_in_the_workspace_region(make_stack: StackFactory) -> None:
    uk = await make_stack(default_region="GB")
    user = f"u-{uuid.uuid4().hex[:8]}"
    event = Event(type=EventType.EVENT_TYPE_IDENTIFY, user_id=user, traits=struct({"phone": "020 7946 0958"}))
    response = await uk.stub.Identify(pb.IdentifyRequest(event=event), metadata=uk.md)
    assert response.result.status == ACCEPTED
    [stored] = await user_events(uk, user)
    assert stored.event.phone == "+442079460958"


async def test_a_number_json_cannot_hold_is_rejected_alone(stack: Stack) -> None:
    # NaN and the infinities have no JSON form: stored, one would fail the whole batch in identity.
    user = f"u-{uuid.uuid4().hex[:8]}"
    events = [
        track("First", user_id=user),
        track("Nan", user_id=user, properties={"amount": float("nan")}),
        track("Inf", user_id=user, traits={"scores": [1, {"top": float("inf")}]}),
        track("MinusInf", user_id=user, context={"screen": {"density": float("-inf")}}),
        track("Last", user_id=user, properties={"big": 1e308, "tiny": 5e-324, "zero": -0.0}),
    ]
    response = await stack.stub.IngestBatch(pb.IngestBatchRequest(events=events), metadata=stack.md)
    assert [r.status for r in response.results] == [ACCEPTED, REJECTED, REJECTED, REJECTED, ACCEPTED]
    assert [[v.field for v in r.violations] for r in response.results[1:4]] == [
        ["events[1].properties"],
        ["events[2].traits"],
        ["events[3].context"],
    ]
    stored = await user_events(stack, user)
    assert sorted(e.event.name for e in stored) == ["First", "Last"]


async def test_nul_characters_are_rejected_alone_naming_the_field(stack: Stack) -> None:
    # Postgres text and jsonb cannot hold NUL: an event with one would fail its whole batch downstream.
    user = f"u-{uuid.uuid4().hex[:8]}"
    events = [
        track("First", user_id=user),
        track("Bad Id", user_id="a\x00b"),
        track("Bad\x00Name", user_id=user),
        track("Bad Key", user_id=user, properties={"k\x00": "v", "n": 3.0}),
        track("Bad Trait", user_id=user, traits={"nick": ["ok", "a\x00"]}),
        track("Bad Context", user_id=user, context={"app": {"name": "x\x00"}}),
        track("Last", user_id=user, properties={"zeros": 0.0, "false": False, "none": None, "empty": ""}),
    ]
    response = await stack.stub.IngestBatch(pb.IngestBatchRequest(events=events), metadata=stack.md)
    assert [r.status for r in response.results] == [ACCEPTED] + [REJECTED] * 5 + [ACCEPTED]
    assert [[v.field for v in r.violations] for r in response.results[1:6]] == [
        ["events[1].user_id"],
        ["events[2].name"],
        ["events[3].properties"],
        ["events[4].traits"],
        ["events[5].context"],
    ]
    stored = await user_events(stack, user)
    assert sorted(e.event.name for e in stored) == ["First", "Last"]


async def test_a_second_call_runs_beside_the_first_only_for_a_large_group(stack: Stack) -> None:
    forwarder = stack.ingest.runtime.state["forwarder"]
    send = forwarder._send
    running = peak = 0

    async def counting(events: list[Event], workspace: Any) -> list[Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await send(events, workspace)
        finally:
            running -= 1

    forwarder._send = counting
    try:
        user = f"u-{uuid.uuid4().hex[:8]}"
        singles = await asyncio.gather(
            *(
                stack.stub.Track(pb.TrackRequest(event=track(f"S{i}", user_id=user)), metadata=stack.md)
                for i in range(64)
            )
        )
        assert all(r.result.status == ACCEPTED for r in singles)
        assert peak == 1  # single events wait for the running call and ride the next one together
        peak = 0
        batches = await asyncio.gather(
            *(
                stack.stub.IngestBatch(
                    pb.IngestBatchRequest(events=[track(f"B{b}-{i}", user_id=f"{user}-{b}-{i}") for i in range(300)]),
                    metadata=stack.md,
                )
                for b in range(4)
            )
        )
        assert all(r.accepted_count == 300 for r in batches)
        assert peak > 1  # groups of 300 events each get a call of their own
    finally:
        forwarder._send = send


def test_forwarding_needs_at_least_one_call_in_flight() -> None:
    with pytest.raises(ValueError, match="PARLEY_FORWARD_IN_FLIGHT"):
        Forwarder(None, "token", max_in_flight=0)  # type: ignore[arg-type]
