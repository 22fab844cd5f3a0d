"""Identity: GetContact-by-phone latency over 1,000,000 contacts, RecordEvents throughput, stream delivery delay.

Runs against a fresh bench database (PARLEY_DATABASE_URL's server, else the embedded one under
.parley/bench), loads the contacts set-based (INSERT ... SELECT FROM generate_series), runs identity
as its own process (``python -m services.identity``) on loopback and calls it through the generated
stubs. Prints a markdown section on stdout; progress goes to stderr.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import asyncpg  # noqa: E402
import grpc  # noqa: E402
from google.protobuf.struct_pb2 import Struct  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from parley.common.v1.event_pb2 import Event, EventType  # noqa: E402
from parley.identity.v1 import identity_service_pb2 as ipb  # noqa: E402
from parley.identity.v1.identity_service_pb2_grpc import IdentityServiceStub  # noqa: E402

from services.common import tenancy  # noqa: E402
from services.common.clients import internal_metadata, key_metadata  # noqa: E402
from services.common.db import create_pool  # noqa: E402
from services.common.embedded import embedded_server_url, with_database  # noqa: E402

CONTACTS = int(os.environ.get("BENCH_IDENTITY_CONTACTS", "1000000"))
LOOKUPS = 3000
BATCHES, BATCH_SIZE, IN_FLIGHT = 40, 500, 4
STREAM_SAMPLES = 100


def log(msg: str) -> None:
    print(f"bench_identity: {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_phone(i: int) -> str:
    return f"+1415{2_000_000 + i}"


def formats(e164: str) -> list[str]:
    national = e164[2:]
    return [
        e164,
        f"({national[:3]}) {national[3:6]}-{national[6:]}",
        f"{national[:3]}.{national[3:6]}.{national[6:]}",
        f"1-{national[:3]}-{national[3:6]}-{national[6:]}",
        national,
    ]


async def load_contacts(url: str, workspace_id: str) -> float:
    """1M contacts, each with one user id, in three set-based statements; then vacuumed, analyzed, checkpointed."""
    conn = await asyncpg.connect(url)
    started = time.perf_counter()
    try:
        await conn.execute("SET maintenance_work_mem = '256MB'")
        async with conn.transaction():
            await conn.execute(
                """INSERT INTO identity.contacts (workspace_id, id, phone, properties, property_times, phone_time_zone)
                   SELECT $1::uuid, md5('c' || g)::uuid, '+1415' || (2000000 + g),
                          jsonb_build_object('first_name', 'n' || g, 'score', g % 100,
                                             'phone', '+1415' || (2000000 + g)),
                          '{}'::jsonb, 'America/Los_Angeles'
                     FROM generate_series(0, $2 - 1) AS g""",
                workspace_id,
                CONTACTS,
            )
            await conn.execute(
                """INSERT INTO identity.identities (workspace_id, kind, external_id, user_key)
                   SELECT $1::uuid, 'user', 'bench-' || g, md5('u' || g)::uuid FROM generate_series(0, $2 - 1) AS g""",
                workspace_id,
                CONTACTS,
            )
            await conn.execute(
                """INSERT INTO identity.contact_users (workspace_id, contact_id, user_key)
                   SELECT $1::uuid, md5('c' || g)::uuid, md5('u' || g)::uuid FROM generate_series(0, $2 - 1) AS g""",
                workspace_id,
                CONTACTS,
            )
        # A steady state, not one busy vacuuming three million fresh rows (and the GIN pending
        # list) on the same two cores while latency is measured.
        for table in ("contacts", "identities", "contact_users"):
            await conn.execute(f"VACUUM (ANALYZE) identity.{table}")
        await conn.execute("CHECKPOINT")  # the load's dirty pages written now, not during the lookups
    finally:
        await conn.close()
    return time.perf_counter() - started


async def lookup_execution_ms(url: str, workspace_id: str, phones: list[str]) -> list[float]:
    """Server-side execution time of GetContact's own query, as Postgres reports it."""
    from services.identity.repository import _CONTACT_COLUMNS

    conn = await asyncpg.connect(url)
    try:
        out = []
        for phone in phones:
            plan = await conn.fetchval(
                f"""EXPLAIN (ANALYZE, FORMAT JSON) SELECT {_CONTACT_COLUMNS} FROM identity.contacts c
                     WHERE c.workspace_id = $1::uuid AND c.phone = $2""",
                workspace_id,
                phone,
            )
            out.append(float(json.loads(plan)[0]["Execution Time"]))
        return out
    finally:
        await conn.close()


def struct(value: dict) -> Struct:  # type: ignore[type-arg]
    out = Struct()
    out.update(value)
    return out


def workload(rng: random.Random, n: int) -> list[Event]:
    events = []
    now = datetime.now(UTC)
    for _ in range(n):
        user = rng.randrange(20_000)
        roll = rng.random()
        e = Event(message_id=uuid.uuid4().hex, user_id=f"w-{user}", anonymous_id=f"a-{user}")
        if roll < 0.2:
            phone = f"+1212{2_000_000 + user}"
            e.type = EventType.EVENT_TYPE_IDENTIFY
            e.phone = phone
            e.traits.CopyFrom(struct({"phone": phone, "first_name": f"n{user}", "score": rng.randrange(100)}))
        elif roll < 0.4:
            e.type, e.name = EventType.EVENT_TYPE_PAGE, "Pricing"
        else:
            e.type, e.name = EventType.EVENT_TYPE_TRACK, "Loan Viewed"
            e.properties.CopyFrom(struct({"amount": rng.randrange(10_000), "currency": "USD"}))
        for ts in (e.timestamp, e.received_at, e.original_timestamp):
            ts.FromDatetime(now)
        events.append(e)
    return events


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve(url: str, token: str) -> tuple[subprocess.Popen[bytes], int]:
    """identity in its own process; returns once its health check says SERVING."""
    port = free_port()
    env = {
        **os.environ,
        "PARLEY_DATABASE_URL": url,
        "PARLEY_HOST": "127.0.0.1",
        "PARLEY_IDENTITY_PORT": str(port),
        "PARLEY_INTERNAL_TOKEN": token,
        "PARLEY_LOG_LEVEL": "warning",
        "PARLEY_DB_POOL_MAX": "12",
    }
    proc = subprocess.Popen([sys.executable, "-m", "services.identity"], cwd=ROOT, env=env)  # noqa: ASYNC220
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            try:
                got = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if got.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, port
            except grpc.aio.AioRpcError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("identity exited during start")
            await asyncio.sleep(0.1)
    raise RuntimeError("identity did not become SERVING")


async def main() -> None:
    admin = os.environ.get("PARLEY_DATABASE_URL") or embedded_server_url(ROOT / ".parley" / "bench")
    db = f"parley_bench_identity_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{db}"')
    await conn.close()
    url = with_database(admin, db)
    proc = None
    token = secrets.token_urlsafe(24)
    try:
        proc, port = await serve(url, token)
        pool = await create_pool(url, max_size=2)
        ws, key = await tenancy.create_workspace(pool, "bench")
        stream_ws, stream_key = await tenancy.create_workspace(pool, "bench-stream")
        await pool.close()
        log(f"loading {CONTACTS:,} contacts")
        load_seconds = await load_contacts(url, ws.id)
        log(f"loaded in {load_seconds:.0f}s")

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = IdentityServiceStub(channel)
        md = key_metadata(key)
        rng = random.Random(1)
        # The harness's own start-up objects stay out of its collector, so its pauses do not
        # count as the server's latency.
        gc.collect()
        gc.freeze()
        for _ in range(300):  # warm-up: connections, statement caches, key cache
            await stub.GetContact(ipb.GetContactRequest(phone=bench_phone(rng.randrange(CONTACTS))), metadata=md)
        latencies: list[float] = []
        for _ in range(LOOKUPS):
            raw = rng.choice(formats(bench_phone(rng.randrange(CONTACTS))))
            started = time.perf_counter()
            got = await stub.GetContact(ipb.GetContactRequest(phone=raw), metadata=md)
            latencies.append((time.perf_counter() - started) * 1000)
            assert got.contact.phone
        log("lookups done")
        health = health_pb2_grpc.HealthStub(channel)
        floor: list[float] = []
        for _ in range(LOOKUPS):
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest())
            floor.append((time.perf_counter() - started) * 1000)
        db_ms = await lookup_execution_ms(url, ws.id, [bench_phone(rng.randrange(CONTACTS)) for _ in range(200)])
        load = os.getloadavg()[0]

        batches = [workload(rng, BATCH_SIZE) for _ in range(BATCHES)]
        imd = internal_metadata(token, ws.id)
        queue = list(batches)
        batch_ms: list[float] = []

        async def writer() -> None:
            while queue:
                events = queue.pop()
                t = time.perf_counter()
                await stub.RecordEvents(ipb.RecordEventsRequest(events=events), metadata=imd, timeout=120)
                batch_ms.append((time.perf_counter() - t) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(IN_FLIGHT)))
        record_seconds = time.perf_counter() - started
        log("record done")

        smd = key_metadata(stream_key)
        call = stub.SubscribeEvents(ipb.SubscribeEventsRequest(), metadata=smd)
        imd2 = internal_metadata(token, stream_ws.id)
        delays: list[float] = []
        for i in range(STREAM_SAMPLES):
            e = workload(rng, 1)[0]
            e.user_id = f"stream-{i}"
            await stub.RecordEvents(ipb.RecordEventsRequest(events=[e]), metadata=imd2)
            acked = time.perf_counter()
            response = await asyncio.wait_for(call.read(), 10)
            delays.append((time.perf_counter() - acked) * 1000)
            assert response.events[-1].event.message_id == e.message_id
        call.cancel()
        await channel.close()

        total = BATCHES * BATCH_SIZE
        print("## Identity\n")
        print(
            f"{CONTACTS:,} contacts (each with a user id) loaded set-based in {load_seconds:.0f}s; "
            f"identity in its own process on loopback, called through gRPC stubs with an API key.\n"
        )
        print("| measure | p50 | p90 | p99 | max |")
        print("|---|---|---|---|---|")
        print(
            f"| GetContact by phone ({LOOKUPS} calls, 5 formats, ms) | {pct(latencies, 0.5):.2f} | "
            f"{pct(latencies, 0.9):.2f} | {pct(latencies, 0.99):.2f} | {max(latencies):.2f} |"
        )
        print(
            f"| gRPC floor: health check round trip, same server ({LOOKUPS} calls, ms) | {pct(floor, 0.5):.2f} | "
            f"{pct(floor, 0.9):.2f} | {pct(floor, 0.99):.2f} | {max(floor):.2f} |"
        )
        print(
            f"| RecordEvents, {BATCH_SIZE}-event batch ({IN_FLIGHT} in flight, ms) | {pct(batch_ms, 0.5):.0f} | "
            f"{pct(batch_ms, 0.9):.0f} | {pct(batch_ms, 0.99):.0f} | {max(batch_ms):.0f} |"
        )
        print(
            f"| SubscribeEvents delivery after commit ack ({STREAM_SAMPLES} events, ms) | {pct(delays, 0.5):.1f} | "
            f"{pct(delays, 0.9):.1f} | {pct(delays, 0.99):.1f} | {max(delays):.1f} |"
        )
        print()
        verdict = "meets" if pct(latencies, 0.99) <= 5 else "misses"
        print(
            f"- GetContact p99 {pct(latencies, 0.99):.2f} ms: {verdict} the 5 ms target "
            f"(mean {statistics.fmean(latencies):.2f} ms; 1-minute load average {load:.1f} on {os.cpu_count()} cores "
            "shared with other work while it ran)."
        )
        print(
            f"- The lookup inside Postgres (EXPLAIN ANALYZE of GetContact's query, 200 phones): p50 "
            f"{pct(db_ms, 0.5):.3f} ms, p99 {pct(db_ms, 0.99):.3f} ms — the rest is gRPC, Python and scheduling."
        )
        print(
            f"- RecordEvents: {total:,} events in {record_seconds:.1f}s = **{total / record_seconds:,.0f} events/s** "
            f"(20% identifies with phones over 20,000 users, one transaction per batch)."
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
