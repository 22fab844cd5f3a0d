"""The engine on real Postgres: A/B split of 10,000 enrollments, sticky cohorts, exact stats and conversions."""

from __future__ import annotations

from datetime import timedelta

from parley.campaign.v1 import campaign_service_pb2 as pb

from services.campaign.engine import cohort_for
from tests.campaign.conftest import Campaigns, feed, seed, stored

AB = {
    "trigger": {"event": {"name": "Quote Requested"}},
    "re_entry": {"policy": "any_time"},
    "goal": {"event": {"name": "Policy Bought"}, "window": "7d"},
    "steps": [
        {
            "id": "ab",
            "split": {
                "cohorts": [{"name": "a", "percent": 30, "next": "wa"}, {"name": "b", "percent": 70, "next": "wb"}]
            },
        },
        {"id": "wa", "next": "", "wait": {"duration": "1h"}},
        {"id": "wb", "next": "", "wait": {"duration": "2h"}},
    ],
}


async def test_ten_thousand_enrollments_split_within_two_points(campaigns_only: Campaigns) -> None:
    c = campaigns_only
    campaign = await c.live("ab-test", AB)
    contacts = [f"contact-{i}" for i in range(10_000)]
    await seed(c, campaign, contacts)
    assert await c.engine.run_due() == 10_000
    stats = await c.stub.GetCampaignStats(pb.GetCampaignStatsRequest(campaign_id=campaign.id), metadata=c.md)
    v1 = stats.versions[0]
    cohorts = {x.cohort: x.entered for x in v1.cohorts}
    assert sum(cohorts.values()) == 10_000
    assert abs(cohorts["a"] / 10_000 - 0.30) <= 0.02
    steps = {s.step_id: s for s in v1.steps}
    assert steps["ab"].entered == steps["ab"].completed == 10_000
    assert steps["wa"].entered == steps["wa"].waiting == cohorts["a"]
    assert steps["wb"].waiting == cohorts["b"]
    assert v1.entered == v1.active == 10_000

    # Conversions: 100 known contacts of cohort a buy within the window.
    buyers_a = [cid for cid in contacts if cohort_for(campaign.id, "ab", cid, _cohorts()).name == "a"][:100]
    await feed(c, *(stored(c, cid, "Policy Bought") for cid in buyers_a))
    # Time passes: every wait ends, every journey completes.
    c.engine.clock.advance(timedelta(hours=3))  # type: ignore[attr-defined]
    assert await c.engine.run_due() == 10_000
    stats = await c.stub.GetCampaignStats(pb.GetCampaignStatsRequest(campaign_id=campaign.id), metadata=c.md)
    v1 = stats.versions[0]
    assert v1.completed == 10_000 and v1.active == 0
    assert v1.converted == 100 and abs(v1.conversion_rate - 0.01) < 1e-9
    by = {x.cohort: x for x in v1.cohorts}
    assert by["a"].converted == 100 and by["b"].converted == 0
    # A conversion counts once, however often the goal event repeats.
    await feed(c, *(stored(c, cid, "Policy Bought") for cid in buyers_a[:10]))
    again = await c.stub.GetCampaignStats(pb.GetCampaignStatsRequest(campaign_id=campaign.id), metadata=c.md)
    assert again.versions[0].converted == 100

    # Re-entering contacts keep their cohort.
    returning = contacts[:50]
    await seed(c, campaign, returning)
    await c.engine.run_due()
    resp = await c.stub.ListEnrollments(
        pb.ListEnrollmentsRequest(campaign_id=campaign.id, page_size=1000), metadata=c.md
    )
    seen: dict[str, set[str]] = {}
    for e in resp.enrollments:
        seen.setdefault(e.contact_id, set()).add(e.cohorts["ab"])
    for cid in returning:
        assert len(seen.get(cid, {"x"})) == 1


def _cohorts() -> list[pb.Cohort]:
    return [pb.Cohort(name="a", percent=30), pb.Cohort(name="b", percent=70)]
