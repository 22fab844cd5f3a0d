"""Per-call context: the caller's workspace, whether the caller is a Parley service, the request id."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from services.common.errors import Unauthenticated


@dataclass(frozen=True)
class Workspace:
    """A tenant. Every row and every call belongs to exactly one."""

    id: str
    name: str
    default_region: str = "US"


_workspace: contextvars.ContextVar[Workspace | None] = contextvars.ContextVar("workspace", default=None)
_internal: contextvars.ContextVar[bool] = contextvars.ContextVar("internal", default=False)
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# The calling key's scope (``tenancy.FULL`` or ``tenancy.WRITE``); internal calls are full.
_scope: contextvars.ContextVar[str] = contextvars.ContextVar("scope", default="full")


def current_workspace() -> Workspace:
    """The workspace this call runs in; UNAUTHENTICATED when there is none."""
    ws = _workspace.get()
    if ws is None:
        raise Unauthenticated("this call needs a workspace")
    return ws


def workspace_or_none() -> Workspace | None:
    """The call's workspace, or None for an internal call spanning all workspaces."""
    return _workspace.get()


def is_internal() -> bool:
    """True when the caller presented the internal service token."""
    return _internal.get()


def request_id() -> str:
    return _request_id.get()


def key_scope() -> str:
    """The calling key's scope: ``"full"``, or ``"write"`` for a key that may only send events."""
    return _scope.get()


def bind(
    workspace: Workspace | None, *, internal: bool = False, request: str | None = None, scope: str = "full"
) -> None:
    """Set the context for the current task (the interceptor and HTTP handlers call this)."""
    _workspace.set(workspace)
    _internal.set(internal)
    _scope.set(scope)
    if request is not None:
        _request_id.set(request)
