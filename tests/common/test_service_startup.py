"""Each of the four services starts on a fresh database, reports SERVING and lists itself via reflection."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services.common.server import ServiceModule, start
from tests.helpers import test_settings

EXPECTED = {
    "ingest": {"parley.ingest.v1.IngestService"},
    "identity": {"parley.identity.v1.IdentityService"},
    "campaign": {"parley.campaign.v1.CampaignService"},
    "messaging": {"parley.messaging.v1.MessagingService", "parley.messaging.v1.AgentService"},
}


def _reflected_services(target: str) -> set[str]:
    # The same client grpcurl uses: the reflection service, over a plain channel.
    with grpc.insecure_channel(target) as channel:
        return set(ProtoReflectionDescriptorDatabase(channel).get_services())


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_service_starts_serving_with_reflection(name: str, new_database: Callable[[], Awaitable[str]]) -> None:
    module: ServiceModule = importlib.import_module(f"services.{name}.module").MODULE
    srv = await start(module, test_settings(await new_database()))
    try:
        target = f"127.0.0.1:{srv.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ["", *EXPECTED[name]]:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
            listing = await stub.List(health_pb2.HealthListRequest(), timeout=10)
            serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
            assert dict(listing.statuses) == {service: serving for service in ["", *EXPECTED[name]]}
        listed = await asyncio.to_thread(_reflected_services, target)
        assert EXPECTED[name] <= listed
        assert "grpc.health.v1.Health" in listed
        # Idle transactions are ended (campaign's batches of runs set a longer limit themselves).
        assert await srv.runtime.pool.fetchval("SHOW idle_in_transaction_session_timeout") == "1min"
    finally:
        await srv.stop(0)
