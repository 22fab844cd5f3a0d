"""identity down: ingest answers UNAVAILABLE and stores nothing; back up: the retry stores everything once."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from parley.common.v1.event_pb2 import EventStatus
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.ingest.v1 import ingest_service_pb2 as pb

from tests.ingest.conftest import StackFactory, track


async def retry_until_ok(call: object, *args: object, **kwargs: object) -> object:
    """What a client does: retry UNAVAILABLE with backoff (bounded, so a bug fails the test)."""
    for _ in range(100):
        try:
            return await call(*args, **kwargs)  # type: ignore[operator]
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("ingest stayed UNAVAILABLE")


async def test_outage_then_retry_stores_once(make_stack: StackFactory) -> None:
    stack = await make_stack()
    user = f"u-{uuid.uuid4().hex[:8]}"
    events = [track(f"E{i}", user_id=user, message_id=f"{user}-{i}") for i in range(10)]
    events.append(track("", user_id=user))  # rejected either way

    await stack.identity.stop(0)
    for call, request in (
        (stack.stub.IngestBatch, pb.IngestBatchRequest(events=events)),
        (stack.stub.Track, pb.TrackRequest(event=events[0])),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request, metadata=stack.md)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    await stack.restart_identity()
    # Nothing of the failed calls was stored: the retry finds every event new.
    response = await retry_until_ok(stack.stub.IngestBatch, pb.IngestBatchRequest(events=events), metadata=stack.md)
    assert isinstance(response, pb.IngestBatchResponse)
    assert [r.status for r in response.results] == [EventStatus.EVENT_STATUS_ACCEPTED] * 10 + [
        EventStatus.EVENT_STATUS_REJECTED
    ]
    again = await stack.stub.IngestBatch(pb.IngestBatchRequest(events=events), metadata=stack.md)
    assert again.duplicate_count == 10
    got = await stack.identity_stub.GetUser(ipb.GetUserRequest(user_id=user, event_limit=100), metadata=stack.md)
    assert sorted(e.event.message_id for e in got.events) == sorted(f"{user}-{i}" for i in range(10))
