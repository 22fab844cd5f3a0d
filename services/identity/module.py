"""The identity service as the chassis runs it: servicer, and the commit listener that wakes subscribers."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import grpc
from parley.identity.v1 import identity_service_pb2
from parley.identity.v1.identity_service_pb2_grpc import add_IdentityServiceServicer_to_server

from services.common.server import Runtime, ServiceModule
from services.identity.connections import HeldConnections
from services.identity.servicer import EVENT_BYTES_ADDED, IdentityServicer
from services.identity.stream import EventHub, listen


def register(server: grpc.aio.Server, rt: Runtime) -> Sequence[str]:
    hub = EventHub()
    # Up to half the pool serves reads on held connections; the rest is for RecordEvents.
    reads = HeldConnections(rt.pool, rt.settings.db_pool_max // 2)
    rt.state["event_hub"], rt.state["held_connections"] = hub, reads
    add_IdentityServiceServicer_to_server(
        IdentityServicer(rt.pool, reads, hub, max_event_bytes=rt.settings.max_event_bytes + EVENT_BYTES_ADDED), server
    )
    return [identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name]


async def on_start(rt: Runtime) -> None:
    reads: HeldConnections = rt.state["held_connections"]
    await reads.start()
    rt.on_stop(reads.stop)
    # What exists after start-up (modules, descriptors, settings) lives as long as the process;
    # frozen, full collections skip it and stay short on the lookup path
    # (https://docs.python.org/3/library/gc.html#gc.freeze).
    gc.collect()
    gc.freeze()
    rt.spawn(listen(rt.database_url, rt.state["event_hub"]), name="identity-event-listener")


MODULE = ServiceModule(
    name="identity",
    migrations=Path(__file__).with_name("migrations"),
    register=register,
    on_start=on_start,
    port_setting="identity_port",
    # Checks its events itself, naming each (servicer._check_batch); a whole-request walk would
    # cost the write path, whose events ingest has already checked.
    self_checked=frozenset({"/parley.identity.v1.IdentityService/RecordEvents"}),
)
