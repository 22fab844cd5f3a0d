"""The abandoned-application journey end to end over real identity and messaging, on a manual clock."""

from __future__ import annotations

from datetime import timedelta

from parley.campaign.v1 import campaign_service_pb2 as pb

from tests.campaign.conftest import Stack

JOURNEY = {
    "trigger": {"event": {"name": "Application Started"}},
    "exit_events": [{"name": "Loan Funded"}],
    "goal": {"event": {"name": "Application Submitted"}, "window": "7d"},
    "steps": [
        {"id": "grace", "next": "submitted", "wait": {"duration": "30m"}},
        {
            "id": "submitted",
            "branch": {
                "conditions": [{"did_event": {"name": "Application Submitted"}}],
                "if_true": "",
                "if_false": "nudge",
            },
        },
        {
            "id": "nudge",
            "next": "day",
            "send_sms": {
                "body": 'Hi {{contact.first_name|default:"there"}}, your application {{event.app_id}} is one step away.'
            },
        },
        {"id": "day", "next": "call", "wait": {"duration": "1d"}},
        {"id": "call", "call_task": {"queue": "loans", "priority": 5, "notes": "Follow up on {{event.app_id}}"}},
    ],
}


async def _enrollment(s: Stack, contact_id: str) -> pb.Enrollment:
    resp = await s.campaign.stub.ListEnrollments(
        pb.ListEnrollmentsRequest(contact_id=contact_id), metadata=s.campaign.md
    )
    assert len(resp.enrollments) == 1
    return resp.enrollments[0]


async def test_abandoned_application_journey(stack: Stack) -> None:
    s = stack
    campaign = await s.campaign.live("abandoned application", JOURNEY)
    ana = await s.contact("u-ana", "+12125550101", first_name="Ana")
    bo = await s.contact("u-bo", "+12125550102")
    cy = await s.contact("u-cy", "+12125550103", first_name="Cy")
    await s.record(
        *(s.event("Application Started", user=u, props={"app_id": f"A-{u}"}) for u in ("u-ana", "u-bo", "u-cy"))
    )
    await s.engine.run_due()
    assert (await _enrollment(s, ana)).current_step_id == "grace"
    assert await s.messages(ana) == []

    # Cy submits within the 30 minutes: no SMS, journey completes (and converts).
    s.clock.advance(timedelta(minutes=10))
    await s.record(s.event("Application Submitted", user="u-cy"))
    s.clock.advance(timedelta(minutes=21))
    await s.engine.run_due()
    sent = await s.messages(ana)
    assert [m.body for m in sent] == ["Hi Ana, your application A-u-ana is one step away."]
    assert [m.body for m in await s.messages(bo)] == ["Hi there, your application A-u-bo is one step away."]
    assert await s.messages(cy) == []
    cy_e = await _enrollment(s, cy)
    assert cy_e.state == pb.ENROLLMENT_STATE_COMPLETED and cy_e.HasField("conversion_time")

    # Bo's loan is funded mid-wait: nothing more happens to Bo.
    s.clock.advance(timedelta(hours=5))
    await s.record(s.event("Loan Funded", user="u-bo"))
    s.clock.advance(timedelta(days=1))
    await s.engine.run_due()
    await s.engine.run_due()
    ana_e, bo_e = await _enrollment(s, ana), await _enrollment(s, bo)
    assert ana_e.state == pb.ENROLLMENT_STATE_COMPLETED
    assert [h.step_id for h in ana_e.history] == ["grace", "submitted", "nudge", "day", "call"]
    call = ana_e.history[-1]
    assert call.outcome == "created" and call.task_id
    assert bo_e.state == pb.ENROLLMENT_STATE_EXITED and bo_e.exit_reason == "exit_event:Loan Funded"
    assert [h.step_id for h in bo_e.history] == ["grace", "submitted", "nudge", "day"]
    assert len(await s.messages(bo)) == 1

    # Outcomes flow back as events: one delivery, one completed call.
    await s.record(
        s.event("SMS Delivered", user="u-ana", props={"message_id": sent[0].id}),
        s.event("Call Completed", user="u-ana", props={"task_id": call.task_id}),
    )
    stats = await s.campaign.stub.GetCampaignStats(
        pb.GetCampaignStatsRequest(campaign_id=campaign.id), metadata=s.campaign.md
    )
    v = stats.versions[0]
    assert (v.entered, v.completed, v.exited_early, v.converted) == (3, 2, 1, 1)
    steps = {x.step_id: x for x in v.steps}
    assert steps["nudge"].messages_sent == 2
    assert steps["call"].tasks_created == 1
    assert steps["submitted"].entered == 3
    assert steps["nudge"].messages_delivered == 1 and steps["call"].tasks_completed == 1


async def test_retrying_a_step_never_sends_twice(stack: Stack) -> None:
    """A crash after the send but before the commit replays the step with the same request_id."""
    s = stack
    dee = await s.contact("u-dee", "+12125550104", first_name="Dee")
    await s.record(s.event("Application Started", user="u-dee", props={"app_id": "A-dee"}))
    await s.engine.run_due()
    e = await _enrollment(s, dee)
    s.clock.advance(timedelta(minutes=31))
    # Replay the send as a crashed replica would have: same enrollment, step and visit.
    from services.campaign.effects import ContactInfo

    contact = ContactInfo(dee, "+12125550104", "America/New_York", {"first_name": "Dee"})
    first = await s.engine.effects.send_sms(
        s.workspace_id,
        request_id=f"{e.id}:nudge:1",
        contact=contact,
        body="Hi Dee, your application A-dee is one step away.",
        transactional=False,
        campaign_id=e.campaign_id,
    )
    await s.engine.run_due()
    msgs = await s.messages(dee)
    assert len(msgs) == 1 and msgs[0].id == first.id


async def test_preview_renders_without_sending(stack: Stack) -> None:
    s = stack
    from tests.campaign.conftest import definition

    eve = await s.contact("u-eve", "+12125550105", first_name="Eve")
    trigger = s.event("Application Started", user="u-eve", props={"app_id": "A-77"})
    resp = await s.campaign.stub.PreviewCampaign(
        pb.PreviewCampaignRequest(definition=definition(JOURNEY), phone="(212) 555-0105", trigger_event=trigger),
        metadata=s.campaign.md,
    )
    assert resp.would_enroll and resp.contact.id == eve
    assert [p.step_id for p in resp.steps] == ["grace", "submitted", "nudge", "day", "call"]
    assert resp.steps[2].rendered == "Hi Eve, your application A-77 is one step away."
    assert resp.steps[4].rendered == "Follow up on A-77"
    assert await s.messages(eve) == []
    bad = definition(JOURNEY)
    bad.steps[2].send_sms.body = "{{contact.first_name"
    from services.common.errors import field_violations

    try:
        await s.campaign.stub.PreviewCampaign(
            pb.PreviewCampaignRequest(definition=bad, contact_id=eve), metadata=s.campaign.md
        )
    except Exception as err:
        fields = [v.field for v in await field_violations(err)]  # type: ignore[arg-type]
        assert fields == ["definition.steps[2].send_sms.body"]
    else:
        raise AssertionError("a bad template must be rejected")
