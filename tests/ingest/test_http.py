"""Segment-compatible HTTP ingest: auth forms, gzip, limits, bad input, leniency, identity outage."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import uuid
from typing import Any

import aiohttp
import pytest
from parley.common.v1.event_pb2 import EventType
from parley.identity.v1 import identity_service_pb2 as ipb

from tests.ingest.conftest import Stack, StackFactory


@pytest.fixture(scope="module")
async def small(make_stack: StackFactory) -> Stack:
    """A stack with small HTTP limits, so limit tests stay cheap."""
    return await make_stack(max_http_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def uid() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


async def post(
    http: aiohttp.ClientSession,
    url: str,
    body: Any,
    headers: dict[str, str] | None = None,
    *,
    gz: bool = False,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if gz:
        data = gzip.compress(data)
        hdrs["Content-Encoding"] = "gzip"
    async with http.post(url, data=data, headers=hdrs) as resp:
        return resp.status, await resp.json()


async def events_of(stack: Stack, user_id: str) -> list[ipb.StoredEvent]:
    got = await stack.identity_stub.GetUser(ipb.GetUserRequest(user_id=user_id, event_limit=1000), metadata=stack.md)
    return list(got.events)


async def test_gzip_batch_with_basic_auth(stack: Stack, http: aiohttp.ClientSession) -> None:
    user = uid()
    body = {
        "batch": [
            {"type": "identify", "userId": user, "traits": {"phone": "(415) 555-0199", "first_name": "Ada"}},
            {"type": "track", "userId": user, "event": "Loan Approved", "properties": {"amount": 5000}},
            {"type": "page", "userId": user, "name": "Pricing"},
            {"type": "screen", "userId": user, "name": "Home"},
        ],
        "sentAt": "2026-01-01T00:00:00Z",
    }
    status, answer = await post(http, f"{stack.http_url}/v1/batch", body, basic(stack.key), gz=True)
    assert (status, answer) == (200, {"success": True})
    stored = await events_of(stack, user)
    assert sorted(EventType.Name(e.event.type) for e in stored) == [
        "EVENT_TYPE_IDENTIFY",
        "EVENT_TYPE_PAGE",
        "EVENT_TYPE_SCREEN",
        "EVENT_TYPE_TRACK",
    ]
    contact = await stack.identity_stub.GetContact(ipb.GetContactRequest(phone="+14155550199"), metadata=stack.md)
    assert contact.contact.phone == "+14155550199"


@pytest.mark.parametrize("form", ["bearer", "write-key", "basic"])
async def test_each_auth_form(stack: Stack, http: aiohttp.ClientSession, form: str) -> None:
    user = uid()
    body: dict[str, Any] = {"userId": user, "event": "Signed Up"}
    headers: dict[str, str] = {}
    if form == "bearer":
        headers = {"Authorization": f"Bearer {stack.key}"}
    elif form == "basic":
        headers = basic(stack.key)
    else:
        body["writeKey"] = stack.key
    status, answer = await post(http, f"{stack.http_url}/v1/track", body, headers)
    assert (status, answer) == (200, {"success": True})
    [stored] = await events_of(stack, user)
    assert stored.event.name == "Signed Up"


@pytest.mark.parametrize(
    ("headers", "body_key"),
    [
        ({}, None),
        ({"Authorization": "Bearer pk_wrong"}, None),
        ({"Authorization": "Basic !!!"}, None),
        ({}, "pk_wrong"),
        ({}, "pk_\ud800"),  # a lone surrogate: no key, and no string its digest can be taken of
        ({"Authorization": "Digest abc"}, None),
    ],
)
async def test_wrong_or_missing_key_is_401(
    stack: Stack, http: aiohttp.ClientSession, headers: dict[str, str], body_key: str | None
) -> None:
    body: dict[str, Any] = {"batch": [{"type": "track", "userId": "u", "event": "E"}]}
    if body_key:
        body["writeKey"] = body_key
    status, answer = await post(http, f"{stack.http_url}/v1/batch", body, headers)
    assert status == 401
    assert answer["success"] is False and answer["code"] == "unauthorized" and answer["message"]


async def test_a_body_carrying_its_own_key_is_held_to_segments_batch_limit(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    # Its key is unknown until it is read: a stranger must not make ingest read megabytes.
    body: dict[str, Any] = {"batch": [{"type": "track", "userId": "u", "event": "E" * 200}] * 3_000}
    status, answer = await post(http, f"{stack.http_url}/v1/batch", {**body, "writeKey": stack.key}, {})
    assert status == 413 and answer["code"] == "payload_too_large" and str(500 * 1024) in answer["message"]
    assert "Authorization header" in answer["message"]
    # With the key in a header, the body limit is the configured one (the batch is refused for
    # its message count instead).
    status, answer = await post(http, f"{stack.http_url}/v1/batch", body, {"Authorization": f"Bearer {stack.key}"})
    assert status == 400 and answer["code"] != "payload_too_large"


async def test_mixed_batch_rejects_the_bad_event_and_stores_the_rest(stack: Stack, http: aiohttp.ClientSession) -> None:
    user = uid()
    body = {
        "batch": [
            {"type": "track", "userId": user, "event": "Good One"},
            {"type": "track", "userId": user, "event": ""},
            {"type": "identify", "userId": user, "traits": {"phone": "12"}},
            {"type": "track", "userId": user, "event": "Bad Time", "timestamp": "yesterday"},
            {"type": "launch", "userId": user},
            "not an object",
            {"type": "track", "event": "No Ids"},
            {"type": "track", "userId": user, "event": "Good Two", "properties": "flat"},
            {"type": "track", "userId": user, "event": "Good Three"},
        ],
        "writeKey": stack.key,
    }
    status, answer = await post(http, f"{stack.http_url}/v1/batch", body)
    assert status == 400
    fields = {(e["index"], e["field"]) for e in answer["errors"]}
    assert fields == {
        (1, "batch[1].event"),
        (2, "batch[2].traits.phone"),
        (3, "batch[3].timestamp"),
        (4, "batch[4].type"),
        (5, "batch[5]"),
        (6, "batch[6].userId"),
        (7, "batch[7].properties"),
    }
    assert (answer["accepted"], answer["rejected"]) == (2, 7)
    stored = await events_of(stack, user)
    assert sorted(e.event.name for e in stored) == ["Good One", "Good Three"]


async def test_nan_and_infinity_literals_are_rejected_naming_the_field(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    # Python's JSON reader takes NaN and Infinity, which JSON (and so what identity stores) has not.
    user = uid()
    body = {
        "writeKey": stack.key,
        "batch": [
            {"type": "track", "userId": user, "event": "Good"},
            {"type": "track", "userId": user, "event": "Bad", "properties": {"x": float("nan"), "y": float("-inf")}},
        ],
    }
    raw = json.dumps(body).encode()  # Python writes the literals NaN and -Infinity
    assert b"NaN" in raw and b"-Infinity" in raw
    status, answer = await post(http, f"{stack.http_url}/v1/batch", None, raw=raw)
    assert status == 400
    assert [(e["index"], e["field"]) for e in answer["errors"]] == [(1, "batch[1].properties")]
    assert (answer["accepted"], answer["rejected"]) == (1, 1)
    assert [e.event.name for e in await events_of(stack, user)] == ["Good"]


async def test_nul_escapes_are_rejected_naming_the_field(stack: Stack, http: aiohttp.ClientSession) -> None:
    user = uid()
    body = {
        "writeKey": stack.key,
        "batch": [
            {"type": "track", "userId": user, "event": "Good"},
            {"type": "track", "userId": "a\u0000b", "event": "Bad Id"},
            {"type": "identify", "userId": user, "traits": {"name": "x\u0000"}},
        ],
    }
    status, answer = await post(http, f"{stack.http_url}/v1/batch", body)
    assert status == 400
    assert [(e["index"], e["field"]) for e in answer["errors"]] == [(1, "batch[1].userId"), (2, "batch[2].traits")]
    assert [e.event.name for e in await events_of(stack, user)] == ["Good"]


async def test_lone_surrogate_escapes_are_rejected_naming_the_field(stack: Stack, http: aiohttp.ClientSession) -> None:
    # Valid JSON, but "\ud800" alone is no character: no protobuf (or Postgres) string can hold it.
    user = uid()
    raw = (
        '{"writeKey": "' + stack.key + '", "batch": ['
        '{"type": "track", "userId": "' + user + '", "event": "Good \\ud83d\\ude00"},'
        '{"type": "track", "userId": "a\\ud800b", "event": "Lone"},'
        '{"type": "track", "userId": "' + user + '", "event": "P", "properties": {"k": "\\udfff"}}]}'
    )
    status, answer = await post(http, f"{stack.http_url}/v1/batch", None, raw=raw.encode())
    assert status == 400
    # (The lone id also leaves the event without an id: a second violation on the same field.)
    assert {(e["index"], e["field"]) for e in answer["errors"]} == {(1, "batch[1].userId"), (2, "batch[2].properties")}
    # A surrogate pair is one character (here an emoji) and is kept.
    assert [e.event.name for e in await events_of(stack, user)] == ["Good \U0001f600"]


async def test_properties_nested_too_deeply_to_read_are_rejected_alone(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    # Parses as JSON, but is too deep to turn into an event: that event is rejected, the rest stored.
    user = uid()
    deep: Any = 1
    for _ in range(900):
        deep = {"a": deep}
    body = {
        "writeKey": stack.key,
        "batch": [
            {"type": "track", "userId": user, "event": "Deep", "properties": deep},
            {"type": "track", "userId": user, "event": "Good"},
        ],
    }
    status, answer = await post(http, f"{stack.http_url}/v1/batch", body)
    assert status == 400
    assert {(e["index"], e["field"]) for e in answer["errors"]} == {(0, "batch[0].properties")}
    assert any("too deeply" in e["description"] for e in answer["errors"])
    assert [e.event.name for e in await events_of(stack, user)] == ["Good"]


async def test_oversized_event_is_rejected_naming_the_limit(stack: Stack, http: aiohttp.ClientSession) -> None:
    user = uid()
    body = {
        "batch": [
            {"type": "track", "userId": user, "event": "Huge", "properties": {"blob": "x" * 40_000}},
            {"type": "track", "userId": user, "event": "Fine"},
        ]
    }
    status, answer = await post(http, f"{stack.http_url}/v1/batch", body, basic(stack.key))
    assert status == 400
    [error] = answer["errors"]
    assert error["field"] == "batch[0]" and "32768" in error["description"]
    assert [e.event.name for e in await events_of(stack, user)] == ["Fine"]


async def test_oversized_body_is_413(small: Stack, http: aiohttp.ClientSession) -> None:
    body = {"batch": [{"type": "track", "userId": "u", "event": "E", "properties": {"b": "x" * 20_000}}] * 4}
    status, answer = await post(http, f"{small.http_url}/v1/batch", body, basic(small.key))
    assert status == 413
    assert answer["code"] == "payload_too_large" and answer["limit"] == 64 * 1024


async def test_gzip_bomb_is_cut_off_at_the_limit(small: Stack, http: aiohttp.ClientSession) -> None:
    # 64 MiB of zeros compresses to ~64 KiB; the server must stop inflating at 64 KiB.
    bomb = gzip.compress(b"0" * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 64 * 1024
    headers = {**basic(small.key), "Content-Encoding": "gzip"}
    status, answer = await post(http, f"{small.http_url}/v1/batch", None, headers, raw=bomb)
    assert status == 413
    assert str(64 * 1024) in answer["message"]


@pytest.mark.parametrize(
    ("raw", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, "invalid_json"),
        (b'{"batch": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, "invalid_json"),  # deeper than the reader
        (b"[1, 2]", {}, 400, "invalid_json"),
        (b'{"batch": {}}', {}, 400, "invalid_batch"),
        (b'{"batch": []}', {}, 400, "invalid_batch"),
        (b"\x1f\x8b\x08garbage", {"Content-Encoding": "gzip"}, 400, "invalid_gzip"),
        (b"{}", {"Content-Encoding": "br"}, 415, "unsupported_encoding"),
        (b"{}", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ],
)
async def test_malformed_requests(
    stack: Stack, http: aiohttp.ClientSession, raw: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    got, answer = await post(http, f"{stack.http_url}/v1/batch", None, {**basic(stack.key), **headers}, raw=raw)
    assert (got, answer["code"]) == (status, code)


async def test_leniency_real_sdks_need(stack: Stack, http: aiohttp.ClientSession) -> None:
    user = uid()
    body = {
        "batch": [
            {
                "type": "identify",
                "userId": user,
                "anonymousId": None,
                "messageId": "len-1",
                "context": {"traits": {"phone": "+1 415 555 0142", "plan": "gold"}},
                "traits": {"first_name": "Grace"},
                "timestamp": "2026-01-01T10:00:00Z",
            },
            {
                "type": "track",
                "userId": user,
                "event": "T1",
                "messageId": "len-2",
                "timestamp": "2026-01-01T10:00:00.123+00:00",
            },
            {
                "type": "track",
                "userId": user,
                "event": "T2",
                "messageId": "len-3",
                "originalTimestamp": "2026-01-01T10:00:00.123456Z",
                "timestamp": "2020-01-01T00:00:00Z",
            },
            {
                "type": "group",
                "userId": user,
                "groupId": "acme-inc",
                "messageId": "len-4",
                "traits": {"name": "Acme", "phone": "+1 212 555 0100"},
            },
            {"type": "alias", "userId": user, "previousId": "anon-42", "messageId": "len-5"},
        ],
        "context": {"library": {"name": "test"}, "ip": "10.0.0.1"},
        "integrations": {"All": True},
        "sentAt": "2026-01-01T10:00:01Z",
    }
    status, answer = await post(http, f"{stack.http_url}/v1/batch", body, basic(stack.key))
    assert (status, answer) == (200, {"success": True})
    stored = {e.event.message_id: e.event for e in await events_of(stack, user)}
    assert set(stored) >= {"len-1", "len-2", "len-3", "len-4"}
    identify = stored["len-1"]
    assert identify.phone == "+14155550142"
    assert identify.traits.fields["first_name"].string_value == "Grace"
    assert identify.traits.fields["plan"].string_value == "gold"
    assert identify.original_timestamp.ToJsonString() == "2026-01-01T10:00:00Z"
    assert stored["len-2"].original_timestamp.ToJsonString() == "2026-01-01T10:00:00.123Z"
    assert stored["len-3"].original_timestamp.ToJsonString() == "2026-01-01T10:00:00.123456Z"
    for event in stored.values():
        assert event.context.fields["library"].struct_value.fields["name"].string_value == "test"
        assert event.context.fields["integrations"].struct_value.fields["All"].bool_value is True
        assert event.sent_at.ToJsonString() == "2026-01-01T10:00:01Z"
    group = stored["len-4"]
    assert group.type == EventType.EVENT_TYPE_GROUP and group.group_id == "acme-inc"
    assert group.phone == ""  # a group's phone is the account's, never a contact
    contact = await stack.identity_stub.GetContact(ipb.GetContactRequest(phone="+14155550142"), metadata=stack.md)
    assert contact.contact.id


async def test_regal_events_shape(stack: Stack, http: aiohttp.ClientSession) -> None:
    user = uid()
    body = {
        "userId": user,
        "traits": {"phone": "415-555-0123", "email": "x@example.com"},
        "name": "Application Submitted",
        "properties": {"loan": "auto"},
        "originalTimestamp": "2026-01-02T03:04:05.678Z",
        "eventSource": "server",
    }
    status, answer = await post(http, f"{stack.http_url}/events", body, {"Authorization": f"Bearer {stack.key}"})
    assert (status, answer) == (200, {"success": True})
    [stored] = await events_of(stack, user)
    assert stored.event.type == EventType.EVENT_TYPE_TRACK
    assert stored.event.name == "Application Submitted"
    assert stored.event.phone == "+14155550123"
    assert stored.event.context.fields["eventSource"].string_value == "server"
    status, answer = await post(http, f"{stack.http_url}/events", {"userId": user, "name": "x" * 300}, basic(stack.key))
    assert status == 400 and answer["errors"][0]["field"] == "name"


async def test_single_endpoint_violation_names_the_field(stack: Stack, http: aiohttp.ClientSession) -> None:
    status, answer = await post(
        http, f"{stack.http_url}/v1/identify", {"userId": "u", "traits": {"phone": "nope"}}, basic(stack.key)
    )
    assert status == 400
    assert [e["field"] for e in answer["errors"]] == ["traits.phone"]


async def test_503_while_identity_is_down_then_success(make_stack: StackFactory, http: aiohttp.ClientSession) -> None:
    stack = await make_stack()
    user = uid()
    body = {"batch": [{"type": "track", "userId": user, "event": "E", "messageId": f"{user}-1"}]}
    await stack.identity.stop(0)
    status, answer = await post(http, f"{stack.http_url}/v1/batch", body, basic(stack.key))
    assert (status, answer["code"]) == (503, "unavailable")
    await stack.restart_identity()
    for _ in range(100):
        status, answer = await post(http, f"{stack.http_url}/v1/batch", body, basic(stack.key))
        if status != 503:
            break
        await asyncio.sleep(0.1)
    assert (status, answer) == (200, {"success": True})
    status, _ = await post(http, f"{stack.http_url}/v1/batch", body, basic(stack.key))
    assert status == 200
    assert len(await events_of(stack, user)) == 1


@pytest.mark.parametrize(
    ("path", "body", "kind"),
    [
        ("/v1/page", {"name": "Home"}, EventType.EVENT_TYPE_PAGE),
        ("/v1/screen", {"name": "Dashboard"}, EventType.EVENT_TYPE_SCREEN),
        ("/v1/identify", {"traits": {"first_name": "Ada"}}, EventType.EVENT_TYPE_IDENTIFY),
        ("/v1/group", {"groupId": "acme"}, EventType.EVENT_TYPE_GROUP),
        ("/v1/alias", {"previousId": "anon-7"}, EventType.EVENT_TYPE_ALIAS),
    ],
)
async def test_single_endpoints(
    stack: Stack, http: aiohttp.ClientSession, path: str, body: dict[str, Any], kind: int
) -> None:
    user = uid()
    status, answer = await post(http, f"{stack.http_url}{path}", {"userId": user, **body}, basic(stack.key))
    assert (status, answer) == (200, {"success": True})
    stored = await events_of(stack, user)
    assert [e.event.type for e in stored] == [kind]


async def test_import_of_an_archived_segment_message_keeps_its_event_time(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    # A message as Segment's archives hold it, with Segment's own stamps: replayed, it keeps the
    # time Segment worked out, not the time of the replay.
    user = uid()
    message = {
        "type": "track",
        "event": "Order Completed",
        "userId": user,
        "messageId": f"{user}-archived",
        "originalTimestamp": "2026-06-01T10:00:00.000Z",
        "sentAt": "2026-06-01T10:00:01.000Z",
        "timestamp": "2026-06-01T10:00:00.900Z",
        "receivedAt": "2026-06-01T10:00:01.900Z",
    }
    status, answer = await post(http, f"{stack.http_url}/v1/import", {"batch": [message]}, basic(stack.key))
    assert (status, answer) == (200, {"success": True})
    [stored] = await events_of(stack, user)
    assert stored.event.timestamp.ToJsonString() == "2026-06-01T10:00:00.900Z"
    assert stored.event.received_at.ToJsonString() == "2026-06-01T10:00:01.900Z"
    # Without a sentAt of its own, the batch's (the replaying client's clock) does not apply to it.
    unsent = {k: v for k, v in message.items() if k != "sentAt"} | {"messageId": f"{user}-unsent"}
    body = {"batch": [unsent], "sentAt": "2026-12-07T12:00:00Z"}
    assert await post(http, f"{stack.http_url}/v1/import", body, basic(stack.key)) == (200, {"success": True})
    # A received time before 2000 is refused, naming the field as sent.
    old = {**message, "messageId": f"{user}-old", "receivedAt": "1999-12-31T00:00:00Z"}
    status, answer = await post(http, f"{stack.http_url}/v1/import", {"batch": [old]}, basic(stack.key))
    assert (status, answer["code"]) == (400, "invalid_events")
    assert [e["field"] for e in answer["errors"]] == ["batch[0].receivedAt"]
    stored = {e.event.message_id: e.event.timestamp.ToJsonString() for e in await events_of(stack, user)}
    assert stored == {f"{user}-archived": "2026-06-01T10:00:00.900Z", f"{user}-unsent": "2026-06-01T10:00:00Z"}
