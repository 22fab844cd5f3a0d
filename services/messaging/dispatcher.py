"""The dispatcher: leases due messages (SKIP LOCKED), rechecks opt-out, rate-limits, calls the provider."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections import defaultdict
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from services.common.phones import time_zone_of
from services.common.sendwindow import SendWindow, local_zone
from services.messaging import outcomes as oc
from services.messaging import repository as repo
from services.messaging.app import Messaging
from services.messaging.providers import ACCEPTED, FAILED, OutboundSms, SendResult
from services.messaging.repository import DispatchResult
from services.messaging.status import BLOCKED, QUEUED, SENT, advances

log = structlog.get_logger(__name__)


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random; at least the provider's Retry-After."""
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    return max(delay, retry_after or 0.0)


class Dispatcher:
    def __init__(self, app: Messaging) -> None:
        self.app = app
        self._senders: set[asyncio.Task[None]] = set()
        # Set when a sender finishes or a stop is asked for: the claimer may go on.
        self._kick = asyncio.Event()
        self._stopping = asyncio.Event()
        self._claimer_done = asyncio.Event()
        self._running = False

    async def run(self) -> None:
        """Claim due batches until stopped, with up to ``dispatch_workers`` batches at the provider at once.

        One claimer per process: woken by a new send (or every poll interval), it leases what is
        due and hands it to a sender task. While every sender is busy, due messages wait and the
        next claim takes them together, so batches grow with the load; an idle process answers a
        lone send at once. (One claimer, not one per sender, so a wake-up costs one claim.)

        A failed claim, whatever the error, is logged and retried after a pause: its transaction
        rolled back, so what it leased is due again. Batches at the provider are never cancelled
        while the grace lasts (``stop``, or this task's cancellation, waits for them): a message
        the provider accepted is recorded as sent, not leased again and sent twice.
        """
        app, tuning = self.app, self.app.tuning
        self._running = True
        self._claimer_done.clear()
        try:
            while not self._stopping.is_set():
                if len(self._senders) >= tuning.dispatch_workers:
                    self._kick.clear()
                    await self._kick.wait()
                    continue
                app.wakeup.clear()
                try:
                    claimed, sendable = await self._claim()
                except (asyncpg.PostgresError, OSError) as exc:
                    log.warning("dispatch_failed", error=repr(exc))
                    await self._pause(1.0)
                    continue
                except Exception as exc:
                    # A bug (policy, zone, ...) must not end dispatch for the whole process.
                    log.exception("dispatch_claim_failed", error=repr(exc))
                    await self._pause(1.0)
                    continue
                if sendable:
                    task = asyncio.create_task(self._send_logged(sendable))
                    self._senders.add(task)
                    task.add_done_callback(self._sender_done)
                if claimed == 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(app.wakeup.wait(), tuning.poll_seconds)
        finally:
            self._running = False
            self._claimer_done.set()
            # Cancelled without ``stop`` (or stopped): the batches at the provider still get recorded.
            await self._drain(self.app.settings.grace_seconds)

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming, then wait up to ``grace`` seconds for the batches at the provider to be recorded.

        What is still at the provider after that is cancelled; its leases lapse and it goes again.
        """
        grace = self.app.settings.grace_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self._stopping.set()
        self._kick.set()
        self.app.wakeup.set()
        if self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._claimer_done.wait(), grace)
        await self._drain(max(0.0, deadline - loop.time()))

    async def _drain(self, grace: float) -> None:
        pending = set(self._senders)
        try:
            if pending:
                _, pending = await asyncio.wait(pending, timeout=grace)
        finally:
            if pending:
                log.warning("dispatch_batches_abandoned", batches=len(pending))
                for task in pending:
                    task.cancel()

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        self._senders.discard(task)
        self._kick.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("dispatch_send_failed", error=repr(exc))

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless a stop is asked for meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def dispatch_once(self) -> int:
        """One round, start to end: lease a batch, hand the allowed ones to the provider, record every outcome."""
        claimed, sendable = await self._claim()
        if sendable:
            await self._send(sendable)
        return claimed

    async def _claim(self) -> tuple[int, list[asyncpg.Record]]:
        """Lease due messages; block the opted-out, hold back the rate-limited and the out-of-window.

        Returns how many were leased, and those to hand to the provider now.
        """
        app, tuning = self.app, self.app.tuning
        now = app.clock.now()
        blocked: list[DispatchResult] = []
        sendable: list[asyncpg.Record] = []
        async with app.pool.acquire() as conn, conn.transaction():
            rows = await repo.claim_due(conn, now, tuning.dispatch_batch, tuning.lease_seconds)
            if not rows:
                return 0, []
            by_ws: dict[str, list[asyncpg.Record]] = defaultdict(list)
            for row in rows:
                if row["sms_subscribed"] is False:
                    # Opted out after it was queued: the gate's answer holds at hand-off too.
                    blocked.append(
                        DispatchResult(
                            str(row["workspace_id"]),
                            str(row["id"]),
                            BLOCKED,
                            "",
                            "opted_out",
                            "the contact opted out of SMS",
                            None,
                        )
                    )
                else:
                    by_ws[str(row["workspace_id"])].append(row)
            later: list[tuple[str, str, datetime]] = []
            closed: list[tuple[str, str, datetime]] = []
            for ws, group in list(by_ws.items()):
                # The window is checked again at hand-off: a retry or a rate-limited wait may have
                # carried a message past its window's end. It waits for the next start.
                open_now = []
                try:
                    policy = await app.policy(ws)
                    window = SendWindow.parse(policy.send_window_start, policy.send_window_end)
                    for row in group:
                        due = window.next_opening(now, _zone(row))
                        if due is None:
                            open_now.append(row)
                        else:
                            closed.append((ws, str(row["id"]), due))
                except Exception as exc:
                    # One workspace's bad policy must not hold up the others: its messages stay
                    # leased and go again when the lease lapses.
                    log.exception("dispatch_workspace_failed", workspace_id=ws, messages=len(group), error=repr(exc))
                    continue
                group = by_ws[ws] = open_now
                rate = policy.rate_limit_per_second
                granted = await repo.take_tokens(conn, ws, rate, len(group)) if group else 0
                sendable.extend(group[:granted])
                for i, row in enumerate(group[granted:]):
                    later.append((ws, str(row["id"]), now + timedelta(seconds=(i + 1) / rate)))
            await repo.release(conn, later)
            await repo.reschedule(conn, closed)
            if blocked:
                moved = await repo.record_results(conn, blocked, now)
                await repo.add_outcomes(conn, _outcomes(moved, now))
        if blocked:
            app.wake_outbox()
        return len(rows), sendable

    async def _send_logged(self, rows: list[asyncpg.Record]) -> None:
        try:
            await self._send(rows)
        except (asyncpg.PostgresError, OSError) as exc:
            # The results are not recorded; the leases lapse and the messages go again.
            log.warning("dispatch_record_failed", error=repr(exc), messages=len(rows))

    async def _send(self, rows: list[asyncpg.Record]) -> None:
        app, tuning = self.app, self.app.tuning
        limit = asyncio.Semaphore(tuning.dispatch_concurrency)

        async def one(row: asyncpg.Record) -> SendResult:
            async with limit:
                sms = OutboundSms(
                    str(row["id"]), row["phone"], row["body"], app.status_callback_url(str(row["workspace_id"]))
                )
                try:
                    return await app.provider.send(sms)
                except Exception as exc:
                    log.exception("provider_error", message_id=sms.message_id)
                    return SendResult("retry", error_code="provider_error", error_message=type(exc).__name__)

        sent = await asyncio.gather(*(one(r) for r in rows))
        now = app.clock.now()
        results: list[DispatchResult] = []
        for row, res in zip(rows, sent, strict=True):
            ws, mid, attempt = str(row["workspace_id"]), str(row["id"]), row["attempts"] + 1
            if res.outcome == ACCEPTED:
                results.append(DispatchResult(ws, mid, SENT, res.provider_message_id, "", "", None))
            elif res.outcome == FAILED or attempt >= tuning.max_attempts:
                results.append(DispatchResult(ws, mid, "failed", "", res.error_code, res.error_message, None))
            else:
                delay = backoff_delay(attempt, tuning.backoff_base, tuning.backoff_cap, res.retry_after)
                due = now + timedelta(seconds=delay)
                results.append(DispatchResult(ws, mid, QUEUED, "", res.error_code, res.error_message, due))
                log.info(
                    "sms_retry", message_id=mid, attempt=attempt, error_code=res.error_code, delay_s=round(delay, 3)
                )
        async with app.pool.acquire() as conn, conn.transaction():
            sids = [(r.workspace_id, r.provider_message_id) for r in results if r.provider_message_id]
            await repo.lock_provider_ids(conn, sids)
            # Callbacks that beat this record (a fast provider) were parked; the furthest status
            # of each message is recorded with its acceptance, in the same statement.
            early: dict[tuple[str, str], tuple[str, str]] = {}
            for e in await repo.take_early_statuses(conn, sids):
                key = (str(e["workspace_id"]), e["provider_message_id"])
                if key not in early or advances(early[key][0], e["status"]):
                    early[key] = (e["status"], e["error_code"])
            if early:
                results = [_with_early(r, early.get((r.workspace_id, r.provider_message_id))) for r in results]
            moved = await repo.record_results(conn, results, now)
            await repo.add_outcomes(conn, _outcomes(moved, now))
        app.wake_outbox()


def _zone(row: asyncpg.Record) -> ZoneInfo:
    """The message's time zone; a stored zone that does not load gives way to the phone's (or UTC)."""
    stored = row["time_zone"]
    zone = local_zone(stored, time_zone_of(row["phone"], ""))
    if stored and zone.key != stored:
        log.warning("bad_time_zone", message_id=str(row["id"]), time_zone=stored)
    return zone


def _with_early(result: DispatchResult, early: tuple[str, str] | None) -> DispatchResult:
    """An accepted hand-off's result carried forward to the status its provider already reported."""
    if early is None or not advances(result.status, early[0]):
        return result
    status, code = early
    return dataclasses.replace(result, status=status, error_code=code or result.error_code)


def _outcomes(moved: list[asyncpg.Record], now: datetime) -> list[oc.Outcome]:
    """The outcomes of recorded results: each status a message passed, so "SMS Sent" comes before
    "SMS Delivered" even when both are recorded at once."""
    out = []
    for row in moved:
        if row["status"] == row["old_status"]:
            continue
        steps = [row["status"]]
        if row["provider_message_id"] and advances(SENT, row["status"]) and advances(row["old_status"], SENT):
            steps.insert(0, SENT)
        for status in steps:
            o = oc.message_outcome(row, status, now)
            if o is not None:
                out.append(o)
    return out
