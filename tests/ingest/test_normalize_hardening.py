"""Rules hardened against hostile or odd input: bounded per-process caches, which phone decides,
and clock-skew correction for devices whose clocks are far off."""

from __future__ import annotations

import uuid
from datetime import UTC, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.event_pb2 import Event, EventType
from parley.identity.v1 import identity_service_pb2 as ipb
from parley.ingest.v1 import ingest_service_pb2 as pb

from services.common import phones
from services.common.errors import field_violations
from services.ingest import normalize
from services.ingest.normalize import Limits, normalize_event
from tests.ingest.conftest import Stack
from tests.ingest.conftest import track as grpc_track
from tests.ingest.test_normalize import NOW, struct, track, ts


def check(event: Event) -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in normalize_event(event, "US", ts(NOW), Limits())]


def identify(**kw: Any) -> Event:
    return Event(type=EventType.EVENT_TYPE_IDENTIFY, user_id="u1", **kw)


def cached_context_sizes() -> list[int]:
    return [len(key) for known in normalize._contexts.values() for key in known]


# --- 1. Caches keyed by client input stay bounded -------------------------------------------


def test_contexts_are_remembered_by_keys_of_bounded_size() -> None:
    small = {"library": {"name": "analytics.js", "version": "5.0.0"}, "nonce": uuid.uuid4().hex}
    large = {"blob": "x" * 20_000, "nonce": uuid.uuid4().hex}  # under the event limit: kept by a digest
    oversized = {"blob": "y" * 100_000, "nonce": uuid.uuid4().hex}  # over it: rejected, not walked
    for context in (small, large, oversized):
        event = track(context=struct(context))
        check(event)
    assert max(cached_context_sizes()) <= normalize._MAX_CACHED_CONTEXT_BYTES
    known = normalize._contexts[Limits().max_depth]
    count = len(known)
    check(track(context=struct(large)))
    assert len(known) == count  # the large one was remembered: seen again, nothing is added
    # Small ones by their bytes. (Compared parsed: a map's serialized order is not fixed.)
    parsed = []
    for key in known:
        try:
            parsed.append(Struct.FromString(key))
        except DecodeError:
            pass  # a digest
    assert struct(small) in parsed


def test_a_large_context_is_still_checked() -> None:
    deep: dict[str, object] = {"leaf": 1}
    for _ in range(9):
        deep = {"inner": deep}
    event = track(context=struct({"blob": "x" * 10_000, "deep": deep}))
    assert ("context", "nested deeper than 8 levels") in check(event)


def test_long_phone_text_is_refused_before_the_cached_parse() -> None:
    before = phones._cached_e164_and_zone.cache_info().currsize
    for i in range(20):
        event = identify(traits=struct({"phone": f"{i} " + "5" * 1_000}))
        violations = check(event)
        assert [f for f, _ in violations] == ["traits.phone"]
        assert "not a valid phone number" in violations[0][1]
        assert str(phones.MAX_PHONE_CHARS) in violations[0][1]
    assert phones._cached_e164_and_zone.cache_info().currsize == before
    # The identity path's parse is bounded the same way.
    before = phones._cached_to_e164.cache_info().currsize
    assert phones.to_e164("5" * (phones.MAX_PHONE_CHARS + 1), "US") is None
    assert phones._cached_to_e164.cache_info().currsize == before


def test_an_oversized_event_is_not_parsed_for_its_phone() -> None:
    before = phones._cached_e164_and_zone.cache_info().currsize
    event = identify(traits=struct({"phone": f"+1 415 555 {uuid.uuid4().int % 10_000:04d}", "blob": "x" * 40_000}))
    assert [f for f, _ in check(event)] == [""]
    assert phones._cached_e164_and_zone.cache_info().currsize == before


async def test_oversized_grpc_events_leave_the_caches_bounded(stack: Stack) -> None:
    phones_before = phones._cached_e164_and_zone.cache_info().currsize
    for i in range(5):
        event = grpc_track(user_id="u-mem")
        event.context.CopyFrom(struct({"blob": f"{i}" + "z" * 200_000}))
        event.traits.CopyFrom(struct({"phone": f"{i}" + "5" * 100_000}))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.Track(pb.TrackRequest(event=event), metadata=stack.md)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in await field_violations(info.value)] == ["event"]
    assert max(cached_context_sizes(), default=0) <= normalize._MAX_CACHED_CONTEXT_BYTES
    assert phones._cached_e164_and_zone.cache_info().currsize == phones_before


# --- 5. traits.phone decides; context.traits.phone only without it ----------------------------


@pytest.mark.parametrize(
    ("traits", "context_phone", "violations", "phone"),
    [
        ({"phone": "+1 415 555 2671"}, "garbage", [], "+14155552671"),
        ({"phone": "+1 415 555 2671"}, True, [], "+14155552671"),
        ({"phone": "12"}, "+1 212 555 0100", ["traits.phone"], ""),
        ({"phone": True}, "+1 212 555 0100", ["traits.phone"], ""),
        ({"phone": ""}, "+1 212 555 0100", [], "+12125550100"),
        ({"phone": None}, "garbage", ["context.traits.phone"], ""),
        ({}, "+1 212 555 0100", [], "+12125550100"),
        ({}, "garbage", ["context.traits.phone"], ""),
    ],
)
def test_traits_phone_wins_over_context_traits_phone(
    traits: dict[str, object], context_phone: object, violations: list[str], phone: str
) -> None:
    event = identify(context=struct({"traits": {"phone": context_phone}}))
    if traits:
        event.traits.CopyFrom(struct(traits))
    assert [f for f, _ in check(event)] == violations
    assert event.phone == phone


async def test_a_bad_context_phone_does_not_reject_a_good_traits_phone(stack: Stack) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    event = Event(
        type=EventType.EVENT_TYPE_IDENTIFY,
        user_id=user,
        traits=struct({"phone": "+1 415 555 2671"}),
        context=struct({"traits": {"phone": "garbage"}}),
    )
    response = await stack.stub.Identify(pb.IdentifyRequest(event=event), metadata=stack.md)
    assert response.result.contact_id


# --- 7. Clock-skew correction for clocks far off ----------------------------------------------


def stamp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


AHEAD = NOW + timedelta(hours=48)


@pytest.mark.parametrize(
    "original",
    [
        ts(AHEAD),  # device clock two days ahead
        stamp(1_000),  # device clock reset to 1970
        stamp(0),  # ... to the epoch itself
        ts(NOW - timedelta(days=365 * 30)),  # ... a battery-less device at its build date
    ],
)
def test_a_far_off_device_clock_is_corrected(original: Timestamp) -> None:
    sent = Timestamp()
    sent.FromNanoseconds(original.ToNanoseconds() + 5 * 10**9)
    event = track(original_timestamp=original, sent_at=sent)
    assert check(event) == []
    assert event.timestamp.ToDatetime(UTC) == NOW - timedelta(seconds=5)
    # Stored as given.
    assert event.original_timestamp == original and event.sent_at == sent and event.received_at == ts(NOW)


@pytest.mark.parametrize(
    ("event", "violation"),
    [
        # Uncorrected (no sent_at): the raw time is the event time, and is checked.
        (
            track(original_timestamp=ts(AHEAD)),
            ("original_timestamp", "more than 24 hours after the event was received"),
        ),
        (track(original_timestamp=stamp(1_000)), ("original_timestamp", "before 2000-01-01T00:00:00Z")),
        # Corrected: the corrected time is checked.
        (
            track(original_timestamp=ts(AHEAD), sent_at=ts(NOW - timedelta(days=2))),
            ("original_timestamp", "more than 24 hours after sent_at"),
        ),
        (
            track(original_timestamp=stamp(1_000), sent_at=ts(NOW)),
            ("original_timestamp", "before 2000-01-01T00:00:00Z after clock-skew correction"),
        ),
        # Raw values must still be valid timestamps.
        (
            track(original_timestamp=stamp(1_000), sent_at=Timestamp(seconds=10**12)),
            ("sent_at", "not a valid timestamp"),
        ),
        (
            track(original_timestamp=stamp(1_000, nanos=-1), sent_at=stamp(1_005)),
            ("original_timestamp", "not a valid timestamp"),
        ),
    ],
)
def test_the_event_time_is_what_the_limits_apply_to(event: Event, violation: tuple[str, str]) -> None:
    assert check(event) == [violation]


def test_sent_at_alone_is_kept_and_not_judged() -> None:
    event = track(sent_at=stamp(1_000))
    assert check(event) == []
    assert event.timestamp == event.received_at and event.sent_at == stamp(1_000)


async def test_a_device_clock_two_days_ahead_is_stored_corrected(stack: Stack) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    now = Timestamp()
    now.GetCurrentTime()
    original = stamp(now.seconds + 48 * 3600, now.nanos)
    sent = stamp(original.seconds + 5, original.nanos)
    event = grpc_track(user_id=user, original_timestamp=original, sent_at=sent)
    await stack.stub.Track(pb.TrackRequest(event=event), metadata=stack.md)
    got = await stack.identity_stub.GetUser(ipb.GetUserRequest(user_id=user), metadata=stack.md)
    [stored] = [e.event for e in got.events]
    assert stored.original_timestamp == original and stored.sent_at == sent
    skew = stored.received_at.ToDatetime(UTC) - stored.timestamp.ToDatetime(UTC)
    assert abs(skew - timedelta(seconds=5)) < timedelta(microseconds=2)
