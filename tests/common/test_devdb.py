"""``make db-stop`` stops the embedded server, whichever process started it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.common.embedded import embedded_server_url
from services.common.settings import PROJECT_ROOT


def _db_stop(data_dir: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PARLEY_DATABASE_URL"}
    env["PARLEY_DATA_DIR"] = str(data_dir)
    done = subprocess.run(
        [sys.executable, "-m", "services.admin.devdb", "stop"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    return done.stdout


def _gone(pid: int) -> bool:
    """No such process, or only its exit status is left (a zombie its parent has not reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_stop_ends_a_server_another_process_started(tmp_path: Path) -> None:
    # Started here, as ``make run`` starts it before handing over to the service runner.
    embedded_server_url(tmp_path)
    pid_file = tmp_path / "pgdata" / "postmaster.pid"
    pid = int(pid_file.read_text().split("\n", 1)[0])

    assert "stopped embedded PostgreSQL" in _db_stop(tmp_path)
    assert not pid_file.exists()
    assert _gone(pid)
    # Nothing left to stop, and it says so.
    assert "no embedded PostgreSQL running" in _db_stop(tmp_path)


def test_a_stale_pid_file_naming_another_process_is_left_alone(tmp_path: Path) -> None:
    # A crash left postmaster.pid behind and its pid now belongs to something else (here, a
    # sleeping child): stop must not signal it.
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (pgdata / "postmaster.pid").write_text(f"{other.pid}\n{pgdata}\n")
        assert "no embedded PostgreSQL running" in _db_stop(tmp_path)
        assert other.poll() is None  # still running
    finally:
        other.kill()
        other.wait()
