"""identity down: ingest answers UNAVAILABLE and stores nothing; back up: the retry stores everything once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from parley.common.v1.event_pb2 import EventStatus
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.ingest.v1 import ingest_service_pb2 as pb

from services.common.clients import internal_metadata
from tests.ingest.conftest import Stack, StackFactory, track


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


async def _terminate_waiting_backends(blocker: asyncpg.Connection) -> None:
    """Ends (as a restart or a failover would) the connections waiting for ``blocker``'s lock."""
    waiting: list[int] = []
    for _ in range(250):
        rows = await blocker.fetch(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        waiting = [r["pid"] for r in rows]
        if waiting:
            break
        await asyncio.sleep(0.02)
    assert waiting, "identity never waited for the lock"
    await blocker.execute("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p", waiting)


async def test_identity_losing_its_database_connection_mid_call_is_unavailable(stack: Stack) -> None:
    """PostgreSQL ends identity's connection while a batch waits in its transaction (a restart or a
    failover does that): identity answers UNAVAILABLE with nothing stored (it was INTERNAL, which
    no one retries, ingest's channel included), and the retry stores the event once."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    event = track("Loan Approved", user_id=user, message_id=f"{user}-0")
    await stack.stub.Track(pb.TrackRequest(event=track("warm", user_id=user)), metadata=stack.md)
    blocker = await asyncpg.connect(stack.db_url)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE identity.events IN ACCESS EXCLUSIVE MODE")
            # identity itself, called as ingest calls it but on a channel that does not retry.
            direct = stack.identity_stub.RecordEvents(
                ipb.RecordEventsRequest(events=[event]),
                metadata=internal_metadata(stack.identity.runtime.internal_token, stack.workspace.id),
            )
            call = asyncio.ensure_future(direct)
            await _terminate_waiting_backends(blocker)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        stored = await blocker.fetchval("SELECT count(*) FROM identity.events WHERE message_id = $1", event.message_id)
        assert stored == 0
        # The client's retry through ingest stores the event, once.
        response = await retry_until_ok(stack.stub.Track, pb.TrackRequest(event=event), metadata=stack.md)
        assert isinstance(response, pb.TrackResponse)
        assert response.result.status == EventStatus.EVENT_STATUS_ACCEPTED
        stored = await blocker.fetchval("SELECT count(*) FROM identity.events WHERE message_id = $1", event.message_id)
        assert stored == 1
    finally:
        await blocker.close()


async def test_a_stream_failing_after_stored_messages_says_so(make_stack: StackFactory) -> None:
    """identity stops between two stream messages: UNAVAILABLE, saying the earlier messages may be
    stored; the stream resent whole stores the rest and answers those as DUPLICATE."""
    stack = await make_stack()
    user = f"u-{uuid.uuid4().hex[:8]}"
    first = [track("A", user_id=user, message_id=f"{user}-a")]
    second = [track("B", user_id=user, message_id=f"{user}-b")]
    stored = asyncio.Event()
    go_on = asyncio.Event()

    async def requests() -> AsyncIterator[pb.IngestStreamRequest]:
        yield pb.IngestStreamRequest(events=first)
        stored.set()
        await go_on.wait()
        yield pb.IngestStreamRequest(events=second)

    stream = asyncio.ensure_future(stack.stub.IngestStream(requests(), metadata=stack.md))
    await stored.wait()
    for _ in range(250):  # until the first message is committed
        try:
            await stack.identity_stub.GetUser(ipb.GetUserRequest(user_id=user), metadata=stack.md)
            break
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
        await asyncio.sleep(0.02)
    await stack.identity.stop(0)
    go_on.set()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "earlier messages may be stored" in (info.value.details() or "")

    await stack.restart_identity()

    def resend() -> AsyncIterator[pb.IngestStreamRequest]:
        async def messages() -> AsyncIterator[pb.IngestStreamRequest]:
            yield pb.IngestStreamRequest(events=first)
            yield pb.IngestStreamRequest(events=second)

        return messages()

    response = None
    for _ in range(100):  # a client's retry: a new stream each time
        try:
            response = await stack.stub.IngestStream(resend(), metadata=stack.md)
            break
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.1)
    assert response is not None
    statuses = [r.status for r in response.results]
    assert statuses == [EventStatus.EVENT_STATUS_DUPLICATE, EventStatus.EVENT_STATUS_ACCEPTED]
