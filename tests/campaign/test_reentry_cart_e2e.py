"""Over real services: abandoned cart keyed on cart_id, re-entry policies, frequency caps, audience filters."""

from __future__ import annotations

from datetime import timedelta

from parley.campaign.v1 import campaign_service_pb2 as pb

from tests.campaign.conftest import Stack

CART = {
    "trigger": {"event": {"name": "Checkout Started"}},
    "steps": [
        {
            "id": "await",
            "wait_for_event": {
                "event": {"name": "Order Completed"},
                "match_key": "cart_id",
                "timeout": "2h",
                "on_event": "",
                "on_timeout": "sms",
            },
        },
        {"id": "sms", "send_sms": {"body": 'You left {{event.item|default:"something"}} in cart {{event.cart_id}}'}},
    ],
}


async def _enrollments(s: Stack, contact_id: str) -> list[pb.Enrollment]:
    resp = await s.campaign.stub.ListEnrollments(
        pb.ListEnrollmentsRequest(contact_id=contact_id), metadata=s.campaign.md
    )
    return list(resp.enrollments)


async def test_abandoned_cart_keyed_on_cart_id(stack: Stack) -> None:
    s = stack
    await s.campaign.live("cart", CART)
    other = await s.contact("u-cart-1", "+12125550201")
    same = await s.contact("u-cart-2", "+12125550202")
    await s.record(
        s.event("Checkout Started", user="u-cart-1", props={"cart_id": "c1", "item": "a kayak"}),
        s.event("Checkout Started", user="u-cart-2", props={"cart_id": "c2"}),
    )
    await s.engine.run_due()
    s.clock.advance(timedelta(minutes=20))
    await s.record(
        s.event("Order Completed", user="u-cart-1", props={"cart_id": "other-cart"}),
        s.event("Order Completed", user="u-cart-2", props={"cart_id": "c2"}),
    )
    await s.engine.run_due()
    assert (await _enrollments(s, same))[0].state == pb.ENROLLMENT_STATE_COMPLETED
    assert (await _enrollments(s, other))[0].current_step_id == "await"
    s.clock.advance(timedelta(hours=2))
    await s.engine.run_due()
    assert [m.body for m in await s.messages(other)] == ["You left a kayak in cart c1"]
    assert await s.messages(same) == []


REENTRY = {
    "trigger": {"event": {"name": "Pricing Viewed", "conditions": [{"key": "plan", "operator": "eq", "value": "pro"}]}},
    "audience": [{"key": "tier", "operator": "neq", "value": "blocked"}],
    "re_entry": {"policy": "after_cooldown", "cooldown": "1d"},
    "frequency_cap": {"max_messages": 1, "period": "7d"},
    "steps": [{"id": "sms", "send_sms": {"body": "Pro is 20% off today"}}],
}


async def test_cooldown_frequency_cap_audience_and_conditions(stack: Stack) -> None:
    s = stack
    await s.campaign.live("pricing", REENTRY)
    pat = await s.contact("u-pat", "+12125550301")
    blocked = await s.contact("u-blk", "+12125550302", tier="blocked")
    view = {"plan": "pro"}
    await s.record(
        s.event("Pricing Viewed", user="u-pat", props=view),
        s.event("Pricing Viewed", user="u-blk", props=view),
        s.event("Pricing Viewed", user="u-pat", props={"plan": "basic"}),
    )
    await s.engine.run_due()
    assert len(await _enrollments(s, pat)) == 1 and await _enrollments(s, blocked) == []
    assert len(await s.messages(pat)) == 1
    # Within the cool-down: no new enrollment.
    s.clock.advance(timedelta(hours=2))
    await s.record(s.event("Pricing Viewed", user="u-pat", props=view))
    assert len(await _enrollments(s, pat)) == 1
    # After it: enrolls again, but the frequency cap (1 per 7 days) skips the send.
    s.clock.advance(timedelta(days=1))
    await s.record(s.event("Pricing Viewed", user="u-pat", props=view))
    await s.engine.run_due()
    rows = await _enrollments(s, pat)
    assert len(rows) == 2 and rows[0].history[0].outcome == "skipped"
    assert len(await s.messages(pat)) == 1


ONCE = {
    "trigger": {"event": {"name": "Demo Booked"}},
    "steps": [
        {"id": "wait", "next": "sms", "wait": {"duration": "1h"}},
        {"id": "sms", "send_sms": {"body": "See you at the demo"}},
    ],
}


async def test_once_and_any_time_keep_one_active_enrollment(stack: Stack) -> None:
    s = stack
    await s.campaign.live("demo-once", ONCE)
    any_time = dict(ONCE, re_entry={"policy": "any_time"})
    await s.campaign.live("demo-any", any_time)
    kim = await s.contact("u-kim", "+12125550401")
    await s.record(s.event("Demo Booked", user="u-kim"), s.event("Demo Booked", user="u-kim"))
    await s.engine.run_due()
    assert len(await _enrollments(s, kim)) == 2  # one per campaign, despite two triggers
    s.clock.advance(timedelta(hours=2))
    await s.engine.run_due()
    await s.record(s.event("Demo Booked", user="u-kim"))
    rows = await _enrollments(s, kim)
    # "once" never again; "any time" enrolls again now the first run has ended.
    assert len(rows) == 3 and sum(r.state == pb.ENROLLMENT_STATE_ACTIVE for r in rows) == 1
    assert len(await s.messages(kim)) == 2


REFUSED = {
    "trigger": {"event": {"name": "Rate Locked"}},
    "steps": [
        {"id": "sms", "next": "call", "send_sms": {"body": "Your rate is locked"}},
        {"id": "call", "call_task": {"queue": "rates"}},
    ],
}


async def test_a_refused_send_is_recorded_and_the_journey_goes_on(stack: Stack) -> None:
    s = stack
    await s.campaign.live("refused", REFUSED)
    lee = await s.contact("u-lee", "+12125550501", consent=False)
    await s.record(s.event("Rate Locked", user="u-lee"))
    await s.engine.run_due()
    e = (await _enrollments(s, lee))[0]
    sms, call = e.history
    assert sms.outcome == "failed" and sms.detail.startswith("FAILED_PRECONDITION")
    assert call.outcome == "created" and e.state == pb.ENROLLMENT_STATE_COMPLETED


PROPERTY = {
    "trigger": {"property_change": {"key": "loan_stage", "conditions": [{"operator": "eq", "value": "approved"}]}},
    "steps": [{"id": "sms", "send_sms": {"body": 'Congrats {{contact.first_name|default:""}}, you are approved'}}],
}
AUDIENCE = {
    "trigger": {"audience_entry": {}},
    "audience": [{"key": "score", "operator": "gte", "value": 700}],
    "steps": [{"id": "sms", "send_sms": {"body": "You pre-qualify"}}],
}


async def test_property_change_and_audience_entry_triggers(stack: Stack) -> None:
    s = stack
    await s.campaign.live("approved", PROPERTY)
    await s.campaign.live("prequalified", AUDIENCE)
    mo = await s.contact("u-mo", "+12125550701", first_name="Mo", score=600)
    await s.record(s.event("", user="u-mo", traits={"loan_stage": "review", "score": 650}))
    await s.engine.run_due()
    assert await s.messages(mo) == []
    await s.record(s.event("", user="u-mo", traits={"loan_stage": "approved"}))
    await s.engine.run_due()
    assert [m.body for m in await s.messages(mo)] == ["Congrats Mo, you are approved"]
    await s.record(s.event("", user="u-mo", traits={"score": 720}))
    await s.engine.run_due()
    assert sorted(m.body for m in await s.messages(mo)) == ["Congrats Mo, you are approved", "You pre-qualify"]


SET_PROPERTY = {
    "trigger": {"event": {"name": "Webinar Attended"}},
    "steps": [
        {"id": "tag", "next": "check", "set_property": {"key": "webinar_attended", "value": True}},
        {"id": "check", "next": "", "wait": {"duration": "1m"}},
    ],
}


async def test_set_property_goes_through_ingest_to_identity(stack: Stack) -> None:
    s = stack
    from parley.identity.v1 import identity_service_pb2 as id_pb

    await s.campaign.live("webinar", SET_PROPERTY)
    nia = await s.contact("u-nia", "+12125550801")
    await s.record(s.event("Webinar Attended", user="u-nia"))
    await s.engine.run_due()
    e = (await _enrollments(s, nia))[0]
    assert e.history[0].outcome == "done", e.history[0].detail
    got = await s.id_stub.GetContact(id_pb.GetContactRequest(contact_id=nia), metadata=s.imd())
    assert got.contact.properties["webinar_attended"] is True
