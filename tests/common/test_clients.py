"""A service's channel to a peer spreads calls over every address the peer's name stands for."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.clients import channel


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
