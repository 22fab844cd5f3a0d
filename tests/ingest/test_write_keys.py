"""A write key (the one a website or app embeds) sends events and can do nothing else."""

from __future__ import annotations

import aiohttp
import grpc
import pytest
from parley.common.v1.event_pb2 import EventStatus
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.ingest.v1 import ingest_service_pb2 as pb

from services.common import tenancy
from services.common.clients import key_metadata
from services.common.db import create_pool
from tests.identity.conftest import identify
from tests.ingest.conftest import Stack
from tests.ingest.test_http import basic, post, uid


async def test_a_write_key_sends_events_and_reads_nothing(stack: Stack) -> None:
    pool = await create_pool(stack.db_url, max_size=1)
    try:
        _, write_key = await tenancy.create_key(pool, stack.workspace.id, "web", tenancy.WRITE)
        with pytest.raises(Exception, match="scope"):
            await tenancy.create_key(pool, stack.workspace.id, "odd", "admin")
    finally:
        await pool.close()
    write = key_metadata(write_key)
    user, phone = uid(), "+14155550177"

    # Events, over gRPC and HTTP, are stored in the key's workspace.
    event = identify({"phone": phone, "first_name": "Ada"}, user_id=user)
    result = await stack.stub.Identify(pb.IdentifyRequest(event=event), metadata=write)
    assert result.result.status == EventStatus.EVENT_STATUS_ACCEPTED
    # Not even which contact an event went to: that would tell whose a phone or a user id is.
    assert result.result.contact_id == ""
    probe = identify({"phone": phone}, anonymous_id=uid())
    batch = await stack.stub.IngestBatch(pb.IngestBatchRequest(events=[probe, probe]), metadata=write)
    assert [r.contact_id for r in batch.results] == ["", ""]
    assert [r.status for r in batch.results] == [EventStatus.EVENT_STATUS_ACCEPTED, EventStatus.EVENT_STATUS_DUPLICATE]
    streamed = await stack.stub.IngestStream(iter([pb.IngestStreamRequest(events=[probe])]), metadata=write)
    assert [(r.status, r.contact_id) for r in streamed.results] == [(EventStatus.EVENT_STATUS_DUPLICATE, "")]
    # A full key is told.
    full = await stack.stub.IngestBatch(pb.IngestBatchRequest(events=[probe]), metadata=stack.md)
    assert full.results[0].contact_id
    async with aiohttp.ClientSession() as http:
        body = {"userId": user, "event": "Viewed"}
        assert await post(http, f"{stack.http_url}/v1/track", body, basic(write_key)) == (200, {"success": True})

    # Reading contacts, users or the stream is for full keys only.
    reads = [
        stack.identity_stub.GetContact(ipb.GetContactRequest(phone=phone), metadata=write),
        stack.identity_stub.ListContacts(ipb.ListContactsRequest(), metadata=write),
        stack.identity_stub.GetUser(ipb.GetUserRequest(user_id=user), metadata=write),
    ]
    for call in reads:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "write key" in (err.value.details() or "")
    stream = stack.identity_stub.SubscribeEvents(ipb.SubscribeEventsRequest(), metadata=write)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stream.read()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # The workspace's full key reads what the write key sent.
    got = await stack.identity_stub.GetUser(ipb.GetUserRequest(user_id=user), metadata=stack.md)
    assert [e.event.name for e in got.events] == ["Viewed", ""]
