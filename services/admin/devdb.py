"""The embedded development database: ``python -m services.admin.devdb url|stop``."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from services.common.embedded import database_url
from services.common.settings import load_settings

# How long ``stop`` waits for the server to finish its shutdown checkpoint.
STOP_WAIT_SECONDS = 60.0


def _postmaster_pid(pgdata: Path) -> int | None:
    """The running postmaster's pid from ``postmaster.pid`` (its first line), None when none runs."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a stale file left by a crash
    except PermissionError:
        pass  # alive, another user's
    return pid if _runs_on(pid, pgdata) else None


def _runs_on(pid: int, pgdata: Path) -> bool:
    """Whether ``pid`` is a postgres started on ``pgdata`` (``-D``): a stale pid file's pid may have
    been reused by another process, which must not be signalled. Where there is no ``/proc`` to
    ask, the pid file is trusted, as ``pg_ctl`` trusts it."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    try:
        args = [os.fsdecode(a) for a in (proc / str(pid) / "cmdline").read_bytes().split(b"\0")]
    except OSError:
        return False  # gone meanwhile
    if not args or Path(args[0]).name != "postgres" or "-D" not in args[:-1]:
        return False
    data = Path(args[args.index("-D") + 1])
    if not data.is_absolute():  # relative to the postmaster's working directory, not ours
        try:
            data = (proc / str(pid) / "cwd").resolve(strict=True) / data
        except OSError:
            return False
    return data.resolve() == pgdata.resolve()


def stop_server(pgdata: Path, wait: float = STOP_WAIT_SECONDS) -> bool:
    """Stop the server running on ``pgdata`` the way ``pg_ctl stop`` does by default (SIGINT, a
    fast shutdown: sessions are ended, a checkpoint is written), and wait until it is gone.

    Signalled directly rather than through the embedded server's handle, which stops the server
    only when the process asking started it (``make run`` hands over to the service runner, so
    nothing ever would). False when no server was running.
    """
    pid = _postmaster_pid(pgdata)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGINT)
    except PermissionError as exc:
        raise PermissionError(f"PostgreSQL (pid {pid}) on {pgdata} runs as another user; stop it as that user") from exc
    deadline = time.monotonic() + wait
    while _postmaster_pid(pgdata) == pid:
        if time.monotonic() > deadline:
            raise TimeoutError(f"PostgreSQL (pid {pid}) on {pgdata} did not stop within {wait:.0f} s")
        time.sleep(0.05)
    return True


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
        pgdata = Path(settings.data_dir) / "pgdata"
        if stop_server(pgdata):
            print(f"stopped embedded PostgreSQL in {pgdata}")
        else:
            print(f"no embedded PostgreSQL running in {pgdata}")
        return 0
    print("usage: python -m services.admin.devdb [url|stop]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
