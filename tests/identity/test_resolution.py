"""Resolution through RecordEvents: anonymous to identified to contact, phones, property merges, idempotency."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from parley.common.v1.event_pb2 import EventStatus, EventType
from parley.identity.v1 import identity_service_pb2 as ipb

from services.common.errors import InvalidArgument
from services.identity import servicer
from tests.identity.conftest import BASE_TIME, Identity, Tenant, event, identify, page, track, uid

ACCEPTED, DUPLICATE = EventStatus.EVENT_STATUS_ACCEPTED, EventStatus.EVENT_STATUS_DUPLICATE
PHONE = "+14155552671"


async def timeline(identity: Identity, tenant: Tenant, contact_id: str) -> list[ipb.StoredEvent]:
    got = await identity.stub.ListContactEvents(
        ipb.ListContactEventsRequest(contact_id=contact_id, page_size=1000), metadata=tenant.md
    )
    return list(got.events)


async def test_anonymous_then_identified_then_phone_is_one_contact_timeline(identity: Identity, tenant: Tenant) -> None:
    anon, user = uid("anon"), uid()
    views = [page(f"P{i}", anonymous_id=anon) for i in range(3)]
    first = await identity.record(tenant, *views)
    assert [r.status for r in first.results] == [ACCEPTED] * 3
    assert {r.contact_id for r in first.results} == {""}
    tie = identify({"first_name": "Ada"}, anonymous_id=anon, user_id=user)
    await identity.record(tenant, tie)
    later = track("Loan Viewed", user_id=user)
    await identity.record(tenant, later)
    user_view = await identity.stub.GetUser(ipb.GetUserRequest(anonymous_id=anon), metadata=tenant.md)
    assert user_view.user.contact_id == "" and list(user_view.user.user_ids) == [user]
    assert len(user_view.events) == 5

    with_phone = identify({"phone": "(415) 555-2671", "last_name": "Lovelace"}, user_id=user, phone=PHONE)
    got = await identity.record(tenant, with_phone)
    contact_id = got.results[0].contact_id
    assert contact_id

    contact = (await identity.stub.GetContact(ipb.GetContactRequest(contact_id=contact_id), metadata=tenant.md)).contact
    assert contact.phone == PHONE
    assert contact.properties["first_name"] == "Ada" and contact.properties["last_name"] == "Lovelace"
    assert contact.properties["phone"] == PHONE
    assert contact.time_zone == "America/Los_Angeles"
    assert list(contact.user_ids) == [user] and list(contact.anonymous_ids) == [anon]

    events = await timeline(identity, tenant, contact_id)
    expected = [*views, tie, later, with_phone]
    assert [e.event.message_id for e in events] == [e.message_id for e in reversed(expected)]
    assert {e.contact_id for e in events} == {contact_id}
    user_view = await identity.stub.GetUser(ipb.GetUserRequest(user_id=user), metadata=tenant.md)
    assert user_view.user.contact_id == contact_id and user_view.user.phone == PHONE
    assert user_view.user.traits["first_name"] == "Ada"


async def test_one_batch_resolves_like_the_same_events_one_by_one(identity: Identity, tenant: Tenant) -> None:
    anon, user = uid("anon"), uid()
    batch = [
        page("Home", anonymous_id=anon),
        identify({"plan": "gold"}, anonymous_id=anon, user_id=user),
        identify({"phone": "415 555 2671"}, user_id=user, phone=PHONE),
        track("Applied", user_id=user),
    ]
    got = await identity.record(tenant, *batch)
    contact_ids = {r.contact_id for r in got.results}
    assert len(contact_ids) == 1 and "" not in contact_ids
    [contact_id] = contact_ids
    events = await timeline(identity, tenant, contact_id)
    assert [e.event.message_id for e in events] == [e.message_id for e in reversed(batch)]
    contact = (await identity.stub.GetContact(ipb.GetContactRequest(contact_id=contact_id), metadata=tenant.md)).contact
    assert contact.properties["plan"] == "gold"


async def test_five_formats_of_one_number_make_one_contact(identity: Identity, tenant: Tenant) -> None:
    formats = ["(415) 555-2671", "+1 415-555-2671", "4155552671", "1-415-555-2671", "+14155552671"]
    results = []
    for i, raw in enumerate(formats):
        got = await identity.record(tenant, identify({"phone": raw}, user_id=f"person-{i}", phone=PHONE))
        results.append(got.results[0].contact_id)
    assert len(set(results)) == 1
    for raw in [*formats, "tel:+1-415-555-2671"]:
        got = await identity.stub.GetContact(ipb.GetContactRequest(phone=raw), metadata=tenant.md)
        assert got.contact.id == results[0]
    listed = await identity.stub.ListContacts(ipb.ListContactsRequest(), metadata=tenant.md)
    assert [c.id for c in listed.contacts] == [results[0]]
    assert sorted(listed.contacts[0].user_ids) == sorted(f"person-{i}" for i in range(5))


async def test_workspace_default_region_reads_national_numbers(identity: Identity, make_workspace) -> None:  # type: ignore[no-untyped-def]
    tenant = await identity.tenant(make_workspace, default_region="GB")
    london = "+442079460000"
    got = await identity.record(tenant, identify({"phone": "020 7946 0000"}, user_id=uid(), phone=london))
    found = await identity.stub.GetContact(ipb.GetContactRequest(phone="020 7946 0000"), metadata=tenant.md)
    assert found.contact.id == got.results[0].contact_id
    assert found.contact.time_zone == "Europe/London"


async def test_a_new_phone_makes_a_second_contact_and_the_old_keeps_its_history(
    identity: Identity, tenant: Tenant
) -> None:
    user, other = uid(), "+14155550100"
    before = [identify({"phone": PHONE}, user_id=user, phone=PHONE), track("Old Phone Event", user_id=user)]
    old_id = (await identity.record(tenant, *before)).results[0].contact_id
    switch = identify({"phone": other}, user_id=user, phone=other)
    after = track("New Phone Event", user_id=user)
    got = await identity.record(tenant, switch, after)
    new_id = got.results[0].contact_id
    assert new_id and new_id != old_id and got.results[1].contact_id == new_id
    old_events = await timeline(identity, tenant, old_id)
    assert [e.event.name for e in old_events] == ["Old Phone Event", ""]
    new_events = await timeline(identity, tenant, new_id)
    assert [e.event.message_id for e in new_events] == [after.message_id, switch.message_id]
    user_view = await identity.stub.GetUser(ipb.GetUserRequest(user_id=user), metadata=tenant.md)
    assert user_view.user.contact_id == new_id
    old = (await identity.stub.GetContact(ipb.GetContactRequest(phone=PHONE), metadata=tenant.md)).contact
    assert old.id == old_id and old.phone == PHONE


async def test_late_older_identify_does_not_clobber_newer_properties(identity: Identity, tenant: Tenant) -> None:
    user = uid()
    t = BASE_TIME + timedelta(days=30)
    await identity.record(
        tenant, identify({"phone": PHONE, "first_name": "Ada", "city": "Paris"}, user_id=user, phone=PHONE, at=t)
    )
    late = identify({"first_name": "Old Name", "plan": "basic", "city": None}, user_id=user, at=t - timedelta(hours=1))
    await identity.record(tenant, late)
    newer = identify({"city": None}, user_id=user, at=t + timedelta(hours=1))
    await identity.record(tenant, newer)
    stale = identify({"city": "Rome"}, user_id=user, at=t + timedelta(minutes=30))
    await identity.record(tenant, stale)
    contact = (await identity.stub.GetContact(ipb.GetContactRequest(phone=PHONE), metadata=tenant.md)).contact
    props = dict(contact.properties)
    assert props["first_name"] == "Ada"  # the newer value stays
    assert props["plan"] == "basic"  # a key never set is taken, however old
    assert "city" not in props  # removed by the newest event; an older value does not bring it back


async def test_late_identify_with_an_old_phone_does_not_move_the_user_back(identity: Identity, tenant: Tenant) -> None:
    user, newer_phone = uid(), "+14155550100"
    t = BASE_TIME + timedelta(days=40)
    await identity.record(tenant, identify({"phone": newer_phone}, user_id=user, phone=newer_phone, at=t))
    late = identify({"phone": PHONE}, user_id=user, phone=PHONE, at=t - timedelta(days=1))
    got = await identity.record(tenant, late)
    user_view = await identity.stub.GetUser(ipb.GetUserRequest(user_id=user), metadata=tenant.md)
    newer = await identity.stub.GetContact(ipb.GetContactRequest(phone=newer_phone), metadata=tenant.md)
    assert user_view.user.contact_id == newer.contact.id
    assert got.results[0].contact_id and got.results[0].contact_id != newer.contact.id


async def test_a_new_contact_takes_the_zone_ingest_found_else_looks_it_up(identity: Identity, tenant: Tenant) -> None:
    # Ingest parses the number once and sends its zone; identity trusts it (internal callers only).
    sent = "+14155550123"
    found = identify({"phone": sent}, user_id=uid(), phone=sent, phone_time_zone="America/Denver")
    await identity.record(tenant, found)
    contact = (await identity.stub.GetContact(ipb.GetContactRequest(phone=sent), metadata=tenant.md)).contact
    assert contact.time_zone == "America/Denver"
    # Without one (another internal caller), identity finds the phone's zone itself.
    bare = "+12125550123"
    await identity.record(tenant, identify({"phone": bare}, user_id=uid(), phone=bare))
    contact = (await identity.stub.GetContact(ipb.GetContactRequest(phone=bare), metadata=tenant.md)).contact
    assert contact.time_zone == "America/New_York"


async def test_time_zone_property_overrides_the_phone_zone(identity: Identity, tenant: Tenant) -> None:
    user = uid()
    await identity.record(tenant, identify({"phone": PHONE, "time_zone": "Europe/Paris"}, user_id=user, phone=PHONE))
    contact = (await identity.stub.GetContact(ipb.GetContactRequest(phone=PHONE), metadata=tenant.md)).contact
    assert contact.time_zone == "Europe/Paris"
    await identity.record(tenant, identify({"time_zone": "Mars/Olympus"}, user_id=user))
    contact = (await identity.stub.GetContact(ipb.GetContactRequest(phone=PHONE), metadata=tenant.md)).contact
    assert contact.time_zone == "America/Los_Angeles"


async def test_duplicates_in_a_batch_and_across_retries_are_stored_once(identity: Identity, tenant: Tenant) -> None:
    user = uid()
    a = track("A", user_id=user, message_id=uid("m"))
    b = identify({"phone": PHONE}, user_id=user, phone=PHONE, message_id=uid("m"))
    first = await identity.record(tenant, a, a, b)
    assert [r.status for r in first.results] == [ACCEPTED, DUPLICATE, ACCEPTED]
    contact_id = first.results[2].contact_id
    assert [r.contact_id for r in first.results] == [contact_id] * 3
    retry = await identity.record(tenant, a, b)
    assert [r.status for r in retry.results] == [DUPLICATE, DUPLICATE]
    assert [r.contact_id for r in retry.results] == [contact_id] * 2
    events = await timeline(identity, tenant, contact_id)
    assert sorted(e.event.message_id for e in events) == sorted([a.message_id, b.message_id])


async def test_alias_joins_a_previous_id_to_a_user(identity: Identity, tenant: Tenant) -> None:
    old_anon, user = uid("anon"), uid()
    await identity.record(tenant, page("Landing", anonymous_id=old_anon))
    await identity.record(tenant, identify({"phone": PHONE}, user_id=user, phone=PHONE))
    await identity.record(tenant, event(EventType.EVENT_TYPE_ALIAS, previous_id=old_anon, user_id=user))
    await identity.record(tenant, event(EventType.EVENT_TYPE_GROUP, group_id="acme", user_id=user))
    user_view = await identity.stub.GetUser(ipb.GetUserRequest(anonymous_id=old_anon), metadata=tenant.md)
    assert list(user_view.user.user_ids) == [user] and old_anon in user_view.user.anonymous_ids
    contact_id = user_view.user.contact_id
    names = [EventType.Name(e.event.type) for e in await timeline(identity, tenant, contact_id)]
    assert names == ["EVENT_TYPE_GROUP", "EVENT_TYPE_ALIAS", "EVENT_TYPE_IDENTIFY", "EVENT_TYPE_PAGE"]


@pytest.mark.parametrize("batched", [False, True], ids=["one by one", "one batch"])
async def test_an_alias_from_an_id_not_seen_yet_joins_its_later_events(
    identity: Identity, tenant: Tenant, batched: bool
) -> None:
    # Segment's previousId may be an anonymous or a user id; one never seen yet is both, so the
    # events that later name it as a user id are the same person's, not a second user's.
    t = BASE_TIME + timedelta(days=60)
    old, new, phone = uid("a-old"), uid("z-new"), "+14155550104"
    events = [
        event(EventType.EVENT_TYPE_ALIAS, previous_id=old, user_id=new, at=t),
        identify({"plan": "gold"}, user_id=old, phone=phone, at=t + timedelta(seconds=1)),
        track(user_id=new, at=t + timedelta(seconds=2)),
    ]
    if batched:
        await identity.record(tenant, *events)
    else:
        for e in events:
            await identity.record(tenant, e)
    by_old = await identity.stub.GetUser(ipb.GetUserRequest(user_id=old), metadata=tenant.md)
    by_new = await identity.stub.GetUser(ipb.GetUserRequest(user_id=new), metadata=tenant.md)
    assert by_old.user.user_key == by_new.user.user_key
    # The id sent as a user id comes first (callers such as campaign take the first), whatever
    # the two ids' order as text.
    assert list(by_new.user.user_ids) == [new, old]
    contact = await identity.stub.GetContact(ipb.GetContactRequest(phone=phone), metadata=tenant.md)
    assert by_new.user.contact_id == contact.contact.id
    assert len(await timeline(identity, tenant, contact.contact.id)) == 3


async def test_a_join_keeps_the_joined_users_phone_trait(identity: Identity, tenant: Tenant) -> None:
    # A contact's phone property is its own number, but a user's traits are what was sent.
    t = BASE_TIME + timedelta(days=61)
    first, second, device = uid(), uid(), uid("anon")
    await identity.record(tenant, page("Home", user_id=second, anonymous_id=device, at=t))
    traits = {"phone": "(415) 555-0105", "plan": "gold"}
    await identity.record(tenant, identify(traits, user_id=first, phone="+14155550105", at=t + timedelta(seconds=1)))
    await identity.record(
        tenant, event(EventType.EVENT_TYPE_ALIAS, previous_id=first, user_id=second, at=t + timedelta(seconds=2))
    )
    got = await identity.stub.GetUser(ipb.GetUserRequest(user_id=second), metadata=tenant.md)
    assert dict(got.user.traits) == traits


async def contact_properties(identity: Identity, tenant: Tenant, phone: str) -> dict[str, object]:
    got = await identity.stub.GetContact(ipb.GetContactRequest(phone=phone), metadata=tenant.md)
    return dict(got.contact.properties)


@pytest.mark.parametrize("batched", [False, True], ids=["one by one", "one batch"])
async def test_joining_users_brings_both_users_traits_to_the_contact(
    identity: Identity, tenant: Tenant, batched: bool
) -> None:
    t = BASE_TIME + timedelta(days=50)
    # The identified user has the phone; the anonymous one's traits arrive when they are joined.
    user, anon = uid(), uid("anon")
    first = [
        identify({"name": "Ann"}, user_id=user, phone=PHONE, at=t),
        identify({"plan": "pro"}, anonymous_id=anon, at=t + timedelta(seconds=1)),
        track(user_id=user, anonymous_id=anon, at=t + timedelta(seconds=2)),
    ]
    # The other way round: the anonymous user has the phone, the identified one the traits.
    other_user, other_anon, other_phone = uid(), uid("anon"), "+14155550102"
    second = [
        identify({"plan": "gold"}, user_id=other_user, at=t),
        identify({"name": "Bob"}, anonymous_id=other_anon, phone=other_phone, at=t + timedelta(seconds=1)),
        track(user_id=other_user, anonymous_id=other_anon, at=t + timedelta(seconds=2)),
    ]
    # An alias joins the same way.
    aliased, alias_phone = uid(), "+14155550103"
    old_anon = uid("anon")
    third = [
        identify({"tier": "vip"}, anonymous_id=old_anon, at=t),
        identify({"name": "Cy"}, user_id=aliased, phone=alias_phone, at=t + timedelta(seconds=1)),
        event(EventType.EVENT_TYPE_ALIAS, previous_id=old_anon, user_id=aliased, at=t + timedelta(seconds=2)),
    ]
    if batched:
        await identity.record(tenant, *first, *second, *third)
    else:
        for e in (*first, *second, *third):
            await identity.record(tenant, e)
    assert await contact_properties(identity, tenant, PHONE) == {"phone": PHONE, "name": "Ann", "plan": "pro"}
    assert await contact_properties(identity, tenant, other_phone) == {
        "phone": other_phone,
        "name": "Bob",
        "plan": "gold",
    }
    assert await contact_properties(identity, tenant, alias_phone) == {
        "phone": alias_phone,
        "name": "Cy",
        "tier": "vip",
    }


async def test_a_join_brings_the_joined_users_traits_not_those_kept_on_an_older_contact(
    identity: Identity, tenant: Tenant
) -> None:
    user, anon, old_phone, new_phone = uid(), uid("anon"), "+14155550104", "+14155550105"
    t = BASE_TIME + timedelta(days=55)
    await identity.record(tenant, identify({"name": "Di"}, user_id=user, phone=new_phone, at=t + timedelta(seconds=20)))
    # Late and older: its traits stay on the old phone's contact.
    await identity.record(tenant, identify({"vip": True}, user_id=user, phone=old_phone, at=t + timedelta(seconds=10)))
    await identity.record(tenant, identify({"plan": "pro"}, anonymous_id=anon, at=t + timedelta(seconds=25)))
    await identity.record(tenant, track(user_id=user, anonymous_id=anon, at=t + timedelta(seconds=30)))
    assert await contact_properties(identity, tenant, new_phone) == {"phone": new_phone, "name": "Di", "plan": "pro"}
    assert await contact_properties(identity, tenant, old_phone) == {"phone": old_phone, "vip": True}


async def test_an_empty_or_null_phone_trait_leaves_the_contacts_phone_property(
    identity: Identity, tenant: Tenant
) -> None:
    user = uid()
    t = BASE_TIME + timedelta(days=60)
    await identity.record(tenant, identify({"phone": PHONE}, user_id=user, phone=PHONE, at=t))
    for i, value in enumerate(["", None], start=1):
        await identity.record(tenant, identify({"phone": value, "step": i}, user_id=user, at=t + timedelta(minutes=i)))
        assert await contact_properties(identity, tenant, PHONE) == {"phone": PHONE, "step": i}
    # The user's own traits keep what was sent: the null removed the trait.
    user_view = await identity.stub.GetUser(ipb.GetUserRequest(user_id=user), metadata=tenant.md)
    assert "phone" not in user_view.user.traits


async def test_an_identified_users_anonymous_id_is_not_taken_by_another_user(
    identity: Identity, tenant: Tenant
) -> None:
    device, first, second = uid("anon"), uid(), uid()
    await identity.record(tenant, identify({"name": "first"}, anonymous_id=device, user_id=first))
    await identity.record(tenant, identify({"name": "second"}, anonymous_id=device, user_id=second))
    one = await identity.stub.GetUser(ipb.GetUserRequest(user_id=first), metadata=tenant.md)
    two = await identity.stub.GetUser(ipb.GetUserRequest(user_id=second), metadata=tenant.md)
    assert one.user.user_key != two.user.user_key
    assert one.user.traits["name"] == "first" and two.user.traits["name"] == "second"


async def test_record_events_needs_internal_credentials_and_a_sane_batch(identity: Identity, tenant: Tenant) -> None:
    request = ipb.RecordEventsRequest(events=[track(user_id="x")])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await identity.stub.RecordEvents(request, metadata=tenant.md)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    from services.common.errors import field_violations

    bad_events = [[], [track(user_id="x") for _ in range(1001)]]
    for events in bad_events:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await identity.record(tenant, *events)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in await field_violations(info.value)] == ["events"]
    no_id = track(user_id="x")
    no_id.message_id = ""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await identity.record(tenant, track(user_id="x"), no_id)
    assert [v.field for v in await field_violations(info.value)] == ["events[1].message_id"]
    # An event far over what ingest lets through would not fit a stream page or a timeline.
    huge = track(user_id="x", properties={"blob": "x" * 40_000})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await identity.record(tenant, track(user_id="x"), huge)
    [violation] = await field_violations(info.value)
    assert violation.field == "events[1]" and "the limit is 33792" in violation.description


async def test_a_batch_that_fails_in_the_database_stores_nothing(identity: Identity, tenant: Tenant) -> None:
    import asyncpg

    poison, user, phone = uid("poison"), uid(), "+14155550177"
    conn = await asyncpg.connect(identity.db_url)
    try:
        # A real failure late in the transaction: after users and contacts are written, the events insert fails.
        await conn.execute(
            f"""CREATE FUNCTION identity.test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.message_id = '{poison}' THEN RAISE EXCEPTION 'poisoned'; END IF; RETURN NEW; END $$;
                CREATE TRIGGER test_poison BEFORE INSERT ON identity.events
                FOR EACH ROW EXECUTE FUNCTION identity.test_poison()"""
        )
        batch = [
            identify({"phone": phone, "name": "x"}, user_id=user, phone=phone),
            track(user_id=user, message_id=poison),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await identity.record(tenant, *batch)
        assert info.value.code() == grpc.StatusCode.INTERNAL
    finally:
        await conn.execute(
            "DROP TRIGGER IF EXISTS test_poison ON identity.events; DROP FUNCTION IF EXISTS identity.test_poison"
        )
        await conn.close()
    for call, request in (
        (identity.stub.GetContact, ipb.GetContactRequest(phone=phone)),
        (identity.stub.GetUser, ipb.GetUserRequest(user_id=user)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request, metadata=tenant.md)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # The same batch, retried once the fault is gone, is stored whole.
    got = await identity.record(tenant, *batch)
    assert [r.status for r in got.results] == [ACCEPTED, ACCEPTED]


async def test_a_huge_number_in_traits_does_not_block_later_changes(identity: Identity, tenant: Tenant) -> None:
    """PostgreSQL prints 1e30 back in full, an integer past 64 bits: the stored user and contact
    must still take later changes."""
    user = uid()
    first = await identity.record(tenant, identify({"big": 1e30, "phone": PHONE}, user_id=user, phone=PHONE))
    second = await identity.record(tenant, identify({"plan": "gold"}, user_id=user))
    assert [r.status for r in (*first.results, *second.results)] == [ACCEPTED, ACCEPTED]
    contact = await identity.stub.GetContact(ipb.GetContactRequest(phone=PHONE), metadata=tenant.md)
    assert contact.contact.properties["plan"] == "gold" and contact.contact.properties["big"] == 1e30


async def test_unstorable_values_are_refused_before_the_database(identity: Identity, tenant: Tenant) -> None:
    from services.common.errors import field_violations

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await identity.record(
            tenant,
            track(user_id="a\x00b"),
            identify({"nested": {"k": ["ok", "n\x00"]}}, user_id="u"),
            identify({"phone": PHONE}, user_id="v", phone=PHONE, phone_time_zone="Europe/\x00"),
            identify({"scores": [1.5, float("nan")]}, user_id="w"),
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in await field_violations(info.value)] == [
        "events[0].user_id",
        "events[1].traits",
        "events[2].phone_time_zone",
        "events[3].traits",
    ]


@pytest.mark.parametrize("name", servicer._TEXT_FIELDS)
def test_a_nul_in_any_text_field_is_named(name: str) -> None:
    event = track(user_id="u", message_id="m")
    setattr(event, name, getattr(event, name) + "x\x00")
    with pytest.raises(InvalidArgument) as info:
        events = [track(user_id="ok"), event]
        servicer._check_batch(events, [e.SerializeToString() for e in events], 33 * 1024)
    assert [v.field for v in info.value.violations] == [f"events[1].{name}"]
