"""Errors reach clients as the right status with readable details; the server keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from structlog.testing import capture_logs

from services.common.clients import key_metadata
from services.common.errors import Violation, field_violations
from services.common.server import RunningServer, start
from tests.common.probe_service import METHOD, MODULE
from tests.helpers import MakeWorkspace, test_settings


@pytest.fixture(scope="module")
async def server_and_key(db_url: str, make_workspace: MakeWorkspace) -> AsyncIterator[tuple[RunningServer, str]]:
    srv = await start(MODULE, test_settings(db_url))
    _, key = await make_workspace(db_url)
    yield srv, key
    await srv.stop(0)


async def test_validation_error_is_invalid_argument_with_field_violations(
    server_and_key: tuple[RunningServer, str],
) -> None:
    srv, key = server_and_key
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(METHOD)(b"invalid", metadata=key_metadata(key))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await field_violations(err.value) == [
        Violation("event.name", "required"),
        Violation("event.phone", "not a phone"),
    ]


async def test_unexpected_error_is_internal_without_leaking_and_server_survives(
    server_and_key: tuple[RunningServer, str],
) -> None:
    srv, key = server_and_key
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(METHOD)(b"boom", metadata=key_metadata(key))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "hunter2" not in (err.value.details() or "")
        assert any(entry["event"] == "unhandled_error" for entry in logs)
        reply = await ch.unary_unary(METHOD)(b"ok", metadata=key_metadata(key))
    assert reply.endswith(b"|key")


async def test_request_id_is_echoed_or_made(server_and_key: tuple[RunningServer, str]) -> None:
    srv, key = server_and_key
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        call = ch.unary_unary(METHOD)(b"ok", metadata=(*key_metadata(key), ("x-request-id", "req-123")))
        await call
        trailing = dict(await call.trailing_metadata())
        assert trailing["x-request-id"] == "req-123"
        call = ch.unary_unary(METHOD)(b"ok", metadata=key_metadata(key))
        await call
        assert len(dict(await call.trailing_metadata())["x-request-id"]) == 32
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(METHOD)(b"invalid", metadata=(*key_metadata(key), ("x-request-id", "req-9")))
        assert dict(err.value.trailing_metadata())["x-request-id"] == "req-9"


async def test_access_log_line_per_call(server_and_key: tuple[RunningServer, str]) -> None:
    srv, key = server_and_key
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        with capture_logs() as logs:
            await ch.unary_unary(METHOD)(b"ok", metadata=key_metadata(key))
    lines = [e for e in logs if e["event"] == "rpc"]
    assert len(lines) == 1
    assert lines[0]["code"] == "OK"
    assert lines[0]["duration_ms"] >= 0
