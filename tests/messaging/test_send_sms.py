"""SendSms through the gate to the Twilio stand-in: idempotency, retries, final failures, bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from parley.messaging.v1 import messaging_service_pb2 as pb

from services.common.errors import error_reason, violations_of
from services.messaging.providers import TwilioProvider
from tests.messaging.conftest import FROM_NUMBER, PUBLIC_BASE, Stack


async def test_send_queues_then_provider_accepts(stack: Stack) -> None:
    await stack.opt_in("+12125550101")
    msg = await stack.send(request_id="s-1", phone="(212) 555-0101", body="Hello there")
    assert msg.status == pb.MESSAGE_STATUS_QUEUED
    assert (msg.phone, msg.segments, msg.encoding, msg.time_zone) == ("+12125550101", 1, "GSM-7", "America/New_York")
    assert msg.conversation_id
    await stack.drain()
    got = await stack.get(msg.id)
    assert got.status == pb.MESSAGE_STATUS_SENT
    [sent] = stack.twilio.to("+12125550101")
    assert got.provider_message_id == sent.sid
    assert sent.form["From"] == FROM_NUMBER and sent.body == "Hello there"
    assert sent.status_callback == f"{PUBLIC_BASE}/twilio/status/{stack.workspace.id}"


async def test_duplicate_request_id_sends_once(stack: Stack) -> None:
    await stack.opt_in("+12125550102")
    first = await stack.send(request_id="dup-1", phone="+12125550102", body="once")
    again = await stack.send(request_id="dup-1", phone="+12125550102", body="once")
    assert again.id == first.id
    await stack.drain()
    third = await stack.send(request_id="dup-1", phone="+12125550102", body="once")
    assert third.id == first.id and third.status == pb.MESSAGE_STATUS_SENT
    await stack.drain()
    assert len(stack.twilio.to("+12125550102")) == 1


async def test_provider_500_then_200_sends_once(stack: Stack) -> None:
    await stack.opt_in("+12125550103")
    stack.twilio.script.extend([500, 503, 429])
    before = stack.twilio.attempts
    msg = await stack.send(request_id="retry-1", phone="+12125550103", body="retry me")
    await stack.drain()
    got = await stack.get(msg.id)
    assert got.status == pb.MESSAGE_STATUS_SENT
    assert got.attempts == 4
    assert stack.twilio.attempts - before == 4
    assert len(stack.twilio.to("+12125550103")) == 1


async def test_provider_400_fails_with_its_code(stack: Stack) -> None:
    await stack.opt_in("+12125550104")
    stack.twilio.invalid_numbers.add("+12125550104")
    msg = await stack.send(request_id="bad-to", phone="+12125550104", body="nope")
    await stack.drain()
    got = await stack.get(msg.id)
    assert got.status == pb.MESSAGE_STATUS_FAILED
    assert got.error_code == "21211"
    assert "not a valid phone number" in got.error_message
    assert got.attempts == 1


async def test_retries_give_up_after_max_attempts(stack: Stack) -> None:
    await stack.opt_in("+12125550105")
    stack.app.tuning.max_attempts = 3
    try:
        stack.twilio.script.extend([500, 500, 500])
        msg = await stack.send(request_id="give-up", phone="+12125550105", body="x")
        await stack.drain()
    finally:
        stack.app.tuning.max_attempts = 8
    got = await stack.get(msg.id)
    assert (got.status, got.attempts, got.error_code) == (pb.MESSAGE_STATUS_FAILED, 3, "20500")


async def test_segments_and_encoding_are_stored(stack: Stack) -> None:
    await stack.opt_in("+12125550106")
    msg = await stack.send(request_id="seg", phone="+12125550106", body="ç" * 71)
    assert (msg.segments, msg.encoding) == (2, "UCS-2")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"request_id": "", "phone": "+12125550100", "body": "x"}, "request_id"),
        ({"request_id": "b1", "phone": "+12125550100", "body": ""}, "body"),
        ({"request_id": "b2", "phone": "+12125550100", "body": "   "}, "body"),
        ({"request_id": "b3", "phone": "+12125550100", "body": "x" * 1601}, "body"),
        ({"request_id": "b4", "phone": "12", "body": "x"}, "phone"),
        ({"request_id": "b5", "phone": "not a phone", "body": "x"}, "phone"),
        ({"request_id": "b6", "body": "x"}, "phone"),
        ({"request_id": "b7", "phone": "+12125550100", "body": "x", "time_zone": "Mars/Olympus"}, "time_zone"),
        ({"request_id": "b8", "phone": "+12125550100", "body": "x", "conversation_id": "nope"}, "conversation_id"),
        ({"request_id": "b9", "phone": "+12125550100", "body": "nul\x00byte"}, "body"),
    ],
)
async def test_bad_input_is_invalid_argument(stack: Stack, fields: dict[str, str], field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.send(**fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [v.field for v in violations_of(err.value)]


async def test_max_length_body_is_accepted(stack: Stack) -> None:
    await stack.opt_in("+12125550107")
    msg = await stack.send(request_id="long", phone="+12125550107", body="a" * 1600)
    assert msg.segments == 11


async def test_opted_out_is_refused_and_recorded(stack: Stack) -> None:
    phone = "+12125550108"
    await stack.messaging.SetConsent(
        pb.SetConsentRequest(consent=pb.Consent(phone=phone, channel=pb.CHANNEL_SMS, subscribed=False)),
        metadata=stack.md,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.send(request_id="oo-1", phone=phone, body="hi", transactional=True)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "OPTED_OUT"
    listed = await stack.messaging.ListMessages(pb.ListMessagesRequest(phone=phone), metadata=stack.md)
    [blocked] = listed.messages
    assert (blocked.status, blocked.error_code) == (pb.MESSAGE_STATUS_BLOCKED, "opted_out")
    await stack.drain()
    assert stack.twilio.to(phone) == []


async def test_marketing_needs_opt_in_but_transactional_does_not(stack: Stack) -> None:
    phone = "+12125550109"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.send(request_id="mk-1", phone=phone, body="Sale!")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "NO_OPT_IN"
    msg = await stack.send(request_id="tx-1", phone=phone, body="Your code is 1234", transactional=True)
    assert msg.status == pb.MESSAGE_STATUS_QUEUED


async def test_outside_window_is_scheduled_not_dropped(stack: Stack) -> None:
    phone = "+12125550110"
    await stack.opt_in(phone)
    stack.app.clock.set(datetime(2026, 6, 16, 2, 30, tzinfo=UTC))  # 22:30 in New York
    try:
        msg = await stack.send(request_id="late", phone=phone, body="tomorrow")
        assert msg.status == pb.MESSAGE_STATUS_SCHEDULED
        assert msg.scheduled_time.ToDatetime(tzinfo=UTC) == datetime(2026, 6, 16, 12, 0, tzinfo=UTC)
        await stack.drain()
        assert stack.twilio.to(phone) == []
        stack.app.clock.set(datetime(2026, 6, 16, 12, 0, 1, tzinfo=UTC))
        await stack.drain()
        assert (await stack.get(msg.id)).status == pb.MESSAGE_STATUS_SENT
        assert len(stack.twilio.to(phone)) == 1
    finally:
        stack.app.clock.set(datetime(2026, 6, 15, 16, 0, tzinfo=UTC))


async def test_time_zone_override(stack: Stack) -> None:
    phone = "+12125550111"
    await stack.opt_in(phone)
    # Noon in New York is 01:00 in Tokyo: outside the window there.
    msg = await stack.send(request_id="tz", phone=phone, body="x", time_zone="Asia/Tokyo")
    assert msg.status == pb.MESSAGE_STATUS_SCHEDULED and msg.time_zone == "Asia/Tokyo"


async def test_daily_cap(stack: Stack) -> None:
    phone = "+12125550112"
    await stack.opt_in(phone)
    await stack.set_policy(daily_cap=2)
    try:
        await stack.send(request_id="cap-1", phone=phone, body="1")
        await stack.send(request_id="cap-2", phone=phone, body="2")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.send(request_id="cap-3", phone=phone, body="3")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(err.value) == "DAILY_CAP"
    finally:
        await stack.set_policy(daily_cap=10)


async def test_rate_limit_defers_the_excess(stack: Stack) -> None:
    await stack.set_policy(rate_limit_per_second=2)
    try:
        phones = [f"+1212555013{i}" for i in range(5)]
        for i, p in enumerate(phones):
            await stack.opt_in(p)
            await stack.send(request_id=f"rl-{i}", phone=p, body="x")
        before = len(stack.twilio.received)
        dispatcher = stack.server.runtime.state["dispatcher"]
        await dispatcher.dispatch_once()
        assert len(stack.twilio.received) - before == 2  # the burst; the rest wait their turn
    finally:
        await stack.set_policy(rate_limit_per_second=0)
    stack.app.clock.advance(timedelta(seconds=5))
    try:
        await stack.drain()
    finally:
        stack.app.clock.set(datetime(2026, 6, 15, 16, 0, tzinfo=UTC))
    assert all(len(stack.twilio.to(p)) == 1 for p in phones)


async def test_message_and_list_lookups(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.get("00000000-0000-0000-0000-000000000000")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.get("x")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    page = await stack.messaging.ListMessages(pb.ListMessagesRequest(page_size=2), metadata=stack.md)
    assert len(page.messages) == 2 and page.next_page_token
    nxt = await stack.messaging.ListMessages(
        pb.ListMessagesRequest(page_size=2, page_token=page.next_page_token), metadata=stack.md
    )
    assert not {m.id for m in page.messages} & {m.id for m in nxt.messages}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.messaging.ListMessages(pb.ListMessagesRequest(page_token="garbage!"), metadata=stack.md)
    assert [v.field for v in violations_of(err.value)] == ["page_token"]


async def test_batch_send_answers_per_item(stack: Stack) -> None:
    await stack.opt_in("+12125550140")
    await stack.opt_in("+12125550141")
    await stack.messaging.SetConsent(
        pb.SetConsentRequest(consent=pb.Consent(phone="+12125550142", channel=pb.CHANNEL_SMS, subscribed=False)),
        metadata=stack.md,
    )
    requests = [
        pb.SendSmsRequest(request_id="bt-1", phone="+12125550140", body="one"),
        pb.SendSmsRequest(request_id="bt-2", phone="bad", body="two"),
        pb.SendSmsRequest(request_id="bt-3", phone="+12125550142", body="three"),
        pb.SendSmsRequest(request_id="bt-1", phone="+12125550140", body="one"),  # repeated in the batch
        pb.SendSmsRequest(request_id="bt-4", phone="+12125550141", body="four"),
    ]
    resp = await stack.messaging.BatchSendSms(pb.BatchSendSmsRequest(requests=requests), metadata=stack.md)
    kinds = [r.WhichOneof("result") for r in resp.results]
    assert kinds == ["message", "error", "error", "message", "message"]
    assert resp.results[0].message.id == resp.results[3].message.id
    assert resp.results[1].error.code == "INVALID_ARGUMENT"
    assert [v.field for v in resp.results[1].error.violations] == ["phone"]
    assert (resp.results[2].error.code, resp.results[2].error.reason) == ("FAILED_PRECONDITION", "OPTED_OUT")
    again = await stack.messaging.BatchSendSms(pb.BatchSendSmsRequest(requests=requests[:1]), metadata=stack.md)
    assert again.results[0].message.id == resp.results[0].message.id
    await stack.drain()
    assert len(stack.twilio.to("+12125550140")) == 1 and len(stack.twilio.to("+12125550141")) == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.messaging.BatchSendSms(pb.BatchSendSmsRequest(), metadata=stack.md)
    assert [v.field for v in violations_of(err.value)] == ["requests"]


async def test_provider_timeout_is_retried(stack: Stack) -> None:
    phone = "+12125550150"
    await stack.opt_in(phone)
    original = stack.app.provider
    s = stack.app.settings
    stack.app.provider = TwilioProvider(
        s.twilio_account_sid or "",
        s.twilio_auth_token or "",
        s.twilio_from_number or "",
        s.twilio_api_base_url,
        timeout=0.3,
    )
    try:
        stack.twilio.script.extend([0, 429])
        msg = await stack.send(request_id="slow", phone=phone, body="eventually")
        await stack.drain()
    finally:
        await stack.app.provider.close()
        stack.app.provider = original
    got = await stack.get(msg.id)
    assert (got.status, got.attempts) == (pb.MESSAGE_STATUS_SENT, 3)
    assert len(stack.twilio.to(phone)) == 1


async def test_window_is_checked_again_at_hand_off(stack: Stack) -> None:
    """A message queued inside the window but due after it closed (retries, rate limits) waits."""
    phone = "+12125550151"
    await stack.opt_in(phone)
    msg = await stack.send(request_id="recheck", phone=phone, body="late")
    assert msg.status == pb.MESSAGE_STATUS_QUEUED
    stack.app.clock.set(datetime(2026, 6, 16, 2, 30, tzinfo=UTC))  # 22:30 in New York
    try:
        await stack.drain()
        got = await stack.get(msg.id)
        assert got.status == pb.MESSAGE_STATUS_SCHEDULED
        assert got.scheduled_time.ToDatetime(tzinfo=UTC) == datetime(2026, 6, 16, 12, 0, tzinfo=UTC)
        assert stack.twilio.to(phone) == []
        stack.app.clock.set(datetime(2026, 6, 16, 12, 0, 1, tzinfo=UTC))
        await stack.drain()
        assert (await stack.get(msg.id)).status == pb.MESSAGE_STATUS_SENT
    finally:
        stack.app.clock.set(datetime(2026, 6, 15, 16, 0, tzinfo=UTC))
