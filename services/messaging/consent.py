"""Consent per phone and channel: recording changes (newest wins) and reading them from identify traits."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.messaging import outcomes as oc
from services.messaging import repository as repo
from services.messaging.outcomes import Outcome
from services.messaging.repository import ConsentChange

CHANNELS = ("sms", "voice")
TRAIT_CHANNELS = {"sms_opt_in": "sms", "voice_opt_in": "voice"}


async def change_consent(
    conn: asyncpg.Connection, change: ConsentChange
) -> tuple[asyncpg.Record | None, list[Outcome]]:
    """Apply ``change`` unless a newer one is recorded; an actual opt-in/out yields its outcome event."""
    row, previous = await repo.apply_consent(conn, change)
    if row is None or previous is change.subscribed:
        return row, []
    name = oc.OPTED_IN if change.subscribed else oc.OPTED_OUT
    # The id names the change, not the phone: message ids travel further than properties do.
    key = hashlib.sha256(
        f"{change.workspace_id}|{change.phone}|{change.channel}|{change.subscribed}|{change.consent_time.isoformat()}".encode()
    ).hexdigest()[:32]
    props = {"channel": change.channel, "source": change.source}
    return row, [Outcome(change.workspace_id, name, key, change.phone, change.consent_time, "", props)]


@dataclass(frozen=True)
class TraitConsent:
    channel: str
    subscribed: bool
    consent_time: datetime
    source: str
    consent_text: str
    ip: str


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in {"true", "yes", "1", "false", "no", "0"}:
        return value.strip().lower() in {"true", "yes", "1"}
    return None


# The earliest consent time taken from a trait, as ingest's earliest event time: a consent's
# outcome event is sent through ingest, which refuses anything older.
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)


def _as_time(value: Any) -> datetime | None:
    """A trait's time in UTC, None when it is no time a datetime holds or is before 2000 (anyone
    holding a write key can send any value: one that raised here stopped the consent stream for
    every workspace)."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = value / 1000 if value > 1e11 else value  # epoch milliseconds or seconds
            at = datetime.fromtimestamp(seconds, UTC)
        elif isinstance(value, str) and value.strip():
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            at = parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        else:
            return None
    except (ValueError, OverflowError, OSError):  # unparseable, or past the years a datetime holds
        return None
    return at if at >= _EARLIEST else None


def consents_from_traits(traits: dict[str, Any], event_time: datetime, ip: str = "") -> list[TraitConsent]:
    """``sms_opt_in`` / ``voice_opt_in`` traits as consents: a boolean, or ``{subscribed, timestamp, source}``.

    A value without its own timestamp takes the event's time, so it never overrides a
    consent recorded later; one dated after its event is held to the event's time, so no consent
    can be dated ahead to outrank a STOP that arrives after it. Malformed values are ignored.
    """
    out: list[TraitConsent] = []
    for trait, channel in TRAIT_CHANNELS.items():
        if trait not in traits:
            continue
        value = traits[trait]
        if isinstance(value, dict):
            subscribed = _as_bool(value.get("subscribed"))
            if subscribed is None:
                continue
            when = _as_time(value.get("timestamp")) or event_time
            when = min(when, event_time)
            source = str(value.get("source") or "identify")
            text = str(value.get("consent_text") or value.get("text") or "")
            out.append(TraitConsent(channel, subscribed, when, source, text, str(value.get("ip") or ip)))
        else:
            subscribed = _as_bool(value)
            if subscribed is not None:
                out.append(TraitConsent(channel, subscribed, event_time, "identify", "", ip))
    return out


async def set_consent(
    pool: asyncpg.Pool,
    workspace_id: str,
    phone: str,
    channel: str,
    subscribed: bool,
    consent_time: datetime,
    source: str,
    consent_text: str,
    ip: str,
) -> tuple[asyncpg.Record, bool, list[Outcome]]:
    """Record a consent change (newest wins): (the recorded consent, whether this change applied, outcomes)."""
    async with pool.acquire() as conn, conn.transaction():
        await repo.lock_phone(conn, workspace_id, phone)
        row, outcomes = await change_consent(
            conn, ConsentChange(workspace_id, phone, channel, subscribed, consent_time, source, consent_text, ip)
        )
        await repo.add_outcomes(conn, outcomes)
        if row is None:
            row = await repo.get_consent(conn, workspace_id, phone, channel)
            assert row is not None
            return row, False, []
    return row, True, outcomes
