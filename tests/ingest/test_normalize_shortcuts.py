"""The hot path's shortcuts give the answers of the plain rules: depth screening by serialized
bytes, remembered contexts, timestamp presence, and the batch response's counts."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.event_pb2 import Event, EventResult, EventStatus, EventType

from services.ingest.normalize import Limits, normalize_event
from services.ingest.servicer import _counts
from tests.ingest.struct_walks import too_deep
from tests.ingest.test_normalize import NOW, nested, struct


def received() -> Timestamp:
    out = Timestamp()
    out.FromDatetime(NOW)
    return out


def check(event: Event, limits: Limits | None = None) -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in normalize_event(event, "US", received(), limits or Limits())]


@pytest.mark.parametrize(
    "value",
    [
        {"plain": "text", "n": 3.5},
        {"star": "*", "two": "2", "list_tag": 50.0, "struct_tag": 42.0},  # bytes 0x2A / 0x32 in flat values
        {"*2*": "22**", "k" * 42: "v" * 50},  # lengths 42 and 50 are the tag bytes too
        nested(8, "2*"),
        nested(9),
        nested(9, "no tag bytes"),
        {"list": [[[[[[[[1]]]]]]]]},
        {"list": [[[[[[[1]]]]]]]},
        {"a": [], "b": {}},
    ],
)
@pytest.mark.parametrize("field", ["properties", "traits", "context"])
@pytest.mark.parametrize("max_depth", [1, 2, 8])
def test_depth_violations_match_the_walk(value: dict[str, Any], field: str, max_depth: int) -> None:
    s = struct(value)
    event = Event(type=EventType.EVENT_TYPE_TRACK, name="n", user_id="u")
    getattr(event, field).CopyFrom(s)
    expected = [(field, f"nested deeper than {max_depth} levels")] if too_deep(s, max_depth) else []
    assert [v for v in check(event, Limits(max_depth=max_depth)) if v[1].startswith("nested")] == expected
    # Asked again: the remembered context must give the same answer.
    again = Event()
    again.CopyFrom(event)
    assert [v for v in check(again, Limits(max_depth=max_depth)) if v[1].startswith("nested")] == expected


def test_remembered_context_still_yields_its_phone() -> None:
    ctx = {"library": {"name": "x"}, "traits": {"phone": "+1 415 555 2671"}}
    for _ in range(2):
        event = Event(type=EventType.EVENT_TYPE_IDENTIFY, context=struct(ctx))
        assert check(event) == []
        assert event.phone == "+14155552671"
    plain = Event(type=EventType.EVENT_TYPE_IDENTIFY, context=struct({"library": {"name": "x"}}))
    assert [f for f, _ in check(plain)] == ["user_id"]
    assert plain.phone == ""


def test_a_client_phone_is_cleared_when_the_traits_hold_none() -> None:
    event = Event(type=EventType.EVENT_TYPE_TRACK, name="n", user_id="u", phone="+14155552671")
    assert check(event) == []
    assert event.phone == ""


def test_a_set_timestamp_at_the_epoch_is_read_and_an_unset_one_is_not() -> None:
    # Alone, a set original_timestamp at the epoch is the event time, and refused.
    epoch = Event(type=EventType.EVENT_TYPE_TRACK, name="n", user_id="u")
    epoch.original_timestamp.SetInParent()
    assert check(epoch) == [("original_timestamp", "before 2000-01-01T00:00:00Z")]
    # With a set sent_at at the epoch too, it is a clock reset to 1970: corrected to arrival.
    both = Event(type=EventType.EVENT_TYPE_TRACK, name="n", user_id="u")
    both.original_timestamp.SetInParent()
    both.sent_at.SetInParent()
    assert check(both) == []
    assert both.timestamp == both.received_at
    assert both.HasField("original_timestamp") and both.HasField("sent_at")
    unset = Event(type=EventType.EVENT_TYPE_TRACK, name="n", user_id="u")
    assert check(unset) == []
    assert unset.timestamp == unset.received_at
    assert not unset.HasField("original_timestamp")


def test_timestamp_violations_keep_their_order_and_words() -> None:
    event = Event(
        type=EventType.EVENT_TYPE_TRACK,
        name="n",
        user_id="u",
        original_timestamp=Timestamp(seconds=10**12),
        sent_at=Timestamp(seconds=int(NOW.timestamp()), nanos=-1),
    )
    assert check(event) == [
        ("original_timestamp", "not a valid timestamp"),
        ("sent_at", "not a valid timestamp"),
    ]


def test_counts_by_status() -> None:
    results = [
        EventResult(status=EventStatus.EVENT_STATUS_ACCEPTED),
        EventResult(status=EventStatus.EVENT_STATUS_DUPLICATE),
        EventResult(status=EventStatus.EVENT_STATUS_REJECTED),
        EventResult(status=EventStatus.EVENT_STATUS_UNSPECIFIED),
        EventResult(status=EventStatus.EVENT_STATUS_ACCEPTED),
    ]
    assert _counts(results) == {"accepted_count": 2, "duplicate_count": 1, "rejected_count": 2}
