"""The whole path over four real services in production wiring, on the real clock.

An SDK sends identify + track over HTTP to ingest; identity resolves the contact; messaging
records the SMS opt-in from the identify traits; a live campaign enrolls the contact and sends
an SMS through messaging to the (stand-in) provider, whose delivery callback comes back signed;
the outcomes flow back through ingest into the contact's timeline.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import aiohttp
import grpc
import phonenumbers
import pytest
from parley.campaign.v1 import campaign_service_pb2 as camp_pb
from parley.campaign.v1 import campaign_service_pb2_grpc as camp_grpc
from parley.identity.v1 import identity_service_pb2 as id_pb
from parley.identity.v1 import identity_service_pb2_grpc as id_grpc
from parley.messaging.v1 import messaging_service_pb2 as msg_pb
from parley.messaging.v1 import messaging_service_pb2_grpc as msg_grpc
from phonenumbers import timezone as phone_timezone

from services.campaign.definition import from_dict
from services.campaign.module import MODULE as CAMPAIGN
from services.common.clients import key_metadata
from services.common.server import RunningServer, start
from services.identity.module import MODULE as IDENTITY
from services.ingest.module import MODULE as INGEST
from services.messaging.module import MODULE as MESSAGING
from tests.helpers import MakeWorkspace, test_settings
from tests.messaging.twilio_standin import ACCOUNT_SID, AUTH_TOKEN, TwilioStandIn

PUBLIC_BASE = "https://hooks.parley.test"
FROM_NUMBER = "+15005550006"
# One number per time zone band, so some number is always mid-day wherever the clock stands.
CANDIDATES = ["+18085552671", "+14155552671", "+12125552671", "+442071838750", "+919876543210",
              "+81312345678", "+61291234567"]  # fmt: skip


def daytime_phone(now: datetime) -> str:
    """A number whose local time is well inside the default 08:00-21:00 send window now."""
    for phone in CANDIDATES:
        zone = phone_timezone.time_zones_for_number(phonenumbers.parse(phone))[0]
        if 10 <= now.astimezone(ZoneInfo(zone)).hour < 19:
            return phone
    raise AssertionError("no candidate number is in daytime")  # the bands overlap; cannot happen


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@dataclass
class Platform:
    ingest: RunningServer
    identity: RunningServer
    messaging: RunningServer
    campaign: RunningServer
    twilio: TwilioStandIn
    channels: list[grpc.aio.Channel]

    def stub(self, server: RunningServer, kind: type) -> object:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        self.channels.append(ch)
        return kind(ch)


@pytest.fixture(scope="module")
async def platform(db_url: str) -> AsyncIterator[Platform]:
    base = test_settings(db_url)
    identity = await start(IDENTITY, base)
    addr = {"identity_addr": f"127.0.0.1:{identity.port}"}
    ingest = await start(INGEST, base.replace(**addr))
    twilio = await TwilioStandIn().start()
    messaging = await start(
        MESSAGING,
        base.replace(
            **addr,
            ingest_addr=f"127.0.0.1:{ingest.port}",
            sms_provider="twilio",
            twilio_account_sid=ACCOUNT_SID,
            twilio_auth_token=AUTH_TOKEN,
            twilio_from_number=FROM_NUMBER,
            twilio_api_base_url=twilio.base_url,
            public_base_url=PUBLIC_BASE,
        ),
    )
    # The stand-in calls the real webhook listener back, signed for the public URL.
    twilio.callback_base = f"http://127.0.0.1:{messaging.runtime.state['http_port']}"
    twilio.public_base = PUBLIC_BASE
    campaign = await start(CAMPAIGN, base.replace(**addr, messaging_addr=f"127.0.0.1:{messaging.port}"))
    p = Platform(ingest, identity, messaging, campaign, twilio, [])
    yield p
    for ch in p.channels:
        await ch.close()
    for srv in (campaign, messaging, ingest, identity):
        await srv.stop(0)
    await twilio.stop()


async def test_event_to_sms_to_outcome(platform: Platform, db_url: str, make_workspace: MakeWorkspace) -> None:
    _, key = await make_workspace(db_url)
    md = key_metadata(key)
    phone = daytime_phone(datetime.now(UTC))
    user = f"user-{uuid.uuid4().hex[:8]}"
    campaigns: camp_grpc.CampaignServiceStub = platform.stub(platform.campaign, camp_grpc.CampaignServiceStub)  # type: ignore[assignment]
    identity: id_grpc.IdentityServiceStub = platform.stub(platform.identity, id_grpc.IdentityServiceStub)  # type: ignore[assignment]
    messaging: msg_grpc.MessagingServiceStub = platform.stub(platform.messaging, msg_grpc.MessagingServiceStub)  # type: ignore[assignment]

    definition = from_dict(
        {
            "trigger": {"event": {"name": "Cart Viewed"}},
            "steps": [
                {
                    "id": "nudge",
                    "send_sms": {
                        "body": 'Hi {{contact.first_name|default:"there"}}, cart {{event.cart_id}} is waiting.'
                    },
                }
            ],
        },
        camp_pb.CampaignDefinition(),
        "definition",
    )
    created = await campaigns.CreateCampaign(
        camp_pb.CreateCampaignRequest(campaign=camp_pb.Campaign(name="cart nudge", definition=definition)), metadata=md
    )
    await campaigns.PublishCampaign(camp_pb.PublishCampaignRequest(campaign_id=created.campaign.id), metadata=md)

    http_port = platform.ingest.runtime.state["http_port"]
    basic = "Basic " + base64.b64encode(f"{key}:".encode()).decode()  # the SDK way: key as username
    async with aiohttp.ClientSession(headers={"Authorization": basic}) as http:
        identify = {"userId": user, "traits": {"phone": phone, "first_name": "Ada", "sms_opt_in": True}}
        async with http.post(f"http://127.0.0.1:{http_port}/v1/identify", json=identify) as resp:
            assert resp.status == 200, await resp.text()

        async def opted_in() -> bool:
            reply = await messaging.GetConsent(msg_pb.GetConsentRequest(phone=phone), metadata=md)
            return any(c.channel == msg_pb.CHANNEL_SMS and c.subscribed for c in reply.consents)

        await eventually(opted_in, "the opt-in from identify traits to reach messaging")

        track = {"userId": user, "event": "Cart Viewed", "properties": {"cart_id": "c-77"}}
        async with http.post(f"http://127.0.0.1:{http_port}/v1/track", json=track) as resp:
            assert resp.status == 200, await resp.text()

    async def sent() -> bool:
        return len(platform.twilio.to(phone)) >= 1

    await eventually(sent, "the SMS to reach the provider")
    assert [r.body for r in platform.twilio.to(phone)] == ["Hi Ada, cart c-77 is waiting."]

    contact = (await identity.GetContact(id_pb.GetContactRequest(phone=phone), metadata=md)).contact

    async def outcomes_in_timeline() -> bool:
        events = await identity.ListContactEvents(
            id_pb.ListContactEventsRequest(contact_id=contact.id, page_size=100), metadata=md
        )
        names = {e.event.name for e in events.events}
        return {"Cart Viewed", "SMS Sent", "SMS Delivered"} <= names

    await eventually(outcomes_in_timeline, "SMS Sent and SMS Delivered in the contact's timeline")
    messages = await messaging.ListMessages(msg_pb.ListMessagesRequest(contact_id=contact.id), metadata=md)
    outbound = [m for m in messages.messages if m.direction == msg_pb.MESSAGE_DIRECTION_OUTBOUND]
    assert [m.status for m in outbound] == [msg_pb.MESSAGE_STATUS_DELIVERED]
    # Exactly one send, however the loops raced.
    await asyncio.sleep(0.5)
    assert len(platform.twilio.to(phone)) == 1
