"""The messaging service's shared state: settings, pool, clock, provider, peers, policy cache, tuning."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from services.common.settings import Settings
from services.messaging import repository as repo
from services.messaging.clock import Clock
from services.messaging.gate import Policy
from services.messaging.identity_client import IdentityClient
from services.messaging.providers import Provider

DEFAULT_HELP_TEXT = "Reply STOP to unsubscribe, START to resubscribe. Msg & data rates may apply."


@dataclass
class Tuning:
    """Knobs of the background loops (tests shorten the backoff; benches widen the batches)."""

    dispatch_batch: int = 200
    # Batches at the provider at once per process: while they wait on it, the next is claimed.
    dispatch_workers: int = 4
    dispatch_concurrency: int = 200
    poll_seconds: float = 0.5
    lease_seconds: float = 60.0
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    max_attempts: int = 8
    outbox_batch: int = 500
    outbox_poll_seconds: float = 0.5
    # Run the dispatcher, outbox and identity-stream loops (tests may drive them by hand).
    background: bool = True
    consume_identity_stream: bool = True
    policy_cache_seconds: float = 2.0
    # Under concurrency, status callbacks wait this long to share a transaction with others
    # arriving meanwhile (Twilio waits seconds for an answer; a transaction's fixed cost is
    # most of the cost of a small batch). A lone callback does not wait, except the first
    # after a batch of several (see Coalescer.linger).
    status_linger_seconds: float = 0.01
    # The same for concurrent SendSms calls.
    send_linger_seconds: float = 0.003


@dataclass
class Messaging:
    settings: Settings
    pool: asyncpg.Pool
    internal_token: str
    provider: Provider
    identity: IdentityClient
    clock: Clock = field(default_factory=Clock)
    tuning: Tuning = field(default_factory=Tuning)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    outbox_wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _policies: dict[str, tuple[float, Policy]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def default_policy(self) -> Policy:
        s = self.settings
        return Policy(
            require_opt_in=True,
            help_text=DEFAULT_HELP_TEXT,
            send_window_start=s.send_window_start,
            send_window_end=s.send_window_end,
            rate_limit_per_second=s.workspace_rate_limit_per_second,
            daily_cap=s.contact_daily_cap,
        )

    async def policy(self, workspace_id: str) -> Policy:
        """The workspace's policy, cached briefly (updates on this replica apply at once)."""
        now = time.monotonic()
        hit = self._policies.get(workspace_id)
        if hit and hit[0] > now:
            return hit[1]
        row = await repo.get_policy(self.pool, workspace_id)
        policy = (
            self.default_policy()
            if row is None
            else Policy(
                require_opt_in=row["require_opt_in"],
                help_text=row["help_text"],
                send_window_start=row["send_window_start"],
                send_window_end=row["send_window_end"],
                rate_limit_per_second=row["rate_limit_per_second"],
                daily_cap=row["daily_cap"],
            )
        )
        self._policies[workspace_id] = (now + self.tuning.policy_cache_seconds, policy)
        return policy

    def forget_policy(self, workspace_id: str) -> None:
        self._policies.pop(workspace_id, None)

    def status_callback_url(self, workspace_id: str) -> str:
        return f"{self.settings.public_base_url.rstrip('/')}/twilio/status/{workspace_id}"

    def wake_dispatcher(self) -> None:
        self.wakeup.set()

    def wake_outbox(self) -> None:
        self.outbox_wakeup.set()
