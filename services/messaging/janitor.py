"""Retention: webhook receipts and unmatched early statuses are kept only as long as they can matter."""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from services.messaging.app import Messaging

log = structlog.get_logger(__name__)

# Providers redeliver webhooks for hours, not weeks; an early status whose message never
# appeared within a day belongs to no message of ours.
RECEIPT_DAYS = 7
EARLY_STATUS_DAYS = 1


async def sweep(pool: asyncpg.Pool, batch: int = 10_000) -> int:
    """Delete expired rows in bounded batches; returns how many went."""
    removed = 0
    for sql, days in (
        (
            """DELETE FROM messaging.webhook_receipts WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM messaging.webhook_receipts
                 WHERE receive_time < now() - make_interval(days => $1) LIMIT $2))""",
            RECEIPT_DAYS,
        ),
        (
            """DELETE FROM messaging.early_statuses WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM messaging.early_statuses
                 WHERE receive_time < now() - make_interval(days => $1) LIMIT $2))""",
            EARLY_STATUS_DAYS,
        ),
    ):
        while True:
            status = await pool.execute(sql, days, batch)
            n = int(status.split()[-1])
            removed += n
            if n < batch:
                break
    return removed


async def run(app: Messaging, every_seconds: float = 3600.0) -> None:
    while True:
        try:
            removed = await sweep(app.pool)
            if removed:
                log.info("retention_sweep", removed=removed)
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("retention_sweep_failed", error=repr(exc))
        await asyncio.sleep(every_seconds)
