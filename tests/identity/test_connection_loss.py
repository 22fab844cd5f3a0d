"""PostgreSQL drops identity's connections (a restart, a failover): the next calls work again."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
from parley.identity.v1 import identity_service_pb2 as ipb

from tests.identity.conftest import Identity, Tenant, identify, uid


async def test_reads_and_streams_after_every_connection_was_dropped(identity: Identity, tenant: Tenant) -> None:
    phone = "+14155550166"
    await identity.record(tenant, identify({"phone": phone}, user_id=uid(), phone=phone))
    admin = await asyncpg.connect(identity.db_url)
    try:
        dropped = await admin.fetchval(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"""
        )
    finally:
        await admin.close()
    assert dropped > 0
    await asyncio.sleep(0.5)
    # The held read connections were lost with the rest: each is replaced before it is lent,
    # so no call fails (it was INTERNAL, "connection has been released back to the pool").
    for _ in range(12):
        got = await identity.stub.GetContact(ipb.GetContactRequest(phone=phone), metadata=tenant.md)
        assert got.contact.phone == phone
    for _ in range(3):
        call = identity.stub.SubscribeEvents(ipb.SubscribeEventsRequest(), metadata=tenant.md)
        page = await asyncio.wait_for(call.read(), 10)
        assert isinstance(page, ipb.SubscribeEventsResponse) and page.events
        call.cancel()


def test_a_lost_connection_is_unavailable_not_internal() -> None:
    from services.common.errors import to_status

    released = asyncpg.InterfaceError("cannot call Connection.fetch(): connection has been released back to the pool")
    for exc in (released, asyncpg.InterfaceError("connection is closed"), asyncpg.ConnectionDoesNotExistError("x")):
        assert to_status(exc).code == grpc.StatusCode.UNAVAILABLE
    # A misuse of a live connection is a bug, not an outage.
    assert to_status(asyncpg.InterfaceError("another operation is in progress")).code == grpc.StatusCode.INTERNAL
