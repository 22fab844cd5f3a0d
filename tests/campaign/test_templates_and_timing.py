"""Template rendering, condition operators, send windows and wait_until in contacts' time zones."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from google.protobuf import struct_pb2
from parley.common.v1 import contact_pb2

from services.campaign import conditions, template, timing
from services.common.sendwindow import parse_hhmm

Op = contact_pb2.FilterOperator


def test_render_fields_defaults_and_filters() -> None:
    t = template.parse('Hi {{ contact.first_name|default:"there" }}, your cart {{event.cart_id|upper}} awaits')
    assert t.render({"first_name": "Ana"}, {"cart_id": "c9"}) == "Hi Ana, your cart C9 awaits"
    assert t.render({}, {}) == "Hi there, your cart  awaits"
    assert template.parse("{{contact.address.city}}").render({"address": {"city": "Reno"}}, {}) == "Reno"
    assert template.parse("{{event.amount}}").render({}, {"amount": 2500.0}) == "2500"


@pytest.mark.parametrize(
    "bad", ["{{", "}} x", "{{contact}}", "{{ other.x }}", "{{contact.x|nope}}", "{{contact.x|default}}", "{{}}"]
)
def test_bad_templates(bad: str) -> None:
    with pytest.raises(template.TemplateError):
        template.parse(bad)


def _f(key: str, op: int, value: object = None) -> contact_pb2.PropertyFilter:
    f = contact_pb2.PropertyFilter(key=key, operator=op)  # type: ignore[arg-type]
    if value is not None:
        v = struct_pb2.Value()
        if isinstance(value, list):
            v.list_value.extend(value)
        elif isinstance(value, str):
            v.string_value = value
        else:
            v.number_value = float(value)  # type: ignore[arg-type]
        f.value.CopyFrom(v)
    return f


def test_operators() -> None:
    props = {"age": 30, "name": "Ana Lopez", "tags": ["vip", "loan"], "state": "CA"}
    assert conditions.matches(_f("age", Op.FILTER_OPERATOR_EQ, 30), props)
    assert conditions.matches(_f("age", Op.FILTER_OPERATOR_GT, 29), props)
    assert not conditions.matches(_f("age", Op.FILTER_OPERATOR_LT, 30), props)
    assert conditions.matches(_f("age", Op.FILTER_OPERATOR_LTE, 30), props)
    assert conditions.matches(_f("age", Op.FILTER_OPERATOR_GTE, 30), props)
    assert conditions.matches(_f("state", Op.FILTER_OPERATOR_NEQ, "NY"), props)
    assert conditions.matches(_f("name", Op.FILTER_OPERATOR_CONTAINS, "lopez"), props)
    assert conditions.matches(_f("tags", Op.FILTER_OPERATOR_CONTAINS, "vip"), props)
    assert conditions.matches(_f("state", Op.FILTER_OPERATOR_IN, ["CA", "NY"]), props)
    assert conditions.matches(_f("age", Op.FILTER_OPERATOR_EXISTS), props)
    assert conditions.matches(_f("missing", Op.FILTER_OPERATOR_NOT_EXISTS), props)
    assert not conditions.matches(_f("missing", Op.FILTER_OPERATOR_EQ, 1), props)


def test_operators_mean_what_identitys_filters_mean() -> None:
    # The cases tests/identity/test_reads.py runs through ListContacts' SQL, evaluated here.
    props = {
        "age": "unknown",
        "score": " 7.5e1 ",
        "amount": "1500",
        "room": "Room 30",
        "items": ["x", "y"],
        "flag": True,
        "one": 1,
        "deep": {"gone": None},
    }
    assert not conditions.matches(_f("age", Op.FILTER_OPERATOR_GT, 40), props)  # not a number
    assert conditions.matches(_f("score", Op.FILTER_OPERATOR_GT, 40), props)  # a numeric string is
    assert conditions.matches(_f("amount", Op.FILTER_OPERATOR_GTE, 1000), props)
    assert conditions.matches(_f("age", Op.FILTER_OPERATOR_GTE, "a"), props)  # strings, lexically
    assert not conditions.matches(_f("amount", Op.FILTER_OPERATOR_GT, "2"), props)  # "1500" < "2"
    assert not conditions.matches(_f("room", Op.FILTER_OPERATOR_CONTAINS, 30), props)
    assert conditions.matches(_f("items.0", Op.FILTER_OPERATOR_EQ, "x"), props)
    assert conditions.matches(_f("items.-1", Op.FILTER_OPERATOR_EQ, "y"), props)
    assert conditions.matches(_f("items.+1", Op.FILTER_OPERATOR_EQ, "y"), props)
    assert not conditions.matches(_f("items.2", Op.FILTER_OPERATOR_EXISTS), props)
    assert conditions.matches(_f("items.2", Op.FILTER_OPERATOR_NEQ, "x"), props)
    assert conditions.matches(_f("deep.gone", Op.FILTER_OPERATOR_EXISTS), props)  # a JSON null is there
    assert not conditions.matches(_f("deep.other", Op.FILTER_OPERATOR_EXISTS), props)
    true = contact_pb2.PropertyFilter(key="one", operator=Op.FILTER_OPERATOR_EQ)
    true.value.bool_value = True
    assert not conditions.matches(true, props)  # JSON true is not 1
    assert not conditions.matches(_f("flag", Op.FILTER_OPERATOR_IN, [1]), props)
    assert conditions.matches(_f("one", Op.FILTER_OPERATOR_IN, [1.0, 2]), props)


def test_ordering_is_exact_and_never_raises_on_odd_text() -> None:
    # Exact, as PostgreSQL's numeric compares (a float would make these equal).
    assert conditions.matches(_f("n", Op.FILTER_OPERATOR_GT, 9007199254740992), {"n": "9007199254740993"})
    assert conditions.matches(_f("n", Op.FILTER_OPERATOR_GT, 0), {"n": "1e-999"})
    # Spaces other than ASCII ones, which neither Decimal nor numeric read, make no number; a
    # condition is false, never an error (one event must not stop the engine).
    for odd in ("\x1c1500", "1500\u00a0", "\u20031500", "1500\u3000", "nan", "inf", "1_500", "\u0661"):
        assert not conditions.matches(_f("n", Op.FILTER_OPERATOR_GTE, 1), {"n": odd})
    assert conditions.matches(_f("n", Op.FILTER_OPERATOR_GTE, 1), {"n": " \t1500\n"})
    for key in ("items.\x1c1", "items.\u00a01"):
        assert not conditions.matches(_f(key, Op.FILTER_OPERATOR_EXISTS), {"items": ["x", "y"]})


def test_wait_until_next_allowed_weekday() -> None:
    tz = ZoneInfo("America/Chicago")
    friday_noon = datetime(2026, 11, 27, 12, 0, tzinfo=tz)  # a Friday
    got = timing.next_time_of_day(friday_noon.astimezone(UTC), parse_hhmm("10:00"), ["mon"], tz)
    assert got.astimezone(tz) == datetime(2026, 11, 30, 10, 0, tzinfo=tz)
    got = timing.next_time_of_day(friday_noon.astimezone(UTC), parse_hhmm("13:00"), [], tz)
    assert got.astimezone(tz) == datetime(2026, 11, 27, 13, 0, tzinfo=tz)


def test_durations() -> None:
    assert timing.parse_duration("1h30m").total_seconds() == 5400
    assert timing.parse_duration("1w").days == 7
    for bad in ["", "5", "1x", "m", "-1m"]:
        with pytest.raises(ValueError):
            timing.parse_duration(bad)
