"""Messaging throughput: SendSms through the compliance gate to a Twilio stand-in, until every message is final.

Messaging runs as deployed (``python -m services.messaging``, provider ``twilio``), as N replicas
sharing one database (the dispatcher's SKIP LOCKED claims split the work). A local stand-in of
Twilio's Messages API runs in its own process and answers 201. 1,000 distinct contacts (opted in
beforehand) each get several messages from concurrent SendSms callers spread over the replicas.

Phase 1 — gate to provider: the clock runs from the first SendSms until every message is
recorded SENT (accepted by the provider, its id stored). Phase 2 — with delivery receipts: the
stand-in also posts a signed "delivered" status callback per message (spread over the replicas'
webhook listeners); the clock runs until every message is recorded DELIVERED. The stand-in's
counts prove each message reached the provider exactly once. Markdown on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from parley.messaging.v1 import messaging_service_pb2 as pb  # noqa: E402
from parley.messaging.v1.messaging_service_pb2_grpc import MessagingServiceStub  # noqa: E402

from bench.proc_cpu import cpu_seconds, tree_cpu_seconds  # noqa: E402
from services.common import tenancy  # noqa: E402
from services.common.clients import key_metadata  # noqa: E402
from services.common.db import create_pool  # noqa: E402
from services.common.embedded import embedded_server_url, with_database  # noqa: E402
from tests.messaging.twilio_standin import ACCOUNT_SID, AUTH_TOKEN  # noqa: E402

PUBLIC_BASE = "https://hooks.parley.bench"


def log(msg: str) -> None:
    print(f"bench_messaging: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a helper process from the repository root."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def postmaster_pid() -> int | None:
    """The embedded server's postmaster (None when PARLEY_DATABASE_URL names another server)."""
    if os.environ.get("PARLEY_DATABASE_URL"):
        return None
    pidfile = ROOT / ".parley" / "bench" / "pgdata" / "postmaster.pid"
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def admin_url() -> str:
    return os.environ.get("PARLEY_DATABASE_URL") or embedded_server_url(ROOT / ".parley" / "bench")


async def fresh_database() -> str:
    admin = admin_url()
    name = f"parley_bench_msg_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin, name)


async def drop_database(url: str) -> None:
    # The database name is the URL's path; the query may hold a socket path with slashes.
    name = url.split("://", 1)[1].split("?", 1)[0].split("/", 1)[1]
    conn = await asyncpg.connect(admin_url())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def db_counters(pool: asyncpg.Pool) -> tuple[int, int]:
    """(transactions committed in the database, status callbacks parked before their hand-off was recorded)."""
    row = await pool.fetchrow(
        """SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) AS commits,
                  (SELECT n_tup_ins FROM pg_stat_user_tables
                    WHERE schemaname = 'messaging' AND relname = 'early_statuses') AS early"""
    )
    assert row is not None
    return int(row["commits"]), int(row["early"] or 0)


async def wait_serving(addr: str, proc: subprocess.Popen[bytes]) -> None:
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError("messaging exited during start")
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("messaging never became healthy")


@dataclass
class Phase:
    name: str
    total: int
    accepted_s: float
    final_s: float
    p50_ms: float
    p99_ms: float
    cpu_messaging: float
    cpu_standin: float
    cpu_postgres: float | None
    commits: int
    early: int
    final: str


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: list[subprocess.Popen[bytes]] = []

    async def phase(
        self,
        name: str,
        stubs: list[MessagingServiceStub],
        md: tuple[tuple[str, str], ...],
        pool: asyncpg.Pool,
        ws_id: str,
        phones: list[str],
        final: str,
        batch: int,
    ) -> Phase:
        """Send every contact ``per_contact`` SMS (one per SendSms, or ``batch`` per BatchSendSms)."""
        per, conc = self.args.per_contact, self.args.concurrency
        if batch > 1:
            conc = max(2, conc // 16)
        jobs = [
            (f"{name}-{r}-{i}", phones[i], f"{name} message {r}-{i}") for r in range(per) for i in range(len(phones))
        ]
        groups = [jobs[i : i + batch] for i in range(0, len(jobs), batch)]
        queue: asyncio.Queue[list[tuple[str, str, str]]] = asyncio.Queue()
        for group in groups:
            queue.put_nowait(group)
        latencies: list[float] = []

        async def sender(n: int) -> None:
            stub = stubs[n % len(stubs)]
            while not queue.empty():
                group = queue.get_nowait()
                reqs = [pb.SendSmsRequest(request_id=rid, phone=phone, body=body) for rid, phone, body in group]
                t = time.perf_counter()
                if batch > 1:
                    resp = await stub.BatchSendSms(pb.BatchSendSmsRequest(requests=reqs), metadata=md, timeout=60)
                    bad = [r.error for r in resp.results if r.WhichOneof("result") == "error"]
                    if bad:
                        raise RuntimeError(f"refused: {bad[0]}")
                else:
                    await stub.SendSms(reqs[0], metadata=md, timeout=60)
                latencies.append(time.perf_counter() - t)

        total = len(jobs)
        cpu0 = [cpu_seconds(p.pid) for p in self.procs]
        pg = postmaster_pid()
        pg0 = tree_cpu_seconds(pg) if pg else 0.0
        db0 = await db_counters(pool)
        how = f"BatchSendSms of {batch}" if batch > 1 else "SendSms"
        log(f"{name}: sending {total} SMS by {how}, {conc} concurrent callers over {len(stubs)} replica(s)")
        t0 = time.perf_counter()
        await asyncio.gather(*(sender(n) for n in range(conc)))
        accepted = time.perf_counter() - t0
        statuses = ("sent", "delivered") if final == "sent" else ("delivered",)
        polls = 0
        while True:
            polls += 1
            row = await pool.fetchrow(
                """SELECT count(*) FILTER (WHERE status = ANY($3::text[])) AS done,
                          count(*) FILTER (WHERE status IN ('failed', 'blocked', 'undelivered')) AS bad
                   FROM messaging.messages WHERE workspace_id = $1 AND request_id LIKE $2""",
                ws_id,
                f"{name}-%",
                list(statuses),
            )
            elapsed = time.perf_counter() - t0
            if row["done"] >= total or row["bad"]:
                break
            if elapsed > 600:
                raise RuntimeError(f"{name}: not final after 600s: {dict(row)}")
            await asyncio.sleep(0.05)
        if row["bad"]:
            raise RuntimeError(f"{name}: {row['bad']} messages failed")
        cpu1 = [cpu_seconds(p.pid) for p in self.procs]
        pg_used = tree_cpu_seconds(pg) - pg0 if pg else None
        await asyncio.sleep(0.6)  # the statistics collector lags up to half a second
        db1 = await db_counters(pool)
        used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
        latencies.sort()
        log(f"{name}: {total} {final} in {elapsed:.2f}s")
        return Phase(
            name,
            total,
            accepted,
            elapsed,
            latencies[len(latencies) // 2] * 1000,
            latencies[int(len(latencies) * 0.99)] * 1000,
            sum(used[1:]),
            used[0],
            pg_used,
            db1[0] - db0[0] - polls - 1,  # not the bench's own queries
            db1[1] - db0[1],
            final,
        )

    async def run(self) -> str:
        args = self.args
        db = await fresh_database()
        grpc_ports = [free_port() for _ in range(args.replicas)]
        http_ports = [free_port() for _ in range(args.replicas)]
        standin_port = free_port()
        callbacks = ",".join(f"http://127.0.0.1:{p}" for p in http_ports)
        prof = Path(tempfile.gettempdir()) / f"bench_messaging_{os.getpid()}.prof"
        standin_prof = prof.with_suffix(".standin.prof")
        self.procs.append(
            spawn(
                [*(["-m", "cProfile", "-o", str(standin_prof)] if args.profile else []),
                 "-m", "tests.messaging.twilio_standin", "--port", str(standin_port),
                 "--callback-base", callbacks, "--public-base", PUBLIC_BASE,
                 "--event-loop", "asyncio" if args.profile else "uvloop",
                 "--callback-statuses", args.receipt_statuses]
            )
        )  # fmt: skip
        for i in range(args.replicas):
            env = dict(os.environ)
            env.update(
                PARLEY_DATABASE_URL=db,
                PARLEY_HOST="127.0.0.1",
                PARLEY_MESSAGING_PORT=str(grpc_ports[i]),
                PARLEY_MESSAGING_HTTP_PORT=str(http_ports[i]),
                PARLEY_SMS_PROVIDER="twilio",
                PARLEY_TWILIO_ACCOUNT_SID=ACCOUNT_SID,
                PARLEY_TWILIO_AUTH_TOKEN=AUTH_TOKEN,
                PARLEY_TWILIO_FROM_NUMBER="+15005550006",
                PARLEY_TWILIO_API_BASE_URL=f"http://127.0.0.1:{standin_port}",
                PARLEY_PUBLIC_BASE_URL=PUBLIC_BASE,
                # No peers here: outcome events wait in the outbox, which is durable.
                PARLEY_INGEST_ADDR="127.0.0.1:9",
                PARLEY_IDENTITY_ADDR="127.0.0.1:9",
                PARLEY_LOG_LEVEL="error",
                PARLEY_LOG_FORMAT="json",
                PARLEY_DB_POOL_MAX="20",
            )
            wrap = []
            if args.profile and i == 0:
                wrap = ["-m", "cProfile", "-o", str(prof)]
                # uvloop runs callbacks in C, where cProfile cannot see whose they are.
                env["PARLEY_EVENT_LOOP"] = "asyncio"
            self.procs.append(spawn([*wrap, "-m", "services.messaging"], env))
        pool = await create_pool(db, max_size=4)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in grpc_ports]
        try:
            for port, proc in zip(grpc_ports, self.procs[1:], strict=True):
                await wait_serving(f"127.0.0.1:{port}", proc)
            await tenancy.migrate(pool)
            ws, key = await tenancy.create_workspace(pool, "bench")
            md = key_metadata(key)
            phones = [f"+1212{2000000 + i:07d}" for i in range(args.contacts)]
            stubs = [MessagingServiceStub(ch) for ch in channels]
            fields = ["send_window_start", "send_window_end", "rate_limit_per_second", "daily_cap"]
            await stubs[0].UpdateMessagingPolicy(
                pb.UpdateMessagingPolicyRequest(
                    policy=pb.MessagingPolicy(
                        send_window_start="00:00", send_window_end="00:00", rate_limit_per_second=0, daily_cap=0
                    ),
                    update_mask={"paths": fields},
                ),
                metadata=md,
            )
            log(f"opting in {len(phones)} contacts")
            sem = asyncio.Semaphore(32)

            async def opt_in(phone: str) -> None:
                async with sem:
                    consent = pb.Consent(phone=phone, channel=pb.CHANNEL_SMS, subscribed=True)
                    await stubs[0].SetConsent(pb.SetConsentRequest(consent=consent), metadata=md)

            await asyncio.gather(*(opt_in(p) for p in phones))
            async with aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{standin_port}"
                async with http.post(f"{base}/control", json={"callbacks": False}):
                    pass
                done: list[tuple[Phase, str]] = []
                if "single" in args.phases:
                    p = await self.phase("single", stubs, md, pool, ws.id, phones, "sent", 1)
                    done.append((p, "SendSms per message; until recorded SENT (provider accepted)"))
                if "batch" in args.phases:
                    p = await self.phase("batch", stubs, md, pool, ws.id, phones, "sent", args.batch)
                    done.append((p, f"BatchSendSms of {args.batch}; until recorded SENT"))
                if "receipts" in args.phases:
                    async with http.post(f"{base}/control", json={"callbacks": True}):
                        pass
                    p = await self.phase("receipts", stubs, md, pool, ws.id, phones, "delivered", args.batch)
                    what = "a status callback" if "," not in args.receipt_statuses else "status callbacks"
                    done.append(
                        (
                            p,
                            f"BatchSendSms of {args.batch}; until recorded DELIVERED ({what}:"
                            f" {args.receipt_statuses.replace(',', ', ')})",
                        )
                    )
                async with http.get(f"{base}/count") as resp:
                    counts = await resp.json()
            expected = sum(p.total for p, _ in done)
        finally:
            for ch in channels:
                await ch.close()
            await pool.close()
            stop_all(self.procs)
            await drop_database(db)
            for who, path in (("messaging replica 1", prof), ("stand-in", standin_prof)):
                if args.profile and path.exists():
                    print(f"--- profile: {who}", file=sys.stderr)
                    stats = pstats.Stats(str(path), stream=sys.stderr)
                    stats.sort_stats("tottime").print_stats(40)
        once = counts["received"] == expected and counts["distinct"] == expected
        rows = []
        for p, what in done:
            pg_ms = "n/a" if p.cpu_postgres is None else f"{p.cpu_postgres / p.total * 1000:.2f}"
            rows.append(
                f"| {p.name}: {what} | {p.total:,} | {p.total / p.accepted_s:,.0f} /s |"
                f" **{p.total / p.final_s:,.0f} /s** |"
                f" {p.p50_ms:.0f} / {p.p99_ms:.0f} ms | {p.cpu_messaging / p.total * 1000:.2f} /"
                f" {p.cpu_standin / p.total * 1000:.2f} / {pg_ms} | {p.commits / p.total * 1000:,.0f} |"
            )
        notes = [
            f"\n{p.early:,} status callbacks of phase {p.name} ({p.total:,} SMS) arrived before the dispatcher"
            " had recorded the provider's id (parked, then recorded with it)."
            for p, _ in done
            if p.final == "delivered"
        ]
        return "\n".join(
            [
                "## Messaging: SMS through the gate to a Twilio stand-in",
                "",
                f"{args.contacts:,} distinct opted-in contacts, {args.per_contact} SMS each per phase,"
                f" {args.concurrency} concurrent SendSms callers (a sixteenth as many batch callers)"
                f" over {args.replicas} messaging replica(s)"
                " (gRPC + gate + dispatcher + webhooks each) sharing one database; the Twilio stand-in in its own"
                " process. Each phase's clock runs from the first SendSms until every message of the phase has"
                " that final status.",
                "",
                "| phase | SMS | calls answered | **through to final status** | call p50 / p99 | CPU s per 1k SMS:"
                " messaging / stand-in / PostgreSQL | DB commits per 1k SMS |",
                "|---|---|---|---|---|---|---|",
                *rows,
                "",
                f"Provider received {counts['received']:,} messages with {counts['distinct']:,} distinct bodies in"
                f" {counts['attempts']:,} HTTP requests for {expected:,} SendSms calls:"
                f" {'each exactly once' if once else 'MISMATCH'}. Target: ≥ 1,000 SMS/s through the gate,"
                " every one recorded with its final status.",
                *notes,
            ]
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so the cleanup below runs when the bench is stopped


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--contacts", type=int, default=1000)
    parser.add_argument("--per-contact", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100, help="sends per BatchSendSms call")
    parser.add_argument("--phases", default="single,batch,receipts", help="comma-separated phases to run")
    parser.add_argument(
        "--receipt-statuses",
        default="sent,delivered",
        help="statuses the stand-in posts per message in phase receipts, in order (default: as Twilio does)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the first replica under cProfile (on asyncio's loop); stats on stderr",
    )
    print(asyncio.run(Bench(parser.parse_args()).run()))


if __name__ == "__main__":
    main()
