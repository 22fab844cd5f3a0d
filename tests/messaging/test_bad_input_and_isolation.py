"""Every input path rejects bad input naming the field; one workspace never sees or changes another's data."""

from __future__ import annotations

import base64
from typing import Any

import grpc
import pytest
from parley.messaging.v1 import agent_service_pb2 as apb
from parley.messaging.v1 import messaging_service_pb2 as pb

from services.common.clients import key_metadata
from services.common.errors import violations_of
from tests.messaging.conftest import Stack, StackFactory


async def fields_of(call: Any) -> list[str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return [v.field for v in violations_of(err.value)]


async def test_messaging_service_bad_input(stack: Stack) -> None:
    m, md = stack.messaging, stack.md
    assert await fields_of(m.GetConversation(pb.GetConversationRequest(conversation_id="x"), metadata=md)) == [
        "conversation_id"
    ]
    assert await fields_of(m.ListConversations(pb.ListConversationsRequest(page_token="%%"), metadata=md)) == [
        "page_token"
    ]
    too_deep = base64.urlsafe_b64encode(b"[" * 3000).decode()  # past the JSON parser's depth
    request = pb.ListConversationsRequest(page_token=too_deep)
    assert await fields_of(m.ListConversations(request, metadata=md)) == ["page_token"]
    assert await fields_of(m.ListConversations(pb.ListConversationsRequest(page_size=-1), metadata=md)) == ["page_size"]
    assert await fields_of(m.ListMessages(pb.ListMessagesRequest(phone="12"), metadata=md)) == ["phone"]
    assert await fields_of(m.ListMessages(pb.ListMessagesRequest(conversation_id="nope"), metadata=md)) == [
        "conversation_id"
    ]
    assert await fields_of(m.GetConsent(pb.GetConsentRequest(phone=""), metadata=md)) == ["phone"]
    bad_window = pb.UpdateMessagingPolicyRequest(
        policy=pb.MessagingPolicy(send_window_start="25:00", daily_cap=-1),
        update_mask={"paths": ["send_window_start", "daily_cap"]},
    )
    assert sorted(await fields_of(m.UpdateMessagingPolicy(bad_window, metadata=md))) == [
        "policy.daily_cap",
        "policy.send_window_start",
    ]
    unknown = pb.UpdateMessagingPolicyRequest(update_mask={"paths": ["colour"]})
    assert await fields_of(m.UpdateMessagingPolicy(unknown, metadata=md)) == ["update_mask"]


async def test_agent_service_bad_input(stack: Stack) -> None:
    a, md = stack.agents, stack.md
    assert await fields_of(a.GetTaskContext(apb.GetTaskContextRequest(task_id="x"), metadata=md)) == ["task_id"]
    assert await fields_of(
        a.GetTaskContext(
            apb.GetTaskContextRequest(task_id="00000000-0000-0000-0000-000000000000", event_limit=500), metadata=md
        )
    ) == ["event_limit"]
    assert await fields_of(a.ListTasks(apb.ListTasksRequest(page_token="??"), metadata=md)) == ["page_token"]
    assert await fields_of(a.ListAgents(apb.ListAgentsRequest(page_token="??"), metadata=md)) == ["page_token"]
    assert await fields_of(a.CompleteTask(apb.CompleteTaskRequest(task_id="t", agent_id="a"), metadata=md)) == [
        "task_id"
    ]
    assert await fields_of(
        a.ReplyInConversation(apb.ReplyInConversationRequest(conversation_id="c", body="hi"), metadata=md)
    ) == ["conversation_id"]
    # What Postgres text cannot hold is refused by the chassis for every request, naming the field
    # (this one answered INTERNAL from the database before).
    assert await fields_of(a.CreateAgent(apb.CreateAgentRequest(request_id="bi-nul", name="B\x00"), metadata=md)) == [
        "name"
    ]
    agent = (await a.CreateAgent(apb.CreateAgentRequest(request_id="bi-agent", name="B"), metadata=md)).agent
    await stack.inbound("+12125550701", "hi", "SMbi701")
    convs = await stack.messaging.ListConversations(pb.ListConversationsRequest(), metadata=md)
    conv = next(c for c in convs.conversations if c.phone == "+12125550701")
    assert await fields_of(
        a.ReplyInConversation(
            apb.ReplyInConversationRequest(conversation_id=conv.id, agent_id=agent.id, body="hi"), metadata=md
        )
    ) == ["request_id"]


async def test_workspaces_are_isolated(stack: Stack, make_workspace: Any, db_url: str) -> None:
    phone = "+12125550702"
    await stack.opt_in(phone)
    msg = await stack.send(request_id="iso-1", phone=phone, body="mine")
    await stack.drain()
    sid = (await stack.get(msg.id)).provider_message_id
    other, other_key = await make_workspace(db_url)
    other_md = key_metadata(other_key)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.messaging.GetMessage(pb.GetMessageRequest(message_id=msg.id), metadata=other_md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stack.messaging.ListMessages(pb.ListMessagesRequest(phone=phone), metadata=other_md)
    assert list(listed.messages) == []
    consent = await stack.messaging.GetConsent(pb.GetConsentRequest(phone=phone), metadata=other_md)
    assert list(consent.consents) == []
    # The same request_id in another workspace is another message.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.messaging.SendSms(
            pb.SendSmsRequest(request_id="iso-1", phone=phone, body="theirs"), metadata=other_md
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # no opt-in recorded there
    # A callback for this message's sid, posted to the other workspace's URL, changes nothing here.
    assert (await stack.status(sid, "failed", "30008", workspace_id=other.id))[0] == 200
    assert (await stack.get(msg.id)).status == pb.MESSAGE_STATUS_SENT
    # And a STOP to the other workspace does not opt out here.
    await stack.inbound(phone, "STOP", "SMiso702", workspace_id=other.id)
    again = await stack.send(request_id="iso-2", phone=phone, body="still mine")
    assert again.status == pb.MESSAGE_STATUS_QUEUED


async def test_missing_key_is_unauthenticated(make_stack: StackFactory) -> None:
    stack = await make_stack()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.messaging.SendSms(pb.SendSmsRequest(request_id="x", phone="+12125550703", body="x"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
