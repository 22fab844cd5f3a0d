"""SubscribeEvents: resume from a cursor without loss or repeats, gap safety, live delivery, scoping."""

from __future__ import annotations

import asyncio
import base64

import asyncpg
import grpc
import pytest
from parley.identity.v1 import identity_service_pb2 as ipb

from services.common.db import create_pool
from services.identity import record, repository, servicer, stream
from services.identity.tokens import Cursor
from tests.identity.conftest import Identity, Tenant, identify, page, track, uid

# Only a guard against a hung test; the stream itself delivers within milliseconds.
HANG_GUARD = 20.0


async def read_events(call: grpc.aio.UnaryStreamCall, count: int) -> tuple[list[ipb.StoredEvent], str]:
    """Read responses until ``count`` events arrived; the events and the last cursor."""
    events: list[ipb.StoredEvent] = []
    cursor = ""
    while len(events) < count:
        response = await asyncio.wait_for(call.read(), HANG_GUARD)
        assert response is not grpc.aio.EOF
        events.extend(response.events)
        cursor = response.cursor
    return events, cursor


def subscribe(identity: Identity, md: tuple[tuple[str, str], ...], cursor: str = "", batch_size: int = 0):  # type: ignore[no-untyped-def]
    return identity.stub.SubscribeEvents(ipb.SubscribeEventsRequest(cursor=cursor, batch_size=batch_size), metadata=md)


async def test_backlog_then_live_then_resume_without_loss_or_repeats(identity: Identity, tenant: Tenant) -> None:
    user = uid()
    first = [track(f"E{i}", user_id=user) for i in range(5)]
    await identity.record(tenant, *first)
    call = subscribe(identity, tenant.md, batch_size=2)
    got, _ = await read_events(call, 2)
    assert [e.event.message_id for e in got] == [e.message_id for e in first[:2]]
    resume_at = (await call.read()).cursor  # after the first four
    call.cancel()

    more = [track(f"F{i}", user_id=user) for i in range(3)]
    await identity.record(tenant, *more)
    call = subscribe(identity, tenant.md, cursor=resume_at)
    got, cursor = await read_events(call, 4)
    assert [e.event.message_id for e in got] == [e.message_id for e in [*first[4:], *more]]
    assert all(e.workspace_id == tenant.workspace.id for e in got)
    seqs = [e.sequence for e in got]
    assert seqs == sorted(seqs)

    # Live: a batch committed while the subscriber waits reaches it without a reconnect.
    live = identify({"phone": "+14155552671"}, user_id=user, phone="+14155552671")
    await identity.record(tenant, live)
    got, cursor = await read_events(call, 1)
    assert [e.event.message_id for e in got] == [live.message_id]
    assert got[0].contact_id
    call.cancel()

    # Resuming from the very last cursor yields nothing old: the next thing read is new.
    call = subscribe(identity, tenant.md, cursor=cursor)
    newest = track("After Resume", user_id=user)
    await identity.record(tenant, newest)
    got, _ = await read_events(call, 1)
    assert [e.event.message_id for e in got] == [newest.message_id]
    call.cancel()


async def test_events_stream_with_the_contact_they_had_at_commit(identity: Identity, tenant: Tenant) -> None:
    anon = uid("anon")
    before = page("Home", anonymous_id=anon)
    await identity.record(tenant, before)
    phone = identify({"phone": "+14155552671"}, anonymous_id=anon, phone="+14155552671")
    contact_id = (await identity.record(tenant, phone)).results[0].contact_id
    call = subscribe(identity, tenant.md)
    got, _ = await read_events(call, 2)
    call.cancel()
    assert [(e.event.message_id, e.contact_id) for e in got] == [
        (before.message_id, ""),
        (phone.message_id, contact_id),
    ]
    timeline = await identity.stub.ListContactEvents(
        ipb.ListContactEventsRequest(contact_id=contact_id), metadata=tenant.md
    )
    assert {e.contact_id for e in timeline.events} == {contact_id} and len(timeline.events) == 2


async def test_an_event_committed_after_a_later_numbered_one_is_still_delivered(
    identity: Identity, tenant: Tenant
) -> None:
    held, quick = track("Held Open", user_id=uid()), track("Committed First", user_id=uid())
    call = subscribe(identity, tenant.md)
    pool = await create_pool(identity.db_url, max_size=2)
    try:
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                await record.record_events(conn, tenant.workspace.id, [held])
                held_seq = await conn.fetchval(
                    "SELECT seq FROM identity.events WHERE workspace_id = $1::uuid AND message_id = $2",
                    tenant.workspace.id,
                    held.message_id,
                )
                await identity.record(tenant, quick)  # commits while `held` is still open
                quick_seq = await pool.fetchval(
                    "SELECT seq FROM identity.events WHERE workspace_id = $1::uuid AND message_id = $2",
                    tenant.workspace.id,
                    quick.message_id,
                )
                # Numbering alone would deliver `quick` now and skip `held` for ever.
                assert held_seq < quick_seq
                async with pool.acquire() as reader:
                    rows, held_back = await repository.stream_page(reader, tenant.workspace.id, Cursor(), 100)
                assert rows == [] and held_back
            except BaseException:
                await tx.rollback()
                raise
            await tx.commit()
        got, _ = await read_events(call, 2)
        assert [e.event.message_id for e in got] == [held.message_id, quick.message_id]
    finally:
        call.cancel()
        await pool.close()


async def test_an_open_transaction_that_writes_no_events_does_not_hold_the_stream_back(
    identity: Identity, tenant: Tenant
) -> None:
    other = await asyncpg.connect(identity.db_url)
    call = subscribe(identity, tenant.md)
    try:
        async with other.transaction():
            await other.fetchval("SELECT pg_current_xact_id()")  # an older open transaction with an xid
            quick = track("While Another Transaction Is Open", user_id=uid())
            await identity.record(tenant, quick)
            got, _ = await read_events(call, 1)
            assert [e.event.message_id for e in got] == [quick.message_id]
    finally:
        call.cancel()
        await other.close()


async def test_workspace_keys_stream_only_their_workspace_and_internal_callers_see_all(
    identity: Identity, tenant: Tenant, make_workspace
) -> None:  # type: ignore[no-untyped-def]
    other = await identity.tenant(make_workspace)
    mine, theirs = track("Mine", user_id=uid()), track("Theirs", user_id=uid())
    await identity.record(other, theirs)
    await identity.record(tenant, mine)
    call = subscribe(identity, tenant.md)
    got, _ = await read_events(call, 1)
    call.cancel()
    assert [e.event.message_id for e in got] == [mine.message_id]

    everything = subscribe(identity, identity.internal_md, batch_size=1000)
    seen: dict[str, str] = {}
    while not {mine.message_id, theirs.message_id} <= seen.keys():
        response = await asyncio.wait_for(everything.read(), HANG_GUARD)
        seen.update({e.event.message_id: e.workspace_id for e in response.events})
    everything.cancel()
    assert seen[mine.message_id] == tenant.workspace.id and seen[theirs.message_id] == other.workspace.id


async def test_a_commit_wakes_only_its_workspaces_subscribers(
    identity: Identity, tenant: Tenant, make_workspace, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Each wake-up costs the subscriber a page query: commits elsewhere must not cost it one.
    monkeypatch.setattr(stream, "IDLE_CHECK_SECONDS", 60.0)  # no safety-net re-check in the test's time
    other = await identity.tenant(make_workspace)
    pages: dict[str | None, int] = {}
    real_page = repository.stream_page

    async def counted(conn, workspace_id, cursor, size):  # type: ignore[no-untyped-def]
        pages[workspace_id] = pages.get(workspace_id, 0) + 1
        return await real_page(conn, workspace_id, cursor, size)

    await identity.record(tenant, track("Before", user_id=uid()))
    quiet = subscribe(identity, tenant.md)
    await read_events(quiet, 1)  # the backlog read: now it waits
    busy = subscribe(identity, other.md)
    everything = subscribe(identity, identity.internal_md, batch_size=1000)
    await asyncio.wait_for(everything.read(), HANG_GUARD)
    await asyncio.sleep(0.2)
    monkeypatch.setattr(repository, "stream_page", counted)
    for i in range(5):
        await identity.record(other, track(f"Theirs{i}", user_id=uid()))
    await read_events(busy, 5)
    await asyncio.sleep(0.3)
    for call in (quiet, busy, everything):
        call.cancel()
    assert pages.get(tenant.workspace.id, 0) == 0
    assert pages.get(other.workspace.id, 0) >= 1 and pages.get(None, 0) >= 1


def _raw_cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def test_bad_cursor_and_batch_size(identity: Identity, tenant: Tenant) -> None:
    from services.common.errors import field_violations

    for request, field in (
        (ipb.SubscribeEventsRequest(cursor="not-a-cursor"), "cursor"),
        # Well formed, but past what xid8 and bigint hold.
        (ipb.SubscribeEventsRequest(cursor=_raw_cursor(f"v1:{2**64}:0")), "cursor"),
        (ipb.SubscribeEventsRequest(cursor=_raw_cursor(f"v1:1:{2**63}")), "cursor"),
        # Ahead of every transaction of this database (another database's, or one from before a
        # restore): it would skip every new event until the counter caught up.
        (ipb.SubscribeEventsRequest(cursor=_raw_cursor(f"v1:{2**40}:0")), "cursor"),
        (ipb.SubscribeEventsRequest(batch_size=1001), "batch_size"),
        (ipb.SubscribeEventsRequest(batch_size=-1), "batch_size"),
    ):
        call = identity.stub.SubscribeEvents(request, metadata=tenant.md)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), HANG_GUARD)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in await field_violations(info.value)] == [field]


async def test_pages_of_large_events_stay_under_the_payload_budget(
    identity: Identity, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A page of up to 1,000 events of up to 32 KiB each would pass gRPC's 16 MiB message limit:
    # pages end at the payload budget (made small here), and paging goes on from there.
    monkeypatch.setattr(repository, "MAX_PAGE_PAYLOAD_BYTES", 10_000)
    user, phone = uid(), "+14155550155"
    events = [identify({"phone": phone}, user_id=user, phone=phone)]
    events += [track(f"Big{i}", user_id=user, properties={"blob": "x" * 3_000}) for i in range(9)]
    contact_id = (await identity.record(tenant, *events)).results[0].contact_id
    call = subscribe(identity, tenant.md, batch_size=1000)
    seen: list[str] = []
    sizes: list[int] = []
    while len(seen) < len(events):
        response = await asyncio.wait_for(call.read(), HANG_GUARD)
        sizes.append(len(response.events))
        seen.extend(e.event.message_id for e in response.events if e.event.user_id == user)
    call.cancel()
    assert sorted(seen) == sorted(e.message_id for e in events)
    assert max(sizes) <= 4 and len(sizes) >= 3  # ~3 KB each: at most three over 10,000 bytes, plus one
    timeline: list[str] = []
    token = ""
    pages = 0
    while True:
        got = await identity.stub.ListContactEvents(
            ipb.ListContactEventsRequest(contact_id=contact_id, page_size=1000, page_token=token), metadata=tenant.md
        )
        timeline.extend(e.event.message_id for e in got.events)
        pages += 1
        if not (token := got.next_page_token):
            break
    assert sorted(timeline) == sorted(e.message_id for e in events) and pages >= 3
    assert len(set(timeline)) == len(timeline)
    user_view = await identity.stub.GetUser(ipb.GetUserRequest(user_id=user, event_limit=1000), metadata=tenant.md)
    assert 1 <= len(user_view.events) < len(events)  # the newest, within one response's budget


async def test_streams_per_workspace_are_capped(
    identity: Identity,
    make_workspace,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    # Each open stream reads a page on every commit of its workspace: one key must not open
    # thousands. The cap is per workspace (made small here); closing a stream frees its place.
    monkeypatch.setattr(servicer, "MAX_STREAMS_PER_WORKSPACE", 2)
    tenant = await identity.tenant(make_workspace)
    other = await identity.tenant(make_workspace)
    await identity.record(tenant, track(user_id=uid()))
    await identity.record(other, track(user_id=uid()))
    open_calls = [subscribe(identity, tenant.md) for _ in range(2)]
    for call in open_calls:
        await read_events(call, 1)
    refused = subscribe(identity, tenant.md)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(refused.read(), HANG_GUARD)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 2 SubscribeEvents streams" in (err.value.details() or "")
    # Another workspace has its own.
    elsewhere = subscribe(identity, other.md)
    await read_events(elsewhere, 1)
    elsewhere.cancel()
    open_calls.pop().cancel()
    for _ in range(200):  # the server ends the cancelled stream a moment later
        again = subscribe(identity, tenant.md)
        try:
            await read_events(again, 1)
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.02)
    else:
        raise AssertionError("a cancelled stream's place was never freed")
    again.cancel()
    open_calls[0].cancel()
