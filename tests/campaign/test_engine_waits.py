"""Engine on real Postgres: wait_for_event keyed on cart_id, exit events mid-wait, pause/resume, versions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from parley.campaign.v1 import campaign_service_pb2 as pb

from services.campaign.engine import _may_enter
from tests.campaign.conftest import Campaigns, feed, seed, stored

CART = {
    "trigger": {"event": {"name": "Cart Abandoned"}},
    "exit_events": [{"name": "Account Closed"}],
    "steps": [
        {
            "id": "await",
            "wait_for_event": {
                "event": {"name": "Order Completed"},
                "match_key": "cart_id",
                "timeout": "1d",
                "on_event": "bought",
                "on_timeout": "nudge",
            },
        },
        {"id": "bought", "exit": {}},
        {"id": "nudge", "next": "", "wait": {"duration": "1h"}},
    ],
}


async def _enrollments(c: Campaigns, campaign: pb.Campaign) -> dict[str, pb.Enrollment]:
    resp = await c.stub.ListEnrollments(pb.ListEnrollmentsRequest(campaign_id=campaign.id), metadata=c.md)
    return {e.contact_id: e for e in resp.enrollments}


async def test_wait_for_event_matches_on_the_same_cart_only(campaigns_only: Campaigns) -> None:
    c = campaigns_only
    campaign = await c.live("cart", CART)
    await seed(c, campaign, ["k1"], props={"cart_id": "cart-1"})
    await c.engine.run_due()
    assert (await _enrollments(c, campaign))["k1"].current_step_id == "await"
    # Another cart's purchase does not end the wait.
    await feed(c, stored(c, "k1", "Order Completed", {"cart_id": "cart-2"}))
    await c.engine.run_due()
    e = (await _enrollments(c, campaign))["k1"]
    assert e.state == pb.ENROLLMENT_STATE_ACTIVE and e.current_step_id == "await"
    # The same cart's purchase does.
    await feed(c, stored(c, "k1", "Order Completed", {"cart_id": "cart-1"}))
    await c.engine.run_due()
    e = (await _enrollments(c, campaign))["k1"]
    assert e.state == pb.ENROLLMENT_STATE_COMPLETED and e.exit_reason == "exit_step"
    assert [(h.step_id, h.outcome) for h in e.history] == [("await", "event"), ("bought", "done")]


async def test_wait_for_event_times_out(campaigns_only: Campaigns) -> None:
    c = campaigns_only
    campaign = await c.live("cart-timeout", CART)
    await seed(c, campaign, ["k2"], props={"cart_id": "cart-9"})
    await c.engine.run_due()
    c.engine.clock.advance(timedelta(days=1, seconds=1))  # type: ignore[attr-defined]
    await c.engine.run_due()
    e = (await _enrollments(c, campaign))["k2"]
    assert e.current_step_id == "nudge"
    assert (e.history[0].step_id, e.history[0].outcome) == ("await", "timeout")


async def test_exit_event_stops_pending_steps(campaigns_only: Campaigns) -> None:
    c = campaigns_only
    campaign = await c.live("cart-exit", CART)
    await seed(c, campaign, ["k3"], props={"cart_id": "c"})
    await c.engine.run_due()
    await feed(c, stored(c, "k3", "Account Closed"))
    c.engine.clock.advance(timedelta(days=2))  # type: ignore[attr-defined]
    await c.engine.run_due()
    e = (await _enrollments(c, campaign))["k3"]
    assert e.state == pb.ENROLLMENT_STATE_EXITED and e.exit_reason == "exit_event:Account Closed"
    assert e.history[0].outcome == "exited"


async def test_pause_holds_timers_and_resume_runs_them(campaigns_only: Campaigns) -> None:
    c = campaigns_only
    campaign = await c.live("pausable", CART)
    await seed(c, campaign, ["p1"], props={"cart_id": "x"})
    await c.engine.run_due()
    await c.stub.PauseCampaign(pb.PauseCampaignRequest(campaign_id=campaign.id), metadata=c.md)
    c.engine.clock.advance(timedelta(days=2))  # type: ignore[attr-defined]
    await c.engine.run_due()
    assert (await _enrollments(c, campaign))["p1"].current_step_id == "await"
    await c.stub.ResumeCampaign(pb.ResumeCampaignRequest(campaign_id=campaign.id), metadata=c.md)
    await c.engine.run_due()
    assert (await _enrollments(c, campaign))["p1"].current_step_id == "nudge"


async def test_running_enrollments_stay_on_their_version(campaigns_only: Campaigns) -> None:
    c = campaigns_only
    campaign = await c.live("versions", CART)
    await seed(c, campaign, ["v1"], props={"cart_id": "x"})
    await c.engine.run_due()
    changed = pb.Campaign(id=campaign.id, name="versions", definition=campaign.definition)
    changed.definition.steps[0].wait_for_event.timeout = "1w"
    await c.stub.UpdateCampaign(pb.UpdateCampaignRequest(campaign=changed), metadata=c.md)
    v2 = (await c.stub.PublishCampaign(pb.PublishCampaignRequest(campaign_id=campaign.id), metadata=c.md)).campaign
    await seed(c, v2, ["v2"], props={"cart_id": "y"})
    await c.engine.run_due()
    c.engine.clock.advance(timedelta(days=1, seconds=1))  # type: ignore[attr-defined]
    await c.engine.run_due()
    rows = await _enrollments(c, campaign)
    assert rows["v1"].version == 1 and rows["v1"].current_step_id == "nudge"
    assert rows["v2"].version == 2 and rows["v2"].current_step_id == "await"


def test_re_entry_policies() -> None:
    now = datetime(2026, 1, 10, tzinfo=UTC)
    done = [{"state": "completed", "enroll_time": now - timedelta(days=3), "end_time": now - timedelta(days=2)}]
    active = [{"state": "active", "enroll_time": now, "end_time": None}]
    once = pb.ReEntry(policy=pb.RE_ENTRY_POLICY_ONCE)
    anytime = pb.ReEntry(policy=pb.RE_ENTRY_POLICY_ANY_TIME)
    cool = pb.ReEntry(policy=pb.RE_ENTRY_POLICY_AFTER_COOLDOWN, cooldown="1d")
    long_cool = pb.ReEntry(policy=pb.RE_ENTRY_POLICY_AFTER_COOLDOWN, cooldown="7d")
    assert _may_enter(once, [], now)
    assert not _may_enter(once, done, now)
    assert not _may_enter(pb.ReEntry(), done, now)
    assert _may_enter(anytime, done, now)
    assert _may_enter(cool, done, now)
    assert not _may_enter(long_cool, done, now)
    for policy in (once, anytime, cool):
        assert not _may_enter(policy, active + done, now)
