"""Calls to identity: contacts by id or phone, recent events, and the resolved-event stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from parley.common.v1 import contact_pb2, event_pb2
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.identity.v1.identity_service_pb2_grpc import IdentityServiceStub

from services.common.clients import channel, internal_metadata
from services.common.errors import Unavailable


class IdentityClient:
    """A lazily opened channel to identity, called with the internal token."""

    def __init__(self, addr: str, token: str, timeout: float = 5.0) -> None:
        self._addr = addr
        self._token = token
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> IdentityServiceStub:
        if self._channel is None:
            self._channel = channel(self._addr)
        return IdentityServiceStub(self._channel)

    async def contact(self, workspace_id: str, *, contact_id: str = "", phone: str = "") -> contact_pb2.Contact | None:
        """The contact, or None when identity does not know it (other errors propagate)."""
        req = ipb.GetContactRequest(contact_id=contact_id) if contact_id else ipb.GetContactRequest(phone=phone)
        try:
            resp = await self._stub().GetContact(
                req, metadata=internal_metadata(self._token, workspace_id), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise Unavailable(f"identity: {err.code().name}") from err
        return resp.contact

    async def recent_events(self, workspace_id: str, contact_id: str, limit: int) -> list[event_pb2.Event]:
        try:
            resp = await self._stub().ListContactEvents(
                ipb.ListContactEventsRequest(contact_id=contact_id, page_size=limit),
                metadata=internal_metadata(self._token, workspace_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise Unavailable(f"identity: {err.code().name}") from err
        return [e.event for e in resp.events]

    async def subscribe(self, cursor: str, batch_size: int = 500) -> AsyncIterator[ipb.SubscribeEventsResponse]:
        """Every workspace's resolved events from ``cursor``, then live."""
        call = self._stub().SubscribeEvents(
            ipb.SubscribeEventsRequest(cursor=cursor, batch_size=batch_size),
            metadata=internal_metadata(self._token, None),
        )
        async for resp in call:
            yield resp

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
