"""What Postgres text and jsonb cannot hold, found in protos by field path."""

from __future__ import annotations

from google.protobuf.struct_pb2 import Struct, Value
from parley.common.v1.contact_pb2 import PropertyFilter
from parley.common.v1.event_pb2 import Event

from services.common.storable import unstorable, unstorable_fields


def struct(data: dict[str, object]) -> Struct:
    s = Struct()
    s.update(data)
    return s


def test_json_values() -> None:
    assert not unstorable(struct({"a": [1, 2.5, "x", None, True, {"b": -0.0}]}))
    assert unstorable(struct({"a\x00": 1}))
    assert unstorable(struct({"a": [{"b": "\x00"}]}))
    assert unstorable(struct({"a": {"b": float("nan")}}))
    assert unstorable(Value(number_value=float("inf")))


def test_paths_of_bad_fields() -> None:
    event = Event(name="ok", user_id="a\x00", properties=struct({"x": float("-inf")}), traits=struct({"k": "v"}))
    assert sorted(unstorable_fields(event)) == ["properties", "user_id"]
    assert list(unstorable_fields(PropertyFilter(key="a", value=Value(string_value="\x00")), "filters[3]")) == [
        "filters[3].value"
    ]
    assert list(unstorable_fields(Event(name="fine", properties=struct({"x": 1})))) == []


def test_map_keys_and_values() -> None:
    from parley.campaign.v1.campaign_service_pb2 import Enrollment

    enrollment = Enrollment()
    enrollment.cohorts["split\x00"] = "a"
    enrollment.cohorts["other"] = "b\x00"
    enrollment.cohorts["fine"] = "c"
    assert sorted(unstorable_fields(enrollment)) == ["cohorts['other']", "cohorts['split\\x00']"]
