"""The compliance gate: the one decision every outbound SMS passes before it may reach a provider."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from services.common.sendwindow import SendWindow

OPTED_OUT = "opted_out"
NO_OPT_IN = "no_opt_in"
DAILY_CAP = "daily_cap"

REASONS = {
    OPTED_OUT: "the contact opted out of SMS",
    NO_OPT_IN: "the workspace requires an SMS opt-in and the contact has none",
    DAILY_CAP: "the contact's daily message cap is reached",
}


@dataclass(frozen=True)
class Policy:
    """A workspace's messaging policy (see MessagingPolicy in the proto)."""

    require_opt_in: bool
    help_text: str
    send_window_start: str
    send_window_end: str
    rate_limit_per_second: float
    daily_cap: int


@dataclass(frozen=True)
class GateInput:
    # None: no consent recorded; else the recorded SMS subscription.
    sms_subscribed: bool | None
    transactional: bool
    # A reply inside a conversation the contact started.
    reply_to_contact: bool
    sent_last_24h: int
    now: datetime
    zone: str


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""
    # When allowed but outside the send window: when it may go.
    due_time: datetime | None = None

    @property
    def scheduled(self) -> bool:
        return self.due_time is not None


def decide(policy: Policy, given: GateInput) -> Decision:
    """Refuse opted-out contacts, marketing without opt-in and capped contacts; defer outside the window."""
    if given.sms_subscribed is False:
        return Decision(False, OPTED_OUT)
    if (
        policy.require_opt_in
        and given.sms_subscribed is None
        and not given.transactional
        and not given.reply_to_contact
    ):
        return Decision(False, NO_OPT_IN)
    if policy.daily_cap > 0 and given.sent_last_24h >= policy.daily_cap:
        return Decision(False, DAILY_CAP)
    window = SendWindow.parse(policy.send_window_start, policy.send_window_end)
    due = window.next_opening(given.now, ZoneInfo(given.zone))
    return Decision(True, due_time=due)
