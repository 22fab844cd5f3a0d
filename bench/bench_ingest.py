"""Ingest throughput end to end (client → ingest → identity → Postgres, each its own process), beside a COPY ceiling.

Phases, all in one run against one fresh database:
  1. gRPC ``IngestBatch``: 500 mixed events per call (20% identify calls carrying phones,
     50k distinct users), a few calls in flight, until every event is committed.
  2. gRPC ``Track``: one event per call, 64 concurrent callers.
  3. HTTP ``/v1/batch``: 100-event gzip batches, 16 concurrent senders.
  3b. gRPC ``IngestBatch`` again for another 50k users, ids mixed as browsers and servers send
     them (an identify names the anonymous and the user id, other events one of the two), so
     one user is reached through two ids: a reference, not a target.
  4. Ceiling: asyncpg COPY of phase 1's rows into a table made ``LIKE`` identity's event
     table ``INCLUDING ALL`` (same columns, indexes and constraints); three times, each into a
     fresh table, and the median counts.
  5. Profile: ingest restarted under cProfile for a short batch phase; its hottest functions.

CPU seconds of every process are read from /proc before and after each phase, so the
report says where the time went (client, ingest, identity, Postgres), per event.
Prints a markdown section on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import pstats
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from parley.common.v1.event_pb2 import Event, EventType  # noqa: E402
from parley.ingest.v1 import ingest_service_pb2 as pb  # noqa: E402

from bench.proc_cpu import cpu_seconds, parent_of, tree_cpu_seconds  # noqa: E402
from services.common import tenancy  # noqa: E402
from services.common.db import create_pool  # noqa: E402
from services.common.embedded import embedded_server_url, with_database  # noqa: E402
from services.common.logs import configure_logging  # noqa: E402

USERS = 50_000
FLOOR = "gRPC Health.Check, no-op (64 callers)"
MIXED = "gRPC IngestBatch, mixed ids (500/call)"
AREA_CODES = (415, 212, 646, 312, 617, 206, 303, 512)


def log(msg: str) -> None:
    print(f"bench_ingest: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def phone_of(user: int) -> str:
    area = AREA_CODES[user % len(AREA_CODES)]
    exchange = 200 + (user // 10_000) % 700
    return f"({area}) {exchange}-{user % 10_000:04d}"


# --- workload -------------------------------------------------------------------------------


@dataclass
class Spec:
    """One event, independent of wire format."""

    kind: str
    user: int
    message_id: str
    name: str
    properties: dict[str, Any]
    traits: dict[str, Any]
    original: datetime
    sent: datetime


def workload(n: int, rng: random.Random, first_user: int = 0) -> list[Spec]:
    now = datetime.now(UTC)
    out: list[Spec] = []
    for _ in range(n):
        user = first_user + rng.randrange(USERS)
        roll = rng.random()
        traits: dict[str, Any] = {}
        properties: dict[str, Any] = {}
        if roll < 0.20:
            kind, name = "identify", ""
            traits = {"phone": phone_of(user), "first_name": f"First{user}", "plan": rng.choice(["gold", "basic"])}
        elif roll < 0.80:
            kind = "track"
            name = rng.choice(["Loan Approved", "Application Started", "Document Uploaded", "Payment Made"])
            properties = {"amount": round(rng.uniform(10, 5000), 2), "currency": "USD", "step": rng.randrange(8)}
        elif roll < 0.95:
            kind, name = "page", rng.choice(["Home", "Pricing", "Apply", "FAQ"])
            properties = {"path": f"/{name.lower()}", "referrer": "https://example.com/"}
        else:
            kind, name = "screen", rng.choice(["Dashboard", "Settings"])
            properties = {"tab": rng.randrange(4)}
        sent = now - timedelta(seconds=rng.uniform(0, 5))
        out.append(
            Spec(
                kind,
                user,
                str(uuid.uuid4()),
                name,
                properties,
                traits,
                sent - timedelta(seconds=rng.uniform(0, 60)),
                sent,
            )
        )
    return out


_KINDS = {
    "track": EventType.EVENT_TYPE_TRACK,
    "page": EventType.EVENT_TYPE_PAGE,
    "screen": EventType.EVENT_TYPE_SCREEN,
    "identify": EventType.EVENT_TYPE_IDENTIFY,
}
_CONTEXT = {"library": {"name": "bench", "version": "1.0"}, "ip": "10.1.2.3", "locale": "en-US"}


def to_proto(spec: Spec, mixed_ids: bool = False) -> Event:
    event = Event(type=_KINDS[spec.kind], message_id=spec.message_id, name=spec.name)
    if mixed_ids:
        # As a browser and a server send them: an identify names the anonymous and the user id,
        # other events one of the two.
        both = spec.kind == "identify"
        by_user = both or int(spec.message_id[:8], 16) % 2 == 0
        if by_user:
            event.user_id = f"user-{spec.user}"
        if both or not by_user:
            event.anonymous_id = f"anon-{spec.user}"
    else:
        event.user_id = f"user-{spec.user}"
    if spec.properties:
        event.properties.update(spec.properties)
    if spec.traits:
        event.traits.update(spec.traits)
    event.context.update(_CONTEXT)
    event.original_timestamp.FromDatetime(spec.original)
    event.sent_at.FromDatetime(spec.sent)
    return event


def to_segment(spec: Spec) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": spec.kind,
        "messageId": spec.message_id,
        "userId": f"user-{spec.user}",
        "context": _CONTEXT,
        "timestamp": spec.original.isoformat(timespec="milliseconds"),
    }
    if spec.kind == "track":
        message["event"] = spec.name
    elif spec.name:
        message["name"] = spec.name
    if spec.properties:
        message["properties"] = spec.properties
    if spec.traits:
        message["traits"] = spec.traits
    return message


# --- processes and CPU accounting -----------------------------------------------------------


def read_profile(path: str) -> list[str]:
    if not Path(path).exists():
        return []
    rows = top_functions(path)
    Path(path).unlink()
    return rows


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, to see how much others used."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return float(sum(parts) - idle), float(sum(parts))


@dataclass
class Meter:
    """CPU seconds per role between ``start`` and ``stop``."""

    cpu: dict[str, Callable[[], float]]
    before: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    machine: tuple[float, float] = (0.0, 0.0)
    machine_used: float = 0.0
    commits: int = 0

    def _sample(self) -> dict[str, float]:
        out = {role: get() for role, get in self.cpu.items()}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["client"] = usage.ru_utime + usage.ru_stime
        return out

    def start(self) -> None:
        self.before = self._sample()
        self.machine = machine_busy()

    def stop(self) -> None:
        after = self._sample()
        self.used = {k: after[k] - self.before.get(k, 0.0) for k in after}
        busy, total = machine_busy()
        self.machine_used = (busy - self.machine[0]) / max(total - self.machine[1], 1.0)


async def commits(url: str) -> int:
    """Transactions committed in the bench database so far (after the statistics flush)."""
    await asyncio.sleep(1.1)  # backends publish their counters at most once a second
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await conn.close()


def spawn(module: str, env: dict[str, str], profile: str | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable]
    if profile:
        cmd += ["-m", "cProfile", "-o", profile]
    cmd += ["-m", module]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)


async def wait_serving(addr: str, proc: subprocess.Popen[bytes], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{addr}: process exited with {proc.returncode}")
            try:
                got = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if got.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{addr} not serving after {within}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- phases ---------------------------------------------------------------------------------


async def run_pool(jobs: list[Any], workers: int, work: Callable[[Any], Awaitable[int]]) -> tuple[int, float]:
    """Run ``work`` over ``jobs`` with ``workers`` in flight; (sum of results, seconds)."""
    queue = list(reversed(jobs))
    total = 0

    async def worker() -> None:
        nonlocal total
        while queue:
            done = await work(queue.pop())
            total += done  # after the await: `total += await ...` would read total before it

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return total, time.perf_counter() - started


def raw_method(channel: grpc.aio.Channel, name: str, response: Any) -> Any:
    # Requests are serialized before the clock starts, so the client costs little CPU.
    return channel.unary_unary(
        f"/parley.ingest.v1.IngestService/{name}",
        request_serializer=lambda b: b,
        response_deserializer=response.FromString,
    )


async def grpc_batches(addr: str, md: Any, bodies: list[bytes], in_flight: int) -> tuple[int, float]:
    async with grpc.aio.insecure_channel(addr) as ch:
        call = raw_method(ch, "IngestBatch", pb.IngestBatchResponse)

        async def send(body: bytes) -> int:
            for attempt in range(20):
                try:
                    got = await call(body, metadata=md, timeout=120)
                    return got.accepted_count + got.duplicate_count
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 19:
                        raise
                    await asyncio.sleep(0.2)
            return 0

        return await run_pool(bodies, in_flight, send)


async def grpc_singles(addr: str, md: Any, bodies: list[bytes], callers: int) -> tuple[int, float]:
    async with grpc.aio.insecure_channel(addr) as ch:
        call = raw_method(ch, "Track", pb.TrackResponse)

        async def send(body: bytes) -> int:
            await call(body, metadata=md, timeout=120)
            return 1

        return await run_pool(bodies, callers, send)


async def health_checks(addr: str, count: int, callers: int) -> tuple[int, float]:
    """The cost of a bare Python gRPC call on this machine: the floor under single-event calls."""
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)

        async def check(_: int) -> int:
            await stub.Check(health_pb2.HealthCheckRequest())
            return 1

        return await run_pool(list(range(count)), callers, check)


async def http_batches(url: str, key: str, bodies: list[tuple[bytes, int]], senders: int) -> tuple[int, float]:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip", "Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=senders)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(item: tuple[bytes, int]) -> int:
            body, count = item
            for _ in range(20):
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return count
                    if resp.status != 503:
                        raise RuntimeError(f"HTTP {resp.status}")
                await asyncio.sleep(0.2)
            raise RuntimeError("HTTP ingest stayed unavailable")

        return await run_pool(bodies, senders, send)


# --- the COPY ceiling -----------------------------------------------------------------------


async def events_table(conn: asyncpg.Connection) -> str:
    rows = await conn.fetch(
        """SELECT c.table_name, pg_total_relation_size(format('identity.%I', c.table_name)::regclass) AS size
           FROM information_schema.columns c JOIN information_schema.tables t
             ON t.table_schema = c.table_schema AND t.table_name = c.table_name AND t.table_type = 'BASE TABLE'
           WHERE c.table_schema = 'identity' AND c.column_name = 'message_id'
           ORDER BY size DESC"""
    )
    if not rows:
        raise RuntimeError("identity has no table with a message_id column")
    names = [r["table_name"] for r in rows]
    return "events" if "events" in names else names[0]


def _row_value(col: asyncpg.Record, spec: Spec, workspace_id: uuid.UUID, n: int) -> Any:
    name, kind = col["column_name"], col["udt_name"]
    proto_kind = int(_KINDS[spec.kind])
    when = {"original_timestamp": spec.original, "sent_at": spec.sent, "event_time": spec.original}
    if "workspace" in name:
        return workspace_id if kind == "uuid" else str(workspace_id)
    if kind in ("timestamptz", "timestamp"):
        return when.get(name, spec.sent)
    if kind in ("json", "jsonb"):
        return {"properties": spec.properties, "traits": spec.traits, "context": _CONTEXT}.get(name, {})
    if kind in ("int2", "int4", "int8"):
        return proto_kind if name in ("type", "event_type", "kind") else n
    if kind == "uuid":
        if name == "user_key":
            return uuid.UUID(int=spec.user + 1)
        if "contact" in name:
            return uuid.UUID(int=(1 << 64) + spec.user) if spec.traits else None
        return uuid.uuid4()
    if kind in ("text", "varchar", "bpchar"):
        text = {
            "message_id": spec.message_id,
            "user_id": f"user-{spec.user}",
            "name": spec.name,
            "type": spec.kind,
            "event_type": spec.kind,
            "phone": phone_of(spec.user) if spec.traits else "",
        }
        return text.get(name, f"{name}-{n}")
    if kind == "bool":
        return False
    if kind == "bytea":
        return to_proto(spec).SerializeToString()
    if kind == "numeric" or kind.startswith("float"):
        return float(n)
    return None


async def copy_ceiling(url: str, workspace_id: str, specs: list[Spec], runs: int) -> tuple[list[float], str]:
    """Rows/s of ``runs`` COPYs of the rows, each into a fresh copy of the events table: one COPY
    takes well under a second, and on a shared machine a single one can be off by half."""
    conn = await asyncpg.connect(url)
    try:
        table = await events_table(conn)
        for kind in ("json", "jsonb"):
            await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        cols = await conn.fetch(
            """SELECT column_name, udt_name, is_nullable, column_default, is_identity, is_generated
               FROM information_schema.columns WHERE table_schema = 'identity' AND table_name = $1
               ORDER BY ordinal_position""",
            table,
        )
        # Columns with defaults (sequences, now()) are left to the database, as identity would.
        chosen = [
            c
            for c in cols
            if c["is_generated"] != "ALWAYS"
            and c["is_identity"] != "YES"
            and (c["column_default"] is None or c["column_name"] in ("message_id", "received_at"))
        ]
        ws = uuid.UUID(workspace_id)
        records = [tuple(_row_value(c, s, ws, i) for c in chosen) for i, s in enumerate(specs)]
        names = [c["column_name"] for c in chosen]
        rates: list[float] = []
        for _ in range(runs):
            await conn.execute("DROP SCHEMA IF EXISTS bench_copy CASCADE")
            await conn.execute("CREATE SCHEMA bench_copy")
            await conn.execute(f"CREATE TABLE bench_copy.{table} (LIKE identity.{table} INCLUDING ALL)")
            started = time.perf_counter()
            await conn.copy_records_to_table(table, schema_name="bench_copy", columns=names, records=records)
            rates.append(len(records) / (time.perf_counter() - started))
        indexes = await conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'bench_copy' AND tablename = $1", table
        )
        await conn.execute("DROP SCHEMA bench_copy CASCADE")
        return rates, f"identity.{table} ({len(cols)} columns, {indexes} indexes)"
    finally:
        await conn.close()


# --- main -----------------------------------------------------------------------------------


def top_functions(path: str, limit: int = 15) -> list[str]:
    stats = pstats.Stats(path)
    rows = []
    for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "poll" in func or "select" in func:
            continue  # waiting for work, not work
        rows.append((tottime, cumtime, calls, f"{Path(file).name}:{line}({func})"))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows) or 1.0
    return [
        f"| `{where}` | {tottime:.2f} | {100 * tottime / total:.1f}% | {cumtime:.2f} | {calls} |"
        for tottime, cumtime, calls, where in rows[:limit]
    ]


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(7)
    admin = os.environ.get("PARLEY_DATABASE_URL") or embedded_server_url(ROOT / ".parley" / "bench")
    db = f"parley_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{db}"')
    await conn.close()
    url = with_database(admin, db)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pool = await create_pool(url, max_size=2)
        await tenancy.migrate(pool)
        workspace, key = await tenancy.create_workspace(pool, "bench")
        backend = await pool.fetchval("SELECT pg_backend_pid()")
        postmaster = parent_of(backend)
        await pool.close()

        identity_port, ingest_port, http_port = free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "PARLEY_DATABASE_URL": url,
            "PARLEY_HOST": "127.0.0.1",
            "PARLEY_LOG_LEVEL": "warning",
            "PARLEY_LOG_FORMAT": "json",
            "PARLEY_IDENTITY_PORT": str(identity_port),
            "PARLEY_INGEST_PORT": str(ingest_port),
            "PARLEY_INGEST_HTTP_PORT": str(http_port),
            "PARLEY_IDENTITY_ADDR": f"127.0.0.1:{identity_port}",
        }
        identity = spawn("services.identity", env)
        procs.append(identity)
        await wait_serving(f"127.0.0.1:{identity_port}", identity)
        ingest = spawn("services.ingest", env)
        procs.append(ingest)
        ingest_addr = f"127.0.0.1:{ingest_port}"
        await wait_serving(ingest_addr, ingest)
        md = (("authorization", f"Bearer {key}"),)
        meter = Meter(
            {
                "ingest": lambda: cpu_seconds(ingest.pid),
                "identity": lambda: cpu_seconds(identity.pid),
                "postgres": lambda: tree_cpu_seconds(postmaster),
            }
        )

        log("building workloads")
        batch_specs = workload(args.batches * 500, rng)
        batch_bodies = [
            pb.IngestBatchRequest(events=[to_proto(s) for s in batch_specs[i : i + 500]]).SerializeToString()
            for i in range(0, len(batch_specs), 500)
        ]
        single_specs = workload(args.singles, rng)
        for spec in single_specs:
            if spec.kind != "track":  # Track calls carry track events; phones ride along as traits
                spec.kind, spec.name = "track", spec.name or "Profile Updated"
        single_bodies = [pb.TrackRequest(event=to_proto(s)).SerializeToString() for s in single_specs]
        http_specs = workload(args.http_batches * 100, rng)
        http_bodies = [
            (gzip.compress(json.dumps({"batch": [to_segment(s) for s in http_specs[i : i + 100]]}).encode()), 100)
            for i in range(0, len(http_specs), 100)
        ]
        # Other users (and phones) than the first phase's, so the two phases do not meet.
        mixed_specs = workload(args.batches * 500, rng, first_user=USERS)
        mixed_bodies = [
            pb.IngestBatchRequest(
                events=[to_proto(s, mixed_ids=True) for s in mixed_specs[i : i + 500]]
            ).SerializeToString()
            for i in range(0, len(mixed_specs), 500)
        ]
        warm = workload(2_000, rng)
        await grpc_batches(
            ingest_addr,
            md,
            [
                pb.IngestBatchRequest(events=[to_proto(s) for s in warm[i : i + 500]]).SerializeToString()
                for i in range(0, 2_000, 500)
            ],
            2,
        )

        results: dict[str, tuple[int, float, Meter]] = {}
        for label, run in (
            ("gRPC IngestBatch (500/call)", lambda: grpc_batches(ingest_addr, md, batch_bodies, args.in_flight)),
            ("gRPC Track (64 callers)", lambda: grpc_singles(ingest_addr, md, single_bodies, 64)),
            (
                "HTTP /v1/batch (100/gzip, 16 senders)",
                lambda: http_batches(f"http://127.0.0.1:{http_port}/v1/batch", key, http_bodies, 16),
            ),
            (MIXED, lambda: grpc_batches(ingest_addr, md, mixed_bodies, args.in_flight)),
            (FLOOR, lambda: health_checks(ingest_addr, args.singles, 64)),
        ):
            log(f"phase: {label}")
            m = Meter(meter.cpu)
            commits_before = await commits(url)
            m.start()
            count, took = await run()
            m.stop()
            m.commits = await commits(url) - commits_before
            results[label] = (count, took, m)
            cpu = ", ".join(f"{k} {v:.1f}s" for k, v in m.used.items())
            log(
                f"  {count} events in {took:.1f}s = {count / took:,.0f}/s; CPU {cpu}; machine {m.machine_used:.0%}; "
                f"{m.commits} commits"
            )

        log("phase: COPY ceiling")
        copy_rates, copy_table = await copy_ceiling(url, workspace.id, batch_specs, args.copy_runs)
        copy_rate = statistics.median(copy_rates)
        log(f"  COPY {copy_rate:,.0f} rows/s (median of {', '.join(f'{r:,.0f}' for r in copy_rates)})")

        profile_rows: list[str] = []
        if args.profile_batches:
            log("phase: profile (ingest under cProfile)")
            stop(ingest)
            profile = tempfile.mktemp(prefix="ingest-", suffix=".prof")
            # The standard event loop, so the profile attributes time to Python functions
            # (under uvloop it all lands in the C loop's run()).
            ingest = spawn("services.ingest", {**env, "PARLEY_EVENT_LOOP": "asyncio"}, profile=profile)
            procs.append(ingest)
            await wait_serving(ingest_addr, ingest)
            prof_specs = workload(args.profile_batches * 500, rng)
            prof_bodies = [
                pb.IngestBatchRequest(events=[to_proto(s) for s in prof_specs[i : i + 500]]).SerializeToString()
                for i in range(0, len(prof_specs), 500)
            ]
            await grpc_batches(ingest_addr, md, prof_bodies, args.in_flight)
            prof_singles = workload(args.profile_singles, rng)
            for spec in prof_singles:
                spec.kind, spec.name = "track", spec.name or "Profile Updated"
            await grpc_singles(
                ingest_addr, md, [pb.TrackRequest(event=to_proto(x)).SerializeToString() for x in prof_singles], 64
            )
            stop(ingest)
            profile_rows = read_profile(profile)
    finally:
        for proc in reversed(procs):
            stop(proc)
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await conn.close()

    report(results, copy_rates, copy_table, profile_rows, args)


def report(
    results: dict[str, tuple[int, float, Meter]],
    copy_rates: list[float],
    copy_table: str,
    profile_rows: list[str],
    args: argparse.Namespace,
) -> None:
    batch_label, single_label, http_label = list(results)[:3]
    copy_rate = statistics.median(copy_rates)
    batch_rate = results[batch_label][0] / results[batch_label][1]
    single_rate = results[single_label][0] / results[single_label][1]
    http_rate = results[http_label][0] / results[http_label][1]
    lines = [
        "## Ingest throughput (bench_ingest.py)",
        "",
        f"Client, ingest, identity and PostgreSQL as separate processes on {os.cpu_count()} cores; "
        f"{USERS:,} distinct users, 20% of events identify calls with a phone. Every event is committed "
        "by identity before its call returns. The mixed-ids phase sends the same kind of events for "
        f"another {USERS:,} users, each identify naming an anonymous and a user id and every other event "
        "one of the two.",
        "",
        "| path | events | seconds | events/s | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    targets = {
        batch_label: (batch_rate >= 20_000 and batch_rate / copy_rate >= 0.20, "≥ 20,000/s and ≥ 0.20 x COPY"),
        single_label: (single_rate >= 1_500, "≥ 1,500/s"),
        http_label: (http_rate >= 0.5 * batch_rate, "≥ 0.5 x gRPC batch"),
        MIXED: (True, "(reference: the first phase's events, ids as browsers and servers mix them)"),
        FLOOR: (True, "(reference: calls/s, not events)"),
    }
    for label, (count, took, _m) in results.items():
        met, target = targets[label]
        if label in (FLOOR, MIXED):
            lines.append(f"| {label} | {count:,} | {took:.1f} | {count / took:,.0f} | {target} | |")
            continue
        lines.append(
            f"| {label} | {count:,} | {took:.1f} | {count / took:,.0f} | {target} | {'yes' if met else 'no'} |"
        )
    lines += [
        f"| COPY ceiling into a copy of {copy_table}, median of {len(copy_rates)} "
        f"({', '.join(f'{r:,.0f}' for r in copy_rates)}) | {args.batches * 500:,} | | {copy_rate:,.0f} | | |",
        "",
        f"Ratios: gRPC batch / COPY = **{batch_rate / copy_rate:.2f}**; "
        f"HTTP / gRPC batch = **{http_rate / batch_rate:.2f}**; single / batch = {single_rate / batch_rate:.2f}.",
        "",
        "Where the time goes — CPU microseconds per event, by process (busy = whole-machine CPU use "
        "during the phase, other tenants included):",
        "",
        "| path | client | ingest | identity | postgres | busy | events per commit |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, (count, _took, m) in results.items():
        per = {k: 1e6 * v / max(count, 1) for k, v in m.used.items()}
        lines.append(
            f"| {label} | {per['client']:.0f} | {per['ingest']:.0f} | {per['identity']:.0f} | "
            f"{per['postgres']:.0f} | {100 * m.machine_used:.0f}% | "
            f"{count / m.commits if m.commits and label != FLOOR else 0:.0f} |"
        )
    if profile_rows:
        lines += [
            "",
            f"Ingest's hottest functions under cProfile ({args.profile_batches} batches of 500, then "
            f"{args.profile_singles:,} Track calls from 64 callers; own time excluding idle waits, "
            "profiler overhead included):",
            "",
            "| function | own s | share | cumulative s | calls |",
            "|---|---:|---:|---:|---:|",
            *profile_rows,
        ]
    print("\n".join(lines))


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=120, help="IngestBatch calls of 500 events")
    parser.add_argument("--in-flight", type=int, default=4, help="IngestBatch calls in flight")
    parser.add_argument("--singles", type=int, default=10_000, help="Track calls")
    parser.add_argument("--http-batches", type=int, default=400, help="HTTP batches of 100 events")
    parser.add_argument("--copy-runs", type=_at_least_one, default=3, help="COPYs for the ceiling (the median counts)")
    parser.add_argument("--profile-batches", type=int, default=20, help="batches under cProfile (0: skip)")
    parser.add_argument("--profile-singles", type=int, default=2_000, help="Track calls under cProfile")
    configure_logging("warning", "json")  # stdout carries only the markdown
    asyncio.run(main(parser.parse_args()))
