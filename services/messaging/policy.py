"""Updating a workspace's messaging policy, field by field, with validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from services.common.errors import InvalidArgument, Violation
from services.common.sendwindow import parse_hhmm
from services.messaging import repository as repo
from services.messaging.app import Messaging
from services.messaging.gate import Policy

FIELDS = tuple(f.name for f in dataclasses.fields(Policy))


def validate(p: Policy) -> None:
    out: list[Violation] = []
    for name in ("send_window_start", "send_window_end"):
        try:
            parse_hhmm(getattr(p, name))
        except ValueError:
            out.append(Violation(f"policy.{name}", "must be HH:MM (24h)"))
    if p.rate_limit_per_second < 0:
        out.append(Violation("policy.rate_limit_per_second", "must not be negative (0: unlimited)"))
    if p.daily_cap < 0:
        out.append(Violation("policy.daily_cap", "must not be negative (0: no cap)"))
    if len(p.help_text) > 1600:
        out.append(Violation("policy.help_text", "longer than 1,600 characters"))
    if out:
        raise InvalidArgument(out)


async def update(app: Messaging, workspace_id: str, given: Policy, mask: Sequence[str]) -> Policy:
    """Apply the masked fields of ``given`` (all fields when the mask is empty)."""
    unknown = [m for m in mask if m not in FIELDS]
    if unknown:
        raise InvalidArgument.field("update_mask", f"unknown fields: {', '.join(unknown)}")
    current = await app.policy(workspace_id)
    changes = {name: getattr(given, name) for name in (mask or FIELDS)}
    merged = dataclasses.replace(current, **changes)
    validate(merged)
    await repo.save_policy(app.pool, workspace_id, merged)
    app.forget_policy(workspace_id)
    return merged
