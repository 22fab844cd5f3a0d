"""Consent per phone and channel: the API, identify traits from identity's stream, newest always wins."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import timestamp_pb2
from parley.common.v1 import event_pb2
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.messaging.v1 import messaging_service_pb2 as pb

from services.common.errors import violations_of
from services.messaging import repository as repo
from services.messaging.identity_stream import CURSOR_NAME, IdentityStream
from tests.messaging.conftest import Stack


def ts(dt: datetime) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(dt)
    return t


async def set_consent(
    stack: Stack, phone: str, subscribed: bool, at: datetime | None = None, **kw: str
) -> pb.SetConsentResponse:
    consent = pb.Consent(phone=phone, channel=pb.CHANNEL_SMS, subscribed=subscribed, **kw)
    if at is not None:
        consent.consent_time.CopyFrom(ts(at))
    return await stack.messaging.SetConsent(pb.SetConsentRequest(consent=consent), metadata=stack.md)


async def test_newer_consent_wins_older_is_ignored(stack: Stack) -> None:
    phone = "+12125550301"
    first = await set_consent(
        stack, phone, True, datetime(2026, 3, 1, tzinfo=UTC), source="web", consent_text="I agree", ip="203.0.113.9"
    )
    assert first.applied and first.consent.subscribed
    older = await set_consent(stack, phone, False, datetime(2026, 2, 1, tzinfo=UTC))
    assert not older.applied and older.consent.subscribed and older.consent.source == "web"
    newer = await set_consent(stack, phone, False, datetime(2026, 4, 1, tzinfo=UTC))
    assert newer.applied and not newer.consent.subscribed
    got = await stack.messaging.GetConsent(pb.GetConsentRequest(phone="212-555-0301"), metadata=stack.md)
    [sms] = got.consents
    assert (sms.subscribed, sms.consent_time.ToDatetime(tzinfo=UTC)) == (False, datetime(2026, 4, 1, tzinfo=UTC))


async def test_change_without_timestamp_never_overrides_a_newer_one(stack: Stack) -> None:
    phone = "+12125550302"
    future = datetime(2027, 1, 1, tzinfo=UTC)  # the test clock reads 2026-06-15
    assert (await set_consent(stack, phone, False, future)).applied
    undated = await set_consent(stack, phone, True)
    assert not undated.applied and not undated.consent.subscribed


async def test_first_consent_keeps_text_and_ip(stack: Stack) -> None:
    resp = await set_consent(stack, "+12125550303", True, None, consent_text="Yes, text me", ip="198.51.100.7")
    assert (resp.consent.consent_text, resp.consent.ip, resp.consent.source) == ("Yes, text me", "198.51.100.7", "api")
    recorded = resp.consent.consent_time.ToDatetime(tzinfo=UTC)
    assert abs((stack.app.clock.now() - recorded).total_seconds()) < 60


@pytest.mark.parametrize(
    ("consent", "field"),
    [
        (pb.Consent(phone="", channel=pb.CHANNEL_SMS), "consent.phone"),
        (pb.Consent(phone="123", channel=pb.CHANNEL_SMS), "consent.phone"),
        (pb.Consent(phone="+12125550304"), "consent.channel"),
    ],
)
async def test_bad_consent_is_invalid_argument(stack: Stack, consent: pb.Consent, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.messaging.SetConsent(pb.SetConsentRequest(consent=consent), metadata=stack.md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in violations_of(err.value)] == [field]


def identify(ws: str, phone: str, traits: dict[str, object], at: datetime, seq: int) -> ipb.StoredEvent:
    event = event_pb2.Event(type=event_pb2.EVENT_TYPE_IDENTIFY, message_id=f"m{seq}", user_id="u1", phone=phone)
    event.traits.update(traits)
    event.timestamp.CopyFrom(ts(at))
    return ipb.StoredEvent(event=event, workspace_id=ws, contact_id="c1", sequence=seq)


async def test_identify_traits_from_the_stream(stack: Stack) -> None:
    ws, phone = stack.workspace.id, "+12125550305"
    stream = IdentityStream(stack.app)
    t1, t2 = datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 5, 2, tzinfo=UTC)
    resp = ipb.SubscribeEventsResponse(
        events=[
            identify(ws, phone, {"sms_opt_in": True, "first_name": "Ada"}, t1, 1),
            identify(
                ws,
                phone,
                {"voice_opt_in": {"subscribed": False, "timestamp": "2026-04-01T00:00:00Z", "source": "ivr"}},
                t2,
                2,
            ),
            # A consent older than the one recorded (t1) never overrides it:
            identify(ws, phone, {"sms_opt_in": {"subscribed": False, "timestamp": "2026-01-01T00:00:00Z"}}, t2, 3),
        ],
        cursor="cursor-3",
    )
    assert await stream.apply(resp) == 3
    got = await stack.messaging.GetConsent(pb.GetConsentRequest(phone=phone), metadata=stack.md)
    by_channel = {c.channel: c for c in got.consents}
    assert by_channel[pb.CHANNEL_SMS].subscribed and by_channel[pb.CHANNEL_SMS].source == "identify"
    assert not by_channel[pb.CHANNEL_VOICE].subscribed and by_channel[pb.CHANNEL_VOICE].source == "ivr"
    assert await repo.get_cursor(stack.app.pool, CURSOR_NAME) == "cursor-3"
    # The opt-in lets a marketing send through.
    msg = await stack.send(request_id="after-identify", phone=phone, body="Welcome!")
    assert msg.status == pb.MESSAGE_STATUS_QUEUED


async def test_stop_reply_wins_over_a_future_dated_consent(stack: Stack) -> None:
    """A client clock ahead of ours must not make a contact's STOP ineffective."""
    phone = "+12125550306"
    assert (await set_consent(stack, phone, True, datetime(2030, 1, 1, tzinfo=UTC))).applied
    await stack.inbound(phone, "STOP", "SMc306")
    got = await stack.messaging.GetConsent(pb.GetConsentRequest(phone=phone), metadata=stack.md)
    [sms] = got.consents
    assert not sms.subscribed and sms.source == "keyword"
    # And a dated change older than the STOP still cannot undo it.
    assert not (await set_consent(stack, phone, True, datetime(2029, 1, 1, tzinfo=UTC))).applied
