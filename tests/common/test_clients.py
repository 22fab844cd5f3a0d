"""A service's channel to a peer spreads calls over every address the peer's name stands for."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.clients import channel, key_metadata
from services.common.server import start
from tests.common.probe_service import METHOD
from tests.common.probe_service import MODULE as PROBE
from tests.helpers import MakeWorkspace, test_settings


class _Count(grpc.aio.ServerInterceptor):
    def __init__(self, name: str, calls: Counter[str]) -> None:
        self._name, self._calls = name, calls

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        self._calls[self._name] += 1
        return await continuation(details)


async def test_calls_spread_over_the_replicas_of_a_peer() -> None:
    calls: Counter[str] = Counter()
    servers, ports = [], []
    for name in ("a", "b"):
        server = grpc.aio.server(interceptors=[_Count(name, calls)])
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
    try:
        # What a name with two addresses resolves to (a service scaled to two replicas).
        async with channel(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for _ in range(20):
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
        assert calls["a"] >= 5 and calls["b"] >= 5, calls
    finally:
        for server in servers:
            await server.stop(0)


async def test_a_replica_shutting_down_is_passed_over(db_url: str, make_workspace: MakeWorkspace) -> None:
    # A stopping replica says NOT_SERVING and refuses new calls UNAVAILABLE while its calls in
    # flight finish; callers through a service channel never see it: the channel leaves it out
    # of the rotation, and a call it refused is made again on the other replica.
    _, key = await make_workspace(db_url)
    a = await start(PROBE, test_settings(db_url, grace_seconds=10.0), port=0)
    b = await start(PROBE, test_settings(db_url, grace_seconds=10.0), port=0)
    codes: Counter[str] = Counter()
    try:
        async with channel(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}") as ch:
            probe = ch.unary_unary(METHOD)
            for _ in range(4):
                await probe(b"x", metadata=key_metadata(key), wait_for_ready=True, timeout=5)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as direct:
                held = asyncio.ensure_future(direct.unary_unary(METHOD)(b"sleep:2", metadata=key_metadata(key)))
                await asyncio.sleep(0.3)
                stopping = asyncio.ensure_future(a.stop())
                await asyncio.sleep(0.1)

                async def one() -> None:
                    try:
                        await probe(b"x", metadata=key_metadata(key), timeout=5)
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as err:
                        codes[err.code().name] += 1

                for _ in range(3):  # concurrent calls share the channel's picker
                    await asyncio.gather(*(one() for _ in range(100)))
                assert (await held).endswith(b"|key")
                await stopping
    finally:
        await a.stop(0)
        await b.stop(0)
    assert codes == Counter({"OK": 300})
