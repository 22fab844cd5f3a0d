"""The gate's decisions (the send window itself: tests/common/test_sendwindow.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from parley.common.v1 import event_pb2

from services.common.phones import time_zone_of
from services.messaging import gate
from services.messaging.consent import consents_from_traits
from services.messaging.identity_stream import _event_time

NY = "America/New_York"


def test_zone_of_phone() -> None:
    assert time_zone_of("+12125550100", "UTC") == NY
    assert time_zone_of("+14155552671", "UTC") == "America/Los_Angeles"
    assert time_zone_of("+447911123456", "UTC").startswith("Europe/")


POLICY = gate.Policy(True, "help", "08:00", "21:00", 10.0, 3)
NOON = datetime(2026, 6, 15, 16, 0, tzinfo=UTC)


def given(**kw: object) -> gate.GateInput:
    base: dict[str, object] = dict(
        sms_subscribed=True, transactional=False, reply_to_contact=False, sent_last_24h=0, now=NOON, zone=NY
    )
    base.update(kw)
    return gate.GateInput(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "allowed", "reason"),
    [
        ({}, True, ""),
        ({"sms_subscribed": False}, False, gate.OPTED_OUT),
        ({"sms_subscribed": False, "transactional": True}, False, gate.OPTED_OUT),
        ({"sms_subscribed": None}, False, gate.NO_OPT_IN),
        ({"sms_subscribed": None, "transactional": True}, True, ""),
        ({"sms_subscribed": None, "reply_to_contact": True}, True, ""),
        ({"sent_last_24h": 3}, False, gate.DAILY_CAP),
    ],
)
def test_gate_decisions(kw: dict[str, object], allowed: bool, reason: str) -> None:
    d = gate.decide(POLICY, given(**kw))
    assert (d.allowed, d.reason) == (allowed, reason)


def test_gate_defers_outside_window_rather_than_drop() -> None:
    d = gate.decide(POLICY, given(now=datetime(2026, 6, 16, 2, 30, tzinfo=UTC)))
    assert d.allowed and d.due_time == datetime(2026, 6, 16, 12, 0, tzinfo=UTC)


def test_opt_in_not_required_by_policy() -> None:
    relaxed = gate.Policy(False, "help", "08:00", "21:00", 10.0, 3)
    assert gate.decide(relaxed, given(sms_subscribed=None)).allowed


def test_consent_traits() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    out = consents_from_traits(
        {
            "sms_opt_in": True,
            "voice_opt_in": {"subscribed": False, "timestamp": "2025-12-01T10:00:00Z", "source": "web form"},
        },
        at,
    )
    assert [(c.channel, c.subscribed, c.consent_time, c.source) for c in out] == [
        ("sms", True, at, "identify"),
        ("voice", False, datetime(2025, 12, 1, 10, tzinfo=UTC), "web form"),
    ]
    assert consents_from_traits({"sms_opt_in": "maybe", "voice_opt_in": {"x": 1}}, at) == []
    # Dated ahead of its event, a consent would outrank a STOP arriving before that date.
    [ahead] = consents_from_traits({"sms_opt_in": {"subscribed": True, "timestamp": "2099-01-01T00:00:00Z"}}, at)
    assert ahead.consent_time == at
    # Times no datetime holds are no times: the event's stands (one had stopped the consent stream).
    # Nor are times before 2000: the consent's outcome event would be older than ingest takes.
    for odd in (
        -1e15,
        1e20,
        1e300,
        float("nan"),
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:00:00-05:00",
        0,
        "1999-12-31",
    ):
        [c] = consents_from_traits({"sms_opt_in": {"subscribed": True, "timestamp": odd}}, at)
        assert c.consent_time == at, odd
    # Old ones are kept as sent (a backfill), in UTC.
    [old] = consents_from_traits({"sms_opt_in": {"subscribed": False, "timestamp": "2025-06-01T12:00:00+02:00"}}, at)
    assert old.consent_time == datetime(2025, 6, 1, 10, tzinfo=UTC)


def test_consents_are_dated_no_later_than_their_event_arrived() -> None:
    # A device clock ahead may date an event up to a day after ingest received it; its consents
    # must not outrank an opt-out recorded after the event arrived.
    received = datetime(2026, 1, 1, 12, tzinfo=UTC)
    event = event_pb2.Event()
    event.received_at.FromDatetime(received)
    event.timestamp.FromDatetime(received + timedelta(hours=20))
    assert _event_time(event) == received
    event.timestamp.FromDatetime(received - timedelta(minutes=5))
    assert _event_time(event) == received - timedelta(minutes=5)
