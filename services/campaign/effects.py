"""What the engine does outside its own schema: read contacts and timelines, send SMS, queue call tasks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

import grpc
from google.protobuf import json_format, struct_pb2
from parley.common.v1 import event_pb2
from parley.identity.v1 import identity_service_pb2 as id_pb
from parley.identity.v1 import identity_service_pb2_grpc as id_grpc
from parley.ingest.v1 import ingest_service_pb2 as in_pb
from parley.ingest.v1 import ingest_service_pb2_grpc as in_grpc
from parley.messaging.v1 import messaging_service_pb2 as msg_pb
from parley.messaging.v1 import messaging_service_pb2_grpc as msg_grpc

from services.common.clients import channel, internal_metadata
from services.common.settings import Settings

# Failures worth retrying later: the peer is down, busy or stopping. Anything else is final for
# the step. CANCELLED is among them because this process never sees its own cancellation as a
# status (a cancelled task gets CancelledError): it comes from a peer that stopped with the call
# taken but not yet handed to its handler, so nothing was done and the call can be sent again.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
_TIMEOUT = 10.0


@dataclass(frozen=True)
class ContactInfo:
    id: str
    phone: str
    time_zone: str
    properties: dict[str, Any] = field(default_factory=dict)
    user_ids: tuple[str, ...] = ()
    anonymous_ids: tuple[str, ...] = ()

    def template_data(self) -> dict[str, Any]:
        """Properties plus ``id``/``phone``/``time_zone``, as templates and conditions see them."""
        return {**self.properties, "id": self.id, "phone": self.phone, "time_zone": self.time_zone}


@dataclass(frozen=True)
class Result:
    """A side effect's outcome: ``ok`` (with the created id), ``failed`` (final) or ``retry``."""

    status: Literal["ok", "failed", "retry"]
    id: str = ""
    detail: str = ""


class Effects(Protocol):
    async def get_contact(self, workspace_id: str, contact_id: str, phone: str = "") -> ContactInfo | None:
        """The contact by id (or phone); None when identity does not know it."""
        ...

    async def events_since(
        self, workspace_id: str, contact_id: str, name: str, since: datetime
    ) -> list[dict[str, Any]]:
        """Properties of the contact's events named ``name`` at or after ``since``."""
        ...

    async def send_sms(
        self,
        workspace_id: str,
        *,
        request_id: str,
        contact: ContactInfo,
        body: str,
        transactional: bool,
        campaign_id: str,
    ) -> Result: ...

    async def create_call_task(
        self,
        workspace_id: str,
        *,
        request_id: str,
        contact: ContactInfo,
        queue: str,
        priority: int,
        notes: str,
        campaign_id: str,
    ) -> Result: ...

    async def set_property(
        self, workspace_id: str, *, request_id: str, contact: ContactInfo, key: str, value: Any
    ) -> Result: ...


def contact_info(c: Any) -> ContactInfo:
    return ContactInfo(
        id=c.id,
        phone=c.phone,
        time_zone=c.time_zone,
        properties=json_format.MessageToDict(c.properties),
        user_ids=tuple(c.user_ids),
        anonymous_ids=tuple(c.anonymous_ids),
    )


def _failure(err: grpc.aio.AioRpcError) -> Result:
    code = err.code()
    detail = f"{code.name}: {err.details()}"
    return Result("retry" if code in _RETRYABLE else "failed", detail=detail)


class _SmsBatcher:
    """Coalesces concurrent SendSms calls of one workspace into BatchSendSms calls.

    The engine advances a batch of enrollments concurrently; their sends reach here within
    a few milliseconds of each other and go to messaging as one request (one gate
    transaction there instead of one per message). Each caller still gets its own result.
    """

    def __init__(self, stub: msg_grpc.MessagingServiceStub, md: Any, window: float = 0.002, max_batch: int = 500):
        self._stub = stub
        self._md = md
        self._window = window
        self._max = max_batch
        self._pending: dict[str, list[tuple[msg_pb.SendSmsRequest, asyncio.Future[Result]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batch_supported = True

    async def send(self, workspace_id: str, req: msg_pb.SendSmsRequest) -> Result:
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        queue = self._pending.setdefault(workspace_id, [])
        queue.append((req, fut))
        if len(queue) == 1:
            task = asyncio.create_task(self._flush(workspace_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _flush(self, workspace_id: str) -> None:
        await asyncio.sleep(self._window)
        items = self._pending.pop(workspace_id, [])
        for i in range(0, len(items), self._max):
            chunk = items[i : i + self._max]
            try:
                results = await self._send_chunk(workspace_id, [r for r, _ in chunk])
            except Exception as exc:  # every caller of the chunk learns of it
                for _, fut in chunk:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(chunk, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _send_chunk(self, workspace_id: str, reqs: list[msg_pb.SendSmsRequest]) -> list[Result]:
        md = self._md(workspace_id)
        if self.batch_supported and len(reqs) > 1:
            try:
                resp = await self._stub.BatchSendSms(
                    msg_pb.BatchSendSmsRequest(requests=reqs), metadata=md, timeout=_TIMEOUT
                )
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return [_failure(err)] * len(reqs)
                self.batch_supported = False
            else:
                return [_batch_result(r) for r in resp.results]
        return list(await asyncio.gather(*(self._one(md, r) for r in reqs)))

    async def _one(self, md: Any, req: msg_pb.SendSmsRequest) -> Result:
        try:
            resp = await self._stub.SendSms(req, metadata=md, timeout=_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            return _failure(err)
        return Result("ok", id=resp.message.id, detail=msg_pb.MessageStatus.Name(resp.message.status))


def _batch_result(r: Any) -> Result:
    if r.HasField("message"):
        return Result("ok", id=r.message.id, detail=msg_pb.MessageStatus.Name(r.message.status))
    code = getattr(grpc.StatusCode, r.error.code, grpc.StatusCode.UNKNOWN)
    detail = f"{r.error.code}: {r.error.message}"
    return Result("retry" if code in _RETRYABLE else "failed", detail=detail)


class GrpcEffects:
    """Production effects: identity for reads, messaging for sends, ingest for property writes."""

    def __init__(self, settings: Settings, token: str) -> None:
        self._token = token
        self._channels = [
            channel(settings.identity_addr),
            channel(settings.messaging_addr),
            channel(settings.ingest_addr),
        ]
        self.identity = id_grpc.IdentityServiceStub(self._channels[0])
        self.messaging = msg_grpc.MessagingServiceStub(self._channels[1])
        self.ingest = in_grpc.IngestServiceStub(self._channels[2])
        self._sms = _SmsBatcher(self.messaging, self.md)

    def md(self, workspace_id: str | None) -> tuple[tuple[str, str], ...]:
        return internal_metadata(self._token, workspace_id)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels), return_exceptions=True)

    async def get_contact(self, workspace_id: str, contact_id: str, phone: str = "") -> ContactInfo | None:
        req = id_pb.GetContactRequest(contact_id=contact_id) if contact_id else id_pb.GetContactRequest(phone=phone)
        try:
            resp = await self.identity.GetContact(req, metadata=self.md(workspace_id), timeout=_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return contact_info(resp.contact)

    async def events_since(
        self, workspace_id: str, contact_id: str, name: str, since: datetime
    ) -> list[dict[str, Any]]:
        req = id_pb.ListContactEventsRequest(contact_id=contact_id, names=[name], page_size=1000)
        req.start_time.FromDatetime(since)
        resp = await self.identity.ListContactEvents(req, metadata=self.md(workspace_id), timeout=_TIMEOUT)
        return [json_format.MessageToDict(e.event.properties) for e in resp.events]

    async def send_sms(
        self,
        workspace_id: str,
        *,
        request_id: str,
        contact: ContactInfo,
        body: str,
        transactional: bool,
        campaign_id: str,
    ) -> Result:
        req = msg_pb.SendSmsRequest(
            request_id=request_id,
            contact_id=contact.id,
            phone=contact.phone,
            body=body,
            transactional=transactional,
            campaign_id=campaign_id,
            time_zone=contact.time_zone,
        )
        return await self._sms.send(workspace_id, req)

    async def create_call_task(
        self,
        workspace_id: str,
        *,
        request_id: str,
        contact: ContactInfo,
        queue: str,
        priority: int,
        notes: str,
        campaign_id: str,
    ) -> Result:
        req = msg_pb.CreateCallTaskRequest(
            request_id=request_id,
            contact_id=contact.id,
            phone=contact.phone,
            queue=queue,
            priority=priority,
            notes=notes,
            campaign_id=campaign_id,
        )
        try:
            resp = await self.messaging.CreateCallTask(req, metadata=self.md(workspace_id), timeout=_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            return _failure(err)
        return Result("ok", id=resp.task.id)

    async def set_property(
        self, workspace_id: str, *, request_id: str, contact: ContactInfo, key: str, value: Any
    ) -> Result:
        # Identity owns properties; an identify through ingest keeps its merge rules in charge.
        # The message_id is derived from the step's request id, so a retry is stored once.
        traits = struct_pb2.Struct()
        traits.update({key: value, "phone": contact.phone})
        event = event_pb2.Event(
            type=event_pb2.EVENT_TYPE_IDENTIFY,
            message_id=f"campaign:{request_id}",
            traits=traits,
            user_id=contact.user_ids[0] if contact.user_ids else "",
            anonymous_id=""
            if contact.user_ids
            else (contact.anonymous_ids[0] if contact.anonymous_ids else contact.id),
        )
        try:
            await self.ingest.Identify(
                in_pb.IdentifyRequest(event=event), metadata=self.md(workspace_id), timeout=_TIMEOUT
            )
        except grpc.aio.AioRpcError as err:
            return _failure(err)
        return Result("ok")
