"""Invariant 4 as a property: any interleaving of STOP/START replies, sends and dispatches never
delivers to an opted-out contact."""

from __future__ import annotations

import itertools

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parley.messaging.v1 import messaging_service_pb2 as pb

from tests.messaging.conftest import Stack

OPS = st.sampled_from(
    ["STOP", "stop please", "please stop texting me", "START", "unstop", "send", "send_tx", "dispatch", "hello"]
)
_phones = itertools.count(1000)
_ids = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opted_in_first=st.booleans(), ops=st.lists(OPS, min_size=1, max_size=14))
async def test_never_delivers_to_an_opted_out_contact(stack: Stack, opted_in_first: bool, ops: list[str]) -> None:
    phone = f"+1212555{next(_phones):04d}"
    opted_out = False
    if opted_in_first:
        await stack.opt_in(phone)
    for op in [*ops, "dispatch"]:
        if op == "dispatch":
            before = len(stack.twilio.to(phone))
            await stack.drain()
            if opted_out:
                assert len(stack.twilio.to(phone)) == before, f"delivered to an opted-out contact after {ops}"
        elif op in ("send", "send_tx"):
            try:
                await stack.send(request_id=f"p-{next(_ids)}", phone=phone, body="hi", transactional=op == "send_tx")
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        else:
            status, _ = await stack.inbound(phone, op, f"SMprop{next(_ids)}")
            assert status == 200
            if op in ("STOP", "please stop texting me", "stop please"):
                opted_out = True
            elif op in ("START", "unstop"):
                opted_out = False
    consent = await stack.messaging.GetConsent(pb.GetConsentRequest(phone=phone), metadata=stack.md)
    recorded = {c.channel: c.subscribed for c in consent.consents}.get(pb.CHANNEL_SMS)
    assert recorded is (not opted_out) or (recorded is None and not opted_out)
