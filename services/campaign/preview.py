"""PreviewCampaign: walk a definition for one contact without sending or storing anything."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2
from parley.campaign.v1 import campaign_service_pb2 as pb
from parley.common.v1 import contact_pb2

from services.campaign import conditions, template
from services.campaign.definition import Graph, kind_of
from services.campaign.effects import ContactInfo
from services.common.errors import NotFound

# A preview follows loops at most this far; real journeys loop only through waits.
MAX_PREVIEW_STEPS = 50


async def run(
    engine: Any, workspace_id: str, definition: pb.CampaignDefinition, request: pb.PreviewCampaignRequest
) -> pb.PreviewCampaignResponse:
    """The steps the contact would take, assuming waits elapse and awaited events never come."""
    from services.campaign.engine import cohort_for, event_data, matcher_matches

    contact = await engine.effects.get_contact(workspace_id, request.contact_id, request.phone)
    if contact is None:
        raise NotFound("contact not found")
    ev = request.trigger_event
    trigger = event_data(ev)
    data = contact.template_data()
    graph = Graph.of(definition)
    trig_kind = definition.trigger.WhichOneof("kind")
    would = conditions.all_match(definition.audience, data)
    if trig_kind == "event":
        would = would and matcher_matches(definition.trigger.event, ev, trigger)
    out = pb.PreviewCampaignResponse(would_enroll=would, contact=_contact_proto(contact, workspace_id))
    step_id = graph.start
    campaign_id = request.campaign_id or "preview"
    for _ in range(MAX_PREVIEW_STEPS):
        step = graph.steps.get(step_id)
        if step is None:
            break
        kind = kind_of(step)
        ps = pb.PreviewStep(step_id=step.id, kind=kind)
        nxt = step.next
        if kind == "wait":
            ps.description = f"wait {step.wait.duration}"
        elif kind == "wait_until":
            days = ",".join(step.wait_until.weekdays) or "any day"
            ps.description = f"wait until {step.wait_until.time} ({days}) in {contact.time_zone or 'UTC'}"
        elif kind == "wait_for_event":
            w = step.wait_for_event
            ps.description = f"wait up to {w.timeout} for {w.event.name!r}"
            ps.outcome, nxt = "timeout", w.on_timeout
        elif kind == "branch":
            ok = all(_condition(c, data, trigger) for c in step.branch.conditions)
            ps.outcome = "true" if ok else "false"
            ps.description = "branch"
            nxt = step.branch.if_true if ok else step.branch.if_false
        elif kind == "split":
            cohort = cohort_for(campaign_id, step.id, contact.id, step.split.cohorts)
            ps.outcome, nxt = cohort.name, cohort.next
            ps.description = "split " + ", ".join(f"{c.name} {c.percent}%" for c in step.split.cohorts)
        elif kind == "send_sms":
            ps.rendered = template.parse(step.send_sms.body).render(data, trigger)
            ps.description = "send SMS"
        elif kind == "call_task":
            ps.rendered = template.parse(step.call_task.notes).render(data, trigger) if step.call_task.notes else ""
            ps.description = (
                f"call task in queue {step.call_task.queue or 'default'!r}, priority {step.call_task.priority}"
            )
        elif kind == "set_property":
            value = json_format.MessageToDict(step.set_property.value)
            ps.description = f"set {step.set_property.key} = {value!r}"
        elif kind == "exit":
            ps.description = "exit"
            nxt = ""
        out.steps.append(ps)
        if not nxt:
            break
        step_id = nxt
    return out


def _condition(c: pb.Condition, contact: dict[str, Any], trigger: dict[str, Any]) -> bool:
    kind = c.WhichOneof("kind")
    if kind == "contact":
        return conditions.matches(c.contact, contact)
    if kind == "trigger":
        return conditions.matches(c.trigger, trigger)
    # Nothing has happened since an enrollment that has not begun.
    return kind == "did_not_event"


def _contact_proto(c: ContactInfo, workspace_id: str) -> contact_pb2.Contact:
    props = struct_pb2.Struct()
    props.update(c.properties)
    return contact_pb2.Contact(
        id=c.id,
        workspace_id=workspace_id,
        phone=c.phone,
        time_zone=c.time_zone,
        properties=props,
        user_ids=list(c.user_ids),
        anonymous_ids=list(c.anonymous_ids),
    )
