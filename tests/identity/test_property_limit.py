"""A contact's properties and a user's traits are bounded, so no person outgrows the responses
(and the event streams' readers) that hold them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from parley.identity.v1 import identity_service_pb2 as ipb

from services.common.db import dumps_json
from services.identity import resolve
from services.identity.resolve import MAX_PROPERTIES_BYTES, Sized, _set_bytes, merge_properties, merge_stamped
from tests.identity.conftest import BASE_TIME, Identity, Tenant, identify, track, uid


def test_a_merge_past_the_limit_leaves_the_key_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolve, "MAX_PROPERTIES_BYTES", 80)
    props: dict[str, object] = {"a": "x" * 10}
    times = {"a": 1}
    sized = Sized()
    assert merge_properties(props, times, {"b": "y" * 20}, 2, sized)  # 45 bytes as JSON: fits
    assert not merge_properties(props, times, {"c": "z" * 40}, 3, sized)  # would be 92
    assert "c" not in props and "c" not in times and sized.refused == 1
    # A later, smaller value of a refused key still comes in; shrinking and removing always do.
    assert merge_properties(props, times, {"c": 1, "b": "y"}, 4, sized)
    assert merge_properties(props, times, {"a": None}, 5, sized)
    assert props == {"b": "y", "c": 1} and times["a"] == 5
    # The size counts a removed key's kept time too (it is stored, and read, like a value).
    assert sized.bytes == _set_bytes(props, times) == len(dumps_json(props)) + len(dumps_json("a")) + 19
    # Growing an existing key past the limit is refused.
    assert not merge_properties(props, times, {"b": "y" * 80}, 6, sized)
    assert props["b"] == "y" and sized.refused == 2
    # So is keeping the time of many removals of keys never held: each would be stored.
    merge_properties(props, times, {f"gone{i}": None for i in range(5)}, 7, sized)
    assert "gone0" in times and "gone4" not in times and sized.refused > 2 and sized.bytes <= 80
    # Merges of stamped sets (users joining) are held to it as well.
    other, other_times = {"d": "w" * 80, "e": 2}, {"d": 8, "e": 8}
    assert merge_stamped(props, times, other, other_times, sized=sized)
    assert "d" not in props and props["e"] == 2 and sized.bytes == _set_bytes(props, times)
    # The phone always comes in; numbers count as jsonb writes them out (1e30: 31 digits).
    assert merge_properties(props, times, {"phone": "+1415555" + "0" * 60}, 9, sized)
    assert not merge_properties(props, times, {"e": 1e30}, 10, sized)
    # Removing a key the set holds always applies, even past the limit.
    assert merge_properties(props, times, {"b": None}, 11, sized)
    assert "b" not in props and sized.bytes == _set_bytes(props, times)
    # Without a size, no limit applies.
    assert merge_properties(props, times, {"f": "v" * 100}, 12)


async def test_identifies_past_the_limit_store_their_events_but_not_their_keys(
    identity: Identity, tenant: Tenant
) -> None:
    # Twelve identifies of 30 KB each: the contact and the user take keys while they fit.
    user, phone = uid(), "+14155550188"
    first = identify({"phone": phone}, user_id=user, phone=phone, at=BASE_TIME)
    blobs = [
        identify({f"k{i:02d}": f"{i:02d}" + "x" * 30_000}, user_id=user, at=BASE_TIME + timedelta(minutes=i + 1))
        for i in range(12)
    ]
    contact_id = (await identity.record(tenant, first)).results[0].contact_id
    await identity.record(tenant, *blobs[:6])
    for blob in blobs[6:]:  # one by one too: the size is worked out again from what is stored
        await identity.record(tenant, blob)
    got = await identity.stub.GetContact(ipb.GetContactRequest(contact_id=contact_id), metadata=tenant.md)
    props = dict(got.contact.properties)
    kept = sorted(k for k in props if k.startswith("k"))
    assert kept == [f"k{i:02d}" for i in range(8)]  # 8 x 30 KB fit in 256 KiB, the 9th does not
    assert len(dumps_json(props)) <= MAX_PROPERTIES_BYTES
    person = await identity.stub.GetUser(ipb.GetUserRequest(user_id=user, event_limit=1000), metadata=tenant.md)
    assert len(dumps_json(dict(person.user.traits))) <= MAX_PROPERTIES_BYTES
    assert len(person.events) == 13  # every event is stored all the same
    # A key that fits still changes, and other events still resolve to the contact.
    update = identify({"k00": "small"}, user_id=user, at=BASE_TIME + timedelta(hours=1))
    seen = track(user_id=user, at=BASE_TIME + timedelta(hours=2))
    results = (await identity.record(tenant, update, seen)).results
    assert {r.contact_id for r in results} == {contact_id}
    got = await identity.stub.GetContact(ipb.GetContactRequest(contact_id=contact_id), metadata=tenant.md)
    assert got.contact.properties["k00"] == "small"
