"""Campaign definitions: loading from YAML/JSON dicts, validation with field paths, the step graph."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from parley.campaign.v1 import campaign_service_pb2 as pb

from services.campaign import template, timing
from services.campaign.conditions import filter_problem
from services.common.errors import InvalidArgument, Violation
from services.common.sendwindow import SendWindow, parse_hhmm
from services.common.storable import UNSTORABLE, unstorable_fields

STEP_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
# Steps that take time: a cycle must pass through one of them.
WAITING_KINDS = frozenset({"wait", "wait_until", "wait_for_event"})
# Steps whose successor is Step.next.
LINEAR_KINDS = frozenset({"wait", "wait_until", "send_sms", "call_task", "set_property"})
MAX_SMS_BODY = 1600
_PASSTHROUGH = {
    "google.protobuf.Value",
    "google.protobuf.Struct",
    "google.protobuf.ListValue",
    "google.protobuf.Timestamp",
}


# ---------------------------------------------------------------------------------------------
# Loading: dict (from YAML or JSON) → proto, with the same field names and path-precise errors.


def from_dict(data: Mapping[str, Any], message: Message, path: str = "") -> Message:
    """Fill ``message`` from ``data``; enum values may be written short and lower-case ("eq", "once").

    Raises InvalidArgument naming the field path (``definition.steps[1].wait.duration``) for
    unknown fields, wrong shapes and unknown enum values.
    """
    errors: list[Violation] = []
    normalized = _normalize(data, message.DESCRIPTOR, path, errors)
    if errors:
        raise InvalidArgument(errors)
    try:
        json_format.ParseDict(normalized, message)
    except json_format.ParseError as exc:
        raise InvalidArgument([Violation(path or "campaign", str(exc))]) from exc
    return message


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _normalize(data: Any, desc: Descriptor, path: str, errors: list[Violation]) -> Any:
    if desc.full_name in _PASSTHROUGH:
        return data
    if not isinstance(data, Mapping):
        errors.append(Violation(path or desc.name, "must be a mapping"))
        return {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = desc.fields_by_name.get(key) or next((f for f in desc.fields if f.json_name == key), None)
        fpath = _join(path, str(key))
        if field is None:
            errors.append(Violation(fpath, f"unknown field (known: {', '.join(f.name for f in desc.fields)})"))
            continue
        if value is None:
            continue
        if _is_repeated(field) and not _is_map(field):
            if not isinstance(value, list):
                errors.append(Violation(fpath, "must be a list"))
                continue
            out[field.name] = [_scalar(v, field, f"{fpath}[{i}]", errors) for i, v in enumerate(value)]
        else:
            out[field.name] = _scalar(value, field, fpath, errors)
    return out


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated) if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _scalar(value: Any, field: FieldDescriptor, path: str, errors: list[Violation]) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if _is_map(field):
            return value
        return _normalize(value, field.message_type, path, errors)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _enum(value, field.enum_type, path, errors)
    return value


def _enum(value: Any, enum: EnumDescriptor, path: str, errors: list[Violation]) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    names = [v.name for v in enum.values]
    prefix = _common_prefix(names)
    if isinstance(value, str):
        wanted = value.strip().upper().replace("-", "_").replace(" ", "_")
        for candidate in (wanted, prefix + wanted):
            if candidate in enum.values_by_name and not candidate.endswith("_UNSPECIFIED"):
                return candidate
    short = [n[len(prefix) :].lower() for n in names if not n.endswith("_UNSPECIFIED")]
    errors.append(Violation(path, f"unknown value {value!r}; use one of {', '.join(short)}"))
    return names[0]


def _common_prefix(names: list[str]) -> str:
    first = names[0]
    cut = first.rfind("UNSPECIFIED")
    return first[:cut] if cut > 0 else ""


def definition_to_dict(definition: pb.CampaignDefinition) -> dict[str, Any]:
    """The definition as a JSON-ready dict with proto field names (how it is stored)."""
    return json_format.MessageToDict(definition, preserving_proto_field_name=True)


def definition_from_stored(data: Mapping[str, Any]) -> pb.CampaignDefinition:
    msg = pb.CampaignDefinition()
    json_format.ParseDict(dict(data), msg, ignore_unknown_fields=True)
    return msg


# ---------------------------------------------------------------------------------------------
# The graph.


@dataclass(frozen=True)
class Graph:
    """Steps by id, the start step, and each step's successors (label → step id or '')."""

    definition: pb.CampaignDefinition
    steps: dict[str, pb.Step]
    index: dict[str, int]
    start: str

    @classmethod
    def of(cls, definition: pb.CampaignDefinition) -> Graph:
        steps = {s.id: s for s in definition.steps}
        index = {s.id: i for i, s in reversed(list(enumerate(definition.steps)))}
        start = definition.start_step_id or (definition.steps[0].id if definition.steps else "")
        return cls(definition, steps, index, start)

    def step(self, step_id: str) -> pb.Step:
        return self.steps[step_id]

    @property
    def event_triggered(self) -> bool:
        return self.definition.trigger.WhichOneof("kind") == "event"


def kind_of(step: pb.Step) -> str:
    return step.WhichOneof("kind") or ""


def successors(step: pb.Step) -> Iterator[tuple[str, str]]:
    """(field path under the step, target id) for every edge of the step; '' targets end the journey."""
    kind = kind_of(step)
    if kind in LINEAR_KINDS:
        yield "next", step.next
    elif kind == "branch":
        yield "branch.if_true", step.branch.if_true
        yield "branch.if_false", step.branch.if_false
    elif kind == "wait_for_event":
        yield "wait_for_event.on_event", step.wait_for_event.on_event
        yield "wait_for_event.on_timeout", step.wait_for_event.on_timeout
    elif kind == "split":
        for i, c in enumerate(step.split.cohorts):
            yield f"split.cohorts[{i}].next", c.next


# ---------------------------------------------------------------------------------------------
# Validation.


def validate(definition: pb.CampaignDefinition, prefix: str = "definition", *, draft: bool = False) -> None:
    """Raise InvalidArgument listing every problem with its field path; a draft may be empty."""
    problems = list(problems_of(definition, prefix, draft=draft))
    if problems:
        raise InvalidArgument(problems)


def problems_of(d: pb.CampaignDefinition, prefix: str = "definition", *, draft: bool = False) -> Iterator[Violation]:
    """Every violation of the definition rules, each with a precise field path."""
    if draft and d.ByteSize() == 0:
        return

    def p(sub: str) -> str:
        return _join(prefix, sub)

    # The definition is stored as jsonb: no NUL anywhere in it, no NaN or infinite number.
    for path in unstorable_fields(d):
        yield Violation(p(path), UNSTORABLE)

    trigger_kind = d.trigger.WhichOneof("kind")
    if trigger_kind is None:
        yield Violation(p("trigger"), "required: event, property_change or audience_entry")
    elif trigger_kind == "event":
        yield from _matcher(d.trigger.event, p("trigger.event"))
    elif trigger_kind == "property_change":
        if not d.trigger.property_change.key:
            yield Violation(p("trigger.property_change.key"), "required")
        yield from _filters(d.trigger.property_change.conditions, p("trigger.property_change.conditions"), False)
    elif trigger_kind == "audience_entry" and not d.audience:
        yield Violation(p("audience"), "required for an audience_entry trigger")
    yield from _filters(d.audience, p("audience"))
    for i, m in enumerate(d.exit_events):
        yield from _matcher(m, p(f"exit_events[{i}]"))
    yield from _policies(d, p)

    if not d.steps:
        yield Violation(p("steps"), "at least one step is required")
        return
    ids: dict[str, int] = {}
    for i, step in enumerate(d.steps):
        if not STEP_ID.match(step.id):
            yield Violation(p(f"steps[{i}].id"), "required: 1-64 letters, digits, '_' or '-'")
        elif step.id in ids:
            yield Violation(p(f"steps[{i}].id"), f"duplicate step id {step.id!r} (also steps[{ids[step.id]}])")
        else:
            ids[step.id] = i
    if d.start_step_id and d.start_step_id not in ids:
        yield Violation(p("start_step_id"), f"unknown step id {d.start_step_id!r}")
    for i, step in enumerate(d.steps):
        yield from _step(step, p(f"steps[{i}]"), trigger_kind == "event")
        for sub, target in successors(step):
            if target and target not in ids:
                yield Violation(p(f"steps[{i}].{sub}"), f"unknown step id {target!r}")
        if kind_of(step) and kind_of(step) not in LINEAR_KINDS and step.next:
            yield Violation(p(f"steps[{i}].next"), f"not used by a {kind_of(step)} step; set its own targets")

    graph = Graph.of(d)
    reachable = _reachable(graph)
    for i, step in enumerate(d.steps):
        if step.id in ids and ids[step.id] == i and step.id not in reachable:
            yield Violation(p(f"steps[{i}]"), f"step {step.id!r} is unreachable from the start step")
    cycle = _cycle_without_wait(graph)
    if cycle:
        yield Violation(
            p(f"steps[{graph.index[cycle[0]]}]"), "cycle without a wait: " + " -> ".join([*cycle, cycle[0]])
        )


def _policies(d: pb.CampaignDefinition, p: Any) -> Iterator[Violation]:
    policy = d.re_entry.policy
    if policy not in pb.ReEntryPolicy.values():
        yield Violation(p("re_entry.policy"), "unknown policy; use once, after_cooldown or any_time")
    if policy == pb.RE_ENTRY_POLICY_AFTER_COOLDOWN or d.re_entry.cooldown:
        yield from _duration(d.re_entry.cooldown, p("re_entry.cooldown"))
    if d.frequency_cap.max_messages < 0:
        yield Violation(p("frequency_cap.max_messages"), "must not be negative")
    if d.frequency_cap.max_messages > 0 or d.frequency_cap.period:
        yield from _duration(d.frequency_cap.period, p("frequency_cap.period"))
    w = d.send_window
    start_ok = end_ok = True
    for name, value in (("start", w.start), ("end", w.end)):
        if value:
            try:
                parse_hhmm(value)
            except ValueError as exc:
                start_ok, end_ok = (False, end_ok) if name == "start" else (start_ok, False)
                yield Violation(p(f"send_window.{name}"), str(exc))
    if start_ok and end_ok:
        window = SendWindow.parse(w.start, w.end)
        if window.start >= window.end:
            yield Violation(p("send_window"), "start must be before end")
    if d.HasField("goal"):
        yield from _matcher(d.goal.event, p("goal.event"))
        if d.goal.window:
            yield from _duration(d.goal.window, p("goal.window"))


def _duration(value: str, path: str) -> Iterator[Violation]:
    if not value:
        yield Violation(path, "required")
        return
    try:
        timing.parse_duration(value)
    except ValueError as exc:
        yield Violation(path, str(exc))


def _matcher(m: pb.EventMatcher, path: str) -> Iterator[Violation]:
    if not m.name.strip():
        yield Violation(f"{path}.name", "required")
    yield from _filters(m.conditions, f"{path}.conditions")


def _filters(filters: Any, path: str, key_required: bool = True) -> Iterator[Violation]:
    for i, f in enumerate(filters):
        problem = filter_problem(f, key_required=key_required)
        if problem:
            yield Violation(f"{path}[{i}].{problem[0]}", problem[1])


def _template(text: str, path: str) -> Iterator[Violation]:
    try:
        template.parse(text)
    except template.TemplateError as exc:
        yield Violation(path, f"template does not parse: {exc}")


def _step(step: pb.Step, path: str, event_triggered: bool) -> Iterator[Violation]:
    kind = kind_of(step)
    if not kind:
        yield Violation(
            path,
            "a step needs one kind: wait, wait_until, wait_for_event, branch, split, "
            "send_sms, call_task, set_property or exit",
        )
    elif kind == "wait":
        yield from _duration(step.wait.duration, f"{path}.wait.duration")
    elif kind == "wait_until":
        try:
            parse_hhmm(step.wait_until.time)
        except ValueError as exc:
            yield Violation(f"{path}.wait_until.time", str(exc))
        for i, day in enumerate(step.wait_until.weekdays):
            if day.lower() not in timing.WEEKDAYS:
                yield Violation(f"{path}.wait_until.weekdays[{i}]", f"use one of {', '.join(timing.WEEKDAYS)}")
    elif kind == "wait_for_event":
        w = step.wait_for_event
        yield from _matcher(w.event, f"{path}.wait_for_event.event")
        yield from _duration(w.timeout, f"{path}.wait_for_event.timeout")
        if w.match_key and not event_triggered:
            yield Violation(f"{path}.wait_for_event.match_key", "only allowed in event-triggered campaigns")
    elif kind == "branch":
        if not step.branch.conditions:
            yield Violation(f"{path}.branch.conditions", "at least one condition is required")
        for i, c in enumerate(step.branch.conditions):
            yield from _condition(c, f"{path}.branch.conditions[{i}]", event_triggered)
    elif kind == "split":
        cohorts = step.split.cohorts
        if len(cohorts) < 2:
            yield Violation(f"{path}.split.cohorts", "at least two cohorts are required")
        names: set[str] = set()
        for i, c in enumerate(cohorts):
            if not c.name:
                yield Violation(f"{path}.split.cohorts[{i}].name", "required")
            elif c.name in names:
                yield Violation(f"{path}.split.cohorts[{i}].name", f"duplicate cohort {c.name!r}")
            names.add(c.name)
            if not 0 <= c.percent <= 100:
                yield Violation(f"{path}.split.cohorts[{i}].percent", "must be between 0 and 100")
        if cohorts and sum(c.percent for c in cohorts) != 100:
            yield Violation(f"{path}.split.cohorts", "percents must sum to 100")
    elif kind == "send_sms":
        body = step.send_sms.body
        if not body.strip():
            yield Violation(f"{path}.send_sms.body", "required: an SMS body cannot be empty")
        elif len(body) > MAX_SMS_BODY:
            yield Violation(f"{path}.send_sms.body", f"at most {MAX_SMS_BODY} characters")
        else:
            yield from _template(body, f"{path}.send_sms.body")
    elif kind == "call_task":
        yield from _template(step.call_task.notes, f"{path}.call_task.notes")
    elif kind == "set_property":
        if not step.set_property.key:
            yield Violation(f"{path}.set_property.key", "required")
        if not step.set_property.HasField("value"):
            yield Violation(f"{path}.set_property.value", "required")


def _condition(c: pb.Condition, path: str, event_triggered: bool) -> Iterator[Violation]:
    kind = c.WhichOneof("kind")
    if kind is None:
        yield Violation(path, "a condition needs one of contact, trigger, did_event, did_not_event")
    elif kind in ("contact", "trigger"):
        if kind == "trigger" and not event_triggered:
            yield Violation(f"{path}.trigger", "trigger-event conditions need an event trigger")
        problem = filter_problem(getattr(c, kind))
        if problem:
            yield Violation(f"{path}.{kind}.{problem[0]}", problem[1])
    else:
        occ: pb.EventOccurrence = getattr(c, kind)
        if not occ.name.strip():
            yield Violation(f"{path}.{kind}.name", "required")
        yield from _filters(occ.conditions, f"{path}.{kind}.conditions")
        if occ.match_key and not event_triggered:
            yield Violation(f"{path}.{kind}.match_key", "only allowed in event-triggered campaigns")


def _reachable(graph: Graph) -> set[str]:
    seen: set[str] = set()
    todo = [graph.start] if graph.start in graph.steps else []
    while todo:
        sid = todo.pop()
        if sid in seen:
            continue
        seen.add(sid)
        todo.extend(t for _, t in successors(graph.steps[sid]) if t in graph.steps)
    return seen


def _cycle_without_wait(graph: Graph) -> list[str] | None:
    """A cycle through instant steps only (it would spin forever), or None."""
    instant = {sid for sid, s in graph.steps.items() if kind_of(s) not in WAITING_KINDS}
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(sid: str) -> list[str] | None:
        color[sid] = 1
        stack.append(sid)
        for _, t in successors(graph.steps[sid]):
            if t not in instant:
                continue
            if color.get(t) == 1:
                return stack[stack.index(t) :]
            if t not in color:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        color[sid] = 2
        return None

    for sid in graph.index:
        if sid in instant and sid not in color:
            found = visit(sid)
            if found:
                return found
    return None
