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
SECTIONS = BENCH / "sections"


def run(script: Path) -> bool:
    """Run one benchmark; keep its latest section (or its failure) in bench/sections/."""
    print(f"bench: running {script.name} ...", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], cwd=BENCH.parent, capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        section = f"## {script.stem}\n\nFAILED (exit {proc.returncode}) after {took:.0f}s:\n\n```\n{tail}\n```\n"
    else:
        section = proc.stdout.strip() + f"\n\n_{script.name} ran in {took:.0f}s._\n"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    SECTIONS.mkdir(exist_ok=True)
    (SECTIONS / f"{script.stem}.md").write_text(f"<!-- {stamp} -->\n{section}")
    print(f"bench: {script.name} done in {took:.0f}s (exit {proc.returncode})", flush=True)
    return proc.returncode == 0


def main() -> int:
    only = sys.argv[1:]
    scripts = sorted(p for p in BENCH.glob("bench_*.py") if not only or p.stem in only)
    failed = sum(not run(script) for script in scripts)
    # results.md holds the latest section of every benchmark, so one can be re-run alone.
    sections = [p.read_text().split("\n", 1)[1] for p in sorted(SECTIONS.glob("bench_*.md"))]
    header = (
        "# Benchmark results\n\n"
        f"Written {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}. Each section comes from its "
        "benchmark's latest run (`make bench`, or `python bench/run_all.py bench_x` for one). "
        "Figures from a shared machine; compare ratios within one section.\n"
    )
    out = BENCH / "results.md"
    out.write_text(header + "\n" + "\n".join(sections))
    print(f"bench: wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
