"""Fixtures: a messaging server wired to a local Twilio stand-in, with a workspace and a test clock."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import grpc
import pytest
from parley.messaging.v1 import agent_service_pb2_grpc as agrpc
from parley.messaging.v1 import messaging_service_pb2 as pb
from parley.messaging.v1 import messaging_service_pb2_grpc as mgrpc
from twilio.request_validator import RequestValidator

from services.common.clients import key_metadata
from services.common.context import Workspace
from services.common.server import RunningServer, start
from services.messaging.app import Messaging, Tuning
from services.messaging.dispatcher import Dispatcher
from services.messaging.module import build_module
from services.messaging.outbox import OutboxDeliverer
from tests.helpers import test_settings
from tests.messaging.twilio_standin import ACCOUNT_SID, AUTH_TOKEN, TwilioStandIn

PUBLIC_BASE = "https://hooks.parley.test"
FROM_NUMBER = "+15005550006"
# Noon in New York: inside the default 08:00-21:00 window for +1 212 numbers.
NOON_NY = datetime(2026, 6, 15, 16, 0, tzinfo=UTC)
# A port nothing listens on: peers that are not started fail fast instead of reaching a stranger.
NOWHERE = "127.0.0.1:9"


def manual_tuning() -> Tuning:
    """No background loops: tests drive the dispatcher and outbox, so every step is deterministic."""
    return Tuning(background=False, backoff_base=0.0, backoff_cap=0.0, poll_seconds=0.05, policy_cache_seconds=0.0)


@dataclasses.dataclass
class Stack:
    server: RunningServer
    twilio: TwilioStandIn
    workspace: Workspace
    key: str
    channel: grpc.aio.Channel
    http: aiohttp.ClientSession

    @property
    def app(self) -> Messaging:
        return self.server.runtime.state["app"]

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return key_metadata(self.key)

    @property
    def messaging(self) -> mgrpc.MessagingServiceStub:
        return mgrpc.MessagingServiceStub(self.channel)

    @property
    def agents(self) -> agrpc.AgentServiceStub:
        return agrpc.AgentServiceStub(self.channel)

    @property
    def http_port(self) -> int:
        return int(self.server.runtime.state["http_port"])

    async def send(self, **fields: Any) -> pb.Message:
        resp = await self.messaging.SendSms(pb.SendSmsRequest(**fields), metadata=self.md, timeout=10)
        return resp.message

    async def get(self, message_id: str) -> pb.Message:
        return (await self.messaging.GetMessage(pb.GetMessageRequest(message_id=message_id), metadata=self.md)).message

    async def drain(self) -> int:
        """Run the dispatcher until nothing is due; the number of messages handled."""
        dispatcher: Dispatcher = self.server.runtime.state["dispatcher"]
        total = 0
        while (n := await dispatcher.dispatch_once()) > 0:
            total += n
        return total

    async def flush_outbox(self) -> int:
        outbox: OutboxDeliverer = self.server.runtime.state["outbox"]
        total = 0
        for _ in range(20):
            n = await outbox.deliver_once()
            if n == 0:
                break
            total += n
        return total

    async def webhook(
        self,
        kind: str,
        params: dict[str, str],
        *,
        signature: str | None = "good",
        token: str | None = None,
        workspace_id: str | None = None,
    ) -> tuple[int, str]:
        """POST a Twilio-style webhook ("status" or "inbound"), signed for the public URL."""
        path = f"/twilio/{kind}/{workspace_id or self.workspace.id}"
        headers = {}
        if signature == "good":
            headers["X-Twilio-Signature"] = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC_BASE + path, params)
        elif signature is not None:
            headers["X-Twilio-Signature"] = signature
        if token:
            headers["I-Twilio-Idempotency-Token"] = token
        async with self.http.post(f"http://127.0.0.1:{self.http_port}{path}", data=params, headers=headers) as resp:
            return resp.status, await resp.text()

    async def inbound(self, phone: str, body: str, sid: str, **kw: Any) -> tuple[int, str]:
        params = {
            "MessageSid": sid,
            "SmsSid": sid,
            "AccountSid": ACCOUNT_SID,
            "From": phone,
            "To": FROM_NUMBER,
            "Body": body,
            "NumMedia": "0",
            "NumSegments": "1",
        }
        return await self.webhook("inbound", params, **kw)

    async def status(self, sid: str, status: str, error_code: str = "", **kw: Any) -> tuple[int, str]:
        params = {
            "MessageSid": sid,
            "SmsSid": sid,
            "AccountSid": ACCOUNT_SID,
            "MessageStatus": status,
            "SmsStatus": status,
            "To": "+12125550100",
            "From": FROM_NUMBER,
            "ApiVersion": "2010-04-01",
        }
        if error_code:
            params["ErrorCode"] = error_code
        return await self.webhook("status", params, **kw)

    async def set_policy(self, **fields: Any) -> pb.MessagingPolicy:
        resp = await self.messaging.UpdateMessagingPolicy(
            pb.UpdateMessagingPolicyRequest(policy=pb.MessagingPolicy(**fields), update_mask={"paths": list(fields)}),
            metadata=self.md,
        )
        return resp.policy

    async def opt_in(self, phone: str) -> None:
        await self.messaging.SetConsent(
            pb.SetConsentRequest(consent=pb.Consent(phone=phone, channel=pb.CHANNEL_SMS, subscribed=True)),
            metadata=self.md,
        )


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture(scope="module")
async def make_stack(db_url: str, make_workspace: Any) -> AsyncIterator[StackFactory]:
    """Factory: a messaging server (own workspace) on the module's database, its Twilio stand-in and clients."""
    made: list[Stack] = []

    async def make(tuning: Callable[[], Tuning] = manual_tuning, **overrides: Any) -> Stack:
        twilio = await TwilioStandIn().start()
        settings = test_settings(
            db_url,
            sms_provider="twilio",
            twilio_account_sid=ACCOUNT_SID,
            twilio_auth_token=AUTH_TOKEN,
            twilio_from_number=FROM_NUMBER,
            twilio_api_base_url=twilio.base_url,
            public_base_url=PUBLIC_BASE,
            **{"identity_addr": NOWHERE, "ingest_addr": NOWHERE, **overrides},
        )
        server = await start(build_module(tuning), settings, port=0)
        ws, key = await make_workspace(db_url)
        stack = Stack(
            server, twilio, ws, key, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"), aiohttp.ClientSession()
        )
        stack.app.clock.set(NOON_NY)
        twilio.public_base = PUBLIC_BASE
        made.append(stack)
        return stack

    yield make
    for s in made:
        await s.http.close()
        await s.channel.close()
        await s.server.stop(0)
        await s.twilio.stop()


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()
