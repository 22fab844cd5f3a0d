"""What Segment's current SDKs send: analytics.js's short paths and mobile SDKs' /v1/b batches."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from parley.common.v1.event_pb2 import EventType

from tests.ingest.conftest import Stack
from tests.ingest.test_http import events_of, uid


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def send(http: aiohttp.ClientSession, url: str, body: dict[str, Any], *, gzipped: bool = False) -> int:
    # As analytics.js sends: text/plain (no preflight needed), the write key in the body.
    data = json.dumps(body).encode()
    headers = {"Content-Type": "text/plain"}
    if gzipped:
        data, headers["Content-Encoding"] = gzip.compress(data), "gzip"
    async with http.post(url, data=data, headers=headers) as resp:
        return resp.status


@pytest.mark.parametrize(
    ("path", "message", "kind"),
    [
        ("/v1/t", {"type": "track", "event": "Clicked"}, EventType.EVENT_TYPE_TRACK),
        ("/v1/p", {"type": "page", "name": "Home"}, EventType.EVENT_TYPE_PAGE),
        ("/v1/s", {"type": "screen", "name": "Welcome"}, EventType.EVENT_TYPE_SCREEN),
        ("/v1/i", {"type": "identify", "traits": {"plan": "pro"}}, EventType.EVENT_TYPE_IDENTIFY),
        ("/v1/g", {"type": "group", "groupId": "acme"}, EventType.EVENT_TYPE_GROUP),
        ("/v1/a", {"type": "alias", "previousId": "anon-1"}, EventType.EVENT_TYPE_ALIAS),
    ],
)
async def test_analytics_js_short_paths_store_their_event(
    stack: Stack, http: aiohttp.ClientSession, path: str, message: dict[str, Any], kind: int
) -> None:
    user = uid()
    status = await send(http, stack.http_url + path, {**message, "userId": user, "writeKey": stack.key})
    assert status == 200
    assert [e.event.type for e in await events_of(stack, user)] == [kind]


async def test_mobile_batches_to_v1_b_are_stored(stack: Stack, http: aiohttp.ClientSession) -> None:
    user = uid()
    batch = [
        {"type": "screen", "name": "Welcome", "category": "Onboarding", "userId": user, "properties": {"step": 1}},
        {"type": "track", "event": "Signed Up", "userId": user},
    ]
    status = await send(http, stack.http_url + "/v1/b", {"batch": batch, "writeKey": stack.key}, gzipped=True)
    assert status == 200
    stored = {e.event.type: e.event for e in await events_of(stack, user)}
    assert set(stored) == {EventType.EVENT_TYPE_SCREEN, EventType.EVENT_TYPE_TRACK}
    # A screen's category comes at the top level, as a page's does: kept in its properties.
    assert dict(stored[EventType.EVENT_TYPE_SCREEN].properties) == {"step": 1.0, "category": "Onboarding"}
