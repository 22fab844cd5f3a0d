"""Status callbacks applied in batches: each once, each message only forward, outcomes with every move."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
from parley.messaging.v1 import messaging_service_pb2 as pb
from twilio.request_validator import RequestValidator

from services.messaging.inbound import StatusCallback, apply_callbacks, status_batcher
from tests.messaging.conftest import PUBLIC_BASE, Stack
from tests.messaging.twilio_standin import ACCOUNT_SID, AUTH_TOKEN


async def sent_messages(stack: Stack, prefix: str, phones: Sequence[str]) -> list[pb.Message]:
    msgs = []
    for n, phone in enumerate(phones):
        await stack.opt_in(phone)
        msgs.append(await stack.send(request_id=f"{prefix}-{n}", phone=phone, body=f"{prefix} {n}"))
    await stack.drain()
    out = [await stack.get(m.id) for m in msgs]
    assert all(m.status == pb.MESSAGE_STATUS_SENT and m.provider_message_id for m in out)
    return out


async def outbox_names(stack: Stack, message_ids: Sequence[str]) -> set[str]:
    rows = await stack.app.pool.fetch(
        "SELECT message_id FROM messaging.outbox WHERE workspace_id = $1 AND properties->>'message_id' = ANY($2)",
        stack.workspace.id,
        list(message_ids),
    )
    return {r["message_id"] for r in rows}


async def test_one_batch_applies_each_callback_once_and_only_forward(stack: Stack) -> None:
    phones = [f"+121255503{n:02d}" for n in range(6)]
    m = await sent_messages(stack, "batch", phones)
    sid = [x.provider_message_id for x in m]
    # Before the batch: message 4 delivered (token tok-b4), message 5 delivered.
    assert (await stack.status(sid[4], "delivered", token="tok-b4"))[0] == 200
    assert (await stack.status(sid[5], "delivered"))[0] == 200
    ws = stack.workspace.id
    batch = [
        StatusCallback(ws, sid[0], "delivered", "", "tok-b0"),
        StatusCallback(ws, sid[1], "delivered", "", ""),
        StatusCallback(ws, sid[2], "undelivered", "30003", ""),
        StatusCallback(ws, sid[3], "delivered", "", ""),
        StatusCallback(ws, sid[4], "delivered", "", "tok-b4"),  # redelivered from before
        StatusCallback(ws, sid[5], "sent", "", ""),  # late: message 5 is delivered
        StatusCallback(ws, sid[0], "delivered", "", "tok-b0"),  # redelivered within the batch
        StatusCallback(ws, sid[1], "sent", "", ""),  # out of order within the batch
        StatusCallback(ws, sid[3], "queued", "", ""),  # says nothing new
        StatusCallback(ws, "SM" + "f" * 32, "delivered", "", ""),  # not handed off yet
    ]
    before_4 = await stack.get(m[4].id)

    async def run(items: Sequence[StatusCallback]) -> list[str]:
        async with stack.app.pool.acquire() as conn, conn.transaction():
            return await apply_callbacks(stack.app, conn, items)

    results = await run(batch)
    assert results == [
        "delivered",
        "delivered",
        "undelivered",
        "delivered",
        "duplicate",
        "stale",
        "duplicate",
        "stale",
        "ignored",
        "early",
    ]
    got = [await stack.get(x.id) for x in m]
    assert [g.status for g in got] == [
        pb.MESSAGE_STATUS_DELIVERED,
        pb.MESSAGE_STATUS_DELIVERED,
        pb.MESSAGE_STATUS_UNDELIVERED,
        pb.MESSAGE_STATUS_DELIVERED,
        pb.MESSAGE_STATUS_DELIVERED,
        pb.MESSAGE_STATUS_DELIVERED,
    ]
    assert got[2].error_code == "30003"
    assert got[4] == before_4
    ids = [x.id for x in m[:4]]
    assert await outbox_names(stack, ids) >= {
        f"sms-delivered:{ids[0]}",
        f"sms-delivered:{ids[1]}",
        f"sms-failed:{ids[2]}",
        f"sms-delivered:{ids[3]}",
    }
    parked = await stack.app.pool.fetchval(
        "SELECT status FROM messaging.early_statuses WHERE workspace_id = $1 AND provider_message_id = $2",
        ws,
        "SM" + "f" * 32,
    )
    assert parked == "delivered"

    # The same batch again is a redelivery of every callback in it: nothing changes.
    outbox_before = await stack.app.pool.fetchval(
        "SELECT count(*) FROM messaging.outbox WHERE workspace_id = $1", stack.workspace.id
    )
    assert await run(batch) == ["duplicate"] * len(batch)
    assert [await stack.get(x.id) for x in m] == got
    assert (
        await stack.app.pool.fetchval("SELECT count(*) FROM messaging.outbox WHERE workspace_id = $1", ws)
        == outbox_before
    )


async def test_concurrent_callbacks_share_transactions_and_bad_signatures_change_nothing(stack: Stack) -> None:
    phones = [f"+121255504{n:02d}" for n in range(24)]
    m = await sent_messages(stack, "conc", phones)
    batcher = status_batcher(stack.app)
    handle = batcher._handle
    sizes: list[int] = []

    async def counting(conn: asyncpg.Connection, items: Sequence[StatusCallback]) -> Sequence[str]:
        sizes.append(len(items))
        return await handle(conn, items)

    batcher._handle = counting
    try:
        calls = [stack.status(x.provider_message_id, "delivered", token=f"tok-conc-{n}") for n, x in enumerate(m[:20])]
        calls.append(stack.status(m[0].provider_message_id, "delivered", token="tok-conc-0"))  # redelivery
        calls.append(stack.status(m[1].provider_message_id, "sent"))  # out of order
        calls += [stack.status(x.provider_message_id, "delivered", signature="bm90IGEgc2lnbmF0dXJl") for x in m[20:]]
        answers = await asyncio.gather(*calls)
    finally:
        batcher._handle = handle
    assert [a[0] for a in answers] == [200] * 22 + [403] * 4
    assert sum(sizes) == 22 and max(sizes) > 1  # concurrent callbacks shared a transaction
    got = [await stack.get(x.id) for x in m]
    assert [g.status for g in got] == [pb.MESSAGE_STATUS_DELIVERED] * 20 + [pb.MESSAGE_STATUS_SENT] * 4
    delivered = {f"sms-delivered:{x.id}" for x in m}
    assert await outbox_names(stack, [x.id for x in m]) & delivered == {f"sms-delivered:{x.id}" for x in m[:20]}


async def test_a_callback_that_beats_the_hand_off_yields_both_outcomes(stack: Stack) -> None:
    phone = "+12125550500"
    await stack.opt_in(phone)
    msg = await stack.send(request_id="beat-1", phone=phone, body="fast")
    next_sid = f"SM{len(stack.twilio.received) + 1:032x}"
    assert (await stack.status(next_sid, "delivered"))[0] == 200  # parked: the sid is not recorded yet
    await stack.drain()
    got = await stack.get(msg.id)
    assert (got.provider_message_id, got.status) == (next_sid, pb.MESSAGE_STATUS_DELIVERED)
    assert await outbox_names(stack, [msg.id]) == {f"sms-sent:{msg.id}", f"sms-delivered:{msg.id}"}
    left = await stack.app.pool.fetchval(
        "SELECT count(*) FROM messaging.early_statuses WHERE workspace_id = $1 AND provider_message_id = $2",
        stack.workspace.id,
        next_sid,
    )
    assert left == 0


async def test_a_burst_for_an_unknown_workspace_is_404_for_each(stack: Stack) -> None:
    unknown = "00000000-0000-0000-0000-00000000abcd"
    answers = await asyncio.gather(*(stack.status(f"SMu{n}", "delivered", workspace_id=unknown) for n in range(10)))
    assert [a[0] for a in answers] == [404] * 10
    assert (await stack.status("SMbad", "delivered", workspace_id="not-a-uuid"))[0] == 404


async def test_a_signature_over_the_url_with_its_default_port_still_verifies(stack: Stack) -> None:
    [msg] = await sent_messages(stack, "port", ["+12125550501"])
    path = f"/twilio/status/{stack.workspace.id}"
    params = {"MessageSid": msg.provider_message_id, "MessageStatus": "delivered", "AccountSid": ACCOUNT_SID}
    with_port = PUBLIC_BASE.replace("https://hooks.parley.test", "https://hooks.parley.test:443") + path
    assert with_port != PUBLIC_BASE + path
    signature = RequestValidator(AUTH_TOKEN).compute_signature(with_port, params)
    assert (await stack.webhook("status", params, signature=signature))[0] == 200
    assert (await stack.get(msg.id)).status == pb.MESSAGE_STATUS_DELIVERED
    # Signed for another port: refused.
    [other] = await sent_messages(stack, "port-bad", ["+12125550502"])
    params["MessageSid"] = other.provider_message_id
    signature = RequestValidator(AUTH_TOKEN).compute_signature(with_port.replace(":443", ":8443"), params)
    assert (await stack.webhook("status", params, signature=signature))[0] == 403
    assert (await stack.get(other.id)).status == pb.MESSAGE_STATUS_SENT
