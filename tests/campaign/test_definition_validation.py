"""Every definition rule rejects a bad definition with INVALID_ARGUMENT naming the exact field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from parley.campaign.v1 import campaign_service_pb2 as pb

from services.campaign.definition import from_dict, problems_of, validate
from services.common.errors import InvalidArgument

GOOD: dict[str, Any] = {
    "trigger": {"event": {"name": "Application Started"}},
    "audience": [{"key": "state", "operator": "in", "value": ["CA", "NY"]}],
    "steps": [
        {"id": "wait", "next": "check", "wait": {"duration": "30m"}},
        {
            "id": "check",
            "branch": {
                "conditions": [{"did_event": {"name": "Application Submitted"}}],
                "if_true": "",
                "if_false": "sms",
            },
        },
        {"id": "sms", "next": "later", "send_sms": {"body": 'Hi {{contact.first_name|default:"there"}}!'}},
        {"id": "later", "next": "call", "wait": {"duration": "1d"}},
        {"id": "call", "call_task": {"queue": "loans", "priority": 5, "notes": "Amount {{event.amount}}"}},
    ],
    "exit_events": [{"name": "Loan Funded"}],
    "re_entry": {"policy": "after_cooldown", "cooldown": "30d"},
    "frequency_cap": {"max_messages": 3, "period": "1d"},
    "send_window": {"start": "09:00", "end": "20:00"},
    "goal": {"event": {"name": "Application Submitted"}, "window": "7d"},
}


def load(data: dict[str, Any]) -> pb.CampaignDefinition:
    return from_dict(data, pb.CampaignDefinition(), "definition")  # type: ignore[return-value]


def fields_of(data: dict[str, Any]) -> dict[str, str]:
    return {v.field: v.description for v in problems_of(load(data))}


def mutate(path: list[Any], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    cur: Any = data
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return data


def test_good_definition_is_valid() -> None:
    validate(load(GOOD))


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (mutate(["steps", 0, "next"], "nope"), "definition.steps[0].next", "unknown step id"),
        (mutate(["steps", 1, "branch", "if_false"], "ghost"), "definition.steps[1].branch.if_false", "unknown step id"),
        (mutate(["start_step_id"], "ghost"), "definition.start_step_id", "unknown step id"),
        (mutate(["steps", 2, "send_sms", "body"], "   "), "definition.steps[2].send_sms.body", "empty"),
        (
            mutate(["steps", 2, "send_sms", "body"], "Hi {{contact.first_name"),
            "definition.steps[2].send_sms.body",
            "does not parse",
        ),
        (
            mutate(["steps", 2, "send_sms", "body"], "Hi {{user.name}}"),
            "definition.steps[2].send_sms.body",
            "does not parse",
        ),
        (
            mutate(["steps", 2, "send_sms", "body"], "Hi {{contact.name|shout}}"),
            "definition.steps[2].send_sms.body",
            "unknown filter",
        ),
        (
            mutate(["steps", 4, "call_task", "notes"], "{{event.}}"),
            "definition.steps[4].call_task.notes",
            "does not parse",
        ),
        (mutate(["steps", 0, "wait", "duration"], "30 minutes"), "definition.steps[0].wait.duration", "not a duration"),
        (mutate(["steps", 0, "wait", "duration"], "0m"), "definition.steps[0].wait.duration", "positive"),
        (mutate(["steps", 0, "wait", "duration"], "400d"), "definition.steps[0].wait.duration", "at most"),
        (mutate(["send_window", "start"], "25:00"), "definition.send_window.start", "time of day"),
        (mutate(["send_window", "end"], "08:00"), "definition.send_window", "before end"),
        (mutate(["re_entry", "cooldown"], "soon"), "definition.re_entry.cooldown", "not a duration"),
        (mutate(["frequency_cap", "period"], ""), "definition.frequency_cap.period", "required"),
        (mutate(["goal", "window"], "1y"), "definition.goal.window", "not a duration"),
        (mutate(["trigger"], {}), "definition.trigger", "required"),
        (mutate(["trigger", "event", "name"], ""), "definition.trigger.event.name", "required"),
        (mutate(["exit_events", 0, "name"], ""), "definition.exit_events[0].name", "required"),
        (mutate(["audience", 0, "value"], "CA"), "definition.audience[0].value", "must be a list"),
        (mutate(["steps", 1, "branch", "conditions"], []), "definition.steps[1].branch.conditions", "at least one"),
        (mutate(["steps", 0, "id"], "check"), "definition.steps[1].id", "duplicate"),
        (mutate(["steps", 0, "id"], "has space"), "definition.steps[0].id", "letters"),
    ],
)
def test_each_rule_names_its_field(data: dict[str, Any], field: str, words: str) -> None:
    found = fields_of(data)
    assert field in found, found
    assert words in found[field]


def test_unreachable_step() -> None:
    data = copy.deepcopy(GOOD)
    data["steps"].append({"id": "orphan", "exit": {}})
    assert "unreachable" in fields_of(data)["definition.steps[5]"]


def test_cycle_without_a_wait_is_rejected_but_a_loop_through_a_wait_is_fine() -> None:
    data = copy.deepcopy(GOOD)
    data["steps"][4]["next"] = "loop"
    data["steps"].append(
        {
            "id": "loop",
            "branch": {
                "conditions": [{"contact": {"key": "vip", "operator": "exists"}}],
                "if_true": "sms",
                "if_false": "",
            },
        }
    )
    # sms -> later(wait) -> call -> loop -> sms: has a wait, fine.
    assert fields_of(data) == {}
    data["steps"][2]["next"] = "call"  # sms -> call -> loop -> sms: no wait
    found = fields_of(data)
    assert any("cycle without a wait" in d for d in found.values()), found


def test_unknown_operator_on_the_wire_and_in_yaml() -> None:
    with pytest.raises(InvalidArgument) as err:
        load(mutate(["audience", 0, "operator"], "like"))
    assert err.value.violations[0].field == "definition.audience[0].operator"
    d = load(GOOD)
    d.steps[1].branch.conditions[0].ClearField("did_event")
    d.steps[1].branch.conditions[0].contact.key = "age"
    d.steps[1].branch.conditions[0].contact.operator = 42  # type: ignore[assignment]
    found = {v.field: v.description for v in problems_of(d)}
    assert "unknown operator" in found["definition.steps[1].branch.conditions[0].contact.operator"]


def test_unknown_yaml_field_and_enum_value() -> None:
    with pytest.raises(InvalidArgument) as err:
        load(mutate(["re_entry", "policy"], "sometimes") | {"colour": "red"})
    got = {v.field for v in err.value.violations}
    assert got == {"definition.re_entry.policy", "definition.colour"}


def test_split_percents_and_match_key_rules() -> None:
    data = copy.deepcopy(GOOD)
    data["steps"][0] = {
        "id": "wait",
        "split": {
            "cohorts": [{"name": "a", "percent": 60, "next": "check"}, {"name": "b", "percent": 30, "next": "check"}]
        },
    }
    assert "sum to 100" in fields_of(data)["definition.steps[0].split.cohorts"]
    data = copy.deepcopy(GOOD)
    data["trigger"] = {"audience_entry": {}}
    data["steps"][0] = {
        "id": "wait",
        "wait_for_event": {
            "event": {"name": "Purchase"},
            "match_key": "cart_id",
            "timeout": "1d",
            "on_event": "",
            "on_timeout": "check",
        },
    }
    assert "event-triggered" in fields_of(data)["definition.steps[0].wait_for_event.match_key"]


def test_linear_next_on_a_branch_is_rejected() -> None:
    data = mutate(["steps", 1, "next"], "sms")
    assert "not used" in fields_of(data)["definition.steps[1].next"]


def test_empty_draft_is_allowed_but_not_published() -> None:
    validate(pb.CampaignDefinition(), draft=True)
    with pytest.raises(InvalidArgument):
        validate(pb.CampaignDefinition())


def test_what_jsonb_cannot_hold_is_refused_naming_each_field() -> None:
    # A definition is stored as jsonb: a NUL anywhere, or a NaN or infinite number (YAML's .nan,
    # .inf), would fail in the database instead of naming the field.
    data = copy.deepcopy(GOOD)
    data["trigger"]["event"]["name"] = "Application\x00Started"
    data["audience"] = [
        {"key": "amount", "operator": "gte", "value": float("nan")},
        {"key": "state\x00", "operator": "exists"},
        {"key": "tags", "operator": "in", "value": ["ok", float("-inf")]},
    ]
    data["steps"][4]["call_task"]["notes"] = "call\x00"
    found = fields_of(data)
    for field in (
        "definition.trigger.event.name",
        "definition.audience[0].value",
        "definition.audience[1].key",
        "definition.audience[2].value",
        "definition.steps[4].call_task.notes",
    ):
        assert "NUL" in found[field], (field, found)
    assert fields_of(GOOD) == {}
