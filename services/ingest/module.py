"""The ingest service as the chassis runs it: gRPC servicer, identity client, HTTP listener."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
from parley.identity.v1.identity_service_pb2_grpc import IdentityServiceStub
from parley.ingest.v1 import ingest_service_pb2
from parley.ingest.v1.ingest_service_pb2_grpc import add_IngestServiceServicer_to_server

from services.common.clients import channel
from services.common.server import Runtime, ServiceModule
from services.ingest import http
from services.ingest.forward import Forwarder
from services.ingest.normalize import Limits
from services.ingest.pipeline import Ingestor
from services.ingest.salvage import parser
from services.ingest.servicer import IngestServicer


def register(server: grpc.aio.Server, rt: Runtime) -> Sequence[str]:
    identity = channel(rt.settings.identity_addr)

    async def close_identity() -> None:
        await identity.close()

    rt.on_stop(close_identity)
    forwarder = Forwarder(IdentityServiceStub(identity), rt.internal_token, max_in_flight=rt.settings.forward_in_flight)
    ingestor = Ingestor(forwarder, Limits(max_event_bytes=rt.settings.max_event_bytes))
    rt.state["ingestor"] = ingestor
    rt.state["forwarder"] = forwarder
    add_IngestServiceServicer_to_server(IngestServicer(ingestor, rt.settings.max_batch_bytes), server)
    return [ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name]


async def on_start(rt: Runtime) -> None:
    await http.start(rt, rt.state["ingestor"])


EVENT_METHODS = frozenset(
    f"/parley.ingest.v1.IngestService/{name}"
    for name in ("Track", "Page", "Screen", "Identify", "IngestBatch", "IngestStream")
)

MODULE = ServiceModule(
    name="ingest",
    migrations=Path(__file__).with_name("migrations"),
    register=register,
    on_start=on_start,
    port_setting="ingest_port",
    # Every event RPC: a bad event is rejected alone, naming its field, the others stored (normalize.py).
    self_checked=EVENT_METHODS,
    # They are all a write key (one a website or app embeds) may call.
    write_methods=EVENT_METHODS,
    # An event that does not parse at all (a string that is not UTF-8) too, and a request over
    # the batch limit is not parsed at all (salvage.py).
    request_parsers=lambda settings: {
        f"/parley.ingest.v1.IngestService/{name}": parser(
            getattr(ingest_service_pb2, f"{name}Request"), field, settings.max_batch_bytes
        )
        for name, field in (
            ("Track", "event"),
            ("Page", "event"),
            ("Screen", "event"),
            ("Identify", "event"),
            ("IngestBatch", "events"),
            ("IngestStream", "events"),
        )
    },
)
