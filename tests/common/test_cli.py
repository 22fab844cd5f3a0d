"""The `parley` admin command manages workspaces and keys against the configured database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from services.common.clients import key_metadata
from services.common.server import start
from tests.common.probe_service import METHOD, MODULE
from tests.helpers import test_settings

PARLEY = Path(sys.executable).with_name("parley")


def parley(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PARLEY_DATABASE_URL": db_url}
    return subprocess.run([str(PARLEY), *args], env=env, capture_output=True, text=True, timeout=60, check=False)


async def test_workspace_create_prints_a_working_key_last(db_url: str) -> None:
    out = parley(db_url, "workspace", "create", "cli-acme")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("pk_")
    srv = await start(MODULE, test_settings(db_url))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            assert (await ch.unary_unary(METHOD)(b"ok", metadata=key_metadata(key))).endswith(b"|key")
            created = parley(db_url, "key", "create", "cli-acme", "--label", "ci")
            assert created.returncode == 0, created.stderr
            second = created.stdout.strip().splitlines()[-1]
            key_id = created.stdout.split("id=")[1].split()[0]
            listing = parley(db_url, "key", "list", "cli-acme")
            assert key_id in listing.stdout and second not in listing.stdout
            assert parley(db_url, "key", "revoke", key_id).returncode == 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(METHOD)(b"ok", metadata=key_metadata(second))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in parley(db_url, "key", "list", "cli-acme").stdout
            # A write key works for sending events only: the probe's method is no event method.
            write = parley(db_url, "key", "create", "cli-acme", "--label", "web", "--write-only")
            assert write.returncode == 0 and "scope=write" in write.stdout, write.stderr
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(METHOD)(b"ok", metadata=key_metadata(write.stdout.strip().splitlines()[-1]))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "\twrite\t" in parley(db_url, "key", "list", "cli-acme").stdout
    finally:
        await srv.stop(0)


def test_errors_are_clear_and_non_zero(db_url: str) -> None:
    assert parley(db_url, "workspace", "create", "cli-dupe").returncode == 0
    dupe = parley(db_url, "workspace", "create", "cli-dupe")
    assert dupe.returncode == 1 and "already exists" in dupe.stderr
    missing = parley(db_url, "key", "list", "no-such-workspace")
    assert missing.returncode == 1 and "not found" in missing.stderr
    bad_region = parley(db_url, "workspace", "create", "cli-region", "--region", "XX")
    assert bad_region.returncode == 1 and "region" in bad_region.stderr
