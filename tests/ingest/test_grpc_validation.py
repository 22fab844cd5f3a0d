"""Bad input over gRPC: INVALID_ARGUMENT naming the field for single events, per-event rejection in batches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.event_pb2 import Event, EventStatus, EventType
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.ingest.v1 import ingest_service_pb2 as pb

from services.common.errors import field_violations
from tests.ingest.conftest import Stack, struct, track


def ts(delta: timedelta) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(datetime.now(UTC) + delta)
    return out


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"inner": value}
    return value


# (event, field named in the error, words in its description) — one case per rule.
BAD_EVENTS = [
    pytest.param(track(user_id="u", type=EventType.EVENT_TYPE_PAGE), "event.type", "EVENT_TYPE_TRACK", id="wrong-type"),
    pytest.param(track("", user_id="u"), "event.name", "required", id="name-missing"),
    pytest.param(track("   ", user_id="u"), "event.name", "required", id="name-blank"),
    pytest.param(track("n" * 201, user_id="u"), "event.name", "200", id="name-too-long"),
    pytest.param(track(), "event.user_id", "anonymous_id", id="no-identity"),
    pytest.param(track(user_id="u" * 300), "event.user_id", "255", id="user-id-too-long"),
    pytest.param(track(user_id="u", traits={"phone": "555-12"}), "event.traits.phone", "phone", id="bad-phone"),
    pytest.param(
        track(user_id="u", context={"traits": {"phone": "nope"}}), "event.context.traits.phone", "phone", id="ctx-phone"
    ),
    pytest.param(track(user_id="u", properties=deep(9)), "event.properties", "deeper than 8", id="deep-properties"),
    pytest.param(track(user_id="u", traits=deep(9)), "event.traits", "deeper than 8", id="deep-traits"),
    pytest.param(track(user_id="u", context=deep(9)), "event.context", "deeper than 8", id="deep-context"),
    pytest.param(track(user_id="u", properties={"b": "x" * 40_000}), "event", "32768 bytes", id="event-too-big"),
    pytest.param(
        track(user_id="u", original_timestamp=Timestamp(seconds=100)), "event.original_timestamp", "2000", id="ts-old"
    ),
    pytest.param(
        track(user_id="u", original_timestamp=ts(timedelta(days=3))),
        "event.original_timestamp",
        "24 hours",
        id="ts-future",
    ),
    pytest.param(
        track(user_id="u", original_timestamp=Timestamp(seconds=1_700_000_000, nanos=2_000_000_000)),
        "event.original_timestamp",
        "not a valid timestamp",
        id="ts-invalid",
    ),
    pytest.param(
        track(user_id="u", sent_at=Timestamp(seconds=10**12)),
        "event.sent_at",
        "not a valid timestamp",
        id="sent-at-bad",
    ),
]


@pytest.mark.parametrize(("event", "field", "words"), BAD_EVENTS)
async def test_single_event_rejected_with_field(stack: Stack, event: Event, field: str, words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.stub.Track(pb.TrackRequest(event=event), metadata=stack.md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = await field_violations(info.value)
    assert any(v.field == field and words in v.description for v in violations), violations


async def test_unknown_type_in_a_batch(stack: Stack) -> None:
    response = await stack.stub.IngestBatch(
        pb.IngestBatchRequest(events=[Event(name="x", user_id="u")]), metadata=stack.md
    )
    [result] = response.results
    assert result.status == EventStatus.EVENT_STATUS_REJECTED
    assert [v.field for v in result.violations] == ["events[0].type"]


async def test_each_single_rpc_fills_in_its_type(stack: Stack) -> None:
    user = "single-rpc-user"
    await stack.stub.Track(pb.TrackRequest(event=track(user_id=user)), metadata=stack.md)
    await stack.stub.Page(pb.PageRequest(event=Event(user_id=user, name="Home")), metadata=stack.md)
    await stack.stub.Screen(pb.ScreenRequest(event=Event(user_id=user)), metadata=stack.md)
    identify = Event(user_id=user, traits=struct({"first_name": "Ada"}))
    response = await stack.stub.Identify(pb.IdentifyRequest(event=identify), metadata=stack.md)
    assert response.result.status == EventStatus.EVENT_STATUS_ACCEPTED
    got = await stack.identity_stub.GetUser(ipb.GetUserRequest(user_id=user), metadata=stack.md)
    types = sorted(EventType.Name(e.event.type) for e in got.events)
    assert types == ["EVENT_TYPE_IDENTIFY", "EVENT_TYPE_PAGE", "EVENT_TYPE_SCREEN", "EVENT_TYPE_TRACK"]


async def test_batch_limits(stack: Stack) -> None:
    too_many = [track(user_id="u") for _ in range(1001)]
    for events, words in (([], "at least one"), (too_many, "1000")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.IngestBatch(pb.IngestBatchRequest(events=events), metadata=stack.md)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        [violation] = await field_violations(info.value)
        assert violation.field == "events" and words in violation.description


async def test_batch_over_500_kib_is_rejected_whole(stack: Stack) -> None:
    events = [track(user_id="u", properties={"blob": "x" * 30_000}) for _ in range(20)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.stub.IngestBatch(pb.IngestBatchRequest(events=events), metadata=stack.md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [violation] = await field_violations(info.value)
    assert violation.field == "events" and "512000 bytes" in violation.description


async def test_a_request_over_the_batch_limit_is_refused_unread(stack: Stack) -> None:
    # 2 MiB of numbers: decoded, a request like it costs tens of times its size. It is refused
    # by its size, before it is read and before the key is checked (a stranger's request too).
    big = pb.TrackRequest(event=track(user_id="u", properties={"n": list(range(200_000))}))
    size = big.ByteSize()
    assert size > 2 * 1024 * 1024
    for md, code in ((stack.md, grpc.StatusCode.INVALID_ARGUMENT), ((("authorization", "Bearer pk_nope"),), None)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.Track(big, metadata=md)
        if code is None:
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            continue
        assert info.value.code() == code
        [violation] = await field_violations(info.value)
        assert violation.field == "event" and f"{size} bytes" in violation.description
        # The limit it broke is the request's (max_batch_bytes), not the event's.
        assert f"a request is at most {500 * 1024} bytes" in violation.description
    batch = pb.IngestBatchRequest(events=[big.event])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.stub.IngestBatch(batch, metadata=stack.md)
    [violation] = await field_violations(info.value)
    assert violation.field == "events" and f"{batch.ByteSize()} bytes" in violation.description


async def test_missing_or_wrong_key_is_unauthenticated(stack: Stack) -> None:
    for md in ((), (("authorization", "Bearer pk_nope"),)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.Track(pb.TrackRequest(event=track(user_id="u")), metadata=md)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_request_that_does_not_parse_is_invalid_argument(stack: Stack) -> None:
    # Bytes no client library would send (a string that is not UTF-8) fail protobuf's parsing,
    # before any handler; the caller still gets INVALID_ARGUMENT, not INTERNAL. Ingest's event
    # calls read such an event again and name the field (test_unparseable_events.py); a request
    # whose structure is broken is refused whole.
    good = pb.TrackRequest(event=Event(user_id="abc", name="Clicked")).SerializeToString()
    bad = good.replace(b"abc", b"a\xffc")
    track = stack.channel.unary_unary("/parley.ingest.v1.IngestService/Track")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await track(bad, metadata=stack.md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in await field_violations(info.value)] == ["event.user_id"]
    stream = stack.channel.stream_unary("/parley.ingest.v1.IngestService/IngestStream")
    message = pb.IngestStreamRequest(events=[Event(user_id="abc", name="Clicked")]).SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream(iter([message, message[:-2]]), metadata=stack.md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Server streaming (identity's SubscribeEvents) answers the same before its first message.
    subscribe = stack.identity_channel.unary_stream("/parley.identity.v1.IdentityService/SubscribeEvents")
    body = ipb.SubscribeEventsRequest(cursor="abc").SerializeToString().replace(b"abc", b"a\xffc")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in subscribe(body, metadata=stack.md):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Without a key, the answer is still UNAUTHENTICATED: authentication comes first.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await track(bad)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
