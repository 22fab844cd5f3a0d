"""The webhook HTTP server: Twilio status callbacks and inbound SMS, each verified by its signature."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

import structlog
from aiohttp import web
from twilio.request_validator import RequestValidator

from services.common import context
from services.common.context import Workspace
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.tenancy import KeyVerifier
from services.messaging import inbound
from services.messaging.app import Messaging

log = structlog.get_logger(__name__)

STATUS_PATH = "/twilio/status/{workspace_id}"
INBOUND_PATH = "/twilio/inbound/{workspace_id}"
# How long a webhook listener trusts a workspace it looked up (the verifier caches it longer).
WORKSPACE_CACHE_SECONDS = 5.0
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'

Handler = Callable[[Messaging, Workspace, Mapping[str, str], str], Awaitable[str]]


def signed(validator: RequestValidator, url: str, params: dict[str, str], signature: str) -> bool:
    """Twilio's signature check: first for the URL exactly as configured (what Twilio signs), then
    ``validate``'s own variants of it (with and without an explicit port) — the same requests pass,
    most of them after one HMAC instead of two."""
    if hmac.compare_digest(validator.compute_signature(url, params).encode(), signature.encode()):
        return True
    return bool(validator.validate(url, params, signature))


def build_app(app: Messaging, verifier: KeyVerifier) -> web.Application:
    """The aiohttp application; the routes carry the workspace id Parley gave the provider."""
    validator = RequestValidator(app.settings.twilio_auth_token) if app.settings.twilio_auth_token else None

    async def verified_form(request: web.Request) -> dict[str, str]:
        form = await request.post()
        params = {k: str(v) for k, v in form.items()}
        signature = request.headers.get("X-Twilio-Signature", "")
        # Twilio signs the URL it called, which is the public one, not our bind address.
        url = app.settings.public_base_url.rstrip("/") + request.path_qs
        if validator is None or not signature or not signed(validator, url, params, signature):
            log.warning("webhook_bad_signature", path=request.path, signed=bool(signature))
            raise web.HTTPForbidden(text="invalid signature")
        expected_account = app.settings.twilio_account_sid
        if expected_account and params.get("AccountSid") and params["AccountSid"] != expected_account:
            raise web.HTTPForbidden(text="unknown account")
        # Text columns cannot hold NUL, and a body is whatever the sender's phone sent: keep the
        # message with each NUL shown as U+FFFD rather than fail the webhook (the provider retries it).
        return {k: v.replace("\x00", "\ufffd") if "\x00" in v else v for k, v in params.items()}

    # Workspaces seen lately, and lookups in flight: a burst of callbacks for a workspace not
    # cached yet waits on one query instead of each sending its own.
    recent: dict[str, tuple[float, Workspace]] = {}
    lookups: dict[str, asyncio.Future[Workspace]] = {}

    async def lookup(raw: str) -> Workspace:
        uuid.UUID(raw)
        ws = await verifier.workspace_by_id(raw)
        recent[raw] = (time.monotonic() + WORKSPACE_CACHE_SECONDS, ws)
        return ws

    def forget(raw: str, done: asyncio.Future[Workspace]) -> None:
        lookups.pop(raw, None)
        if not done.cancelled():
            done.exception()  # retrieved here too, in case every waiter went away

    async def workspace(request: web.Request) -> Workspace:
        raw = request.match_info["workspace_id"]
        hit = recent.get(raw)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        pending = lookups.get(raw)
        if pending is None:
            pending = lookups[raw] = asyncio.ensure_future(lookup(raw))
            pending.add_done_callback(lambda done, key=raw: forget(key, done))
        try:
            return await asyncio.shield(pending)
        except (ValueError, Unauthenticated) as exc:
            raise web.HTTPNotFound(text="unknown workspace") from exc

    def endpoint(handler: Handler, twiml: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            params = await verified_form(request)
            ws = await workspace(request)
            context.bind(ws, request=request.headers.get("I-Twilio-Idempotency-Token") or uuid.uuid4().hex)
            token = request.headers.get("I-Twilio-Idempotency-Token", "")
            with structlog.contextvars.bound_contextvars(workspace_id=ws.id, path=request.path):
                try:
                    outcome = await handler(app, ws, params, token)
                except InvalidArgument as exc:
                    raise web.HTTPBadRequest(text=exc.message) from exc
                log.info("webhook", outcome=outcome)
            if twiml:
                return web.Response(text=EMPTY_TWIML, content_type="text/xml")
            return web.Response(text="", status=200)

        return handle

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    http = web.Application(client_max_size=1024 * 1024)
    http.router.add_post(STATUS_PATH, endpoint(inbound.status_callback, twiml=False))
    http.router.add_post(INBOUND_PATH, endpoint(inbound.receive_sms, twiml=True))
    http.router.add_get("/healthz", health)
    return http


async def serve(http: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start listening; returns the runner (for shutdown) and the bound port (port 0 picks one)."""
    runner = web.AppRunner(http, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    bound = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    return runner, bound
