"""Fixtures: real identity and ingest servers on loopback, wired together, and a workspace key."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from parley.common.v1.event_pb2 import Event, EventType
from parley.identity.v1.identity_service_pb2_grpc import IdentityServiceStub
from parley.ingest.v1.ingest_service_pb2_grpc import IngestServiceStub

from services.common.clients import key_metadata
from services.common.context import Workspace
from services.common.server import RunningServer, start
from tests.helpers import test_settings


@dataclass
class Stack:
    """identity + ingest on one database, and a client with a workspace key."""

    db_url: str
    identity: RunningServer
    ingest: RunningServer
    workspace: Workspace
    key: str
    channel: grpc.aio.Channel
    identity_channel: grpc.aio.Channel

    @property
    def stub(self) -> IngestServiceStub:
        return IngestServiceStub(self.channel)

    @property
    def identity_stub(self) -> IdentityServiceStub:
        return IdentityServiceStub(self.identity_channel)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return key_metadata(self.key)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ingest.runtime.state['http_port']}"

    async def restart_identity(self) -> None:
        """Start identity again on the port ingest knows."""
        from services.identity.module import MODULE as IDENTITY

        settings = test_settings(self.db_url)
        self.identity = await start(IDENTITY, settings, port=self.identity.port)


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture(scope="module")
async def make_stack(
    db_url: str, make_workspace: Callable[..., Awaitable[tuple[Workspace, str]]]
) -> AsyncIterator[StackFactory]:
    """Factory of stacks (each with its own servers) on the module's database; all stopped at the end."""
    from services.identity.module import MODULE as IDENTITY
    from services.ingest.module import MODULE as INGEST

    stacks: list[Stack] = []

    async def make(default_region: str = "US", **ingest_overrides: Any) -> Stack:
        workspace, key = await make_workspace(db_url, default_region=default_region)
        identity = await start(IDENTITY, test_settings(db_url), port=0)
        settings = test_settings(db_url, identity_addr=f"127.0.0.1:{identity.port}", **ingest_overrides)
        ingest = await start(INGEST, settings, port=0)
        stack = Stack(
            db_url,
            identity,
            ingest,
            workspace,
            key,
            grpc.aio.insecure_channel(f"127.0.0.1:{ingest.port}"),
            grpc.aio.insecure_channel(f"127.0.0.1:{identity.port}"),
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.channel.close()
        await stack.identity_channel.close()
        await stack.ingest.stop(0)
        await stack.identity.stop(0)


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> Stack:
    """One identity + ingest pair shared by a test module."""
    return await make_stack()


def struct(value: dict[str, Any]) -> Struct:
    out = Struct()
    out.update(value)
    return out


def track(name: str = "Loan Approved", **kw: Any) -> Event:
    for key in ("properties", "traits", "context"):
        if isinstance(kw.get(key), dict):
            kw[key] = struct(kw[key])
    kw.setdefault("type", EventType.EVENT_TYPE_TRACK)
    return Event(name=name, **kw)
