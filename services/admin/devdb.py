"""The embedded development database: ``python -m services.admin.devdb url|stop``."""

from __future__ import annotations

import sys
from pathlib import Path

from services.common.embedded import database_url
from services.common.settings import load_settings


def main(argv: list[str]) -> int:
    settings = load_settings()
    action = argv[0] if argv else "url"
    if action == "url":
        print(database_url(settings))
        return 0
    if action == "stop":
        if settings.database_url:
            print("PARLEY_DATABASE_URL is set; nothing embedded to stop")
            return 0
        import pgserver

        pgdata = Path(settings.data_dir) / "pgdata"
        if not pgdata.exists():
            print("no embedded database")
            return 0
        pgserver.get_server(pgdata, cleanup_mode="stop").cleanup()
        print(f"stopped embedded PostgreSQL in {pgdata}")
        return 0
    print("usage: python -m services.admin.devdb [url|stop]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
