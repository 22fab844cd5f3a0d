"""Segment-compatible HTTP ingest (aiohttp): same rules and forwarding path as the gRPC API."""

from __future__ import annotations

import base64
import json
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from itertools import islice
from typing import Any

import grpc
import structlog
from aiohttp import web
from parley.common.v1.event_pb2 import Event, EventResult, EventStatus, FieldViolation

from services.common import context
from services.common.context import Workspace
from services.common.errors import ParleyError, Unauthenticated, Unavailable, Violation, classify
from services.common.server import Runtime
from services.common.tenancy import KeyVerifier
from services.ingest.pipeline import Ingestor, Namer
from services.ingest.segment import from_regal, from_segment, json_field, parse_time

log = structlog.get_logger(__name__)

_CHUNK = 64 * 1024
# The most a body may hold when its API key is not in a header but in the body (``writeKey``):
# Segment's own limit for a batch, so no SDK sends more.
KEYLESS_MAX_BODY_BYTES = 500 * 1024
# JSON bodies; text/plain is what browsers' sendBeacon uses to avoid a CORS preflight.
_CONTENT_TYPES = frozenset({"application/json", "text/plain"})
_SINGLE_KINDS = ("track", "page", "screen", "identify", "alias", "group")
# Messages per /v1/batch body: Segment's documented limit (its SDKs batch up to it). More than one
# RecordEvents call's worth is forwarded in several calls (forward.py).
MAX_BATCH_MESSAGES = 2500
# Violations listed in one answer; the rest are counted (``error_count``). Up to 2,500 messages
# with several violations each would otherwise make the error answer larger than the request.
MAX_LISTED_ERRORS = 100
# CORS: browser SDKs (analytics.js sends with fetch) post from the customer's site. The write
# key travels explicitly (Basic auth or in the body), never in cookies, so any origin may send
# and no credentials mode is needed: "*" is right.
_CORS_HEADERS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "X-Request-Id"}
_PREFLIGHT_HEADERS = {
    **_CORS_HEADERS,
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding",
    "Access-Control-Max-Age": "86400",
}
# Responses by status since start (a Counter), e.g. how many 503s senders were told to retry.
RESPONSES = web.AppKey("responses", Counter)


class HttpError(Exception):
    """An HTTP error answer with a JSON body ``{"success": false, "code": ..., "message": ...}``."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def response(self) -> web.Response:
        body = {"success": False, "code": self.code, "message": self.message, **self.extra}
        return web.json_response(body, status=self.status)


def header_key(request: web.Request) -> str | None:
    """The API key in ``Authorization`` (Basic username or Bearer token); None when no header."""
    value = request.headers.get("Authorization")
    if not value:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8 once decoded
            return ""
        return decoded.partition(":")[0]
    return ""


async def read_body(request: web.Request, limit: int, limit_name: str = "max_http_body_bytes") -> bytes:
    """The body, gunzipped when sent so; 413 as soon as it (compressed or not) passes ``limit``.

    Decompression is bounded chunk by chunk, so a gzip bomb costs at most ``limit`` bytes.
    """
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise HttpError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported; use gzip")
    too_large = HttpError(413, "payload_too_large", f"request body is over {limit} bytes ({limit_name})", limit=limit)
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding in ("gzip", "x-gzip") else None
    out = bytearray()
    received = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        received += len(chunk)
        if received > limit:
            raise too_large
        if inflater is None:
            out += chunk
            continue
        if inflater.eof:
            continue  # trailing bytes after the gzip member are ignored
        try:
            out += inflater.decompress(chunk, limit + 1 - len(out))
        except zlib.error as exc:
            raise HttpError(400, "invalid_gzip", "body is not valid gzip") from exc
        if len(out) > limit or inflater.unconsumed_tail:
            raise too_large
    if inflater is not None and not inflater.eof:
        raise HttpError(400, "invalid_gzip", "gzip body is truncated")
    return bytes(out)


def _namer(prefix: str, rename: Callable[[str], str] = lambda f: f) -> Namer:
    def name(index: int, event: Event, field: str) -> str:
        path = rename(json_field(event, field)) if field else ""
        if prefix == "batch":
            return f"batch[{index}].{path}" if path else f"batch[{index}]"
        return path or "body"

    return name


def _named(namer: Namer, index: int, violations: list[Violation]) -> list[FieldViolation]:
    empty = Event()
    return [FieldViolation(field=namer(index, empty, v.field), description=v.description) for v in violations]


class HttpIngest:
    """Request handlers; every one ends in :meth:`Ingestor.ingest`."""

    def __init__(self, ingestor: Ingestor, verifier: KeyVerifier, max_body_bytes: int) -> None:
        self._ingestor = ingestor
        self._verifier = verifier
        self._max_body = max_body_bytes

    async def _authenticate(self, key: str | None) -> tuple[Workspace, str]:
        """The key's workspace and scope (every scope may send events)."""
        if not key:
            raise HttpError(
                401, "unauthorized", "missing API key: use it as the Basic username, a Bearer token, or writeKey"
            )
        try:
            return await self._verifier.verify_scoped(key)
        except Unauthenticated as exc:
            raise HttpError(401, "unauthorized", exc.message) from exc

    async def _payload(self, request: web.Request) -> tuple[Workspace, dict[str, Any]]:
        key = header_key(request)
        if key == "":
            raise HttpError(
                401,
                "unauthorized",
                "the Authorization header holds no readable API key: send Basic base64(<key>:) or Bearer <key>",
            )
        workspace, scope = await self._authenticate(key) if key is not None else (None, "")
        if request.content_type not in _CONTENT_TYPES:
            raise HttpError(
                415, "unsupported_media_type", f"Content-Type {request.content_type!r}; send application/json"
            )
        # A caller whose key is in the body is unknown until the body is read: it may send at
        # most Segment's batch limit, so strangers cannot make ingest read and decode megabytes.
        if workspace is not None or self._max_body <= KEYLESS_MAX_BODY_BYTES:
            body = await read_body(request, self._max_body)
        else:
            body = await read_body(
                request, KEYLESS_MAX_BODY_BYTES, "with the key only in the body; send it in the Authorization header"
            )
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, "invalid_json", f"body is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise HttpError(400, "invalid_json", "body nests arrays or objects too deeply to read") from exc
        if not isinstance(payload, dict):
            raise HttpError(400, "invalid_json", "body must be a JSON object")
        if workspace is None:
            write_key = payload.get("writeKey")
            workspace, scope = await self._authenticate(write_key if isinstance(write_key, str) else "")
        context.bind(workspace, request=context.request_id(), scope=scope)
        structlog.contextvars.bind_contextvars(workspace_id=workspace.id)
        return workspace, payload

    async def _store(
        self,
        workspace: Workspace,
        events: list[Event | None],
        namer: Namer,
        prior: dict[int, list[FieldViolation]],
    ) -> web.Response:
        results = await self._ingestor.ingest(events, workspace, namer, prior=prior)
        return _answer(results)

    async def batch(self, request: web.Request) -> web.Response:
        workspace, payload = await self._payload(request)
        items = payload.get("batch")
        if not isinstance(items, list) or not items:
            raise HttpError(400, "invalid_batch", "batch must be a non-empty array of messages", field="batch")
        if len(items) > MAX_BATCH_MESSAGES:
            # Before any per-item work: a body of tiny items would otherwise cost seconds of CPU.
            raise HttpError(
                400,
                "invalid_batch",
                f"batch has {len(items)} messages; the limit is {MAX_BATCH_MESSAGES} per request",
                field="batch",
                limit=MAX_BATCH_MESSAGES,
            )
        ctx = payload.get("context") if isinstance(payload.get("context"), dict) else None
        integrations = payload.get("integrations") if isinstance(payload.get("integrations"), dict) else None
        sent_at = None
        raw_sent = payload.get("sentAt")
        if isinstance(raw_sent, str) and raw_sent:
            try:
                sent_at = parse_time(raw_sent)
            except (ValueError, OverflowError) as exc:
                raise HttpError(400, "invalid_batch", "sentAt is not an ISO-8601 time", field="sentAt") from exc
        namer = _namer("batch")
        events: list[Event | None] = []
        prior: dict[int, list[FieldViolation]] = {}
        for index, item in enumerate(items):
            event, violations = from_segment(
                item, batch_context=ctx, batch_integrations=integrations, batch_sent_at=sent_at
            )
            events.append(event)
            if violations:
                prior[index] = _named(namer, index, violations)
        return await self._store(workspace, events, namer, prior)

    def single(self, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            workspace, payload = await self._payload(request)
            namer = _namer("")
            event, violations = from_segment(payload, kind=kind)
            return await self._store(workspace, [event], namer, {0: _named(namer, 0, violations)} if violations else {})

        return handle

    async def regal(self, request: web.Request) -> web.Response:
        workspace, payload = await self._payload(request)
        namer = _namer("", lambda f: "name" if f == "event" else f)
        event, violations = from_regal(payload)
        return await self._store(workspace, [event], namer, {0: _named(namer, 0, violations)} if violations else {})


def _answer(results: list[EventResult]) -> web.Response:
    rejected = [r for r in results if r.status == EventStatus.EVENT_STATUS_REJECTED]
    if not rejected:
        return web.json_response({"success": True})
    error_count = sum(len(r.violations) for r in rejected)
    errors = [
        {"index": r.index, "messageId": r.message_id, "field": v.field, "description": v.description}
        for r, v in islice(((r, v) for r in rejected for v in r.violations), MAX_LISTED_ERRORS)
    ]
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
    for r in results:
        if r.status == EventStatus.EVENT_STATUS_ACCEPTED:
            counts["accepted"] += 1
        elif r.status == EventStatus.EVENT_STATUS_DUPLICATE:
            counts["duplicate"] += 1
        else:
            counts["rejected"] += 1
    message = f"{counts['rejected']} of {len(results)} events rejected"
    if counts["rejected"] < len(results):
        message += "; the others were stored"
    return HttpError(400, "invalid_events", message, errors=errors, error_count=error_count, **counts).response()


@web.middleware
async def _cors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every answer, errors and aiohttp's own (404, 405) included, may be read by a browser page."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(_CORS_HEADERS)
        raise
    response.headers.update(_CORS_HEADERS)
    return response


async def _preflight(request: web.Request) -> web.Response:
    """A browser's CORS preflight (its JSON posts with a write key are not "simple" requests)."""
    return web.Response(status=204, headers=_PREFLIGHT_HEADERS)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    started = time.perf_counter()
    context.bind(None, request=rid)
    with structlog.contextvars.bound_contextvars(request_id=rid, path=request.path):
        try:
            response = await handler(request)
        except HttpError as exc:
            response = exc.response()
        except Unavailable as exc:
            response = HttpError(503, "unavailable", exc.message).response()
        except ParleyError as exc:
            log.error("http_ingest_failed", error=exc.message)
            response = HttpError(500, "internal", exc.message).response()
        except web.HTTPException:
            raise
        except Exception as exc:
            code, message = classify(exc)
            if code == grpc.StatusCode.UNAVAILABLE:
                # The database restarting or failing over (the key check reads it): a retry will do,
                # as the gRPC API says with UNAVAILABLE.
                log.warning("http_unavailable", error=repr(exc))
                response = HttpError(503, "unavailable", message).response()
            else:
                log.exception("http_unhandled_error")
                response = HttpError(500, "internal", "internal error").response()
        response.headers["X-Request-Id"] = rid
        request.app[RESPONSES][response.status] += 1
        log.info("http", status=response.status, duration_ms=round((time.perf_counter() - started) * 1000, 2))
        return response


def build_app(ingestor: Ingestor, verifier: KeyVerifier, max_body_bytes: int) -> web.Application:
    """The aiohttp application: Segment's ``/v1/*`` endpoints and Regal's ``/events``."""
    handlers = HttpIngest(ingestor, verifier, max_body_bytes)
    app = web.Application(middlewares=[_cors, _errors])
    app[RESPONSES] = Counter()
    routes: list[tuple[str, Callable[[web.Request], Awaitable[web.Response]]]] = [
        ("/v1/batch", handlers.batch),
        ("/v1/import", handlers.batch),
        # The short paths Segment's current SDKs post to: analytics.js one event at a time to
        # /v1/<first letter of the type>, its batching mode and the mobile SDKs to /v1/b.
        ("/v1/b", handlers.batch),
        *((f"/v1/{kind}", handlers.single(kind)) for kind in _SINGLE_KINDS),
        *((f"/v1/{kind[0]}", handlers.single(kind)) for kind in _SINGLE_KINDS),
        ("/events", handlers.regal),
    ]
    for path, handler in routes:
        app.router.add_post(path, handler)
        app.router.add_route("OPTIONS", path, _preflight)
    return app


async def start(rt: Runtime, ingestor: Ingestor) -> None:
    """Listen on ``ingest_http_port`` (0: ephemeral); the bound port goes to ``rt.state["http_port"]``."""
    app = build_app(ingestor, rt.verifier, rt.settings.max_http_body_bytes)
    # Bodies are inflated by read_body, bounded; aiohttp's own inflation has no such bound.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, rt.settings.host, rt.settings.ingest_http_port)
    await site.start()
    rt.state["http_port"] = int(runner.addresses[0][1])
    rt.state["http_responses"] = app[RESPONSES]
    rt.on_stop(runner.cleanup)
