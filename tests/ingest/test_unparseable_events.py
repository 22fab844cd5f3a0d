"""Events whose bytes do not parse (a string that is not UTF-8): rejected alone, naming the field."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from parley.common.v1.event_pb2 import Event, EventStatus
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.ingest.v1 import ingest_service_pb2 as pb

from services.common.errors import field_violations
from services.ingest import servicer
from services.ingest.salvage import (
    NOT_UTF8,
    Oversized,
    Problem,
    SalvagedBatch,
    Unparsed,
    batch_events,
    parser,
    salvage_batch,
)
from tests.ingest.conftest import Stack, track

ACCEPTED, REJECTED = EventStatus.EVENT_STATUS_ACCEPTED, EventStatus.EVENT_STATUS_REJECTED
# A marker that occurs once in a serialized event, replaced by bytes that are not UTF-8.
MARK = "\u00e9\u00e9\u00e9"
LIMIT = 500 * 1024
BAD = b"\xff\xfe\xfd\xfc\xfb\xfa"  # as long as MARK, so every length prefix still holds


def spoiled(message: pb.IngestBatchRequest | pb.IngestStreamRequest | pb.TrackRequest) -> bytes:
    data = message.SerializeToString()
    assert data.count(MARK.encode()) == 1
    return data.replace(MARK.encode(), BAD)


def raw_call(stack: Stack, method: str, *, stream: bool = False) -> grpc.aio.UnaryUnaryMultiCallable:
    """A call that sends request bytes as they are (a client library writing strings from raw bytes)."""
    path = f"/parley.ingest.v1.IngestService/{method}"
    factory = stack.channel.stream_unary if stream else stack.channel.unary_unary
    return factory(path, request_serializer=lambda data: data, response_deserializer=None)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("spoil", "field"),
    [
        ({"user_id": MARK}, "user_id"),
        ({"name": MARK}, "name"),
        ({"properties": {"plan": MARK}}, "properties"),
        ({"context": {"page": {"title": MARK}}}, "context"),
    ],
)
async def test_a_batch_event_that_does_not_parse_is_rejected_alone(
    stack: Stack, spoil: dict[str, object], field: str
) -> None:
    run = uuid.uuid4().hex[:8]
    good = [track("First", user_id=f"u-1-{run}"), track("Third", user_id=f"u-3-{run}")]
    kw: dict[str, object] = {"user_id": f"u-2-{run}", **spoil}
    bad = track(str(kw.pop("name", "Second")), **kw)  # type: ignore[arg-type]
    data = spoiled(pb.IngestBatchRequest(events=[good[0], bad, good[1]]))
    got = pb.IngestBatchResponse.FromString(await raw_call(stack, "IngestBatch")(data, metadata=stack.md))
    assert [r.status for r in got.results] == [ACCEPTED, REJECTED, ACCEPTED]
    assert [r.index for r in got.results] == [0, 1, 2]
    assert [(v.field, v.description) for v in got.results[1].violations] == [(f"events[1].{field}", _why(field))]
    assert (got.accepted_count, got.rejected_count) == (2, 1)
    # The good ones are stored.
    for event, result in zip(good, (got.results[0], got.results[2]), strict=True):
        assert result.message_id
        user = await stack.identity_stub.GetUser(ipb.GetUserRequest(user_id=event.user_id), metadata=stack.md)
        assert [e.event.message_id for e in user.events] == [result.message_id]


def _why(field: str) -> str:
    return (
        NOT_UTF8
        if field in ("user_id", "name")
        else "not a valid Struct: a string in it is not UTF-8, or it nests too deep"
    )


async def test_a_stream_names_the_event_by_its_place_in_the_stream(stack: Stack) -> None:
    first = pb.IngestStreamRequest(events=[track("A", user_id="s-1"), track("B", user_id="s-2")])
    second = spoiled(pb.IngestStreamRequest(events=[track("C", user_id="s-3"), track("D", anonymous_id=MARK)]))

    async def requests() -> AsyncIterator[bytes]:
        yield first.SerializeToString()
        yield second

    got = pb.IngestStreamResponse.FromString(
        await raw_call(stack, "IngestStream", stream=True)(requests(), metadata=stack.md)
    )
    assert [r.status for r in got.results] == [ACCEPTED, ACCEPTED, ACCEPTED, REJECTED]
    assert [v.field for v in got.results[3].violations] == ["events[3].anonymous_id"]


async def test_a_single_event_that_does_not_parse_names_its_field(stack: Stack) -> None:
    data = spoiled(pb.TrackRequest(event=track("Signed Up", user_id="u-9", traits=_struct({"name": MARK}))))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_call(stack, "Track")(data, metadata=stack.md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in await field_violations(info.value)] == ["event.traits"]


async def test_a_request_whose_structure_is_broken_is_still_one_invalid_argument(stack: Stack) -> None:
    data = pb.IngestBatchRequest(events=[track("A", user_id="u")]).SerializeToString()[:-3]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_call(stack, "IngestBatch")(data, metadata=stack.md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_parsers_read_good_requests_as_the_generated_code_does() -> None:
    request = pb.IngestBatchRequest(events=[track("A", user_id="u"), track("B", anonymous_id="a")])
    assert parser(pb.IngestBatchRequest, "events", LIMIT)(request.SerializeToString()) == request
    single = pb.TrackRequest(event=track("A", user_id="u"))
    assert parser(pb.TrackRequest, "event", LIMIT)(single.SerializeToString()) == single
    bad = spoiled(pb.IngestBatchRequest(events=[track(MARK, user_id="u")]))
    # Nothing is read again in the parser, before the caller is authenticated.
    assert parser(pb.IngestBatchRequest, "events", LIMIT)(bad) == Unparsed(bad)
    # A request over the limit is not read at all: these bytes would not even parse.
    assert parser(pb.IngestBatchRequest, "events", len(bad) - 1)(bad) == Oversized(len(bad))
    salvaged = salvage_batch(batch_events(bad))
    assert salvaged.events == [None] and salvaged.problems == {0: Problem("name", NOT_UTF8)}
    assert len(batch_events(b"\x0a\x00" * 1001 + bad)) == 1002


async def test_a_large_unparseable_request_is_not_read_again(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = servicer.salvage_batch

    def counted(events: list[bytes]) -> SalvagedBatch:
        calls.append(len(events))
        return real(events)

    monkeypatch.setattr(servicer, "salvage_batch", counted)
    bad = spoiled(pb.IngestBatchRequest(events=[track(MARK, user_id="u")]))
    big = b"\x0a\x00" * 2_000_000 + bad  # 4 MB of empty events, then one that does not parse
    call = raw_call(stack, "IngestBatch")
    for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED), (stack.md, grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(big, metadata=metadata)
        assert info.value.code() == code
    assert [v.field for v in await field_violations(info.value)] == ["events"]
    # Within the size limit but over the count: refused before any event is parsed.
    many = b"\x0a\x00" * 1001 + bad
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(many, metadata=stack.md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1002 events" in (info.value.details() or "")
    assert calls == []  # neither was parsed event by event
    await call(bad, metadata=stack.md)  # within the limits: read again, its event rejected alone
    assert calls == [1]


def _struct(value: dict[str, object]) -> Struct:
    out = Struct()
    out.update(value)
    return out


def test_an_event_is_kept_whole_when_it_parses() -> None:
    event = Event(name="x", user_id="u")
    data = pb.IngestBatchRequest(events=[event, track(MARK, user_id="v")]).SerializeToString()
    salvaged = salvage_batch(batch_events(data.replace(MARK.encode(), BAD)))
    assert salvaged.events[0] == event and salvaged.events[1] is None


def test_a_salvaged_batch_gives_no_size_bound() -> None:
    # Re-encoded, events can come out larger than the bytes they were read from: the forwarder
    # measures a salvaged batch's events instead of trusting the request's length.
    data = spoiled(pb.IngestBatchRequest(events=[track("A", user_id="u"), track(MARK, user_id="v")]))
    events, prior, size = servicer.IngestServicer(None, 500_000)._batch(Unparsed(data))  # type: ignore[arg-type]
    assert [e is None for e in events] == [False, True] and prior and size is None
    request = pb.IngestBatchRequest(events=[track("A", user_id="u")])
    assert servicer.IngestServicer(None, 500_000)._batch(request)[2] == request.ByteSize()  # type: ignore[arg-type]
