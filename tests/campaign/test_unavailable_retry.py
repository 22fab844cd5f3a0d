"""A peer that is down keeps the step pending: it is retried with backoff, same visit, nothing skipped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from parley.campaign.v1 import campaign_service_pb2 as pb
from parley.campaign.v1 import campaign_service_pb2_grpc as pb_grpc

from services.campaign.clock import ManualClock
from services.campaign.module import make_module
from services.common.clients import channel, key_metadata
from services.common.server import start
from tests.campaign.conftest import Campaigns, seed
from tests.helpers import test_settings

FLOW = {
    "trigger": {"event": {"name": "Anything"}},
    "send_window": {"start": "00:00", "end": "23:59"},
    "steps": [{"id": "sms", "send_sms": {"body": "hello"}}],
}


@pytest.fixture(scope="module")
async def isolated(db_url: str, make_workspace: Any) -> AsyncIterator[Campaigns]:
    ws, key = await make_workspace(db_url)
    # Port 1: nothing listens there, so identity and messaging are UNAVAILABLE.
    settings = test_settings(db_url, identity_addr="127.0.0.1:1", messaging_addr="127.0.0.1:1")
    srv = await start(make_module(clock=ManualClock(), run_timers=False, consume=False), settings, port=0)
    ch = channel(f"127.0.0.1:{srv.port}")
    yield Campaigns(srv, pb_grpc.CampaignServiceStub(ch), key_metadata(key), ws.id)
    await ch.close()
    await srv.stop(0)


async def test_unavailable_peer_is_retried_with_backoff(isolated: Campaigns) -> None:
    c = isolated
    campaign = await c.live("retry", FLOW)
    await seed(c, campaign, ["r1"])
    start_time = c.engine.clock.now()
    await c.engine.run_due()
    resp = await c.stub.ListEnrollments(pb.ListEnrollmentsRequest(campaign_id=campaign.id), metadata=c.md)
    e = resp.enrollments[0]
    assert e.state == pb.ENROLLMENT_STATE_ACTIVE and e.current_step_id == "sms"
    first_due = e.due_time.ToDatetime().replace(tzinfo=start_time.tzinfo)
    assert first_due > start_time
    assert len(e.history) == 1 and e.history[0].visit == 1 and e.history[0].outcome == "retrying"
    c.engine.clock.advance(first_due - start_time + timedelta(seconds=1))  # type: ignore[attr-defined]
    await c.engine.run_due()
    e = (await c.stub.ListEnrollments(pb.ListEnrollmentsRequest(campaign_id=campaign.id), metadata=c.md)).enrollments[0]
    second_due = e.due_time.ToDatetime().replace(tzinfo=start_time.tzinfo)
    # Backoff grows; still the same (first) visit of the step.
    assert second_due - c.engine.clock.now() > first_due - start_time
    assert [h.visit for h in e.history] == [1]
