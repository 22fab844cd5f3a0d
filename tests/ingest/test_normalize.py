"""Validation and normalization rules of one event, without servers."""

from __future__ import annotations

import math
import random
import struct as struct_module
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.event_pb2 import Event, EventType

from services.common.phones import time_zone_of
from services.common.phones import to_e164 as normalize_phone
from services.ingest.normalize import Limits, _struct_problems, normalize_event
from tests.ingest.struct_walks import has_non_finite, has_nul, too_deep

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def ts(dt: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(dt)
    return out


def struct(value: dict[str, Any]) -> Struct:
    s = Struct()
    s.update(value)
    return s


def nested(depth: int, leaf: Any = 1) -> dict[str, Any]:
    """An object that is ``depth`` levels deep (itself included), ``leaf`` at the bottom."""
    value: dict[str, Any] = {"leaf": leaf}
    for _ in range(depth - 1):
        value = {"inner": value}
    return value


def track(**kw: Any) -> Event:
    base: dict[str, Any] = {"type": EventType.EVENT_TYPE_TRACK, "name": "Loan Approved", "user_id": "u1"}
    base.update(kw)
    return Event(**base)


def check(event: Event, region: str = "US") -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in normalize_event(event, region, ts(NOW), Limits())]


@pytest.mark.parametrize(
    "raw",
    ["(415) 555-2671", "+1 415-555-2671", "4155552671", "tel:+1-415-555-2671", "tel:4155552671", "415.555.2671"],
)
def test_phone_formats_normalize_to_e164(raw: str) -> None:
    assert normalize_phone(raw, "US") == "+14155552671"


@pytest.mark.parametrize(
    ("raw", "region", "zone"),
    [
        ("(415) 555-2671", "US", "America/Los_Angeles"),
        ("tel:+1-212-555-0100", "US", "America/New_York"),
        ("020 7946 0958", "GB", "Europe/London"),
        ("+33 1 42 68 53 00", "US", "Europe/Paris"),
    ],
)
def test_the_phone_zone_comes_from_the_same_parse(raw: str, region: str, zone: str) -> None:
    event = track(traits=struct({"phone": raw}))
    assert check(event, region) == []
    assert event.phone == normalize_phone(raw, region)
    assert event.phone_time_zone == zone == time_zone_of(event.phone)


def test_a_zone_sent_by_the_client_is_replaced_or_cleared() -> None:
    event = track(traits=struct({"phone": "(415) 555-2671"}), phone_time_zone="Asia/Tokyo")
    assert check(event) == [] and event.phone_time_zone == "America/Los_Angeles"
    no_phone = track(phone="+14155552671", phone_time_zone="Asia/Tokyo")
    assert check(no_phone) == [] and (no_phone.phone, no_phone.phone_time_zone) == ("", "")
    bad = track(traits=struct({"phone": "12"}), phone_time_zone="Asia/Tokyo")
    assert check(bad) == [("traits.phone", "not a valid phone number")] and bad.phone_time_zone == ""


def test_phone_uses_the_workspace_region() -> None:
    assert normalize_phone("020 7946 0958", "GB") == "+442079460958"
    assert normalize_phone("020 7946 0958", "US") is None


def test_valid_event_is_normalized() -> None:
    event = track(
        name="  Loan Approved ",
        user_id=" u1 ",
        traits=struct({"phone": "(415) 555-2671"}),
        original_timestamp=ts(NOW - timedelta(hours=1, minutes=5)),
        sent_at=ts(NOW - timedelta(hours=1)),
    )
    assert check(event) == []
    assert event.name == "Loan Approved"
    assert event.user_id == "u1"
    assert event.phone == "+14155552671"
    assert event.traits.fields["phone"].string_value == "(415) 555-2671"
    assert len(event.message_id) == 36
    assert event.received_at.ToDatetime(UTC) == NOW
    # The device clock is an hour behind: the event happened 5 minutes before arrival.
    assert event.timestamp.ToDatetime(UTC) == NOW - timedelta(minutes=5)
    assert event.original_timestamp.ToDatetime(UTC) == NOW - timedelta(hours=1, minutes=5)


def test_message_id_is_kept_when_given() -> None:
    event = track(message_id="m-1")
    assert check(event) == []
    assert event.message_id == "m-1"


def test_timestamp_without_sent_at_is_the_original() -> None:
    event = track(original_timestamp=ts(NOW - timedelta(days=3)))
    assert check(event) == []
    assert event.timestamp.ToDatetime(UTC) == NOW - timedelta(days=3)


def test_timestamp_without_original_is_received_at() -> None:
    event = track()
    assert check(event) == []
    assert event.timestamp == event.received_at


def test_an_earlier_received_at_is_kept_and_corrects_against_it() -> None:
    # A message another platform received and stamped (an archive replayed): its event time comes
    # out as that platform corrected it.
    received = NOW - timedelta(days=200)
    event = track(
        original_timestamp=ts(received - timedelta(hours=2, seconds=1)),  # the device two hours behind
        sent_at=ts(received - timedelta(hours=2)),
        received_at=ts(received),
    )
    assert check(event) == []
    assert event.received_at.ToDatetime(UTC) == received
    assert event.timestamp.ToDatetime(UTC) == received - timedelta(seconds=1)
    alone = track(received_at=ts(received))
    assert check(alone) == [] and alone.timestamp == alone.received_at == ts(received)


def test_a_later_received_at_is_replaced_and_an_ancient_one_refused() -> None:
    # A clock a little ahead: ingest's own time stands, and with it the limits.
    event = track(received_at=ts(NOW + timedelta(seconds=1)))
    assert check(event) == []
    assert event.received_at == ts(NOW) and event.timestamp == ts(NOW)
    # Before the event time's floor, as original_timestamp would be (over gRPC a set but zero
    # stamp is 1970).
    for ancient in (datetime(1999, 12, 31, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC)):
        event = track(received_at=ts(ancient))
        assert [field for field, _ in check(event)] == ["received_at"]


def test_phone_from_context_traits() -> None:
    event = track(user_id="", context=struct({"traits": {"phone": "+1 (415) 555-2671"}}))
    assert check(event) == []
    assert event.phone == "+14155552671"


def test_a_group_traits_phone_is_the_accounts_not_the_callers() -> None:
    # A group's traits describe the account: its phone makes no contact (not even an invalid one
    # is read); the caller's own context traits still count, as for a track.
    group = track(type=EventType.EVENT_TYPE_GROUP, name="", group_id="acme", traits=struct({"phone": "4155550100"}))
    assert check(group) == []
    assert group.phone == ""
    bad = track(type=EventType.EVENT_TYPE_GROUP, name="", group_id="acme", traits=struct({"phone": "n/a"}))
    assert check(bad) == []
    caller = track(
        type=EventType.EVENT_TYPE_GROUP,
        name="",
        group_id="acme",
        traits=struct({"phone": "4155550100"}),
        context=struct({"traits": {"phone": "+1 (415) 555-2671"}}),
    )
    assert check(caller) == []
    assert caller.phone == "+14155552671"


def test_numeric_phone_is_read_as_digits() -> None:
    event = track(traits=struct({"phone": 4155552671}))
    assert check(event) == []
    assert event.phone == "+14155552671"


def test_page_and_screen_need_no_name() -> None:
    assert check(Event(type=EventType.EVENT_TYPE_PAGE, anonymous_id="a")) == []
    assert check(Event(type=EventType.EVENT_TYPE_SCREEN, anonymous_id="a")) == []


def test_phone_alone_identifies_the_user() -> None:
    event = Event(type=EventType.EVENT_TYPE_IDENTIFY, traits=struct({"phone": "4155552671"}))
    assert check(event) == []


def test_depth_limit_is_inclusive() -> None:
    assert not too_deep(struct(nested(8)), 8)
    assert too_deep(struct(nested(9)), 8)
    assert too_deep(struct({"list": [[[[[[[[1]]]]]]]]}), 8)


OLD = ts(datetime(1999, 12, 31, tzinfo=UTC))
FUTURE = ts(NOW + timedelta(days=2))


@pytest.mark.parametrize(
    ("event", "field", "words"),
    [
        (Event(name="x", user_id="u"), "type", "event type"),
        (Event(type=99, name="x", user_id="u"), "type", "event type"),  # type: ignore[arg-type]
        (track(name=""), "name", "required"),
        (track(name="   "), "name", "required"),
        (track(name="n" * 201), "name", "200"),
        (Event(type=EventType.EVENT_TYPE_PAGE, name="p" * 201, user_id="u"), "name", "200"),
        (track(user_id=""), "user_id", "anonymous_id"),
        (track(user_id="u" * 256), "user_id", "255"),
        (track(message_id="m" * 256), "message_id", "255"),
        (track(traits=struct({"phone": "555"})), "traits.phone", "not a valid phone"),
        (track(traits=struct({"phone": "not a phone"})), "traits.phone", "not a valid phone"),
        (track(traits=struct({"phone": True})), "traits.phone", "string"),
        (track(context=struct({"traits": {"phone": "12"}})), "context.traits.phone", "not a valid phone"),
        (track(properties=struct(nested(9))), "properties", "nested deeper than 8"),
        (track(traits=struct(nested(9))), "traits", "nested deeper than 8"),
        (track(context=struct(nested(9))), "context", "nested deeper than 8"),
        (track(properties=struct({"blob": "x" * 33_000})), "", "the limit is 32768 bytes"),
        (track(original_timestamp=OLD), "original_timestamp", "2000"),
        (track(original_timestamp=FUTURE), "original_timestamp", "24 hours"),
        (track(original_timestamp=Timestamp(seconds=10**12)), "original_timestamp", "not a valid timestamp"),
        (
            track(original_timestamp=Timestamp(seconds=NOW.timestamp().__int__(), nanos=-1)),
            "original_timestamp",
            "not a valid timestamp",
        ),
        (track(sent_at=Timestamp(seconds=10**12)), "sent_at", "not a valid timestamp"),
        (track(original_timestamp=OLD, sent_at=ts(NOW)), "original_timestamp", "after clock-skew correction"),
        (
            track(original_timestamp=ts(NOW), sent_at=ts(NOW - timedelta(days=3))),
            "original_timestamp",
            "after sent_at",
        ),
        (Event(type=EventType.EVENT_TYPE_ALIAS, user_id="u"), "previous_id", "required"),
        (Event(type=EventType.EVENT_TYPE_ALIAS, previous_id="p"), "user_id", "required"),
        (Event(type=EventType.EVENT_TYPE_GROUP, user_id="u"), "group_id", "required"),
    ],
)
def test_bad_input_is_a_violation_naming_the_field(event: Event, field: str, words: str) -> None:
    violations = check(event)
    assert any(f == field and words in d for f, d in violations), violations


def test_a_phone_with_no_ids_still_reports_only_the_phone() -> None:
    event = Event(type=EventType.EVENT_TYPE_IDENTIFY, traits=struct({"phone": "123"}))
    assert [f for f, _ in check(event)] == ["traits.phone"]


def test_the_non_finite_shortcut_agrees_with_the_walk() -> None:
    # The byte-pattern filter only skips walks: over random numbers (every bit pattern, so NaNs,
    # infinities and finite values whose bytes look alike) and odd strings, the answer is the walk's.
    rng = random.Random(5)
    specials = [float("nan"), float("inf"), float("-inf"), 1e308, -0.0, 5e-324]
    for _ in range(2000):
        value: dict[str, Any] = {}
        for i in range(rng.randrange(1, 5)):
            bits = rng.getrandbits(64)
            number = struct_module.unpack("<d", bits.to_bytes(8, "little"))[0]
            leaf = rng.choice([number, rng.choice(specials), "\x11abcdef\u00f0\x7f", [number, {"n": number}]])
            value[f"k{i}"] = leaf
        s = struct(value)
        expected = has_non_finite(s)
        assert _struct_problems(s, 8)[1] == expected
        assert expected == any(isinstance(n, float) and not math.isfinite(n) for n in _numbers(value))


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value]


def test_the_nul_shortcut_agrees_with_the_walk() -> None:
    rng = random.Random(9)
    leaves: list[Any] = ["", "plain", "a\x00b", 0.0, 3.0, False, None, [0, ""], {"k\x00": 1}, {"ok": "\x00"}]
    for _ in range(1000):
        s = struct({f"k{i}": rng.choice(leaves) for i in range(rng.randrange(1, 5))})
        assert _struct_problems(s, 8)[2] == has_nul(s)
