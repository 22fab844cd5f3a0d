"""A tiny service on the real chassis, for testing the chassis itself (auth, errors, shutdown)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc

from services.common.context import is_internal, workspace_or_none
from services.common.errors import InvalidArgument, Violation
from services.common.server import Runtime, ServiceModule, main

METHOD = "/parley.test.v1.ProbeService/Probe"


async def probe(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Echo the caller's workspace; misbehave on demand."""
    command = request.decode()
    if command == "invalid":
        raise InvalidArgument([Violation("event.name", "required"), Violation("event.phone", "not a phone")])
    if command == "boom":
        raise RuntimeError("secret internals: password=hunter2")
    if command.startswith("sleep:"):
        await asyncio.sleep(float(command.split(":", 1)[1]))
    ws = workspace_or_none()
    return f"{ws.id if ws else '-'}|{'internal' if is_internal() else 'key'}".encode()


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    handler = grpc.method_handlers_generic_handler(
        "parley.test.v1.ProbeService", {"Probe": grpc.unary_unary_rpc_method_handler(probe)}
    )
    server.add_generic_rpc_handlers((handler,))
    return []


MODULE = ServiceModule(name="probe", migrations=Path(__file__).with_name("no_migrations"), register=register)

if __name__ == "__main__":
    main(MODULE)
