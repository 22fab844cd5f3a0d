"""A local stand-in for Twilio's Messages API: answers as Twilio does, can fail on cue, can call back."""

from __future__ import annotations

import asyncio
import base64
import itertools
import signal
import sys
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from twilio.request_validator import RequestValidator

ACCOUNT_SID = "AC" + "0" * 32
AUTH_TOKEN = "standin-auth-token"


@dataclass
class Received:
    sid: str
    to: str
    body: str
    status_callback: str
    form: dict[str, str]


@dataclass
class TwilioStandIn:
    """``script`` holds forced answers (HTTP status codes, 0 = hang) for the next requests; empty = 201."""

    account_sid: str = ACCOUNT_SID
    auth_token: str = AUTH_TOKEN
    script: deque[int] = field(default_factory=deque)
    # Numbers Twilio would refuse with 400 / 21211.
    invalid_numbers: set[str] = field(default_factory=set)
    received: list[Received] = field(default_factory=list)
    attempts: int = 0
    # When set, each accepted message gets a signed "delivered" callback to this base URL
    # (the messaging HTTP listener), signed for the public URL it was given.
    callback_base: str | None = None
    public_base: str = ""
    # The statuses each message reports, posted in this order by one sender (Twilio sends no
    # callback for the initial "queued"; it reports "sent", then "delivered" or "undelivered").
    callback_statuses: tuple[str, ...] = ("delivered",)
    callbacks_on: bool = True
    # When given, an accepted message is recorded at once but answered only once this is set:
    # a provider that has taken the message and not yet said so.
    answer_gate: asyncio.Event | None = None
    # Callbacks in flight at once, over keep-alive connections (Twilio's webhook senders are a
    # bounded pool too); the rest wait their turn in order.
    callback_concurrency: int = 64
    port: int = 0
    _runner: web.AppRunner | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _callbacks: asyncio.Queue[tuple[str, dict[str, str]]] | None = None
    _senders: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def to(self, phone: str) -> list[Received]:
        return [r for r in self.received if r.to == phone]

    async def start(self) -> TwilioStandIn:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._create)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        for task in self._senders:
            task.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    def _error(self, status: int, code: int, message: str) -> web.Response:
        return web.json_response(
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
            status=status,
        )

    async def _create(self, request: web.Request) -> web.Response:
        self.attempts += 1
        expected = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if request.headers.get("Authorization") != expected or request.match_info["sid"] != self.account_sid:
            return self._error(401, 20003, "Authenticate")
        form = {k: str(v) for k, v in (await request.post()).items()}
        if self.script:
            forced = self.script.popleft()
            if forced == 0:  # hang past the client's timeout, then fail without sending
                await asyncio.sleep(2.0)
                return self._error(503, 20503, "Service Unavailable")
            if forced == 429:
                resp = self._error(429, 20429, "Too Many Requests")
                resp.headers["Retry-After"] = "0"
                return resp
            if forced >= 500:
                return self._error(forced, 20500, "Internal Server Error")
            if forced >= 400:
                return self._error(forced, 21211, "The 'To' number is not a valid phone number.")
        to, body = form.get("To", ""), form.get("Body", "")
        if not to or not body or not (form.get("From") or form.get("MessagingServiceSid")):
            return self._error(400, 21604, "A 'To' phone number is required.")
        if to in self.invalid_numbers:
            return self._error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        sid = f"SM{next(self._ids):032x}"
        self.received.append(Received(sid, to, body, form.get("StatusCallback", ""), form))
        if self.callback_base and self.callbacks_on and form.get("StatusCallback"):
            self._queue_callback(sid, form)
        if self.answer_gate is not None:
            await self.answer_gate.wait()
        return web.json_response(
            {
                "sid": sid,
                "account_sid": self.account_sid,
                "to": to,
                "from": form.get("From"),
                "body": body,
                "status": "queued",
                "num_segments": "1",
                "error_code": None,
                "error_message": None,
                "api_version": "2010-04-01",
            },
            status=201,
        )

    def _queue_callback(self, sid: str, form: dict[str, str]) -> None:
        if self._callbacks is None:
            self._callbacks = asyncio.Queue()
            self._senders = [asyncio.create_task(self._send_callbacks()) for _ in range(self.callback_concurrency)]
        self._callbacks.put_nowait((sid, form))

    async def _send_callbacks(self) -> None:
        """One of the bounded pool of senders: a keep-alive connection per listener, one request at a time."""
        assert self._callbacks is not None
        connections: dict[tuple[str, int], _Connection] = {}
        try:
            while True:
                sid, form = await self._callbacks.get()
                for status in self.callback_statuses:
                    await self._callback(sid, status, form, connections)
        finally:
            for conn in connections.values():
                conn.close()

    async def _callback(
        self, sid: str, status: str, form: dict[str, str], connections: dict[tuple[str, int], _Connection]
    ) -> None:
        public = form["StatusCallback"]
        # Several bases (comma-separated) are used in turn, like a load balancer over replicas.
        bases = (self.callback_base or "").split(",")
        base = bases[next(self._turn) % len(bases)]
        local = urlsplit(base.rstrip("/") + public[len(self.public_base.rstrip("/")) :])
        params = {
            "MessageSid": sid,
            "SmsSid": sid,
            "AccountSid": self.account_sid,
            "MessageStatus": status,
            "SmsStatus": status,
            "To": form["To"],
            "From": form.get("From", ""),
            "ApiVersion": "2010-04-01",
        }
        signature = RequestValidator(self.auth_token).compute_signature(public, params)
        body = urlencode(params).encode()
        # What Twilio sends: a form-encoded POST, signed for the public URL, with its idempotency token.
        request = (
            f"POST {local.path}{'?' + local.query if local.query else ''} HTTP/1.1\r\n"
            f"Host: {local.netloc}\r\n"
            "User-Agent: TwilioProxy/1.1\r\n"
            "Content-Type: application/x-www-form-urlencoded; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"X-Twilio-Signature: {signature}\r\n"
            f"I-Twilio-Idempotency-Token: tok-{sid}-{status}\r\n\r\n"
        ).encode() + body
        target = (local.hostname or "127.0.0.1", local.port or 80)
        for _ in range(5):
            conn = connections.get(target)
            try:
                if conn is None:
                    conn = connections[target] = await _Connection.open(*target)
                status = await conn.request(request)
                if status < 500:
                    return
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status = 0
            if conn is not None and (status == 0 or not conn.alive):
                conn.close()
                connections.pop(target, None)
            await asyncio.sleep(0.2)


class _Connection:
    """A keep-alive HTTP/1.1 client connection for callbacks, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.alive = True

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def request(self, raw: bytes) -> int:
        """Send one request; the response's status (its body read and dropped)."""
        self.writer.write(raw)
        status_line = await self.reader.readline()
        if not status_line:
            raise asyncio.IncompleteReadError(b"", None)
        status = int(status_line.split()[1])
        length, chunked = None, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value == b"chunked"
            elif name == b"connection" and value == b"close":
                self.alive = False
        if chunked:
            while (size := int((await self.reader.readline()).split(b";")[0], 16)) > 0:
                await self.reader.readexactly(size + 2)
            await self.reader.readline()
        elif length is not None:
            await self.reader.readexactly(length)
        else:
            await self.reader.read()
            self.alive = False
        return status

    def close(self) -> None:
        self.writer.close()


async def _serve(port: int, callback_base: str | None, public_base: str, statuses: tuple[str, ...]) -> None:
    standin = TwilioStandIn(callback_base=callback_base, public_base=public_base, port=port, callback_statuses=statuses)
    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", standin._create)
    app.router.add_get("/count", lambda _: _count(standin))
    app.router.add_post("/control", lambda request: _control(standin, request))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"standin listening on {port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    # A clean exit on SIGTERM, so a profiler wrapping this process writes its stats.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await standin.stop()
    await runner.cleanup()


async def _control(standin: TwilioStandIn, request: web.Request) -> web.Response:
    """Switch delivery callbacks on or off (``{"callbacks": true}``)."""
    body = await request.json()
    standin.callbacks_on = bool(body.get("callbacks", True))
    return web.json_response({"callbacks": standin.callbacks_on})


async def _count(standin: TwilioStandIn) -> web.Response:
    return web.json_response(
        {
            "received": len(standin.received),
            "distinct": len({r.form.get("Body", "") for r in standin.received}),
            "attempts": standin.attempts,
        }
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the Twilio stand-in as its own process (benchmarks).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--callback-base", default=None, help="where to post signed status callbacks")
    parser.add_argument("--public-base", default="", help="the public URL prefix the callbacks are signed for")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--callback-statuses", default="delivered", help="statuses each message reports, in order")
    args = parser.parse_args()
    serve = _serve(args.port, args.callback_base, args.public_base, tuple(args.callback_statuses.split(",")))
    if args.event_loop == "uvloop":
        import uvloop

        uvloop.run(serve)
    else:
        asyncio.run(serve)
