"""A trigger at 23:00 contact local time sends at 08:00 the next morning, in three time zones."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from parley.campaign.v1 import campaign_service_pb2 as pb

from tests.campaign.conftest import Stack, make_stack

SEND_NOW = {
    "trigger": {"event": {"name": "Quote Viewed"}},
    "steps": [{"id": "sms", "send_sms": {"body": 'Your quote is ready, {{contact.first_name|default:"friend"}}.'}}],
}


@pytest.fixture(scope="module")
async def wstack(db_url: str, make_workspace: Any) -> AsyncIterator[Stack]:
    s = await make_stack(db_url, make_workspace, datetime(2026, 1, 12, 12, 0, tzinfo=ZoneInfo("UTC")))
    yield s
    await s.close()


@pytest.mark.parametrize(
    ("day", "zone", "phone"),
    [
        (12, "Europe/London", "+442079460958"),
        (13, "America/New_York", "+12125550111"),
        (14, "America/Los_Angeles", "+13105550112"),
    ],
)
async def test_late_trigger_waits_for_eight_am_local(wstack: Stack, day: int, zone: str, phone: str) -> None:
    s = wstack
    tz = ZoneInfo(zone)
    if day == 12:
        await s.campaign.live("send-now", SEND_NOW)
    s.clock.set(datetime(2026, 1, day, 23, 0, tzinfo=tz))
    user = f"u-{day}"
    contact = await s.contact(user, phone)
    await s.record(s.event("Quote Viewed", user=user))
    await s.engine.run_due()
    assert await s.messages(contact) == []
    resp = await s.campaign.stub.ListEnrollments(pb.ListEnrollmentsRequest(contact_id=contact), metadata=s.campaign.md)
    e = resp.enrollments[0]
    opening = datetime(2026, 1, day + 1, 8, 0, tzinfo=tz)
    assert e.due_time.ToDatetime(tzinfo=tz) == opening
    assert e.history[0].outcome == "deferred"

    s.clock.set(opening - timedelta(minutes=1))
    await s.engine.run_due()
    assert await s.messages(contact) == []
    s.clock.set(opening)
    await s.engine.run_due()
    assert [m.body for m in await s.messages(contact)] == ["Your quote is ready, friend."]
