"""``make run``: bring up the database (embedded unless PARLEY_DATABASE_URL is set), then every service."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from services.common.embedded import database_url
from services.common.settings import PROJECT_ROOT, load_settings


def main() -> None:
    settings = load_settings()
    url = database_url(settings)
    where = "PARLEY_DATABASE_URL" if settings.database_url else f"embedded PostgreSQL in {settings.data_dir}"
    print(f"parley: database: {where}", flush=True)
    print(
        "parley: listening —"
        f" ingest gRPC :{settings.ingest_port} HTTP :{settings.ingest_http_port},"
        f" identity gRPC :{settings.identity_port},"
        f" campaign gRPC :{settings.campaign_port},"
        f" messaging gRPC :{settings.messaging_port} webhooks HTTP :{settings.messaging_http_port}",
        flush=True,
    )
    print("parley: create a workspace and key with: .venv/bin/parley workspace create NAME", flush=True)
    env = dict(os.environ)
    env["PARLEY_DATABASE_URL"] = url
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PARLEY_LOG_FORMAT", "json")
    honcho = Path(sys.executable).parent / "honcho"
    os.chdir(PROJECT_ROOT)
    os.execve(str(honcho), [str(honcho), "start", "-f", "Procfile"], env)


if __name__ == "__main__":
    main()
