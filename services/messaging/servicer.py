"""gRPC servicers: proto in, domain call, proto out (no SQL here)."""

from __future__ import annotations

import uuid
from datetime import UTC

import grpc
from parley.messaging.v1 import agent_service_pb2 as apb
from parley.messaging.v1 import agent_service_pb2_grpc as agrpc
from parley.messaging.v1 import messaging_service_pb2 as pb
from parley.messaging.v1 import messaging_service_pb2_grpc as mgrpc

from services.common.context import current_workspace
from services.common.errors import InvalidArgument, NotFound, ParleyError
from services.common.phones import require_e164
from services.messaging import agents, convert, policy, sending
from services.messaging import repository as repo
from services.messaging.app import Messaging
from services.messaging.consent import set_consent
from services.messaging.gate import Policy

MAX_BATCH = 1000


class MessagingServicer(mgrpc.MessagingServiceServicer):
    def __init__(self, app: Messaging) -> None:
        self.app = app

    async def SendSms(self, request: pb.SendSmsRequest, context: grpc.aio.ServicerContext) -> pb.SendSmsResponse:
        ws = current_workspace()
        row = await sending.send_sms(self.app, ws, _send_request(request))
        return pb.SendSmsResponse(message=convert.message(row))

    async def BatchSendSms(
        self, request: pb.BatchSendSmsRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchSendSmsResponse:
        ws = current_workspace()
        if not 1 <= len(request.requests) <= MAX_BATCH:
            raise InvalidArgument.field("requests", f"must hold 1..{MAX_BATCH} sends")
        outcomes = await sending.send_many(self.app, ws, [_send_request(r) for r in request.requests])
        resp = pb.BatchSendSmsResponse()
        for out in outcomes:
            if isinstance(out, ParleyError):
                err = pb.SendSmsError(code=out.code.name, message=out.message, reason=out.reason)
                for v in getattr(out, "violations", []):
                    err.violations.add(field=v.field, description=v.description)
                resp.results.add(error=err)
            else:
                resp.results.add(message=convert.message(out))
        return resp

    async def CreateCallTask(
        self, request: pb.CreateCallTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCallTaskResponse:
        ws = current_workspace()
        row = await sending.create_call_task(
            self.app,
            ws,
            sending.CallTaskRequest(
                request_id=request.request_id,
                phone=request.phone,
                contact_id=request.contact_id,
                queue=request.queue,
                priority=request.priority,
                notes=request.notes,
                campaign_id=request.campaign_id,
            ),
        )
        return pb.CreateCallTaskResponse(task=convert.call_task(row))

    async def GetMessage(
        self, request: pb.GetMessageRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMessageResponse:
        ws = current_workspace()
        _check_uuid(request.message_id, "message_id")
        row = await repo.get_message(self.app.pool, ws.id, request.message_id)
        if row is None:
            raise NotFound(f"message {request.message_id!r} not found")
        return pb.GetMessageResponse(message=convert.message(row))

    async def ListMessages(
        self, request: pb.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMessagesResponse:
        ws = current_workspace()
        size = convert.page_size(request.page_size)
        if request.conversation_id:
            _check_uuid(request.conversation_id, "conversation_id")
        phone = require_e164(request.phone, ws.default_region) if request.phone else ""
        after = convert.decode_token(request.page_token, "ts")
        rows = await repo.list_messages(
            self.app.pool,
            ws.id,
            contact_id=request.contact_id,
            conversation_id=request.conversation_id,
            phone=phone,
            after=(after[0], after[1]) if after else None,
            limit=size + 1,
        )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = convert.encode_token([rows[-1]["create_time"], str(rows[-1]["id"])])
        return pb.ListMessagesResponse(messages=[convert.message(r) for r in rows], next_page_token=token)

    async def ListConversations(
        self, request: pb.ListConversationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConversationsResponse:
        ws = current_workspace()
        size = convert.page_size(request.page_size)
        after = convert.decode_token(request.page_token, "ts")
        rows = await repo.list_conversations(
            self.app.pool,
            ws.id,
            agent_id=request.agent_id,
            unassigned=request.unassigned,
            after=(after[0], after[1]) if after else None,
            limit=size + 1,
        )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = convert.encode_token([rows[-1]["last_message_time"], str(rows[-1]["id"])])
        return pb.ListConversationsResponse(
            conversations=[convert.conversation(r) for r in rows], next_page_token=token
        )

    async def GetConversation(
        self, request: pb.GetConversationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConversationResponse:
        ws = current_workspace()
        _check_uuid(request.conversation_id, "conversation_id")
        conv = await repo.get_conversation(self.app.pool, ws.id, request.conversation_id)
        if conv is None:
            raise NotFound(f"conversation {request.conversation_id!r} not found")
        rows = await repo.list_messages(
            self.app.pool, ws.id, conversation_id=request.conversation_id, after=None, limit=1000, oldest_first=True
        )
        return pb.GetConversationResponse(
            conversation=convert.conversation(conv), messages=[convert.message(r) for r in rows]
        )

    async def SetConsent(
        self, request: pb.SetConsentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetConsentResponse:
        ws = current_workspace()
        c = request.consent
        phone = require_e164(c.phone, ws.default_region, "consent.phone")
        channel = convert.CHANNEL_FROM_PROTO.get(c.channel)
        if channel is None:
            raise InvalidArgument.field("consent.channel", "CHANNEL_SMS or CHANNEL_VOICE")
        if len(c.consent_text) > 5000 or len(c.ip) > 100 or len(c.source) > 100:
            raise InvalidArgument.field("consent", "consent_text ≤ 5,000, ip and source ≤ 100 characters")
        # No timestamp: the change happens now, so it never overrides a consent recorded later.
        when = c.consent_time.ToDatetime(tzinfo=UTC) if c.HasField("consent_time") else self.app.clock.now()
        row, applied, outcomes = await set_consent(
            self.app.pool, ws.id, phone, channel, c.subscribed, when, c.source.strip() or "api", c.consent_text, c.ip
        )
        if outcomes:
            self.app.wake_outbox()
        return pb.SetConsentResponse(consent=convert.consent(row), applied=applied)

    async def GetConsent(
        self, request: pb.GetConsentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConsentResponse:
        ws = current_workspace()
        phone = require_e164(request.phone, ws.default_region)
        rows = await repo.get_consents(self.app.pool, ws.id, phone)
        return pb.GetConsentResponse(consents=[convert.consent(r) for r in rows])

    async def GetMessagingPolicy(
        self, request: pb.GetMessagingPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMessagingPolicyResponse:
        ws = current_workspace()
        return pb.GetMessagingPolicyResponse(policy=convert.policy(await self.app.policy(ws.id)))

    async def UpdateMessagingPolicy(
        self, request: pb.UpdateMessagingPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateMessagingPolicyResponse:
        ws = current_workspace()
        p = request.policy
        given = Policy(
            require_opt_in=p.require_opt_in,
            help_text=p.help_text,
            send_window_start=p.send_window_start,
            send_window_end=p.send_window_end,
            rate_limit_per_second=p.rate_limit_per_second,
            daily_cap=p.daily_cap,
        )
        updated = await policy.update(self.app, ws.id, given, list(request.update_mask.paths))
        return pb.UpdateMessagingPolicyResponse(policy=convert.policy(updated))


class AgentServicer(agrpc.AgentServiceServicer):
    def __init__(self, app: Messaging) -> None:
        self.app = app

    async def CreateAgent(
        self, request: apb.CreateAgentRequest, context: grpc.aio.ServicerContext
    ) -> apb.CreateAgentResponse:
        ws = current_workspace()
        row = await agents.create_agent(self.app, ws, request.request_id, request.name, list(request.queues))
        return apb.CreateAgentResponse(agent=convert.agent(row))

    async def ListAgents(
        self, request: apb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> apb.ListAgentsResponse:
        ws = current_workspace()
        size = convert.page_size(request.page_size)
        after = convert.decode_token(request.page_token, "s")
        rows = await repo.list_agents(self.app.pool, ws.id, after[0] if after else None, size + 1)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = convert.encode_token([str(rows[-1]["id"])])
        return apb.ListAgentsResponse(agents=[convert.agent(r) for r in rows], next_page_token=token)

    async def ListTasks(
        self, request: apb.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> apb.ListTasksResponse:
        ws = current_workspace()
        size = convert.page_size(request.page_size)
        after = convert.decode_token(request.page_token, "its")
        rows = await repo.list_open_tasks(
            self.app.pool, ws.id, request.queue, (after[0], after[1], after[2]) if after else None, size + 1
        )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            token = convert.encode_token([last["priority"], last["create_time"], str(last["id"])])
        return apb.ListTasksResponse(tasks=[convert.call_task(r) for r in rows], next_page_token=token)

    async def ClaimNextTask(
        self, request: apb.ClaimNextTaskRequest, context: grpc.aio.ServicerContext
    ) -> apb.ClaimNextTaskResponse:
        ws = current_workspace()
        row = await agents.claim_next(self.app, ws, request.agent_id, request.queue)
        return apb.ClaimNextTaskResponse(task=convert.call_task(row))

    async def GetTaskContext(
        self, request: apb.GetTaskContextRequest, context: grpc.aio.ServicerContext
    ) -> apb.GetTaskContextResponse:
        ws = current_workspace()
        ctx = await agents.task_context(self.app, ws, request.task_id, request.event_limit)
        resp = apb.GetTaskContextResponse(
            task=convert.call_task(ctx.task),
            recent_events=ctx.events,
            messages=[convert.message(m) for m in ctx.messages],
        )
        if ctx.contact is not None:
            resp.contact.CopyFrom(ctx.contact)
        if ctx.conversation is not None:
            resp.conversation.CopyFrom(convert.conversation(ctx.conversation))
        return resp

    async def CompleteTask(
        self, request: apb.CompleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> apb.CompleteTaskResponse:
        ws = current_workspace()
        row = await agents.complete(self.app, ws, request.task_id, request.agent_id, request.disposition, request.notes)
        return apb.CompleteTaskResponse(task=convert.call_task(row))

    async def ReplyInConversation(
        self, request: apb.ReplyInConversationRequest, context: grpc.aio.ServicerContext
    ) -> apb.ReplyInConversationResponse:
        ws = current_workspace()
        row = await agents.reply(
            self.app, ws, request.conversation_id, request.agent_id, request.body, request.request_id
        )
        return apb.ReplyInConversationResponse(message=convert.message(row))


def _send_request(r: pb.SendSmsRequest) -> sending.SendRequest:
    return sending.SendRequest(
        request_id=r.request_id,
        body=r.body,
        phone=r.phone,
        contact_id=r.contact_id,
        transactional=r.transactional,
        campaign_id=r.campaign_id,
        time_zone=r.time_zone,
        conversation_id=r.conversation_id,
    )


def _check_uuid(value: str, field: str) -> None:
    try:
        uuid.UUID(value)
    except ValueError as exc:
        raise InvalidArgument.field(field, "required" if not value else "not an id") from exc
