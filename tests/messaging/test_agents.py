"""Agent work: queues, concurrent claims (SKIP LOCKED), dispositions, replies through the gate."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from parley.messaging.v1 import agent_service_pb2 as apb
from parley.messaging.v1 import messaging_service_pb2 as pb

from services.common.errors import error_reason, violations_of
from tests.messaging.conftest import Stack, StackFactory


async def new_agent(stack: Stack, name: str, queues: list[str]) -> apb.Agent:
    resp = await stack.agents.CreateAgent(
        apb.CreateAgentRequest(request_id=f"agent-{name}", name=name, queues=queues), metadata=stack.md
    )
    return resp.agent


async def new_task(stack: Stack, request_id: str, phone: str, queue: str = "sales", priority: int = 0) -> pb.CallTask:
    resp = await stack.messaging.CreateCallTask(
        pb.CreateCallTaskRequest(request_id=request_id, phone=phone, queue=queue, priority=priority, notes="call back"),
        metadata=stack.md,
    )
    return resp.task


async def test_create_agent_is_idempotent(stack: Stack) -> None:
    a = await new_agent(stack, "ana", ["sales"])
    b = await new_agent(stack, "ana", ["sales"])
    assert a.id == b.id and list(a.queues) == ["sales"]
    listed = await stack.agents.ListAgents(apb.ListAgentsRequest(), metadata=stack.md)
    assert a.id in [x.id for x in listed.agents]


async def test_create_agent_bad_input(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.agents.CreateAgent(apb.CreateAgentRequest(request_id="", name=""), metadata=stack.md)
    assert {v.field for v in violations_of(err.value)} == {"request_id", "name"}


async def test_call_task_is_idempotent_and_listed_by_priority(stack: Stack) -> None:
    low = await new_task(stack, "ct-low", "+12125550401", queue="q-list", priority=1)
    high = await new_task(stack, "ct-high", "+12125550402", queue="q-list", priority=5)
    again = await new_task(stack, "ct-low", "+12125550401", queue="q-list", priority=1)
    assert again.id == low.id and low.status == pb.CALL_TASK_STATUS_OPEN
    listed = await stack.agents.ListTasks(apb.ListTasksRequest(queue="q-list", page_size=1), metadata=stack.md)
    assert [t.id for t in listed.tasks] == [high.id] and listed.next_page_token
    rest = await stack.agents.ListTasks(
        apb.ListTasksRequest(queue="q-list", page_token=listed.next_page_token), metadata=stack.md
    )
    assert [t.id for t in rest.tasks] == [low.id]


async def test_call_task_bad_input(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.messaging.CreateCallTask(pb.CreateCallTaskRequest(), metadata=stack.md)
    assert {v.field for v in violations_of(err.value)} == {"request_id", "phone"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.messaging.CreateCallTask(pb.CreateCallTaskRequest(request_id="x", phone="12"), metadata=stack.md)
    assert [v.field for v in violations_of(err.value)] == ["phone"]


async def test_two_agents_claiming_at_once_never_share_a_task(make_stack: StackFactory) -> None:
    stack = await make_stack()
    agents = [await new_agent(stack, f"claimer-{i}", ["rush"]) for i in range(4)]
    tasks = [await new_task(stack, f"rush-{i}", f"+121255505{i:02d}", queue="rush") for i in range(20)]

    async def claim_all(agent: apb.Agent) -> list[str]:
        got = []
        while True:
            try:
                resp = await stack.agents.ClaimNextTask(apb.ClaimNextTaskRequest(agent_id=agent.id), metadata=stack.md)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
                return got
            assert resp.task.agent_id == agent.id and resp.task.status == pb.CALL_TASK_STATUS_CLAIMED
            got.append(resp.task.id)

    claimed = await asyncio.gather(*(claim_all(a) for a in agents))
    flat = [t for c in claimed for t in c]
    assert sorted(flat) == sorted(t.id for t in tasks)
    assert len(set(flat)) == len(flat)


async def test_claim_respects_queues_and_priority(stack: Stack) -> None:
    agent = await new_agent(stack, "bo", ["vip"])
    await new_task(stack, "vip-low", "+12125550410", queue="vip", priority=1)
    high = await new_task(stack, "vip-high", "+12125550411", queue="vip", priority=9)
    await new_task(stack, "other-q", "+12125550412", queue="other", priority=99)
    resp = await stack.agents.ClaimNextTask(apb.ClaimNextTaskRequest(agent_id=agent.id), metadata=stack.md)
    assert resp.task.id == high.id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.agents.ClaimNextTask(apb.ClaimNextTaskRequest(agent_id=agent.id, queue="other"), metadata=stack.md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.agents.ClaimNextTask(apb.ClaimNextTaskRequest(agent_id="nope"), metadata=stack.md)
    assert [v.field for v in violations_of(err.value)] == ["agent_id"]


async def claim_one(stack: Stack, agent: apb.Agent) -> pb.CallTask:
    return (await stack.agents.ClaimNextTask(apb.ClaimNextTaskRequest(agent_id=agent.id), metadata=stack.md)).task


async def complete(stack: Stack, task: pb.CallTask, agent: apb.Agent, disposition: str) -> pb.CallTask:
    resp = await stack.agents.CompleteTask(
        apb.CompleteTaskRequest(task_id=task.id, agent_id=agent.id, disposition=disposition, notes="spoke briefly"),
        metadata=stack.md,
    )
    return resp.task


@pytest.mark.parametrize("disposition", ["connected", "voicemail", "no_answer", "wrong_number"])
async def test_dispositions(stack: Stack, disposition: str) -> None:
    agent = await new_agent(stack, f"disp-{disposition}", [f"d-{disposition}"])
    await new_task(stack, f"d-{disposition}", "+12125550420", queue=f"d-{disposition}")
    task = await claim_one(stack, agent)
    done = await complete(stack, task, agent, disposition)
    assert (done.status, done.disposition, done.disposition_notes) == (
        pb.CALL_TASK_STATUS_COMPLETED,
        disposition,
        "spoke briefly",
    )
    assert (await complete(stack, task, agent, disposition)).update_time == done.update_time  # idempotent
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(stack, task, agent, "connected" if disposition != "connected" else "voicemail")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_complete_needs_the_claiming_agent_and_a_known_disposition(stack: Stack) -> None:
    a = await new_agent(stack, "cc-a", ["cc"])
    b = await new_agent(stack, "cc-b", ["cc"])
    await new_task(stack, "cc-1", "+12125550430", queue="cc")
    task = await claim_one(stack, a)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(stack, task, b, "connected")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(stack, task, a, "maybe")
    assert [v.field for v in violations_of(err.value)] == ["disposition"]


async def test_do_not_contact_stops_the_next_sms_and_calls(stack: Stack) -> None:
    phone = "+12125550440"
    await stack.opt_in(phone)
    # A running campaign's earlier send is fine...
    first = await stack.send(request_id="camp-step-1", phone=phone, body="Your loan is approved", campaign_id="camp-1")
    assert first.status == pb.MESSAGE_STATUS_QUEUED
    agent = await new_agent(stack, "dnc", ["dnc"])
    await new_task(stack, "dnc-call", phone, queue="dnc")
    await new_task(stack, "dnc-call-2", phone, queue="dnc")
    task = await claim_one(stack, agent)
    await complete(stack, task, agent, "do_not_contact")
    # ...its next step is refused by the gate, and the queued one never reaches the provider.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.send(request_id="camp-step-2", phone=phone, body="Reminder", campaign_id="camp-1")
    assert error_reason(err.value) == "OPTED_OUT"
    await stack.drain()
    assert (await stack.get(first.id)).status == pb.MESSAGE_STATUS_BLOCKED
    assert stack.twilio.to(phone) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await new_task(stack, "dnc-call-3", phone, queue="dnc")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = await stack.agents.ListTasks(apb.ListTasksRequest(queue="dnc"), metadata=stack.md)
    assert listed.tasks == []  # the other open task for the phone was cancelled
    consent = await stack.messaging.GetConsent(pb.GetConsentRequest(phone=phone), metadata=stack.md)
    assert {(c.channel, c.subscribed, c.source) for c in consent.consents} == {
        (pb.CHANNEL_SMS, False, "disposition"),
        (pb.CHANNEL_VOICE, False, "disposition"),
    }


async def test_agent_replies_in_a_conversation(stack: Stack) -> None:
    phone = "+12125550450"
    agent = await new_agent(stack, "replier", [])
    await stack.inbound(phone, "Can someone call me about my application?", "SMin450")
    convs = await stack.messaging.ListConversations(pb.ListConversationsRequest(), metadata=stack.md)
    conv = next(c for c in convs.conversations if c.phone == phone)
    resp = await stack.agents.ReplyInConversation(
        apb.ReplyInConversationRequest(conversation_id=conv.id, agent_id=agent.id, body="Sure, 3pm?", request_id="r1"),
        metadata=stack.md,
    )
    assert resp.message.conversation_id == conv.id and resp.message.status == pb.MESSAGE_STATUS_QUEUED
    await stack.drain()
    assert [r.body for r in stack.twilio.to(phone)] == ["Sure, 3pm?"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.agents.ReplyInConversation(
            apb.ReplyInConversationRequest(conversation_id=conv.id, agent_id=agent.id, body="", request_id="r2"),
            metadata=stack.md,
        )
    assert [v.field for v in violations_of(err.value)] == ["body"]


async def test_task_context_without_identity_still_has_the_conversation(stack: Stack) -> None:
    phone = "+12125550460"
    agent = await new_agent(stack, "ctx", ["ctx"])
    await stack.inbound(phone, "hello?", "SMin460")
    await new_task(stack, "ctx-1", phone, queue="ctx")
    task = await claim_one(stack, agent)
    ctx = await stack.agents.GetTaskContext(apb.GetTaskContextRequest(task_id=task.id), metadata=stack.md)
    assert ctx.task.id == task.id
    assert [m.body for m in ctx.messages] == ["hello?"]
    assert ctx.conversation.phone == phone
