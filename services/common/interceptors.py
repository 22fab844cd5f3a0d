"""One server interceptor: request id, authentication, an access-log line, errors mapped to status."""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from services.common import context, tenancy
from services.common.context import Workspace
from services.common.errors import (
    InvalidArgument,
    ParleyError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Violation,
    to_status,
)
from services.common.storable import UNSTORABLE, unstorable_fields
from services.common.tenancy import KeyVerifier

log = structlog.get_logger("parley.access")

# Methods anyone may call: probes and tooling.
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
WORKSPACE_HEADER = "x-parley-workspace"
REQUEST_ID_HEADER = "x-request-id"


def _bearer(metadata: dict[str, str]) -> str:
    value = metadata.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


async def authenticate(
    verifier: KeyVerifier, token: str, workspace_id: str | None
) -> tuple[Workspace | None, bool, str]:
    """(workspace, internal, the key's scope) for a bearer token; UNAUTHENTICATED when it is no valid key."""
    if not token:
        raise Unauthenticated("missing 'authorization: Bearer <API key>' metadata")
    if verifier.is_internal(token):
        workspace = await verifier.workspace_by_id(workspace_id) if workspace_id else None
        return workspace, True, tenancy.FULL
    workspace, scope = await verifier.verify_scoped(token)
    return workspace, False, scope


class _Undecodable:
    """A request message whose bytes did not parse (bad UTF-8 in a string, a truncated field)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, answering ``_Undecodable`` instead of raising: grpc would
    answer INTERNAL, before any handler runs, for what is the caller's bad input."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, and whatever else a parser raises on bad bytes
            return _Undecodable(str(exc))

    return parse


def _decoded(request: Any, check: bool) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument.field("", f"the request is not a valid message: {request.error}")
    if check and isinstance(request, Message):
        # Text and jsonb columns hold no NUL and no NaN or infinite number: refuse them here, naming
        # the field, rather than fail in the database after part of the work.
        bad = list(unstorable_fields(request))
        if bad:
            raise InvalidArgument([Violation(path, UNSTORABLE) for path in bad])
    return request


async def _decoded_stream(requests: AsyncIterator[Any], check: bool) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request, check)


class ChassisInterceptor(grpc.aio.ServerInterceptor):
    """Binds request id and workspace for the call, logs it once, and maps exceptions to status."""

    def __init__(
        self,
        verifier: KeyVerifier,
        *,
        self_checked: frozenset[str] = frozenset(),
        parsers: Mapping[str, Callable[[bytes], Any]] | None = None,
        write_methods: frozenset[str] = frozenset(),
    ) -> None:
        self._verifier = verifier
        self._self_checked = self_checked
        self._write_methods = write_methods
        self._parsers = dict(parsers or {})
        # Shutting down: new calls are answered UNAVAILABLE while those in flight finish (see drain).
        self._draining = False
        self._in_flight = 0
        self._none_in_flight = asyncio.Event()
        self._none_in_flight.set()

    def drain(self) -> None:
        """From now on answer new calls UNAVAILABLE (the caller retries, on another replica). gRPC
        itself, when the server stops, cancels calls it has taken but not yet handed over:
        their callers get CANCELLED, which they do not retry. Refused here first, they cannot
        be among them but for the last instant before the stop."""
        self._draining = True

    async def drained(self) -> None:
        """Return once no call but open-ended streams is in flight."""
        await self._none_in_flight.wait()

    def _admit(self, counted: bool) -> None:
        if self._draining:
            raise Unavailable("the server is shutting down; retry")
        if counted:
            self._in_flight += 1
            self._none_in_flight.clear()

    def _done(self, counted: bool) -> None:
        if counted:
            self._in_flight -= 1
            if not self._in_flight:
                self._none_in_flight.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        deserializer = _lenient(self._parsers.get(method, handler.request_deserializer))
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary, streaming=True),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream, streaming=True),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _enter(self, method: str, ctx: grpc.aio.ServicerContext) -> str:
        metadata = {k: v for k, v in (ctx.invocation_metadata() or ()) if isinstance(v, str)}
        rid = metadata.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        context.bind(None, request=rid)
        structlog.contextvars.bind_contextvars(request_id=rid, method=method)
        ctx.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
        workspace, internal, scope = await authenticate(
            self._verifier, _bearer(metadata), metadata.get(WORKSPACE_HEADER)
        )
        if scope != tenancy.FULL and method not in self._write_methods:
            raise PermissionDenied(
                f"this API key may only send events (a write key); {method} needs a full key of the workspace"
            )
        context.bind(workspace, internal=internal, request=rid, scope=scope)
        if workspace is not None:
            structlog.contextvars.bind_contextvars(workspace_id=workspace.id)
        return rid

    async def _fail(self, ctx: grpc.aio.ServicerContext, exc: BaseException, rid: str, started: float) -> None:
        if not isinstance(exc, ParleyError):
            log.exception("unhandled_error", error_type=type(exc).__name__)
        status = to_status(exc)
        self._access(status.code, started)
        await ctx.abort(
            status.code, status.details, trailing_metadata=(*status.trailing_metadata, (REQUEST_ID_HEADER, rid))
        )

    def _access(self, code: grpc.StatusCode, started: float) -> None:
        log.info("rpc", code=code.name, duration_ms=round((time.perf_counter() - started) * 1000, 2))

    def _wrap_unary(self, method: str, behavior: Callable[..., Any], *, streaming: bool = False) -> Callable[..., Any]:
        check = method not in self._self_checked

        async def wrapper(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            rid = ""
            admitted = False
            with structlog.contextvars.bound_contextvars():
                try:
                    rid = await self._enter(method, ctx)
                    self._admit(counted=True)
                    admitted = True
                    checked = _decoded_stream(request, check) if streaming else _decoded(request, check)
                    response = await behavior(checked, ctx)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await self._fail(ctx, exc, rid, started)
                    return None
                finally:
                    if admitted:
                        self._done(counted=True)
                self._access(grpc.StatusCode.OK, started)
                return response

        return wrapper

    def _wrap_stream(self, method: str, behavior: Callable[..., Any], *, streaming: bool = False) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):
            check = method not in self._self_checked

            async def gen_wrapper(request: Any, ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started = time.perf_counter()
                rid = ""
                with structlog.contextvars.bound_contextvars():
                    try:
                        rid = await self._enter(method, ctx)
                        # Open-ended: not waited for when draining, only refused when new.
                        self._admit(counted=False)
                        checked = _decoded_stream(request, check) if streaming else _decoded(request, check)
                        async for item in behavior(checked, ctx):
                            yield item
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:
                        await self._fail(ctx, exc, rid, started)
                        return
                    self._access(grpc.StatusCode.OK, started)

            return gen_wrapper
        return self._wrap_unary(method, behavior, streaming=streaming)
