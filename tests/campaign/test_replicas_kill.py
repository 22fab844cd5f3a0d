"""Two campaign replicas as processes, one killed with SIGKILL mid-run: every step fires exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from parley.campaign.v1 import campaign_service_pb2 as pb
from parley.identity.v1 import identity_service_pb2 as id_pb
from parley.messaging.v1 import agent_service_pb2 as agent_pb
from parley.messaging.v1 import agent_service_pb2_grpc as agent_grpc

from services.campaign.engine import wait_until
from services.common.settings import PROJECT_ROOT
from tests.campaign.conftest import Stack, make_stack

CONTACTS = 40
FLOW = {
    "trigger": {"event": {"name": "Trial Started"}},
    "send_window": {"start": "00:00", "end": "23:59"},
    "steps": [
        {"id": "first", "next": "pause", "send_sms": {"body": "Welcome to your trial", "transactional": True}},
        {"id": "pause", "next": "second", "wait": {"duration": "1s"}},
        {"id": "second", "next": "call", "send_sms": {"body": "Day one tips", "transactional": True}},
        {"id": "call", "call_task": {"queue": "trials", "notes": "Check in"}},
    ],
}


@pytest.fixture(scope="module")
async def rstack(db_url: str, make_workspace: Any) -> AsyncIterator[Stack]:
    # The in-process campaign server only serves the API: the replicas consume and run timers.
    s = await make_stack(db_url, make_workspace, datetime.now(UTC), consume=False)
    yield s
    await s.close()


def _replica(s: Stack, db_url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PARLEY_DATABASE_URL": db_url,
        "PARLEY_HOST": "127.0.0.1",
        "PARLEY_CAMPAIGN_PORT": "0",
        "PARLEY_IDENTITY_ADDR": f"127.0.0.1:{s.identity.port}",
        "PARLEY_MESSAGING_ADDR": f"127.0.0.1:{s.messaging.port}",
        "PARLEY_LOG_LEVEL": "warning",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.campaign"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_kill_one_replica_mid_run(rstack: Stack, db_url: str) -> None:
    s = rstack
    await s.campaign.live("trial", FLOW)
    users = [f"trial-{i}" for i in range(CONTACTS)]
    contacts = []
    for i, u in enumerate(users):
        phone = f"+1212555{1000 + i:04d}"
        ids = await s.id_stub.RecordEvents(
            id_pb.RecordEventsRequest(events=[s.event("", user=u, traits={"phone": phone}, phone=phone)]),
            metadata=s.imd(),
        )
        contacts.append(ids.results[0].contact_id)
    pool = await asyncpg.connect(db_url)
    a, b = _replica(s, db_url), _replica(s, db_url)
    try:
        # Whichever replica holds the stream enrolls; both run timers. The kill may hit either role.
        await s.id_stub.RecordEvents(
            id_pb.RecordEventsRequest(events=[s.event("Trial Started", user=u) for u in users]), metadata=s.imd()
        )

        async def some_sent() -> bool:
            return bool(await pool.fetchval("SELECT count(*) FROM messaging.messages") >= CONTACTS // 4)

        await wait_until(some_sent, 60.0)
        a.send_signal(signal.SIGKILL)

        async def all_done() -> bool:
            n = await pool.fetchval("SELECT count(*) FROM campaign.enrollments WHERE state = 'completed'")
            return bool(n == CONTACTS)

        await wait_until(all_done, 90.0)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (a, b):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    rows = await pool.fetch("SELECT request_id, count(*) AS n FROM messaging.messages GROUP BY request_id")
    tasks = await pool.fetch("SELECT request_id, count(*) AS n FROM messaging.call_tasks GROUP BY request_id")
    await pool.close()
    enrollments = (
        await s.campaign.stub.ListEnrollments(
            pb.ListEnrollmentsRequest(
                campaign_id=(
                    await s.campaign.stub.ListCampaigns(pb.ListCampaignsRequest(name="trial"), metadata=s.campaign.md)
                )
                .campaigns[0]
                .id,
                page_size=1000,
            ),
            metadata=s.campaign.md,
        )
    ).enrollments
    assert len(enrollments) == CONTACTS
    expected_sms = {f"{e.id}:{step}:1" for e in enrollments for step in ("first", "second")}
    assert {r["request_id"] for r in rows} == expected_sms and all(r["n"] == 1 for r in rows)
    assert {r["request_id"] for r in tasks} == {f"{e.id}:call:1" for e in enrollments}
    for e in enrollments:
        assert [h.step_id for h in e.history] == ["first", "pause", "second", "call"]
    per_contact = [len(await s.messages(c)) for c in contacts]
    assert per_contact == [2] * CONTACTS
    listed = await agent_grpc.AgentServiceStub(s._channels[2]).ListTasks(
        agent_pb.ListTasksRequest(queue="trials", page_size=1000), metadata=s.imd()
    )
    assert len(listed.tasks) == CONTACTS
