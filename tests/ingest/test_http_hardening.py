"""HTTP ingest against hostile or odd bodies: huge and non-finite numeric ids, batches of too
many items, long error lists, and CORS for browser SDKs."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from services.common.tenancy import KeyVerifier
from services.ingest.http import MAX_BATCH_MESSAGES, MAX_LISTED_ERRORS, build_app
from tests.ingest.conftest import Stack
from tests.ingest.test_http import basic, events_of, uid

HUGE = "9" * 400  # a JSON int no float holds


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post_raw(
    http: aiohttp.ClientSession, url: str, raw: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, data=raw, headers={"Content-Type": "application/json", **(headers or {})}) as resp:
        return resp.status, await resp.json()


# --- 3. Numeric ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message", "field"),
    [
        ("/v1/track", '{"userId": %s, "event": "X"}', "userId"),
        ("/v1/track", '{"anonymousId": %s, "event": "X"}', "anonymousId"),
        ("/v1/track", '{"userId": "u", "event": %s}', "event"),
        ("/v1/page", '{"userId": "u", "name": %s}', "name"),
        ("/v1/alias", '{"userId": "u", "previousId": %s}', "previousId"),
        ("/v1/group", '{"userId": "u", "groupId": %s}', "groupId"),
        ("/events", '{"userId": %s, "name": "X"}', "userId"),
    ],
)
@pytest.mark.parametrize("number", [HUGE, "NaN", "Infinity", "-Infinity"])
async def test_a_huge_or_non_finite_numeric_id_is_a_field_violation(
    stack: Stack, http: aiohttp.ClientSession, path: str, message: str, field: str, number: str
) -> None:
    status, answer = await post_raw(http, stack.http_url + path, (message % number).encode(), basic(stack.key))
    assert (status, answer["code"]) == (400, "invalid_events"), answer
    assert field in {e["field"] for e in answer["errors"]}, answer


async def test_a_huge_numeric_id_rejects_its_message_alone(stack: Stack, http: aiohttp.ClientSession) -> None:
    user = uid()
    good = [{"type": "track", "userId": user, "event": f"Good {i}"} for i in range(3)]
    raw = json.dumps({"batch": good}).encode()[:-2]
    raw += b', {"type": "track", "event": "Bad", "userId": ' + HUGE.encode() + b"}"
    raw += b', {"type": "track", "event": "Inf", "userId": Infinity}]}'
    status, answer = await post_raw(http, stack.http_url + "/v1/batch", raw, basic(stack.key))
    assert status == 400
    assert {(e["index"], e["field"]) for e in answer["errors"]} >= {(3, "batch[3].userId"), (4, "batch[4].userId")}
    assert (answer["accepted"], answer["rejected"]) == (3, 2)
    assert sorted(e.event.name for e in await events_of(stack, user)) == ["Good 0", "Good 1", "Good 2"]


async def test_sane_numeric_ids_are_their_decimal_text(stack: Stack, http: aiohttp.ClientSession) -> None:
    number = uuid.uuid4().int % 10**15
    raw = json.dumps({"userId": number, "event": "Numeric", "messageId": 12345678901234567890123}).encode()
    status, answer = await post_raw(http, stack.http_url + "/v1/track", raw, basic(stack.key))
    assert (status, answer) == (200, {"success": True})
    [stored] = await events_of(stack, str(number))
    assert stored.event.message_id == "12345678901234567890123"


# --- 4. Items per request and errors per answer -----------------------------------------------


async def test_too_many_items_are_refused_before_any_item_is_read(stack: Stack, http: aiohttp.ClientSession) -> None:
    # ~4 MiB of two-byte items: read one by one, this took most of a minute.
    count = 2_000_000
    raw = b'{"batch": [' + b",".join([b"0"] * count) + b"]}"
    started = time.perf_counter()
    status, answer = await post_raw(http, stack.http_url + "/v1/batch", raw, basic(stack.key))
    assert time.perf_counter() - started < 10
    assert (status, answer["code"], answer["field"]) == (400, "invalid_batch", "batch")
    assert str(count) in answer["message"] and str(MAX_BATCH_MESSAGES) in answer["message"]


async def test_the_item_limit_is_inclusive(stack: Stack, http: aiohttp.ClientSession) -> None:
    user = uid()
    items = [{"type": "track", "userId": user, "event": "E"} for _ in range(MAX_BATCH_MESSAGES)]
    status, answer = await post_raw(
        http, stack.http_url + "/v1/batch", json.dumps({"batch": items}).encode(), basic(stack.key)
    )
    assert (status, answer) == (200, {"success": True})
    items.append(items[0])
    status, answer = await post_raw(
        http, stack.http_url + "/v1/batch", json.dumps({"batch": items}).encode(), basic(stack.key)
    )
    assert (status, answer["code"]) == (400, "invalid_batch")


async def test_the_error_list_is_capped_and_counted(stack: Stack, http: aiohttp.ClientSession) -> None:
    user = uid()
    items: list[Any] = [0] * (MAX_BATCH_MESSAGES - 1) + [{"type": "track", "userId": user, "event": "Good"}]
    status, answer = await post_raw(
        http, stack.http_url + "/v1/batch", json.dumps({"batch": items}).encode(), basic(stack.key)
    )
    assert (status, answer["code"]) == (400, "invalid_events")
    assert len(answer["errors"]) == MAX_LISTED_ERRORS
    assert [e["index"] for e in answer["errors"]] == list(range(MAX_LISTED_ERRORS))  # the first ones
    assert answer["error_count"] == MAX_BATCH_MESSAGES - 1
    assert (answer["accepted"], answer["rejected"]) == (1, MAX_BATCH_MESSAGES - 1)
    assert [e.event.name for e in await events_of(stack, user)] == ["Good"]


# --- 8. CORS ----------------------------------------------------------------------------------

ORIGIN = {"Origin": "https://shop.example"}


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/import", "/v1/track", "/v1/identify", "/v1/group", "/events"])
async def test_preflight_is_answered(stack: Stack, http: aiohttp.ClientSession, path: str) -> None:
    headers = {
        **ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, content-encoding",
    }
    async with http.options(stack.http_url + path, headers=headers) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert {m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")} >= {"POST", "OPTIONS"}
        allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert allowed >= {"authorization", "content-type", "content-encoding"}
        assert int(resp.headers["Access-Control-Max-Age"]) > 0


@pytest.mark.parametrize(
    ("path", "body", "auth", "status"),
    [
        ("/v1/batch", {"batch": [{"type": "track", "anonymousId": "a-1", "event": "Viewed"}]}, True, 200),
        ("/v1/track", {"anonymousId": "a-1"}, True, 400),
        ("/v1/track", {"anonymousId": "a-1", "event": "E"}, False, 401),
        ("/v1/nothing", {}, True, 404),
    ],
)
async def test_every_answer_allows_any_origin(
    stack: Stack, http: aiohttp.ClientSession, path: str, body: dict[str, Any], auth: bool, status: int
) -> None:
    headers = {**ORIGIN, "Content-Type": "text/plain", **(basic(stack.key) if auth else {})}
    async with http.post(stack.http_url + path, data=json.dumps(body), headers=headers) as resp:
        assert resp.status == status
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


# --- Failures that are not the client's -------------------------------------------------------


async def test_a_database_outage_during_the_key_check_is_503(http: aiohttp.ClientSession) -> None:
    # Nothing listens on port 1: every connection the key check makes is refused, as while the
    # database restarts. The client is told to retry (503), as gRPC callers get UNAVAILABLE.
    pool = await asyncpg.create_pool("postgresql://parley@127.0.0.1:1/parley", min_size=0, max_size=1)
    app = build_app(None, KeyVerifier(pool, internal="unused"), 1024 * 1024)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        body = json.dumps({"userId": "u", "event": "E"}).encode()
        status, answer = await post_raw(http, f"http://127.0.0.1:{port}/v1/track", body, basic("pk_some_key"))
        assert (status, answer["code"]) == (503, "unavailable"), answer
    finally:
        await runner.cleanup()
        await pool.close()


async def test_basic_credentials_that_are_not_ascii_are_401(stack: Stack, http: aiohttp.ClientSession) -> None:
    credentials = base64.b64encode(f"{stack.key}:".encode()).decode() + "\u00e9"
    body = json.dumps({"userId": "u", "event": "E"}).encode()
    status, answer = await post_raw(http, f"{stack.http_url}/v1/track", body, {"Authorization": f"Basic {credentials}"})
    assert (status, answer["code"]) == (401, "unauthorized"), answer
    assert "no readable API key" in answer["message"]
