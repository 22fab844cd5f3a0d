"""A batch means the same as its events sent one by one in event-time order: random small cases
over a few users, devices and phones, both ways into two workspaces, compared through the read API."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format
from parley.common.v1.event_pb2 import Event, EventType
from parley.identity.v1 import identity_service_pb2 as ipb

from services.identity import resolve
from tests.helpers import MakeWorkspace
from tests.identity.conftest import BASE_TIME, Identity, Tenant, event, identify, page, track

PHONES = ["+14155552671", "+14155550100", "+14155550101"]
CASES = 40


def _small_value(rng: random.Random) -> Any:
    return rng.choice(["x", "y", None])


def _sized_value(rng: random.Random) -> Any:
    """Values of many sizes, some that JSON writes shorter than jsonb keeps them (1e20 is stored
    as 21 digits and read back as an int) and some not ASCII."""
    pick = rng.random()
    if pick < 0.15:
        return None
    if pick < 0.3:
        return rng.choice([1e20, -2.5e-7, 1e300 / 10 ** rng.randint(0, 280), 123456789.0])
    if pick < 0.4:
        return "é" * rng.randint(0, 30)
    return "v" * rng.randint(0, 60)


def random_case(rng: random.Random, value: Any = _small_value, keys: int = 2) -> list[dict[str, Any]]:
    """Events as plain specs: kind, time, ids, phone, traits (ids are unique to the case's workspace)."""
    users = [f"u{i}" for i in range(rng.randint(2, 4))]
    devices = [f"a{i}" for i in range(rng.randint(1, len(users) + 1))]
    phones = PHONES[: rng.randint(1, 3)]
    count = rng.randint(2, 9)
    # Distinct times, or a few shared ones: request order decides ties.
    times = rng.sample(range(1, 1000), count) if rng.random() < 0.6 else [rng.randint(1, 4) for _ in range(count)]
    specs: list[dict[str, Any]] = []
    for i in range(count):
        spec: dict[str, Any] = {"t": times[i], "mid": f"m{i}"}
        ids = rng.random()
        if ids < 0.35:
            spec["uid"] = rng.choice(users)
        elif ids < 0.6:
            spec["aid"] = rng.choice(devices)
        else:
            spec["uid"], spec["aid"] = rng.choice(users), rng.choice(devices)
        kind = rng.random()
        if kind < 0.5:
            spec["kind"] = "identify"
            names = rng.sample(["k0", "k1", "kk2", "k3"], rng.randint(0, keys))
            traits = {key: value(rng) for key in names}
            if rng.random() < 0.55:
                spec["phone"] = traits["phone"] = rng.choice(phones)
            spec["traits"] = traits
        elif kind < 0.62:
            spec["kind"] = "alias"
            spec.pop("aid", None)
            spec["uid"] = rng.choice(users)
            spec["prev"] = rng.choice([d for d in devices + users if d != spec["uid"]])
        else:
            spec["kind"] = rng.choice(["page", "track"])
        specs.append(spec)
    return specs


def to_event(spec: dict[str, Any]) -> Event:
    kw: dict[str, Any] = {"at": BASE_TIME + timedelta(seconds=spec["t"]), "message_id": spec["mid"]}
    for key, field in (("uid", "user_id"), ("aid", "anonymous_id"), ("phone", "phone")):
        if spec.get(key):
            kw[field] = spec[key]
    if spec["kind"] == "identify":
        return identify(spec["traits"], **kw)
    if spec["kind"] == "alias":
        return event(EventType.EVENT_TYPE_ALIAS, previous_id=spec["prev"], **kw)
    return page(**kw) if spec["kind"] == "page" else track(**kw)


async def state(identity: Identity, tenant: Tenant, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the read API shows: each contact (by phone), each event's contact, each user."""
    stub, md = identity.stub, tenant.md
    listed = await stub.ListContacts(ipb.ListContactsRequest(page_size=100), metadata=md)
    phone_of = {c.id: c.phone for c in listed.contacts}
    contacts, events = {}, {}
    for c in listed.contacts:
        contacts[c.phone] = (json_format.MessageToDict(c.properties), sorted(c.user_ids), sorted(c.anonymous_ids))
        timeline = await stub.ListContactEvents(
            ipb.ListContactEventsRequest(contact_id=c.id, page_size=100), metadata=md
        )
        events.update({e.event.message_id: c.phone for e in timeline.events})
    users = {}
    names = {("user_id", s[k]) for s in specs for k in ("uid", "prev") if s.get(k)}
    names |= {("anonymous_id", s[k]) for s in specs for k in ("aid", "prev") if s.get(k)}
    for field, value in sorted(names):
        try:
            got = await stub.GetUser(ipb.GetUserRequest(**{field: value}), metadata=md)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            continue
        user = got.user
        users[(field, value)] = (
            sorted(user.user_ids),
            sorted(user.anonymous_ids),
            phone_of.get(user.contact_id),
            json_format.MessageToDict(user.traits),
        )
    return {"contacts": contacts, "events": events, "users": users}


async def without_contact(identity: Identity, tenant: Tenant) -> list[str]:
    """Events with no contact whose user has one (invariant 3 says none)."""
    conn = await asyncpg.connect(identity.db_url)
    try:
        rows = await conn.fetch(
            """SELECT e.message_id FROM identity.events e
                 JOIN identity.users u ON u.workspace_id = e.workspace_id AND u.user_key = e.user_key
                WHERE e.workspace_id = $1::uuid AND e.contact_id IS NULL AND u.contact_id IS NOT NULL""",
            tenant.workspace.id,
        )
    finally:
        await conn.close()
    return [r["message_id"] for r in rows]


@pytest.mark.parametrize("seed", range(CASES))
async def test_a_batch_means_its_events_one_by_one_in_time_order(
    identity: Identity, make_workspace: MakeWorkspace, seed: int
) -> None:
    rng = random.Random(seed)
    await _compare(identity, make_workspace, rng, random_case(rng))


@pytest.mark.parametrize("seed", range(CASES))
async def test_near_the_property_bound_too(
    identity: Identity, make_workspace: MakeWorkspace, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # Which keys fit under the bound (made small here) must not depend on how the events came:
    # in one batch, or one by one with each set read back from what is stored.
    rng = random.Random(10_000 + seed)
    monkeypatch.setattr(resolve, "MAX_PROPERTIES_BYTES", rng.choice([60, 90, 120, 160, 400]))
    await _compare(identity, make_workspace, rng, random_case(rng, _sized_value, keys=3))


async def _compare(
    identity: Identity, make_workspace: MakeWorkspace, rng: random.Random, specs: list[dict[str, Any]]
) -> None:
    one_by_one, batched = await identity.tenant(make_workspace), await identity.tenant(make_workspace)
    for spec in sorted(specs, key=lambda s: s["t"]):  # stable: request order on ties
        await identity.record(one_by_one, to_event(spec))
    # The batch in any order, but events of one time keep their request order (it decides ties).
    shuffled = list(specs)
    rng.shuffle(shuffled)
    by_time: dict[int, list[dict[str, Any]]] = {}
    for spec in specs:
        by_time.setdefault(spec["t"], []).append(spec)
    await identity.record(batched, *[to_event(by_time[s["t"]].pop(0)) for s in shuffled])
    expected = await state(identity, one_by_one, specs)
    assert await state(identity, batched, specs) == expected, specs
    assert await without_contact(identity, one_by_one) == []
    assert await without_contact(identity, batched) == []
