"""Forwarding by size: no RecordEvents call is ever over the channel's message limit.

Events are up to 32 KiB each and callers up to 1,000 events, so 1,000 events can be ~32 MiB
while a gRPC message holds 16 MiB: the calls are cut by bytes as well as by count.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import asyncpg
import grpc
import phonenumbers
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.event_pb2 import Event, EventStatus, EventType
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.identity.v1.identity_service_pb2 import RecordEventsRequest
from parley.identity.v1.identity_service_pb2_grpc import IdentityServiceStub
from parley.ingest.v1 import ingest_service_pb2 as pb
from phonenumbers import PhoneNumberType

from services.common.clients import MAX_MESSAGE_BYTES
from services.ingest.forward import MAX_FORWARD_BYTES, Forwarder
from services.ingest.normalize import MAX_NORMALIZED_GROWTH, normalize_event
from tests.ingest.conftest import Stack, StackFactory, struct, track

ACCEPTED = EventStatus.EVENT_STATUS_ACCEPTED
# A property this long makes an event of ~30 KiB, under the 32 KiB per-event limit.
BLOB = 30_000


class Identity:
    """Stands in for ingest's identity stub: records each RecordEvents request (events, bytes),
    holds calls while ``gate`` is clear, and fails the calls numbered in ``fail`` as identity
    being down would."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[tuple[int, int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: set[int] = set()

    async def RecordEvents(self, request: ipb.RecordEventsRequest, **kwargs: Any) -> ipb.RecordEventsResponse:
        number = len(self.calls)
        self.calls.append((len(request.events), request.ByteSize()))
        await self.gate.wait()
        if number in self.fail:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "injected outage"
            )
        response: ipb.RecordEventsResponse = await self.real.RecordEvents(request, **kwargs)
        return response

    def assert_within_limit(self) -> None:
        assert self.calls
        for events, size in self.calls:
            assert size <= MAX_FORWARD_BYTES < MAX_MESSAGE_BYTES, (events, size)


def forwarder_of(stack: Stack) -> Forwarder:
    forwarder: Forwarder = stack.ingest.runtime.state["forwarder"]
    return forwarder


@pytest.fixture
async def identity(stack: Stack) -> AsyncIterator[Identity]:
    forwarder = forwarder_of(stack)
    real = forwarder._identity
    proxy = Identity(real)
    forwarder._identity = proxy  # type: ignore[assignment]
    try:
        yield proxy
    finally:
        forwarder._identity = real


@pytest.fixture(scope="module")
async def single(make_stack: StackFactory) -> Stack:
    """A stack with one RecordEvents call in flight: every later caller gathers into the next call."""
    return await make_stack(forward_in_flight=1)


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def stored_counts(stack: Stack, message_ids: Iterable[str]) -> dict[str, int]:
    """How many times each of ``message_ids`` is stored (read from the database: a user's
    ~20 MB of events is more than a default client channel takes from GetUser)."""
    conn = await asyncpg.connect(stack.db_url)
    try:
        rows = await conn.fetch(
            """SELECT message_id, count(*) AS n FROM identity.events
               WHERE workspace_id = $1::uuid AND message_id = ANY($2::text[]) GROUP BY message_id""",
            stack.workspace.id,
            list(message_ids),
        )
    finally:
        await conn.close()
    return {r["message_id"]: r["n"] for r in rows}


async def wait_gathered(stack: Stack, since: int, count: int) -> None:
    """Until ``count`` events reached the forwarder after ``since`` (its total sent then):
    sent to identity (and held there) or waiting in a group."""
    forwarder = forwarder_of(stack)
    deadline = time.monotonic() + 60
    while True:
        waiting = sum(len(group.events) for group in forwarder._waiting.get(stack.workspace.id, ()))
        if forwarder.events - since + waiting >= count:
            return
        assert time.monotonic() < deadline, "callers did not reach the forwarder"
        await asyncio.sleep(0.02)


def amplified_batch(run: str) -> tuple[bytes, list[str]]:
    """A ~96 KB HTTP batch of 1,000 messages whose 20 KB batch-level context is copied into each
    message: ~20 MB of events, over one call's byte budget."""
    ids = [f"{run}-{i}" for i in range(1000)]
    batch = [{"type": "track", "userId": f"{run}-u{i % 10}", "event": "E", "messageId": m} for i, m in enumerate(ids)]
    return json.dumps({"batch": batch, "context": {"blob": "x" * 20_000}}).encode(), ids


async def post_batch(http: aiohttp.ClientSession, stack: Stack, body: bytes) -> tuple[int, dict[str, Any]]:
    auth = "Basic " + base64.b64encode(f"{stack.key}:".encode()).decode()
    headers = {"Content-Type": "application/json", "Authorization": auth}
    async with http.post(f"{stack.http_url}/v1/batch", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_an_http_batch_over_one_calls_bytes_is_stored_whole(
    stack: Stack, identity: Identity, http: aiohttp.ClientSession
) -> None:
    body, ids = amplified_batch(f"amp-{uuid.uuid4().hex[:8]}")
    assert await post_batch(http, stack, body) == (200, {"success": True})
    identity.assert_within_limit()
    assert len(identity.calls) > 1  # cut by bytes: 1,000 events fit one call by count
    assert sum(events for events, _ in identity.calls) == 1000
    assert sum(size for _, size in identity.calls) > MAX_FORWARD_BYTES
    assert await stored_counts(stack, ids) == dict.fromkeys(ids, 1)
    # The resend is answered from what is stored, in the same calls, and stores nothing twice.
    assert await post_batch(http, stack, body) == (200, {"success": True})
    assert await stored_counts(stack, ids) == dict.fromkeys(ids, 1)


async def test_a_split_batch_failing_midway_is_not_acked_and_its_retry_stores_the_rest_once(
    stack: Stack, identity: Identity, http: aiohttp.ClientSession
) -> None:
    body, ids = amplified_batch(f"part-{uuid.uuid4().hex[:8]}")
    identity.fail = {1}  # the first part commits, the second finds identity down
    status, answer = await post_batch(http, stack, body)
    assert (status, answer["code"]) == (503, "unavailable")
    assert "a retry answers them as duplicates" in answer["message"]
    first_part = identity.calls[0][0]
    assert sum((await stored_counts(stack, ids)).values()) == first_part < 1000
    assert await post_batch(http, stack, body) == (200, {"success": True})
    assert await stored_counts(stack, ids) == dict.fromkeys(ids, 1)


async def test_concurrent_single_events_over_one_calls_bytes_are_all_stored(stack: Stack, identity: Identity) -> None:
    # 1,000 Track calls of ~30 KiB (~30 MB, as one IngestBatch of them would be, which the
    # 500 KiB batch limit refuses) gather while identity holds the first calls.
    run = f"trk-{uuid.uuid4().hex[:8]}"
    ids = [f"{run}-{i}" for i in range(1000)]
    props = struct({"blob": "y" * BLOB})
    identity.gate.clear()
    since = forwarder_of(stack).events

    async def one(message_id: str) -> pb.TrackResponse:
        event = track(user_id=f"{run}-u", message_id=message_id)
        event.properties.CopyFrom(props)
        response: pb.TrackResponse = await stack.stub.Track(pb.TrackRequest(event=event), metadata=stack.md)
        return response

    calls = [asyncio.create_task(one(m)) for m in ids]
    await wait_gathered(stack, since, len(ids))
    identity.gate.set()
    responses = await asyncio.gather(*calls)
    assert [r.result.status for r in responses] == [ACCEPTED] * len(ids)
    identity.assert_within_limit()
    assert max(events for events, _ in identity.calls) > 100  # still coalesced, up to the byte budget
    assert sum(events for events, _ in identity.calls) == len(ids)
    assert await stored_counts(stack, ids) == dict.fromkeys(ids, 1)


async def test_concurrent_batches_over_one_calls_bytes_all_succeed_each_in_one_call(single: Stack) -> None:
    # 40 batches of 15 events of ~30 KiB (~450 KiB each, under the batch limit; ~18 MB in all)
    # gather behind one held call: a batch that does not fit the gathering call waits for the next.
    forwarder = forwarder_of(single)
    real = forwarder._identity
    identity = Identity(real)
    forwarder._identity = identity  # type: ignore[assignment]
    run = f"bat-{uuid.uuid4().hex[:8]}"
    props = struct({"blob": "z" * BLOB})
    batches = [[f"{run}-{b}-{i}" for i in range(15)] for b in range(40)]
    try:
        identity.gate.clear()
        since = forwarder.events

        async def one(ids: list[str]) -> pb.IngestBatchResponse:
            events = [track(user_id=f"{run}-u{i}", message_id=m) for i, m in enumerate(ids)]
            for event in events:
                event.properties.CopyFrom(props)
            request = pb.IngestBatchRequest(events=events)
            response: pb.IngestBatchResponse = await single.stub.IngestBatch(request, metadata=single.md)
            return response

        calls = [asyncio.create_task(one(ids)) for ids in batches]
        await wait_gathered(single, since, 15 * len(batches))
        identity.gate.set()
        responses = await asyncio.gather(*calls)
    finally:
        forwarder._identity = real
    assert [r.accepted_count for r in responses] == [15] * len(batches)
    identity.assert_within_limit()
    assert len(identity.calls) >= 3  # the held one, one full by bytes, one for the callers left over
    # A batch within one call's limits is never split: it commits together or not at all.
    assert all(events % 15 == 0 for events, _ in identity.calls)
    ids = [m for batch in batches for m in batch]
    assert await stored_counts(single, ids) == dict.fromkeys(ids, 1)


async def test_a_request_over_identitys_message_limit_is_not_reported_as_unavailable(make_stack: StackFactory) -> None:
    # identity taking less than ingest sends (a misconfiguration; the byte budget prevents it
    # otherwise): the same request can only fail again, so the caller must not be told to retry.
    stack = await make_stack()
    forwarder = forwarder_of(stack)
    small = grpc.aio.insecure_channel(
        f"127.0.0.1:{stack.identity.port}", options=[("grpc.max_send_message_length", 4096)]
    )
    real = forwarder._identity
    identity = Identity(IdentityServiceStub(small))
    forwarder._identity = identity  # type: ignore[assignment]
    try:
        event = track(user_id="u-big", properties={"blob": "b" * 8192})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.Track(pb.TrackRequest(event=event), metadata=stack.md)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "message size limit" in (info.value.details() or "")
        assert len(identity.calls) == 1
        # A small event on the same channel still goes through.
        ok = await stack.stub.Track(pb.TrackRequest(event=track(user_id="u-small")), metadata=stack.md)
        assert ok.result.status == ACCEPTED
    finally:
        forwarder._identity = real
        await small.close()


def test_normalizing_adds_at_most_the_bound_the_forwarder_relies_on() -> None:
    # A gRPC batch is forwarded without measuring each event: its request's bytes plus
    # MAX_NORMALIZED_GROWTH per event must cover what normalization adds. Every region's example
    # numbers (the longest zone names among them), no message id, and the latest valid times.
    received = Timestamp(seconds=253402300799 - 86400, nanos=999_999_999)
    latest = Timestamp(seconds=253402300799 - 86400, nanos=999_999_998)
    worst = 0
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE):
            number = phonenumbers.example_number_for_type(region, kind)
            if number is None:
                continue
            phone = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
            event = Event(type=EventType.EVENT_TYPE_IDENTIFY, user_id="u", traits=struct({"phone": phone}))
            event.original_timestamp.CopyFrom(latest)
            before = pb.IngestBatchRequest(events=[event]).ByteSize()
            assert not normalize_event(event, region, received)
            assert event.phone == phone and event.message_id
            worst = max(worst, RecordEventsRequest(events=[event]).ByteSize() - before)
    assert 0 < worst <= MAX_NORMALIZED_GROWTH
