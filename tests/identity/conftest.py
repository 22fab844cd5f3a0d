"""Fixtures: a real identity server on loopback, workspaces, and builders of normalized events."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.event_pb2 import Event, EventType
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.identity.v1.identity_service_pb2_grpc import IdentityServiceStub

from services.common.clients import internal_metadata, key_metadata
from services.common.context import Workspace
from services.common.server import RunningServer, start
from services.identity.module import MODULE as IDENTITY
from tests.helpers import MakeWorkspace, test_settings

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
_clock = itertools.count(1)


@dataclass
class Tenant:
    """A workspace with its API key, and metadata for calling identity as it or as ingest."""

    workspace: Workspace
    key: str
    internal_token: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return key_metadata(self.key)

    @property
    def ingest_md(self) -> tuple[tuple[str, str], ...]:
        return internal_metadata(self.internal_token, self.workspace.id)


@dataclass
class Identity:
    server: RunningServer
    channel: grpc.aio.Channel
    db_url: str

    @property
    def stub(self) -> IdentityServiceStub:
        return IdentityServiceStub(self.channel)

    @property
    def internal_md(self) -> tuple[tuple[str, str], ...]:
        return internal_metadata(self.server.runtime.internal_token, None)

    async def tenant(self, make_workspace: MakeWorkspace, default_region: str = "US") -> Tenant:
        ws, key = await make_workspace(self.db_url, default_region=default_region)
        return Tenant(ws, key, self.server.runtime.internal_token)

    async def record(self, tenant: Tenant, *events: Event) -> ipb.RecordEventsResponse:
        return await self.stub.RecordEvents(ipb.RecordEventsRequest(events=events), metadata=tenant.ingest_md)


@pytest.fixture(scope="module")
async def identity(db_url: str) -> AsyncIterator[Identity]:
    server = await start(IDENTITY, test_settings(db_url, db_pool_max=22), port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield Identity(server, channel, db_url)
    await channel.close()
    await server.stop(0)


@pytest.fixture
async def tenant(identity: Identity, make_workspace: MakeWorkspace) -> Tenant:
    """A fresh workspace per test, so tests never see each other's contacts."""
    return await identity.tenant(make_workspace)


def struct(value: dict[str, Any]) -> Struct:
    out = Struct()
    out.update(value)
    return out


def ts(at: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


def event(
    kind: EventType.ValueType = EventType.EVENT_TYPE_TRACK,
    *,
    at: datetime | None = None,
    traits: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    **kw: Any,
) -> Event:
    """A normalized event as ingest sends it: message_id, timestamps set; ``phone`` given in E.164."""
    when = at or BASE_TIME + timedelta(seconds=next(_clock))
    out = Event(type=kind, message_id=kw.pop("message_id", None) or uuid.uuid4().hex, **kw)
    out.timestamp.CopyFrom(ts(when))
    out.original_timestamp.CopyFrom(ts(when))
    out.received_at.CopyFrom(ts(when))
    if traits is not None:
        out.traits.CopyFrom(struct(traits))
    if properties is not None:
        out.properties.CopyFrom(struct(properties))
    return out


def identify(traits: dict[str, Any] | None = None, **kw: Any) -> Event:
    return event(EventType.EVENT_TYPE_IDENTIFY, traits=traits or {}, **kw)


def page(name: str = "Home", **kw: Any) -> Event:
    return event(EventType.EVENT_TYPE_PAGE, name=name, **kw)


def track(name: str = "Loan Approved", **kw: Any) -> Event:
    return event(EventType.EVENT_TYPE_TRACK, name=name, **kw)


def uid(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
