"""Read RPCs: audience filters and ordering, pagination, timelines, workspace isolation and bad input."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from parley.common.v1.contact_pb2 import FilterOperator, PropertyFilter
from parley.identity.v1 import identity_service_pb2 as ipb

from services.common.errors import field_violations
from services.identity import repository
from tests.helpers import MakeWorkspace
from tests.identity.conftest import BASE_TIME, Identity, Tenant, identify, track, ts, uid

OP = FilterOperator


def value(v: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    if isinstance(v, list):
        out.list_value.extend(v)
    elif isinstance(v, bool):
        out.bool_value = v
    elif isinstance(v, (int, float)):
        out.number_value = v
    else:
        out.string_value = v
    return out


def flt(key: str, op: FilterOperator.ValueType, v: Any = None) -> PropertyFilter:
    return (
        PropertyFilter(key=key, operator=op, value=value(v)) if v is not None else PropertyFilter(key=key, operator=op)
    )


PEOPLE = [
    ("+14155550001", {"first_name": "Ada", "age": 36, "tags": ["vip", "beta"], "address": {"city": "London"}}),
    ("+14155550002", {"first_name": "Grace", "age": 45, "tags": ["beta"], "address": {"city": "New York"}}),
    ("+14155550003", {"first_name": "Alan", "age": 41, "plan": "gold"}),
    ("+14155550004", {"first_name": "Katherine", "age": 29, "plan": "silver", "address": {"city": "london"}}),
]


@pytest.fixture(scope="module")
async def audience(identity: Identity, make_workspace: MakeWorkspace) -> tuple[Tenant, dict[str, str]]:
    tenant = await identity.tenant(make_workspace)
    ids: dict[str, str] = {}
    for phone, traits in PEOPLE:
        got = await identity.record(tenant, identify({"phone": phone, **traits}, user_id=uid(), phone=phone))
        ids[traits["first_name"]] = got.results[0].contact_id
    return tenant, ids


async def names(identity: Identity, tenant: Tenant, *filters: PropertyFilter, **kw: Any) -> list[str]:
    got = await identity.stub.ListContacts(ipb.ListContactsRequest(filters=filters, **kw), metadata=tenant.md)
    return [c.properties["first_name"] for c in got.contacts]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([flt("first_name", OP.FILTER_OPERATOR_EQ, "Ada")], ["Ada"]),
        ([flt("first_name", OP.FILTER_OPERATOR_NEQ, "Ada")], ["Grace", "Alan", "Katherine"]),
        ([flt("age", OP.FILTER_OPERATOR_GT, 40)], ["Grace", "Alan"]),
        ([flt("age", OP.FILTER_OPERATOR_GTE, 41), flt("age", OP.FILTER_OPERATOR_LTE, 45)], ["Grace", "Alan"]),
        ([flt("age", OP.FILTER_OPERATOR_LT, 36)], ["Katherine"]),
        ([flt("first_name", OP.FILTER_OPERATOR_LT, "B")], ["Ada", "Alan"]),
        ([flt("plan", OP.FILTER_OPERATOR_EXISTS)], ["Alan", "Katherine"]),
        ([flt("plan", OP.FILTER_OPERATOR_NOT_EXISTS)], ["Ada", "Grace"]),
        ([flt("address.city", OP.FILTER_OPERATOR_CONTAINS, "LONDON")], ["Ada", "Katherine"]),
        ([flt("tags", OP.FILTER_OPERATOR_CONTAINS, "vip")], ["Ada"]),
        ([flt("plan", OP.FILTER_OPERATOR_IN, ["gold", "platinum"])], ["Alan"]),
        ([flt("address.city", OP.FILTER_OPERATOR_EQ, "New York")], ["Grace"]),
    ],
)
async def test_list_contacts_filters(
    identity: Identity, audience: tuple[Tenant, dict[str, str]], filters: list[PropertyFilter], expected: list[str]
) -> None:
    tenant, _ = audience
    assert await names(identity, tenant, *filters) == expected


async def test_filters_compare_like_values_only_and_in_means_equal_to_one(
    identity: Identity, make_workspace: MakeWorkspace
) -> None:
    tenant = await identity.tenant(make_workspace)
    people = [
        ("+14155550011", {"first_name": "Num", "age": 42, "room": "Room 30", "tags": ["a"], "items": ["x", "y"]}),
        ("+14155550012", {"first_name": "Text", "age": "unknown", "room": 30, "tags": ["a", "b"], "items": ["y"]}),
        ("+14155550013", {"first_name": "Nested", "age": 38, "tags": [], "pair": {"x": 1, "y": 2}}),
        ("+14155550014", {"first_name": "Half", "pair": {"x": 1}, "room": "untrue"}),
    ]
    scores: list[object] = ["50", " 7.5e1 ", "abc", 10]  # numeric strings order with a number operand
    for (phone, traits), score in zip(people, scores, strict=True):
        traits = {**traits, "score": score, "deep": {"gone": None}}
        await identity.record(tenant, identify({"phone": phone, **traits}, user_id=uid(), phone=phone))

    async def who(*filters: PropertyFilter) -> list[str]:
        return sorted(await names(identity, tenant, *filters))

    # An ordering comparison with a number skips string values instead of failing on them.
    assert await who(flt("age", OP.FILTER_OPERATOR_GT, 40)) == ["Num"]
    assert await who(flt("age", OP.FILTER_OPERATOR_LTE, 40)) == ["Nested"]
    assert await who(flt("age", OP.FILTER_OPERATOR_GTE, "a")) == ["Text"]
    assert await who(flt("score", OP.FILTER_OPERATOR_GT, 40)) == ["Num", "Text"]
    assert await who(flt("score", OP.FILTER_OPERATOR_LT, "b")) == ["Nested", "Num", "Text"]  # strings, lexically
    # A JSON null is there; a missing key is not.
    assert await who(flt("deep.gone", OP.FILTER_OPERATOR_EXISTS)) == ["Half", "Nested", "Num", "Text"]
    assert await who(flt("deep.other", OP.FILTER_OPERATOR_EXISTS)) == []
    # CONTAINS: a substring of a string for a string operand; otherwise a member of a list.
    assert await who(flt("room", OP.FILTER_OPERATOR_CONTAINS, 30)) == []
    assert await who(flt("room", OP.FILTER_OPERATOR_CONTAINS, "room 3")) == ["Num"]
    assert await who(flt("room", OP.FILTER_OPERATOR_CONTAINS, True)) == []
    # IN: equal to one of the listed values, lists and objects included, not contained in one.
    tags_in = value([])
    tags_in.list_value.values.add().list_value.extend(["a", "b"])
    assert await who(PropertyFilter(key="tags", operator=OP.FILTER_OPERATOR_IN, value=tags_in)) == ["Text"]
    pair_in = value([])
    pair_in.list_value.values.add().struct_value.update({"x": 1, "y": 2})
    assert await who(PropertyFilter(key="pair", operator=OP.FILTER_OPERATOR_IN, value=pair_in)) == ["Nested"]
    assert await who(flt("age", OP.FILTER_OPERATOR_IN, [42, "unknown"])) == ["Num", "Text"]
    # EQ on a path through a list's index agrees with NEQ on it.
    assert await who(flt("items.0", OP.FILTER_OPERATOR_EQ, "x")) == ["Num"]
    assert await who(flt("items.0", OP.FILTER_OPERATOR_NEQ, "x")) == ["Half", "Nested", "Text"]
    assert await who(flt("items.-1", OP.FILTER_OPERATOR_EQ, "y")) == ["Num", "Text"]  # from the end
    assert await who(flt("items.+1", OP.FILTER_OPERATOR_EQ, "y")) == ["Num"]  # as PostgreSQL reads it
    # Text that PostgreSQL's numeric would refuse is no number: no match, never an error.
    for odd in ("\u20031500", "1500\u3000", "1500\u2028", "\x1c1500", "0." + "0" * 16_400 + "1", "NaN"):
        phone = "+14155550019"
        odd_traits = {"phone": phone, "first_name": "Odd", "odd": odd}
        await identity.record(tenant, identify(odd_traits, user_id=uid(), phone=phone))
        assert await who(flt("odd", OP.FILTER_OPERATOR_GTE, 0)) == []
    # Beyond ASCII too, a string contains itself: both sides are lowered by the same rules.
    for phone, city in (("+14155550015", "İstanbul"), ("+14155550016", "ΟΔΟΣ")):
        traits = {"phone": phone, "first_name": city, "city": city}
        await identity.record(tenant, identify(traits, user_id=uid(), phone=phone))
    assert await who(flt("city", OP.FILTER_OPERATOR_CONTAINS, "İstanbul")) == ["İstanbul"]
    assert await who(flt("city", OP.FILTER_OPERATOR_CONTAINS, "ΟΔΟΣ")) == ["ΟΔΟΣ"]


async def test_list_contacts_orders_and_pages(identity: Identity, audience: tuple[Tenant, dict[str, str]]) -> None:
    tenant, _ = audience
    order = ["Ada", "Grace", "Alan", "Katherine"]
    assert await names(identity, tenant, descending=True) == order[::-1]
    seen: list[str] = []
    token = ""
    while True:
        got = await identity.stub.ListContacts(
            ipb.ListContactsRequest(page_size=3, page_token=token), metadata=tenant.md
        )
        seen.extend(c.properties["first_name"] for c in got.contacts)
        token = got.next_page_token
        if not token:
            break
    assert seen == order
    # Touching a contact moves it to the end of the update-time order.
    await identity.record(tenant, identify({"age": 37}, phone=PEOPLE[0][0]))
    by_update = await names(identity, tenant, order_by=ipb.ContactOrderBy.CONTACT_ORDER_BY_UPDATE_TIME)
    assert by_update[-1] == "Ada"


async def test_contact_timeline_filters_and_pages(identity: Identity, tenant: Tenant) -> None:
    user, phone = uid(), "+14155552671"
    t0 = BASE_TIME + timedelta(days=100)
    events = [identify({"phone": phone}, user_id=user, phone=phone, at=t0)]
    events += [
        track("Viewed" if i % 2 else "Clicked", user_id=user, at=t0 + timedelta(minutes=i + 1)) for i in range(6)
    ]
    contact_id = (await identity.record(tenant, *events)).results[0].contact_id
    got = await identity.stub.ListContactEvents(
        ipb.ListContactEventsRequest(contact_id=contact_id, names=["Viewed"]), metadata=tenant.md
    )
    assert [e.event.message_id for e in got.events] == [
        events[6].message_id,
        events[4].message_id,
        events[2].message_id,
    ]
    window = ipb.ListContactEventsRequest(
        contact_id=contact_id, start_time=ts(t0 + timedelta(minutes=2)), end_time=ts(t0 + timedelta(minutes=4))
    )
    got = await identity.stub.ListContactEvents(window, metadata=tenant.md)
    assert [e.event.message_id for e in got.events] == [events[3].message_id, events[2].message_id]
    pages: list[str] = []
    token = ""
    while True:
        got = await identity.stub.ListContactEvents(
            ipb.ListContactEventsRequest(contact_id=contact_id, page_size=2, page_token=token), metadata=tenant.md
        )
        pages.extend(e.event.message_id for e in got.events)
        token = got.next_page_token
        if not token:
            break
    assert pages == [e.message_id for e in reversed(events)]


async def test_same_phone_in_two_workspaces_is_two_contacts_and_keys_stay_in_their_workspace(
    identity: Identity, make_workspace: MakeWorkspace
) -> None:
    one, two = await identity.tenant(make_workspace), await identity.tenant(make_workspace)
    phone, user = "+14155552671", uid()
    in_one = identify({"phone": phone, "secret": "one"}, user_id=user, phone=phone)
    in_two = identify({"phone": phone, "secret": "two"}, user_id=user, phone=phone)
    first = (await identity.record(one, in_one)).results
    second = (await identity.record(two, in_two)).results
    assert first[0].contact_id != second[0].contact_id
    got = await identity.stub.GetContact(ipb.GetContactRequest(phone=phone), metadata=two.md)
    assert got.contact.id == second[0].contact_id and got.contact.properties["secret"] == "two"
    assert got.contact.workspace_id == two.workspace.id
    calls = [
        (identity.stub.GetContact, ipb.GetContactRequest(contact_id=first[0].contact_id)),
        (identity.stub.ListContactEvents, ipb.ListContactEventsRequest(contact_id=first[0].contact_id)),
    ]
    for call, request in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request, metadata=two.md)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await identity.stub.ListContacts(ipb.ListContactsRequest(), metadata=two.md)
    assert [c.id for c in listed.contacts] == [second[0].contact_id]
    user_two = await identity.stub.GetUser(ipb.GetUserRequest(user_id=user), metadata=two.md)
    assert user_two.user.contact_id == second[0].contact_id
    assert [e.event.message_id for e in user_two.events] == [in_two.message_id]
    assert all(e.workspace_id == two.workspace.id for e in user_two.events)


async def _expect_invalid(call: Any, request: Any, md: Any, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request, metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in [v.field for v in await field_violations(info.value)], info.value.details()


async def test_bad_input_on_every_read_names_the_field(identity: Identity, tenant: Tenant) -> None:
    s = identity.stub
    for request, field in (
        (ipb.GetContactRequest(), "lookup"),
        (ipb.GetContactRequest(phone="not a phone"), "phone"),
        (ipb.GetContactRequest(phone="+1 555"), "phone"),
        (ipb.GetContactRequest(contact_id="nope"), "contact_id"),
    ):
        await _expect_invalid(s.GetContact, request, tenant.md, field)
    for request, field in (
        (ipb.ListContactsRequest(page_size=1001), "page_size"),
        (ipb.ListContactsRequest(page_size=-1), "page_size"),
        (ipb.ListContactsRequest(page_token="garbage"), "page_token"),
        # JSON nested past the parser's depth.
        (ipb.ListContactsRequest(page_token=base64.urlsafe_b64encode(b"[" * 3000).decode()), "page_token"),
        (ipb.ListContactsRequest(filters=[PropertyFilter(key="a", operator=99)]), "filters[0].operator"),  # type: ignore[arg-type]
        (ipb.ListContactsRequest(filters=[flt("a", OP.FILTER_OPERATOR_UNSPECIFIED)]), "filters[0].operator"),
        (ipb.ListContactsRequest(filters=[flt("", OP.FILTER_OPERATOR_EXISTS)]), "filters[0].key"),
        (ipb.ListContactsRequest(filters=[flt(".".join("a" * 1000), OP.FILTER_OPERATOR_EQ, "x")]), "filters[0].key"),
        (ipb.ListContactsRequest(filters=[flt("a", OP.FILTER_OPERATOR_EQ)]), "filters[0].value"),
        (ipb.ListContactsRequest(filters=[flt("a", OP.FILTER_OPERATOR_GT, True)]), "filters[0].value"),
        (ipb.ListContactsRequest(filters=[flt("a", OP.FILTER_OPERATOR_IN, "x")]), "filters[0].value"),
        # What Postgres text and jsonb cannot hold: NUL, NaN and the infinities.
        (ipb.ListContactsRequest(filters=[flt("a\x00", OP.FILTER_OPERATOR_EXISTS)]), "filters[0].key"),
        (ipb.ListContactsRequest(filters=[flt("a", OP.FILTER_OPERATOR_EQ, "x\x00")]), "filters[0].value"),
        (ipb.ListContactsRequest(filters=[flt("a", OP.FILTER_OPERATOR_CONTAINS, "\x00")]), "filters[0].value"),
        (ipb.ListContactsRequest(filters=[flt("a", OP.FILTER_OPERATOR_GT, float("nan"))]), "filters[0].value"),
        (ipb.ListContactsRequest(filters=[flt("a", OP.FILTER_OPERATOR_EQ, float("inf"))]), "filters[0].value"),
        (ipb.ListContactsRequest(filters=[flt("a", OP.FILTER_OPERATOR_IN, ["ok", "\x00"])]), "filters[0].value"),
        (ipb.ListContactsRequest(order_by=7), "order_by"),  # type: ignore[arg-type]
    ):
        await _expect_invalid(s.ListContacts, request, tenant.md, field)
    # A token of one query is not accepted by another.
    phone = "+14155552671"
    await identity.record(tenant, identify({"phone": phone}, user_id=uid(), phone=phone))
    await identity.record(tenant, identify({"phone": "+14155550100"}, user_id=uid(), phone="+14155550100"))
    page = await s.ListContacts(ipb.ListContactsRequest(page_size=1), metadata=tenant.md)
    assert page.next_page_token
    other = ipb.ListContactsRequest(page_size=1, page_token=page.next_page_token, descending=True)
    await _expect_invalid(s.ListContacts, other, tenant.md, "page_token")

    contact_id = (await s.GetContact(ipb.GetContactRequest(phone=phone), metadata=tenant.md)).contact.id
    for request, field in (
        (ipb.ListContactEventsRequest(), "contact_id"),
        (ipb.ListContactEventsRequest(contact_id="x"), "contact_id"),
        (ipb.ListContactEventsRequest(contact_id=contact_id, page_size=5000), "page_size"),
        (ipb.ListContactEventsRequest(contact_id=contact_id, page_token="%%%"), "page_token"),
        (
            ipb.ListContactEventsRequest(
                contact_id=contact_id, page_token=base64.urlsafe_b64encode(b"{" * 3000).decode()
            ),
            "page_token",
        ),
        (
            ipb.ListContactEventsRequest(
                contact_id=contact_id, start_time=ts(BASE_TIME), end_time=ts(BASE_TIME - timedelta(1))
            ),
            "end_time",
        ),
        (ipb.ListContactEventsRequest(contact_id=contact_id, names=["ok", "a\x00"]), "names[1]"),
    ):
        await _expect_invalid(s.ListContactEvents, request, tenant.md, field)
    for request, field in (
        (ipb.GetUserRequest(), "lookup"),
        (ipb.GetUserRequest(user_id=""), "lookup"),
        (ipb.GetUserRequest(user_id="x", event_limit=1001), "event_limit"),
        (ipb.GetUserRequest(user_id="a\x00b"), "user_id"),
        (ipb.GetUserRequest(anonymous_id="\x00"), "anonymous_id"),
    ):
        await _expect_invalid(s.GetUser, request, tenant.md, field)


async def test_a_timeline_pages_past_an_event_at_the_largest_time(identity: Identity, tenant: Tenant) -> None:
    # RecordEvents takes any valid time; the largest is stored as PostgreSQL's infinity, which
    # asyncpg reads back without an offset. The token the server writes must still be its own.
    user, phone = uid(), "+14155552673"
    last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    events = [identify({"phone": phone}, user_id=user, phone=phone, at=last), track(user_id=user, at=BASE_TIME)]
    contact_id = (await identity.record(tenant, *events)).results[0].contact_id
    first = await identity.stub.ListContactEvents(
        ipb.ListContactEventsRequest(contact_id=contact_id, page_size=1), metadata=tenant.md
    )
    assert [e.event.message_id for e in first.events] == [events[0].message_id] and first.next_page_token
    rest = await identity.stub.ListContactEvents(
        ipb.ListContactEventsRequest(contact_id=contact_id, page_size=1, page_token=first.next_page_token),
        metadata=tenant.md,
    )
    assert [e.event.message_id for e in rest.events] == [events[1].message_id]


def _edited(token: str, position: list[Any]) -> str:
    """A page token with its query fingerprint kept and its position replaced."""
    data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw = json.dumps({"q": data["q"], "p": position}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_edited_page_tokens_and_bad_times_are_invalid_arguments(
    identity: Identity, tenant: Tenant, make_workspace: MakeWorkspace
) -> None:
    s = identity.stub
    phone = "+14155552672"
    for p in (phone, "+14155550101"):
        await identity.record(tenant, identify({"phone": p}, user_id=uid(), phone=p), track(user_id=uid(), phone=p))
    page = await s.ListContacts(ipb.ListContactsRequest(page_size=1), metadata=tenant.md)
    contact_id = (await s.GetContact(ipb.GetContactRequest(phone=phone), metadata=tenant.md)).contact.id
    events = await s.ListContactEvents(
        ipb.ListContactEventsRequest(contact_id=contact_id, page_size=1), metadata=tenant.md
    )
    assert page.next_page_token and events.next_page_token
    now, some_id = "2026-01-01T00:00:00+00:00", str(uuid.uuid4())
    for position in (
        [now, 5],
        [now, [1]],
        [now],
        [now, some_id, 1],
        [5, some_id],
        ["2026-01-01T00:00:00", some_id],  # no offset
        ["9999-12-31T23:59:59.999999-05:00", some_id],  # past year 9999 in UTC
    ):
        request = ipb.ListContactsRequest(page_size=1, page_token=_edited(page.next_page_token, position))
        await _expect_invalid(s.ListContacts, request, tenant.md, "page_token")
    for position in ([now, 2**64], [now, -1], [now, True], [now, "3"], [now, 1.5]):
        request = ipb.ListContactEventsRequest(
            contact_id=contact_id, page_size=1, page_token=_edited(events.next_page_token, position)
        )
        await _expect_invalid(s.ListContactEvents, request, tenant.md, "page_token")
    for field, bad in (("start_time", Timestamp(seconds=10**12)), ("end_time", Timestamp(seconds=-(10**12)))):
        request = ipb.ListContactEventsRequest(contact_id=contact_id, **{field: bad})
        await _expect_invalid(s.ListContactEvents, request, tenant.md, field)
    request = ipb.ListContactEventsRequest(contact_id=contact_id, start_time=Timestamp(seconds=0, nanos=-1))
    await _expect_invalid(s.ListContactEvents, request, tenant.md, "start_time")
    # A token is bound to its workspace too, even for the same query.
    other = await identity.tenant(make_workspace)
    request = ipb.ListContactsRequest(page_size=1, page_token=page.next_page_token)
    await _expect_invalid(s.ListContacts, request, other.md, "page_token")


async def test_unknown_ids_are_not_found(identity: Identity, tenant: Tenant) -> None:
    s, unknown = identity.stub, str(uuid.uuid4())
    for call, request in (
        (s.GetContact, ipb.GetContactRequest(contact_id=unknown)),
        (s.GetContact, ipb.GetContactRequest(phone="+14155559999")),
        (s.ListContactEvents, ipb.ListContactEventsRequest(contact_id=unknown)),
        (s.GetUser, ipb.GetUserRequest(user_id="nobody")),
        (s.GetUser, ipb.GetUserRequest(anonymous_id="nobody")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request, metadata=tenant.md)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reads_need_a_key(identity: Identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await identity.stub.GetContact(ipb.GetContactRequest(phone="+14155552671"))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_contact_pages_stay_under_the_response_budget(
    identity: Identity, make_workspace: MakeWorkspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A contact's properties gather over many identifies: a page ends at the byte budget (made
    # small here) with a token after its last contact, and holds one contact even if that alone
    # is over it.
    monkeypatch.setattr(repository, "MAX_PAGE_PAYLOAD_BYTES", 5_000)
    tenant = await identity.tenant(make_workspace)
    phones = [f"+1415555{3000 + i:04d}" for i in range(7)]
    for i, phone in enumerate(phones):
        blob = "x" * (6_000 if i == 3 else 2_000)
        await identity.record(tenant, identify({"phone": phone, "blob": blob}, user_id=uid(), phone=phone))
    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        request = ipb.ListContactsRequest(page_size=1000, page_token=token)
        got = await identity.stub.ListContacts(request, metadata=tenant.md)
        seen += [c.phone for c in got.contacts]
        sizes.append(len(got.contacts))
        token = got.next_page_token
        if not token:
            break
    assert seen == phones  # every contact once, in order
    assert max(sizes) == 2 and 1 in sizes


async def test_get_user_lists_at_most_a_hundred_ids_of_each_kind(identity: Identity, tenant: Tenant) -> None:
    user = uid()
    await identity.record(tenant, *[track(user_id=user, anonymous_id=f"anon-{i:03d}") for i in range(150)])
    got = await identity.stub.GetUser(ipb.GetUserRequest(user_id=user, event_limit=1), metadata=tenant.md)
    assert len(got.user.anonymous_ids) == repository.MAX_IDS_PER_CONTACT == 100
    assert list(got.user.user_ids) == [user]
