"""The resolution rules without a database: property merges, joins, phones and waiting events."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from parley.common.v1.event_pb2 import EventType

from services.identity.resolve import (
    ANONYMOUS,
    USER,
    ContactState,
    StoredState,
    UserState,
    merge_properties,
    prepare,
    resolve,
    struct_dict,
)
from tests.identity.conftest import event, identify, track


def empty() -> StoredState:
    return StoredState(identities={}, users={}, contacts={}, existing={})


def test_merge_newest_wins_and_removals_stick() -> None:
    props: dict[str, object] = {}
    times: dict[str, int] = {}
    assert merge_properties(props, times, {"a": 1, "b": 2}, 10)
    assert not merge_properties(props, times, {"a": 0}, 5)  # older: ignored
    assert merge_properties(props, times, {"b": None}, 20)  # removal
    assert not merge_properties(props, times, {"b": 3}, 15)  # older than the removal
    assert merge_properties(props, times, {"a": 4}, 10)  # equal time: the later write wins
    assert props == {"a": 4} and times == {"a": 10, "b": 20}


def test_waiting_events_of_a_stored_user_are_adopted_by_its_first_contact() -> None:
    key = uuid.uuid4()
    state = empty()
    state.identities[(ANONYMOUS, "dev")] = key
    state.users[key] = UserState(key=key, traits={"plan": "a"}, trait_times={"plan": 1}, stored=True)
    plan = resolve([identify({"phone": "x"}, anonymous_id="dev", user_id="u1", phone="+14155552671")], state)
    [contact] = plan.contacts
    assert plan.adopt == [(key, contact.id)]
    assert contact.properties == {"plan": "a", "phone": "+14155552671"}
    assert (USER, "u1", key) in plan.new_identities
    assert plan.contact_users == [(contact.id, key)]


def test_joining_users_moves_the_waiting_history_to_the_contact() -> None:
    anon_key, user_key, contact_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    state = empty()
    state.identities[(ANONYMOUS, "dev")] = anon_key
    state.identities[(USER, "u1")] = user_key
    state.users[anon_key] = UserState(key=anon_key, stored=True)
    state.users[user_key] = UserState(
        key=user_key, contact_id=contact_id, phone="+14155552671", phone_time=1, identified=True, stored=True
    )
    state.contacts[contact_id] = ContactState(id=contact_id, phone="+14155552671", stored=True)
    plan = resolve([track(anonymous_id="dev", user_id="u1")], state)
    assert plan.merges == [(anon_key, user_key)]
    assert plan.adopt == [(anon_key, contact_id)]
    assert plan.outcomes[0].contact_id == contact_id
    assert {u.key: u.merged_into for u in plan.users}[anon_key] == user_key


def test_phone_only_events_go_straight_to_the_contact() -> None:
    plan = resolve([event(EventType.EVENT_TYPE_IDENTIFY, phone="+14155552671", traits={"a": 1})], empty())
    assert plan.outcomes[0].contact_id == plan.contacts[0].id
    assert plan.users == [] and plan.events[0].user_key is None


def test_a_retried_batch_resolves_its_prepared_events_the_same_way() -> None:
    """A batch is prepared once and resolved again on each retry: resolving must not change
    what was prepared (the phone trait is written as E.164 on the contact only)."""
    batch = prepare([identify({"phone": "(415) 555-2671", "plan": "a"}, user_id="u1", phone="+14155552671")])
    plans = [resolve(batch, empty()) for _ in range(2)]
    for plan in plans:
        [user], [contact] = plan.users, plan.contacts
        assert user.traits == {"phone": "(415) 555-2671", "plan": "a"}
        assert contact.properties == {"phone": "+14155552671", "plan": "a"}
    assert batch.traits == [{"phone": "(415) 555-2671", "plan": "a"}]


def _random_value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth < 6 and roll < 0.15:
        return {f"k{rng.randrange(50)}": _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    if depth < 6 and roll < 0.25:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if roll < 0.5:
        return rng.choice(["", "gold", "é ü", "+14155552671"])
    if roll < 0.8:
        return rng.choice([0.0, -3.0, 1e30, 2.5, float(rng.randrange(10**6))])
    return rng.choice([True, False, None])


def test_traits_are_read_as_message_to_dict_reads_them() -> None:
    rng = random.Random(3)
    for _ in range(500):
        traits = Struct()
        traits.update({f"t{i}": _random_value(rng, 1) for i in range(rng.randrange(6))})
        # As JSON text: equal dicts can still differ in what is stored (3 and 3.0 are equal).
        assert json.dumps(struct_dict(traits)) == json.dumps(json_format.MessageToDict(traits))
    unset = Struct()
    unset.fields["empty"].Clear()  # a Value with no kind set reads as null
    assert struct_dict(unset) == json_format.MessageToDict(unset) == {"empty": None}
