"""Campaign: trigger-to-send latency through ingest → identity → campaign → messaging, and timer drain rate.

Runs ingest, identity, messaging and campaign as their own processes on a fresh bench database
(PARLEY_DATABASE_URL's server, else the embedded one under .parley/bench), then:

1. latency: a live send-immediately campaign; track events through ingest at a fixed rate; for each,
   the time from ingest's ack to messaging storing the SMS (its ``create_time``);
2. timers: 100,000 enrollments made due at once, drained by one campaign replica, then by two.

Prints a markdown section on stdout; progress goes to stderr. BENCH_CAMPAIGN_RATE, _SECONDS and
_TIMERS override the defaults (200 events/s, 60 s, 100,000); a 20 s run at half the rate comes first.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import asyncpg  # noqa: E402
import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from parley.campaign.v1 import campaign_service_pb2 as cpb  # noqa: E402
from parley.campaign.v1.campaign_service_pb2_grpc import CampaignServiceStub  # noqa: E402
from parley.common.v1.event_pb2 import Event, EventType  # noqa: E402
from parley.ingest.v1 import ingest_service_pb2 as ipb  # noqa: E402
from parley.ingest.v1.ingest_service_pb2_grpc import IngestServiceStub  # noqa: E402

from bench.proc_cpu import cpu_seconds, tree_cpu_seconds  # noqa: E402
from services.campaign.definition import from_dict  # noqa: E402
from services.common import tenancy  # noqa: E402
from services.common.clients import key_metadata  # noqa: E402
from services.common.db import create_pool  # noqa: E402
from services.common.embedded import embedded_server_url, with_database  # noqa: E402

RATE = float(os.environ.get("BENCH_CAMPAIGN_RATE", "200"))
SECONDS = float(os.environ.get("BENCH_CAMPAIGN_SECONDS", "60"))
TIMERS = int(os.environ.get("BENCH_CAMPAIGN_TIMERS", "100000"))
# A shorter run at half the rate shows the latency the pipeline has with headroom.
HALF_SECONDS = float(os.environ.get("BENCH_CAMPAIGN_HALF_SECONDS", "20"))

SEND_NOW = {
    "trigger": {"event": {"name": "Bench Triggered"}},
    "re_entry": {"policy": "any_time"},
    "send_window": {"start": "00:00", "end": "23:59"},
    "steps": [{"id": "sms", "send_sms": {"body": 'Hi {{contact.first_name|default:"there"}}', "transactional": True}}],
}
TIMER_FLOW = {
    "trigger": {"event": {"name": "Bench Timers"}},
    "steps": [
        {"id": "w1", "next": "w2", "wait": {"duration": "1m"}},
        {"id": "w2", "next": "", "wait": {"duration": "1d"}},
    ],
}


def log(msg: str) -> None:
    print(f"bench_campaign: {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def postmaster_pid() -> int:
    """The embedded Postgres server's postmaster (0 when PARLEY_DATABASE_URL names another server)."""
    pid_file = ROOT / ".parley" / "bench" / "pgdata" / "postmaster.pid"
    if os.environ.get("PARLEY_DATABASE_URL") or not pid_file.exists():
        return 0
    return int(pid_file.read_text().split()[0])


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine: how loaded it was during a phase."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(parts) - parts[3] - parts[4], sum(parts)


async def metered(procs: dict[str, int], phase: Any) -> dict[str, Any]:
    """Run a latency phase; add each service's CPU seconds per event and the machine's busy share."""
    pg = postmaster_pid()
    before = {name: cpu_seconds(pid) for name, pid in procs.items()}
    pg_before = tree_cpu_seconds(pg) if pg else 0.0
    busy0, total0 = machine_jiffies()
    result: dict[str, Any] = await phase
    busy1, total1 = machine_jiffies()
    events = max(1, result["events"])
    cpu = {name: (cpu_seconds(pid) - before[name]) * 1000 / events for name, pid in procs.items()}
    if pg:
        cpu["postgres"] = (tree_cpu_seconds(pg) - pg_before) * 1000 / events
    result["cpu_ms_per_event"] = {k: round(v, 2) for k, v in cpu.items()}
    result["machine_busy"] = round((busy1 - busy0) / max(1, total1 - total0), 2)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve(service: str, env_extra: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """One service in its own process; returns once its health check says SERVING."""
    env = {**os.environ, "PARLEY_HOST": "127.0.0.1", "PARLEY_LOG_LEVEL": "warning", **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", f"services.{service}"], cwd=ROOT, env=env)  # noqa: ASYNC220
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            try:
                got = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if got.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc
            except grpc.aio.AioRpcError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited during start")
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{service} did not become SERVING")


async def live(stub: CampaignServiceStub, md: tuple[tuple[str, str], ...], name: str, data: dict) -> str:  # type: ignore[type-arg]
    definition = from_dict(data, cpb.CampaignDefinition(), "definition")
    created = await stub.CreateCampaign(
        cpb.CreateCampaignRequest(campaign=cpb.Campaign(name=name, definition=definition)),
        metadata=md,  # type: ignore[arg-type]
    )
    await stub.PublishCampaign(cpb.PublishCampaignRequest(campaign_id=created.campaign.id), metadata=md)
    return str(created.campaign.id)


def stamp(e: Event) -> Event:
    now = datetime.now(UTC)
    for ts in (e.timestamp, e.original_timestamp, e.sent_at):
        ts.FromDatetime(now)
    return e


async def latency_phase(
    url: str,
    ingest: IngestServiceStub,
    md: tuple[tuple[str, str], ...],
    rate: float,
    seconds: float,
    tag: str,
    first_phone: int,
) -> dict[str, float]:
    # One contact per event, so no trigger finds its contact still enrolled from an earlier one.
    total = int(rate * seconds)
    log(f"creating {total} contacts")
    for start in range(0, total, 500):
        events = []
        for i in range(start, min(start + 500, total)):
            e = Event(type=EventType.EVENT_TYPE_IDENTIFY, message_id=f"id-{tag}-{i}", user_id=f"b-{tag}-{i}")
            e.traits.update({"phone": f"+1212{first_phone + i}", "first_name": f"n{i}"})
            events.append(stamp(e))
        await ingest.IngestBatch(ipb.IngestBatchRequest(events=events), metadata=md)
    # Let the campaign consumer catch up with the identify events before timing anything.
    await asyncio.sleep(2.0)
    acks: dict[str, float] = {}
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        mid = f"trig-{tag}-{i}-{uuid.uuid4().hex[:6]}"
        e = Event(type=EventType.EVENT_TYPE_TRACK, name="Bench Triggered", message_id=mid, user_id=f"b-{tag}-{i}")
        try:
            await ingest.Track(ipb.TrackRequest(event=stamp(e)), metadata=md, timeout=10)
            acks[mid] = time.time()
        except grpc.aio.AioRpcError:
            errors += 1

    log(f"sending {total} events at {rate:.0f}/s")
    tasks = []
    started = time.perf_counter()
    for i in range(total):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    send_seconds = time.perf_counter() - started
    conn = await asyncpg.connect(url)
    try:
        latencies: list[float] = []
        for _ in range(300):
            rows = await conn.fetch(
                """SELECT e.trigger_event->>'message_id' AS mid, extract(epoch FROM m.create_time) AS at,
                          extract(epoch FROM e.enroll_time) AS enrolled, extract(epoch FROM h.enter_time) AS stepped
                   FROM campaign.enrollments e JOIN messaging.messages m ON m.request_id = e.id::text || ':sms:1'
                   LEFT JOIN campaign.step_history h
                          ON h.workspace_id = e.workspace_id AND h.enrollment_id = e.id AND h.step_id = 'sms'
                   WHERE e.trigger_event->>'message_id' LIKE $1""",
                f"trig-{tag}-%",
            )
            if len(rows) >= len(acks):
                break
            await asyncio.sleep(0.2)
        done = [r for r in rows if r["mid"] in acks]
        latencies = [(float(r["at"]) - acks[r["mid"]]) * 1000 for r in done]
        # Where the time goes: ack → the consumer's batch (the enrollment's enroll_time), → the step's
        # start (the timer claim, or the in-process run after the enrolling commit), → messaging's row.
        stages = {
            "stream": [(float(r["enrolled"]) - acks[r["mid"]]) * 1000 for r in done],
            "to_step": [(float(r["stepped"]) - float(r["enrolled"])) * 1000 for r in done if r["stepped"]],
            "send": [(float(r["at"]) - float(r["stepped"])) * 1000 for r in done if r["stepped"]],
        }
        log(
            "stages p50/p99 ms: "
            + ", ".join(f"{k} {pct(v, 0.5):.1f}/{pct(v, 0.99):.1f}" for k, v in stages.items() if v)
        )
    finally:
        await conn.close()
    return {
        "events": total,
        "seconds": seconds,
        "acked": len(acks),
        "errors": errors,
        "sent": len(latencies),
        "rate": total / send_seconds,
        "p50": pct(latencies, 0.5) if latencies else float("nan"),
        "p99": pct(latencies, 0.99) if latencies else float("nan"),
        "max": max(latencies) if latencies else float("nan"),
        "stages": {k: (pct(v, 0.5), pct(v, 0.99)) for k, v in stages.items() if v},
    }


async def timer_phase(
    url: str, ws_id: str, campaign_id: str, tag: str, replicas: list[int]
) -> tuple[float, int, dict[str, float]]:
    """Seed TIMERS enrollments waiting at w1, make them all due at once, time the drain.

    Also the CPU seconds the campaign replicas and Postgres spent draining, and the machine's busy share.
    """
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """INSERT INTO campaign.enrollments (workspace_id, id, campaign_id, version, contact_id, step_id, visit,
                                                 phase, due_at, visits, enroll_time)
               SELECT $1::uuid, gen_random_uuid(), $2::uuid, 1, $3 || g, 'w1', 1, 'timer', 'infinity',
                      '{"w1": 1}'::jsonb, now()
               FROM generate_series(1, $4) AS g""",
            ws_id,
            campaign_id,
            f"{tag}-",
            TIMERS,
        )
        await conn.execute("ANALYZE campaign.enrollments")
        await conn.execute(
            "UPDATE campaign.enrollments SET due_at = now() WHERE campaign_id = $1 AND due_at = 'infinity'", campaign_id
        )
        pg = postmaster_pid()
        cpu0 = sum(cpu_seconds(pid) for pid in replicas), tree_cpu_seconds(pg) if pg else 0.0
        busy0, total0 = machine_jiffies()
        await conn.execute("SELECT pg_notify('campaign_due', '')")
        started = time.perf_counter()
        while True:
            left = await conn.fetchval(
                """SELECT count(*) FROM campaign.enrollments
                   WHERE campaign_id = $1 AND step_id = 'w1' AND state = 'active'""",
                campaign_id,
            )
            if left == 0:
                break
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"timers not drained: {left} left")
            await asyncio.sleep(0.1)
        took = time.perf_counter() - started
        busy1, total1 = machine_jiffies()
        usage = {
            "campaign": sum(cpu_seconds(pid) for pid in replicas) - cpu0[0],
            "postgres": (tree_cpu_seconds(pg) - cpu0[1]) if pg else 0.0,
            "busy": (busy1 - busy0) / max(1, total1 - total0),
        }
        moved = await conn.fetchval(
            "SELECT count(*) FROM campaign.enrollments"
            " WHERE campaign_id = $1 AND step_id = 'w2' AND contact_id LIKE $2",
            campaign_id,
            f"{tag}-%",
        )
    finally:
        await conn.close()
    return took, int(moved), usage


async def main() -> None:
    admin = os.environ.get("PARLEY_DATABASE_URL") or embedded_server_url(ROOT / ".parley" / "bench")
    db = f"parley_bench_campaign_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{db}"')
    await conn.close()
    url = with_database(admin, db)
    token = secrets.token_urlsafe(24)
    ports = {name: free_port() for name in ("ingest", "identity", "messaging", "campaign", "campaign2")}
    common = {"PARLEY_DATABASE_URL": url, "PARLEY_INTERNAL_TOKEN": token, "PARLEY_DB_POOL_MAX": "12"}
    addrs = {
        "PARLEY_INGEST_ADDR": f"127.0.0.1:{ports['ingest']}",
        "PARLEY_IDENTITY_ADDR": f"127.0.0.1:{ports['identity']}",
        "PARLEY_MESSAGING_ADDR": f"127.0.0.1:{ports['messaging']}",
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            await serve("identity", {**common, "PARLEY_IDENTITY_PORT": str(ports["identity"])}, ports["identity"])
        )
        procs.append(
            await serve(
                "messaging",
                {
                    **common,
                    **addrs,
                    "PARLEY_MESSAGING_PORT": str(ports["messaging"]),
                    "PARLEY_MESSAGING_HTTP_PORT": str(free_port()),
                    "PARLEY_SEND_WINDOW_START": "00:00",
                    "PARLEY_SEND_WINDOW_END": "23:59",
                    "PARLEY_WORKSPACE_RATE_LIMIT_PER_SECOND": "100000",
                    "PARLEY_CONTACT_DAILY_CAP": "100000",
                },
                ports["messaging"],
            )
        )
        procs.append(
            await serve(
                "ingest",
                {
                    **common,
                    **addrs,
                    "PARLEY_INGEST_PORT": str(ports["ingest"]),
                    "PARLEY_INGEST_HTTP_PORT": str(free_port()),
                },
                ports["ingest"],
            )
        )
        procs.append(
            await serve(
                "campaign",
                {
                    **common,
                    **addrs,
                    "PARLEY_CAMPAIGN_PORT": str(ports["campaign"]),
                    "PARLEY_LOG_LEVEL": os.environ.get("BENCH_CAMPAIGN_LOG", "warning"),
                },
                ports["campaign"],
            )
        )
        pool = await create_pool(url, max_size=2)
        ws, key = await tenancy.create_workspace(pool, "bench")
        await pool.close()
        md = key_metadata(key)
        ingest_ch = grpc.aio.insecure_channel(f"127.0.0.1:{ports['ingest']}")
        camp_ch = grpc.aio.insecure_channel(f"127.0.0.1:{ports['campaign']}")
        campaigns = CampaignServiceStub(camp_ch)
        await live(campaigns, md, "send-now", SEND_NOW)
        pids = dict(zip(("identity", "messaging", "ingest", "campaign"), (p.pid for p in procs), strict=True))
        half = await metered(
            pids, latency_phase(url, IngestServiceStub(ingest_ch), md, RATE / 2, HALF_SECONDS, "half", 2_000_000)
        )
        log(f"latency at half rate: {json.dumps(half)}")
        lat = await metered(
            pids, latency_phase(url, IngestServiceStub(ingest_ch), md, RATE, SECONDS, "full", 3_000_000)
        )
        log(f"latency: {json.dumps(lat)}")

        timer_campaign = await live(campaigns, md, "timers", TIMER_FLOW)
        one_s, one_n, one_cpu = await timer_phase(url, ws.id, timer_campaign, "one", [pids["campaign"]])
        log(f"one replica: {one_n} in {one_s:.1f}s")
        procs.append(
            await serve(
                "campaign", {**common, **addrs, "PARLEY_CAMPAIGN_PORT": str(ports["campaign2"])}, ports["campaign2"]
            )
        )
        two_s, two_n, two_cpu = await timer_phase(url, ws.id, timer_campaign, "two", [pids["campaign"], procs[-1].pid])
        log(f"two replicas: {two_n} in {two_s:.1f}s")
        await ingest_ch.close()
        await camp_ch.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await conn.close()

    print("## Campaign\n")
    print(
        "Trigger-to-send: a live send-immediately campaign; track events through ingest at a fixed rate, one "
        "contact per event. Latency is from ingest's ack to messaging storing the SMS (ingest → identity → "
        "event stream → enrollment → the first step run right after the enrolling commit, with the contact "
        "read → SendSms). All four services, Postgres and the "
        "load generator share this machine's cores.\n"
    )
    print(
        "| rate | events | sent | p50 | p99 | max | target p50 ≤ 50 ms, p99 ≤ 250 ms |\n|---|---|---|---|---|---|---|"
    )
    for r in (half, lat):
        ok = r["p50"] <= 50 and r["p99"] <= 250
        print(
            f"| {r['rate']:.0f}/s for {r['seconds']:.0f}s | {r['events']:.0f} ({r['errors']:.0f} errors) | "
            f"{r['sent']:.0f} | {r['p50']:.1f} ms | {r['p99']:.1f} ms | {r['max']:.1f} ms | "
            f"{'met' if ok else 'not met'} |"
        )
    print()
    print(
        "Where the time goes, p50 / p99 ms: *stream* from ingest's ack to the campaign consumer's batch "
        "(identity's commit, its stream, the consumer's queue); *to step* from there to the step's start "
        "(enrollment query and commit, then the fresh run's start); *send* from there to messaging's row "
        "(claim, contact read, SendSms). CPU is milliseconds per event of each process over the phase "
        "(contact creation included), and the machine's busy share.\n"
    )
    print("| rate | stream | to step | send | CPU ms/event | machine busy |\n|---|---|---|---|---|---|")
    for r in (half, lat):
        st = r.get("stages", {})
        cells = [f"{st[k][0]:.1f} / {st[k][1]:.1f}" if k in st else "-" for k in ("stream", "to_step", "send")]
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_event"].items())
        print(f"| {r['rate']:.0f}/s | {' | '.join(cells)} | {cpu} | {r['machine_busy']:.0%} |")
    print()
    print(
        f"Timer drain: {TIMERS:,} enrollments waiting at a `wait` step, made due in one statement; each "
        "firing ends the wait and enters the next `wait` (two step visits, one transaction per batch of 200, "
        "history written set-based).\n"
    )
    print(
        "| replicas | drained | seconds | enrollments/s | step visits/s | target "
        "| CPU s: campaign / postgres | machine busy |\n|---|---|---|---|---|---|---|---|"
    )
    for n, drained, took, usage, target in (
        (1, one_n, one_s, one_cpu, "≥ 2,000 steps/s"),
        (2, two_n, two_s, two_cpu, "more than one"),
    ):
        print(
            f"| {n} | {drained:,} | {took:.1f} | {drained / took:,.0f} | {2 * drained / took:,.0f} | {target} "
            f"| {usage['campaign']:.1f} / {usage['postgres']:.1f} | {usage['busy']:.0%} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
