"""Every public RPC needs a valid key; the key decides the workspace; internal calls carry theirs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from services.common import tenancy
from services.common.clients import internal_metadata, key_metadata
from services.common.db import create_pool
from services.common.server import RunningServer, start
from tests.common.probe_service import METHOD, MODULE
from tests.helpers import MakeWorkspace, test_settings


@pytest.fixture(scope="module")
async def probe_server(db_url: str) -> AsyncIterator[RunningServer]:
    srv = await start(MODULE, test_settings(db_url))
    yield srv
    await srv.stop(0)


async def call(srv: RunningServer, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        return await ch.unary_unary(METHOD)(payload, metadata=metadata, timeout=10)


async def code_of(srv: RunningServer, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(srv, b"ok", metadata)
    return err.value.code()


async def test_missing_key_is_unauthenticated(probe_server: RunningServer) -> None:
    assert await code_of(probe_server, ()) == grpc.StatusCode.UNAUTHENTICATED


async def test_wrong_key_and_wrong_scheme_are_unauthenticated(probe_server: RunningServer) -> None:
    assert await code_of(probe_server, key_metadata("pk_nope_nope")) == grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(probe_server, (("authorization", "Basic abc"),)) == grpc.StatusCode.UNAUTHENTICATED


async def test_good_key_reaches_handler_with_its_workspace(
    probe_server: RunningServer, db_url: str, make_workspace: MakeWorkspace
) -> None:
    ws, key = await make_workspace(db_url, "auth-good")
    other, other_key = await make_workspace(db_url, "auth-other")
    assert await call(probe_server, b"ok", key_metadata(key)) == f"{ws.id}|key".encode()
    assert await call(probe_server, b"ok", key_metadata(other_key)) == f"{other.id}|key".encode()


async def test_a_key_cannot_pick_another_workspace(
    probe_server: RunningServer, db_url: str, make_workspace: MakeWorkspace
) -> None:
    ws, key = await make_workspace(db_url)
    other, _ = await make_workspace(db_url)
    spoof = (*key_metadata(key), ("x-parley-workspace", other.id))
    assert await call(probe_server, b"ok", spoof) == f"{ws.id}|key".encode()


async def test_revoked_key_is_unauthenticated(
    probe_server: RunningServer, db_url: str, make_workspace: MakeWorkspace
) -> None:
    ws, _ = await make_workspace(db_url)
    pool = await create_pool(db_url, max_size=1)
    try:
        key_id, key = await tenancy.create_key(pool, ws.name, "to revoke")
        assert await call(probe_server, b"ok", key_metadata(key)) == f"{ws.id}|key".encode()
        await tenancy.revoke_key(pool, key_id)
    finally:
        await pool.close()
    assert await code_of(probe_server, key_metadata(key)) == grpc.StatusCode.UNAUTHENTICATED


async def test_internal_token_carries_the_callers_workspace(
    probe_server: RunningServer, db_url: str, make_workspace: MakeWorkspace
) -> None:
    ws, _ = await make_workspace(db_url)
    token = probe_server.runtime.internal_token
    assert await call(probe_server, b"ok", internal_metadata(token, ws.id)) == f"{ws.id}|internal".encode()
    assert await call(probe_server, b"ok", internal_metadata(token, None)) == b"-|internal"
    unknown = internal_metadata(token, "00000000-0000-0000-0000-000000000000")
    assert await code_of(probe_server, unknown) == grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(probe_server, internal_metadata(token, "not-a-uuid")) == grpc.StatusCode.UNAUTHENTICATED


async def test_keys_are_stored_hashed(db_url: str, make_workspace: MakeWorkspace) -> None:
    _, key = await make_workspace(db_url)
    pool = await create_pool(db_url, max_size=1)
    try:
        rows = await pool.fetch("SELECT * FROM tenancy.api_keys")
    finally:
        await pool.close()
    for row in rows:
        assert key.encode() not in bytes(row["key_hash"])
        assert key not in repr(dict(row))
