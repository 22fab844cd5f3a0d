"""The dispatcher: leases due messages (SKIP LOCKED), rechecks opt-out, rate-limits, calls the provider."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections import defaultdict
from datetime import datetime, timedelta

import asyncpg
import structlog

from services.common.phones import time_zone_of
from services.messaging import outcomes as oc
from services.messaging import repository as repo
from services.messaging.app import Messaging
from services.messaging.providers import ACCEPTED, FAILED, OutboundSms, SendResult
from services.messaging.repository import DispatchResult
from services.messaging.status import BLOCKED, QUEUED, SENT, advances
from services.messaging.window import next_send_time

log = structlog.get_logger(__name__)


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random; at least the provider's Retry-After."""
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    return max(delay, retry_after or 0.0)


class Dispatcher:
    def __init__(self, app: Messaging) -> None:
        self.app = app

    async def run(self) -> None:
        """Dispatch until cancelled; sleeps when idle until woken or the poll interval passes."""
        while True:
            try:
                handled = await self.dispatch_once()
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("dispatch_failed", error=repr(exc))
                handled = 0
                await asyncio.sleep(1.0)
            if handled == 0:
                self.app.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.app.wakeup.wait(), self.app.tuning.poll_seconds)

    async def dispatch_once(self) -> int:
        """One round: lease a batch, hand the allowed ones to the provider, record every outcome."""
        app, tuning = self.app, self.app.tuning
        now = app.clock.now()
        blocked: list[DispatchResult] = []
        sendable: list[asyncpg.Record] = []
        async with app.pool.acquire() as conn, conn.transaction():
            rows = await repo.claim_due(conn, now, tuning.dispatch_batch, tuning.lease_seconds)
            if not rows:
                return 0
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
                policy = await app.policy(ws)
                # The window is checked again at hand-off: a retry or a rate-limited wait may have
                # carried a message past its window's end. It waits for the next start.
                open_now = []
                for row in group:
                    due = next_send_time(
                        now,
                        row["time_zone"] or time_zone_of(row["phone"], "UTC"),
                        policy.send_window_start,
                        policy.send_window_end,
                    )
                    if due is None:
                        open_now.append(row)
                    else:
                        closed.append((ws, str(row["id"]), due))
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
        if sendable:
            await self._send(sendable)
        if blocked:
            app.wake_outbox()
        return len(rows)

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
