"""SIGTERM lets an in-flight call finish before the process exits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import grpc
import pytest

from services.common.clients import key_metadata
from services.common.server import run
from services.common.settings import PROJECT_ROOT
from tests.common.probe_service import METHOD
from tests.helpers import MakeWorkspace


async def _listening_port(proc: asyncio.subprocess.Process) -> int:
    assert proc.stderr is not None
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), timeout=60)
        if not line:
            raise AssertionError("service exited before listening")
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("event") == "listening":
            return int(entry["port"])


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_sigterm_finishes_in_flight_call(db_url: str, make_workspace: MakeWorkspace, event_loop: str) -> None:
    _, key = await make_workspace(db_url)
    env = {
        **os.environ,
        "PARLEY_EVENT_LOOP": event_loop,
        "PARLEY_DATABASE_URL": db_url,
        "PARLEY_HOST": "127.0.0.1",
        "PARLEY_LOG_FORMAT": "json",
        "PARLEY_GRACE_SECONDS": "10",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.common.probe_service",
        cwd=PROJECT_ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        port = await _listening_port(proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            in_flight = asyncio.ensure_future(ch.unary_unary(METHOD)(b"sleep:1.5", metadata=key_metadata(key)))
            await asyncio.sleep(0.5)  # the call is running in the server now
            proc.send_signal(signal.SIGTERM)
            reply = await asyncio.wait_for(in_flight, timeout=20)
        assert reply.endswith(b"|key")
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_unknown_event_loop_is_refused_by_name() -> None:
    async def never() -> None:
        raise AssertionError("must not run")

    with pytest.raises(SystemExit, match="PARLEY_EVENT_LOOP"):
        run(never(), "twisted")


async def test_stopping_refuses_new_calls_unavailable_while_in_flight_ones_finish(
    db_url: str, make_workspace: MakeWorkspace
) -> None:
    # gRPC cancels calls it took but had not handed over when the server stops: their callers
    # get CANCELLED, which clients do not retry. New calls are refused UNAVAILABLE first.
    from services.common.server import start
    from tests.common.probe_service import MODULE
    from tests.helpers import test_settings

    _, key = await make_workspace(db_url)
    srv = await start(MODULE, test_settings(db_url), port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        probe = ch.unary_unary(METHOD)
        in_flight = asyncio.ensure_future(probe(b"sleep:1.0", metadata=key_metadata(key)))
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        began = loop.time()
        stopping = asyncio.ensure_future(srv.stop(10.0))
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await probe(b"late", metadata=key_metadata(key))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (info.value.details() or "")
        assert (await asyncio.wait_for(in_flight, 10)).endswith(b"|key")
        await asyncio.wait_for(stopping, 10)
    # The stop waited for the call in flight, not for the whole grace period.
    assert loop.time() - began < 5
