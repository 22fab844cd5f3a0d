"""Test helpers: settings for in-process servers on loopback, ephemeral ports."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from services.common.context import Workspace
from services.common.settings import Settings


def test_settings(db_url: str, **overrides: Any) -> Settings:
    """Settings for a test server: loopback, port 0 everywhere, no key cache."""
    base = Settings(
        database_url=db_url,
        host="127.0.0.1",
        ingest_port=0,
        identity_port=0,
        campaign_port=0,
        messaging_port=0,
        ingest_http_port=0,
        messaging_http_port=0,
        auth_cache_seconds=0.0,
        log_level="warning",
        grace_seconds=2.0,
        db_pool_max=5,
    )
    return base.replace(**overrides)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name


# The `make_workspace` fixture's type: `ws, api_key = await make_workspace(db_url, name=None)`.
MakeWorkspace = Callable[..., Awaitable[tuple[Workspace, str]]]
