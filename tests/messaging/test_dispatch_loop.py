"""The background dispatcher survives a failing claim, and a stop records what is at the provider."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from parley.messaging.v1 import messaging_service_pb2 as pb

from services.messaging import repository as repo
from services.messaging.app import Tuning
from tests.messaging.conftest import Stack, StackFactory


def live_tuning() -> Tuning:
    """The dispatcher runs by itself; no identity stream (identity is not started here)."""
    return Tuning(
        backoff_base=0.0, backoff_cap=0.0, poll_seconds=0.05, policy_cache_seconds=0.0, consume_identity_stream=False
    )


async def eventually(check: Callable[[], Awaitable[Any]], what: str, seconds: float = 10.0) -> Any:
    for _ in range(int(seconds / 0.05)):
        if result := await check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def sent(stack: Stack, message_id: str) -> bool:
    return (await stack.get(message_id)).status == pb.MESSAGE_STATUS_SENT


async def test_an_unexpected_claim_error_does_not_stop_dispatch(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack(live_tuning)
    real = repo.claim_due
    failed: list[int] = []

    async def claim_due(*args: Any, **kwargs: Any) -> list[asyncpg.Record]:
        rows = await real(*args, **kwargs)
        if rows and not failed:
            # After leasing: the claim's transaction must give its leases back.
            failed.append(len(rows))
            raise RuntimeError("a bug in the claim")
        return rows

    monkeypatch.setattr(repo, "claim_due", claim_due)
    try:
        await stack.opt_in("+12125550301")
        await stack.opt_in("+12125550302")
        first = await stack.send(request_id="claim-bug-1", phone="+12125550301", body="first")
        # Sent after the pause, well before its 60 s lease would have lapsed.
        await eventually(lambda: sent(stack, first.id), "the message whose claim failed is sent")
        second = await stack.send(request_id="claim-bug-2", phone="+12125550302", body="second")
        await eventually(lambda: sent(stack, second.id), "the next message is sent")
    finally:
        # Its background dispatcher would otherwise claim the later tests' messages (one database).
        await stack.server.stop(0)
    assert failed == [1]
    assert len(stack.twilio.to("+12125550301")) == 1
    assert len(stack.twilio.to("+12125550302")) == 1


async def test_stop_records_a_send_in_flight(make_stack: StackFactory, db_url: str) -> None:
    stack = await make_stack(live_tuning)
    gate = stack.twilio.answer_gate = asyncio.Event()
    await stack.opt_in("+12125550303")
    msg = await stack.send(request_id="in-flight", phone="+12125550303", body="in flight")
    await eventually(lambda: asyncio.sleep(0, stack.twilio.to("+12125550303")), "the provider has the message")
    stopping = asyncio.create_task(stack.server.stop(0))
    await asyncio.sleep(0.3)
    assert not stopping.done()  # waiting for the provider's answer, not cancelling the send
    gate.set()
    await asyncio.wait_for(stopping, 10)
    [received] = stack.twilio.to("+12125550303")
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow(
            "SELECT status, provider_message_id FROM messaging.messages WHERE id = $1::uuid", msg.id
        )
    finally:
        await conn.close()
    assert (row["status"], row["provider_message_id"]) == ("sent", received.sid)


async def test_a_bad_stored_time_zone_falls_back_to_the_phones(stack: Stack) -> None:
    await stack.opt_in("+12125550304")
    await stack.opt_in("+12125550305")
    # 22:00 UTC is 18:00 in New York: open there, closed in UTC.
    stack.app.clock.set(datetime(2026, 6, 15, 22, 0, tzinfo=UTC))
    try:
        bad = await stack.send(request_id="bad-zone", phone="+12125550304", body="bad zone")
        good = await stack.send(request_id="good-zone", phone="+12125550305", body="neighbour")
        await stack.app.pool.execute(
            "UPDATE messaging.messages SET time_zone = 'Mars/Olympus_Mons' WHERE id = $1::uuid", bad.id
        )
        await stack.drain()
    finally:
        stack.app.clock.set(datetime(2026, 6, 15, 16, 0, tzinfo=UTC))
    assert (await stack.get(bad.id)).status == pb.MESSAGE_STATUS_SENT
    assert (await stack.get(good.id)).status == pb.MESSAGE_STATUS_SENT
    assert len(stack.twilio.to("+12125550304")) == 1
    assert len(stack.twilio.to("+12125550305")) == 1


async def test_a_failing_policy_leaves_its_messages_leased(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    await stack.opt_in("+12125550306")
    msg = await stack.send(request_id="policy-bug", phone="+12125550306", body="later")

    async def broken(workspace_id: str) -> Any:
        raise ValueError("a bad stored policy")

    with monkeypatch.context() as patch:
        patch.setattr(stack.app, "policy", broken)
        assert await stack.drain() == 1  # claimed, not sent, and the claim did not fail
    assert (await stack.get(msg.id)).status == pb.MESSAGE_STATUS_QUEUED
    assert stack.twilio.to("+12125550306") == []
    assert await stack.drain() == 0  # still leased
    await stack.app.pool.execute(
        "UPDATE messaging.messages SET lease_until = now() - interval '1 second' WHERE id = $1::uuid", msg.id
    )
    await stack.drain()
    assert (await stack.get(msg.id)).status == pb.MESSAGE_STATUS_SENT
    assert len(stack.twilio.to("+12125550306")) == 1
