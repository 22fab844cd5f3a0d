"""``make bench``: run every ``bench/bench_*.py`` and collect their markdown sections in bench/results.md."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main() -> int:
    only = sys.argv[1:]
    scripts = sorted(p for p in BENCH.glob("bench_*.py") if not only or p.stem in only)
    sections: list[str] = []
    failed = 0
    for script in scripts:
        print(f"bench: running {script.name} ...", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=BENCH.parent, capture_output=True, text=True, check=False
        )
        took = time.perf_counter() - started
        if proc.returncode != 0:
            failed += 1
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            sections.append(
                f"## {script.stem}\n\nFAILED (exit {proc.returncode}) after {took:.0f}s:\n\n```\n{tail}\n```\n"
            )
        else:
            sections.append(proc.stdout.strip() + f"\n\n_{script.name} ran in {took:.0f}s._\n")
        print(f"bench: {script.name} done in {took:.0f}s (exit {proc.returncode})", flush=True)
    header = (
        "# Benchmark results\n\n"
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}. "
        "Figures from one run on a shared machine; compare ratios within a run.\n"
    )
    out = BENCH / "results.md"
    out.write_text(header + "\n" + "\n".join(sections))
    print(f"bench: wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
