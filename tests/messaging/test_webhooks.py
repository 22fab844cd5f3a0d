"""Twilio webhooks: signatures, forward-only idempotent status callbacks, inbound replies and keywords."""

from __future__ import annotations

import grpc
import pytest
from parley.messaging.v1 import messaging_service_pb2 as pb
from twilio.request_validator import RequestValidator

from services.common.errors import error_reason
from services.messaging.janitor import sweep
from tests.messaging.conftest import PUBLIC_BASE, Stack
from tests.messaging.twilio_standin import AUTH_TOKEN


async def sent_message(stack: Stack, phone: str, request_id: str) -> pb.Message:
    await stack.opt_in(phone)
    msg = await stack.send(request_id=request_id, phone=phone, body="hello")
    await stack.drain()
    got = await stack.get(msg.id)
    assert got.status == pb.MESSAGE_STATUS_SENT
    return got


async def test_good_signature_moves_status(stack: Stack) -> None:
    msg = await sent_message(stack, "+12125550201", "wh-1")
    status, _ = await stack.status(msg.provider_message_id, "delivered")
    assert status == 200
    assert (await stack.get(msg.id)).status == pb.MESSAGE_STATUS_DELIVERED


@pytest.mark.parametrize("signature", [None, "", "bm90IGEgc2lnbmF0dXJl"])
async def test_bad_or_missing_signature_is_403_and_changes_nothing(stack: Stack, signature: str | None) -> None:
    msg = await sent_message(stack, "+12125550202", f"wh-bad-{signature}")
    status, _ = await stack.status(msg.provider_message_id, "delivered", signature=signature)
    assert status == 403
    assert (await stack.get(msg.id)).status == pb.MESSAGE_STATUS_SENT
    status, _ = await stack.inbound("+12125550202", "STOP", f"SMbad{signature}", signature=signature)
    assert status == 403
    consent = await stack.messaging.GetConsent(pb.GetConsentRequest(phone="+12125550202"), metadata=stack.md)
    assert [c.subscribed for c in consent.consents] == [True]


async def test_signature_covers_the_url(stack: Stack) -> None:
    """A signature made for another workspace's URL does not verify here."""
    msg = await sent_message(stack, "+12125550203", "wh-url")
    params = {"MessageSid": msg.provider_message_id, "MessageStatus": "delivered"}
    wrong = RequestValidator(AUTH_TOKEN).compute_signature(f"{PUBLIC_BASE}/twilio/status/other", params)
    assert (await stack.webhook("status", params, signature=wrong))[0] == 403


async def test_statuses_never_move_backwards(stack: Stack) -> None:
    msg = await sent_message(stack, "+12125550204", "wh-order")
    sid = msg.provider_message_id
    assert (await stack.status(sid, "delivered"))[0] == 200
    assert (await stack.status(sid, "sent"))[0] == 200  # late, out of order
    assert (await stack.status(sid, "queued"))[0] == 200
    assert (await stack.status(sid, "undelivered", "30003"))[0] == 200  # final already
    got = await stack.get(msg.id)
    assert got.status == pb.MESSAGE_STATUS_DELIVERED and got.error_code == ""


async def test_redelivered_callback_changes_nothing(stack: Stack) -> None:
    msg = await sent_message(stack, "+12125550205", "wh-dup")
    sid = msg.provider_message_id
    assert (await stack.status(sid, "failed", "30008", token="tok-1"))[0] == 200
    first = await stack.get(msg.id)
    assert (await stack.status(sid, "failed", "30008", token="tok-1"))[0] == 200
    assert (await stack.status(sid, "failed", "30008"))[0] == 200  # same sid + status, no token
    again = await stack.get(msg.id)
    assert again == first
    assert (first.status, first.error_code) == (pb.MESSAGE_STATUS_FAILED, "30008")


async def test_callback_before_the_hand_off_is_recorded(stack: Stack) -> None:
    """A provider may call back before the dispatcher has stored its sid; the status is kept for it."""
    phone = "+12125550206"
    await stack.opt_in(phone)
    msg = await stack.send(request_id="wh-early", phone=phone, body="fast")
    next_sid = f"SM{len(stack.twilio.received) + 1:032x}"
    assert (await stack.status(next_sid, "delivered"))[0] == 200
    await stack.drain()
    got = await stack.get(msg.id)
    assert got.provider_message_id == next_sid
    assert got.status == pb.MESSAGE_STATUS_DELIVERED


async def test_unknown_workspace_is_404(stack: Stack) -> None:
    status, _ = await stack.status("SMx", "delivered", workspace_id="00000000-0000-0000-0000-000000000000")
    assert status == 404


async def test_reply_threads_into_the_conversation(stack: Stack) -> None:
    phone = "+12125550207"
    msg = await sent_message(stack, phone, "wh-thread")
    status, text = await stack.inbound(phone, "Sounds good, see you at 5", "SMin207a")
    assert status == 200 and "<Response>" in text
    conv = await stack.messaging.GetConversation(
        pb.GetConversationRequest(conversation_id=msg.conversation_id), metadata=stack.md
    )
    assert [(m.direction, m.body) for m in conv.messages] == [
        (pb.MESSAGE_DIRECTION_OUTBOUND, "hello"),
        (pb.MESSAGE_DIRECTION_INBOUND, "Sounds good, see you at 5"),
    ]
    assert conv.messages[1].status == pb.MESSAGE_STATUS_RECEIVED
    assert not conv.conversation.started_by_contact
    # Redelivered inbound webhook: kept once.
    await stack.inbound(phone, "Sounds good, see you at 5", "SMin207a")
    conv = await stack.messaging.GetConversation(
        pb.GetConversationRequest(conversation_id=msg.conversation_id), metadata=stack.md
    )
    assert len(conv.messages) == 2


async def test_contact_started_conversation_allows_replies_without_opt_in(stack: Stack) -> None:
    phone = "+12125550208"
    await stack.inbound(phone, "Hi, is the store open today?", "SMin208")
    convs = await stack.messaging.ListConversations(pb.ListConversationsRequest(unassigned=True), metadata=stack.md)
    conv = next(c for c in convs.conversations if c.phone == phone)
    assert conv.started_by_contact and conv.agent_id == ""
    reply = await stack.send(request_id="wh-reply", conversation_id=conv.id, body="Yes, until 9pm")
    assert reply.status == pb.MESSAGE_STATUS_QUEUED and reply.conversation_id == conv.id
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a marketing send outside the conversation still needs opt-in
        await stack.send(request_id="wh-mkt", phone=phone, body="Sale!")
    assert error_reason(err.value) == "NO_OPT_IN"


async def test_help_answers_with_the_workspace_help_text(stack: Stack) -> None:
    phone = "+12125550209"
    await stack.set_policy(help_text="Acme Loans: help at acme.example/help. Reply STOP to opt out.")
    await stack.inbound(phone, " help ", "SMin209")
    await stack.drain()
    [answer] = stack.twilio.to(phone)
    assert answer.body == "Acme Loans: help at acme.example/help. Reply STOP to opt out."


async def test_stop_and_start_keywords(stack: Stack) -> None:
    phone = "+12125550210"
    await stack.opt_in(phone)
    await stack.inbound(phone, "Stop.", "SMin210a")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.send(request_id="ss-1", phone=phone, body="x", transactional=True)
    assert error_reason(err.value) == "OPTED_OUT"
    await stack.inbound(phone, "START", "SMin210b")
    msg = await stack.send(request_id="ss-2", phone=phone, body="welcome back")
    assert msg.status == pb.MESSAGE_STATUS_QUEUED
    consent = await stack.messaging.GetConsent(pb.GetConsentRequest(phone=phone), metadata=stack.md)
    [sms] = consent.consents
    assert sms.subscribed and sms.source == "keyword"


async def test_stopall_opts_out_of_calls_too(stack: Stack) -> None:
    phone = "+12125550211"
    await stack.inbound(phone, "STOPALL", "SMin211")
    consent = await stack.messaging.GetConsent(pb.GetConsentRequest(phone=phone), metadata=stack.md)
    assert {(c.channel, c.subscribed) for c in consent.consents} == {(pb.CHANNEL_SMS, False), (pb.CHANNEL_VOICE, False)}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.messaging.CreateCallTask(
            pb.CreateCallTaskRequest(request_id="call-211", phone=phone), metadata=stack.md
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_opt_out_in_other_words_is_honoured_and_flagged(stack: Stack) -> None:
    phone = "+12125550212"
    await stack.opt_in(phone)
    await stack.inbound(phone, "please stop texting me", "SMin212")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.send(request_id="ow-1", phone=phone, body="x")
    assert error_reason(err.value) == "OPTED_OUT"
    convs = await stack.messaging.ListConversations(pb.ListConversationsRequest(), metadata=stack.md)
    conv = next(c for c in convs.conversations if c.phone == phone)
    assert conv.opt_out_flagged and conv.opt_out_flag_text == "please stop texting me"


async def test_stop_blocks_messages_already_queued(stack: Stack) -> None:
    phone = "+12125550213"
    await stack.opt_in(phone)
    msg = await stack.send(request_id="q-then-stop", phone=phone, body="queued before STOP")
    await stack.inbound(phone, "STOP", "SMin213")
    await stack.drain()
    got = await stack.get(msg.id)
    assert (got.status, got.error_code) == (pb.MESSAGE_STATUS_BLOCKED, "opted_out")
    assert stack.twilio.to(phone) == []


async def test_inbound_without_sid_or_bad_from_is_400(stack: Stack) -> None:
    assert (await stack.webhook("inbound", {"From": "+12125550214", "Body": "hi"}))[0] == 400
    assert (await stack.inbound("not-a-phone", "hi", "SMbadfrom"))[0] == 400


async def test_an_inbound_body_with_nul_is_kept_with_a_replacement_character(stack: Stack) -> None:
    # A text column cannot hold NUL; the message is the sender's, so it is kept, not refused
    # (answering an error would only make the provider retry it).
    phone = "+12125550215"
    status, _ = await stack.inbound(phone, "hi\x00there", "SMnul215")
    assert status == 200
    listed = await stack.messaging.ListMessages(pb.ListMessagesRequest(phone=phone), metadata=stack.md)
    assert [m.body for m in listed.messages] == ["hi\ufffdthere"]


async def test_retention_sweep_keeps_recent_receipts(stack: Stack) -> None:
    ws = stack.workspace.id
    await stack.app.pool.execute(
        """INSERT INTO messaging.webhook_receipts (workspace_id, key, receive_time)
           VALUES ($1, 'old-one', now() - interval '30 days'), ($1, 'new-one', now())""",
        ws,
    )
    assert await sweep(stack.app.pool) >= 1
    keys = {
        r["key"]
        for r in await stack.app.pool.fetch("SELECT key FROM messaging.webhook_receipts WHERE workspace_id = $1", ws)
    }
    assert "new-one" in keys and "old-one" not in keys
