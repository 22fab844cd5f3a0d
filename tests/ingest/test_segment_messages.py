"""Reading Segment messages and Regal's event shape into events, without servers."""

from __future__ import annotations

import pytest
from google.protobuf import json_format
from parley.common.v1.event_pb2 import Event, EventType

from services.ingest.segment import from_regal, from_segment, json_field, parse_time


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2026-01-01T10:00:00Z", "2026-01-01T10:00:00Z"),
        ("2026-01-01T10:00:00+00:00", "2026-01-01T10:00:00Z"),
        ("2026-01-01T12:00:00+02:00", "2026-01-01T10:00:00Z"),
        ("2026-01-01T10:00:00.123Z", "2026-01-01T10:00:00.123Z"),
        ("2026-01-01T10:00:00.123456Z", "2026-01-01T10:00:00.123456Z"),
        ("2026-01-01T10:00:00", "2026-01-01T10:00:00Z"),
        ("2026-01-01t10:00:00.5z", "2026-01-01T10:00:00.500Z"),  # RFC 3339's lower-case letters
    ],
)
def test_iso_times_parse(text: str, iso: str) -> None:
    assert parse_time(text).ToJsonString() == iso


def test_track_message() -> None:
    event, violations = from_segment(
        {
            "type": "track",
            "event": "Signed Up",
            "userId": 42,
            "anonymousId": None,
            "messageId": "m1",
            "properties": {"plan": "gold"},
            "timestamp": "2026-01-01T10:00:00Z",
        }
    )
    assert violations == []
    assert event is not None
    assert (event.type, event.name, event.user_id, event.anonymous_id, event.message_id) == (
        EventType.EVENT_TYPE_TRACK,
        "Signed Up",
        "42",
        "",
        "m1",
    )
    assert event.original_timestamp.ToJsonString() == "2026-01-01T10:00:00Z"


def test_original_timestamp_wins_over_timestamp() -> None:
    event, _ = from_segment(
        {"type": "page", "originalTimestamp": "2026-01-01T09:00:00Z", "timestamp": "2026-01-01T10:00:00Z"}
    )
    assert event is not None and event.original_timestamp.ToJsonString() == "2026-01-01T09:00:00Z"


def test_identify_reads_context_traits_and_batch_defaults() -> None:
    sent = parse_time("2026-01-01T10:00:05Z")
    event, violations = from_segment(
        {"type": "identify", "userId": "u", "traits": {"a": 1}, "context": {"traits": {"a": 0, "phone": "x"}}},
        batch_context={"ip": "1.2.3.4"},
        batch_integrations={"All": False},
        batch_sent_at=sent,
    )
    assert violations == [] and event is not None
    assert dict(event.traits) == {"a": 1, "phone": "x"}
    assert event.context.fields["ip"].string_value == "1.2.3.4"
    assert event.context.fields["integrations"].struct_value.fields["All"].bool_value is False
    assert event.sent_at == sent


def test_group_traits_become_properties() -> None:
    event, _ = from_segment({"type": "group", "userId": "u", "groupId": "g", "traits": {"phone": "4155550100"}})
    assert event is not None
    assert not event.HasField("traits")
    assert event.properties.fields["phone"].string_value == "4155550100"


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"type": "track", "event": ["x"]}, "event"),
        ({"type": "track", "userId": {"a": 1}}, "userId"),
        ({"type": "track", "properties": [1]}, "properties"),
        ({"type": "identify", "traits": "t"}, "traits"),
        ({"type": "track", "context": 3}, "context"),
        ({"type": "track", "timestamp": "soon"}, "timestamp"),
        ({"type": "track", "timestamp": 1700000000}, "timestamp"),
        ({"type": "track", "sentAt": "2026-13-01T00:00:00Z"}, "sentAt"),
    ],
)
def test_unreadable_fields_are_named(message: dict[str, object], field: str) -> None:
    _, violations = from_segment(message)
    assert [v.field for v in violations] == [field]


def test_non_object_message() -> None:
    event, violations = from_segment("nope")
    assert event is None and [v.field for v in violations] == [""]


def test_regal_shape() -> None:
    event, violations = from_regal(
        {"userId": "u", "name": "Paid", "traits": {"phone": "4155550100"}, "eventSource": "crm"}
    )
    assert violations == [] and event is not None
    assert event.type == EventType.EVENT_TYPE_TRACK and event.name == "Paid"
    assert event.context.fields["eventSource"].string_value == "crm"
    unnamed, _ = from_regal({"userId": "u", "traits": {"phone": "4155550100"}})
    assert unnamed is not None and unnamed.type == EventType.EVENT_TYPE_IDENTIFY


def test_json_field_names() -> None:
    assert json_field(Event(type=EventType.EVENT_TYPE_TRACK), "name") == "event"
    assert json_field(Event(type=EventType.EVENT_TYPE_PAGE), "name") == "name"
    assert json_field(Event(), "user_id") == "userId"
    assert json_field(Event(), "original_timestamp") == "timestamp"
    assert json_field(Event(), "traits.phone") == "traits.phone"


def test_integrations_from_every_level_are_kept_the_nearest_winning() -> None:
    event, violations = from_segment(
        {
            "type": "track",
            "event": "E",
            "userId": "u",
            "context": {"ip": "3.3.3.3", "integrations": {"Mine": True, "Shared": "context"}},
            "integrations": {"Shared": "message"},
        },
        batch_integrations={"Amplitude": True, "Mine": False},
    )
    assert violations == [] and event is not None
    hints = json_format.MessageToDict(event.context.fields["integrations"].struct_value)
    assert hints == {
        "Amplitude": True,
        "Mine": True,
        "Shared": "message",
    }


def test_a_null_page_category_is_no_property() -> None:
    # analytics-python's page() sends "category": null when none is given.
    event, _ = from_segment({"type": "page", "userId": "u", "name": "Home", "category": None})
    assert event is not None and "category" not in event.properties
    event, _ = from_segment({"type": "page", "userId": "u", "name": "Home", "category": "Docs"})
    assert event is not None and event.properties["category"] == "Docs"
