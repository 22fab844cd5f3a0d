"""Settings for every service, read from ``PARLEY_*`` environment variables — the one place defaults live."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. Each field ``foo_bar`` is read from ``PARLEY_FOO_BAR``."""

    # Postgres. Unset: an embedded server (pgserver) with its data under ``data_dir``.
    database_url: str | None = None
    data_dir: str = str(PROJECT_ROOT / ".parley")
    db_pool_min: int = 1
    db_pool_max: int = 10
    # A transaction idle this long is ended by PostgreSQL (services/common/db.py).
    db_idle_transaction_timeout_ms: int = 60_000

    log_level: str = "info"
    # "json", "console" for humans, or "auto" (default): console on a terminal, JSON otherwise.
    log_format: str = "auto"

    # "uvloop" (default: libuv's event loop, faster for gRPC and asyncpg) or "asyncio" (the standard one).
    event_loop: str = "uvloop"

    # Address every server binds to.
    host: str = "0.0.0.0"
    ingest_port: int = 50051
    identity_port: int = 50052
    campaign_port: int = 50053
    messaging_port: int = 50054
    # HTTP listeners: Segment-compatible ingest, and provider webhooks.
    ingest_http_port: int = 8080
    messaging_http_port: int = 8081

    # Where each service reaches its peers. Unset, a peer whose port is set is reached on that
    # port of this machine (``load_settings``).
    ingest_addr: str = "127.0.0.1:50051"
    identity_addr: str = "127.0.0.1:50052"
    campaign_addr: str = "127.0.0.1:50053"
    messaging_addr: str = "127.0.0.1:50054"

    # Shared secret for service-to-service calls. Unset: one is generated once and kept
    # in the database, so every service on the same database agrees without configuration.
    internal_token: str | None = None
    # How long a verified API key is trusted before it is looked up again (revocation delay).
    auth_cache_seconds: float = 5.0

    # Region used to read phone numbers written without a country code.
    default_region: str = "US"
    # Seconds in-flight calls get to finish on SIGTERM.
    grace_seconds: float = 10.0

    # Ingest limits.
    max_event_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    max_http_body_bytes: int = 4 * 1024 * 1024
    # RecordEvents calls one ingest process keeps in flight per workspace: identity writes the
    # events of a later call that an earlier one does not touch while that one still runs.
    forward_in_flight: int = 3

    # SMS / voice provider: "console" logs what would be sent; "twilio" calls Twilio's REST API.
    sms_provider: str = "console"
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_api_base_url: str = "https://api.twilio.com"
    twilio_from_number: str | None = None
    # Public base URL of the messaging webhooks, as the provider calls them (signatures cover it).
    # Unset, it follows ``messaging_http_port``.
    public_base_url: str = "http://127.0.0.1:8081"
    # Compliance defaults.
    send_window_start: str = "08:00"
    send_window_end: str = "21:00"
    workspace_rate_limit_per_second: float = 50.0
    contact_daily_cap: int = 10

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests, per-process overrides)."""
        return dataclasses.replace(self, **changes)


def _coerce(raw: str, annotation: str) -> Any:
    if annotation.startswith("int"):
        return int(raw)
    if annotation.startswith("float"):
        return float(raw)
    if annotation.startswith("bool"):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    return raw


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``env`` (default ``os.environ``); a malformed value names its variable."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for field in fields(Settings):
        name = f"PARLEY_{field.name.upper()}"
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[field.name] = _coerce(raw, str(field.type))
        except ValueError as exc:
            raise ValueError(f"{name}={raw!r} is not a valid {field.type}") from exc
    # One machine with moved ports (``make run`` beside something on the defaults): the peers'
    # addresses follow the ports unless they are set themselves.
    for service in ("ingest", "identity", "campaign", "messaging"):
        if f"{service}_port" in values and f"{service}_addr" not in values:
            values[f"{service}_addr"] = f"127.0.0.1:{values[f'{service}_port']}"
    if "messaging_http_port" in values and "public_base_url" not in values:
        values["public_base_url"] = f"http://127.0.0.1:{values['messaging_http_port']}"
    return Settings(**values)
