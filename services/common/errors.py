"""Domain errors that carry their gRPC status, and their mapping to ``google.rpc`` details."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class Violation:
    """One bad field: its path (``events[3].traits.phone``) and what is wrong with it."""

    field: str
    description: str


class ParleyError(Exception):
    """Base of errors a handler raises on purpose; ``code`` is the status the caller gets."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = ""

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__


class InvalidArgument(ParleyError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Iterable[Violation] = (), message: str = "") -> None:
        self.violations: list[Violation] = list(violations)
        if not message:
            message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message or "invalid argument")

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls([Violation(field, description)])


class NotFound(ParleyError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ParleyError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ParleyError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ParleyError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ParleyError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ParleyError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ParleyError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Aborted(ParleyError):
    code = grpc.StatusCode.ABORTED


# SQLSTATE classes a handler may let escape; anything else is INTERNAL.
_DB_ERRORS: Sequence[tuple[type[BaseException], grpc.StatusCode, str]] = (
    (asyncpg.UniqueViolationError, grpc.StatusCode.ALREADY_EXISTS, "already exists"),
    (asyncpg.ForeignKeyViolationError, grpc.StatusCode.FAILED_PRECONDITION, "refers to a missing row"),
    (asyncpg.SerializationError, grpc.StatusCode.ABORTED, "concurrent update; retry"),
    (asyncpg.DeadlockDetectedError, grpc.StatusCode.ABORTED, "concurrent update; retry"),
    (asyncpg.CannotConnectNowError, grpc.StatusCode.UNAVAILABLE, "database unavailable"),
    (asyncpg.TooManyConnectionsError, grpc.StatusCode.UNAVAILABLE, "database unavailable"),
    # The connection ended under the call (the server restarting or failing over, the backend
    # terminated): the transaction did not commit, or did without an answer; either way a retry
    # is safe where writes are idempotent, and the caller must be told to make one.
    (asyncpg.PostgresConnectionError, grpc.StatusCode.UNAVAILABLE, "database connection lost; retry"),
    (asyncpg.AdminShutdownError, grpc.StatusCode.UNAVAILABLE, "database unavailable"),
    (asyncpg.CrashShutdownError, grpc.StatusCode.UNAVAILABLE, "database unavailable"),
    (OSError, grpc.StatusCode.UNAVAILABLE, "database unavailable"),
)


def _connection_closed(exc: BaseException) -> bool:
    # asyncpg raises a plain InterfaceError for an operation on a connection already closed, or
    # on one it released back to its pool when the server connection was lost.
    text = str(exc)
    return isinstance(exc, asyncpg.InterfaceError) and ("closed" in text or "released back to the pool" in text)


def classify(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the message a caller may see for ``exc`` (INTERNAL for a bug)."""
    if isinstance(exc, ParleyError):
        return exc.code, exc.message
    for kind, mapped, text in _DB_ERRORS:
        if isinstance(exc, kind):
            return mapped, text
    if _connection_closed(exc):
        return grpc.StatusCode.UNAVAILABLE, "database connection lost; retry"
    return grpc.StatusCode.INTERNAL, "internal error"


def to_status(exc: BaseException) -> grpc.Status:
    """The status (with ``google.rpc`` details) a caller gets for ``exc``; never leaks internals."""
    code, message = classify(exc)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if isinstance(exc, InvalidArgument) and exc.violations:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in exc.violations
                ]
            )
        )
        status.details.append(detail)
    if isinstance(exc, ParleyError) and exc.reason:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain="parley"))
        status.details.append(detail)
    return rpc_status.to_status(status)


def _details(err: grpc.aio.AioRpcError | grpc.RpcError) -> list[any_pb2.Any]:
    metadata = err.trailing_metadata() or ()
    for key, value in metadata:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            return list(status.details)
    return []


def violations_of(err: grpc.aio.AioRpcError | grpc.RpcError) -> list[Violation]:
    """The BadRequest field violations a failed call carries (client and test side)."""
    out: list[Violation] = []
    for detail in _details(err):
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend(Violation(v.field, v.description) for v in bad.field_violations)
    return out


def error_reason(err: grpc.aio.AioRpcError | grpc.RpcError) -> str:
    """The ErrorInfo reason a failed call carries, or ''."""
    for detail in _details(err):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


async def field_violations(err: grpc.aio.AioRpcError | grpc.RpcError) -> list[Violation]:
    """Awaitable form of :func:`violations_of`, for async callers."""
    return violations_of(err)
