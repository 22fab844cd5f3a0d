"""The messaging service as the chassis runs it: servicers, webhooks listener and background loops."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from parley.messaging.v1 import agent_service_pb2, messaging_service_pb2
from parley.messaging.v1 import agent_service_pb2_grpc as agrpc
from parley.messaging.v1 import messaging_service_pb2_grpc as mgrpc

from services.common.server import Runtime, ServiceModule
from services.messaging import janitor, webhooks
from services.messaging.app import Messaging, Tuning
from services.messaging.dispatcher import Dispatcher
from services.messaging.identity_client import IdentityClient
from services.messaging.identity_stream import IdentityStream
from services.messaging.outbox import OutboxDeliverer
from services.messaging.providers import build_provider
from services.messaging.servicer import AgentServicer, MessagingServicer

NAME = "messaging"


def _app(rt: Runtime, tuning: Tuning) -> Messaging:
    app = rt.state.get("app")
    if app is None:
        app = Messaging(
            settings=rt.settings,
            pool=rt.pool,
            internal_token=rt.internal_token,
            provider=build_provider(rt.settings),
            identity=IdentityClient(rt.settings.identity_addr, rt.internal_token),
            tuning=tuning,
        )
        rt.state["app"] = app
    return app


def build_module(tuning_factory: Callable[[], Tuning] = Tuning) -> ServiceModule:
    """The module; tests pass other tuning (e.g. no background loops, short backoff)."""
    tunings: dict[int, Tuning] = {}

    def tuning_for(rt: Runtime) -> Tuning:
        return tunings.setdefault(id(rt), tuning_factory())

    def register(server: grpc.aio.Server, rt: Runtime) -> Sequence[str]:
        app = _app(rt, tuning_for(rt))
        mgrpc.add_MessagingServiceServicer_to_server(MessagingServicer(app), server)
        agrpc.add_AgentServiceServicer_to_server(AgentServicer(app), server)
        return [
            messaging_service_pb2.DESCRIPTOR.services_by_name["MessagingService"].full_name,
            agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        ]

    async def on_start(rt: Runtime) -> None:
        app = _app(rt, tuning_for(rt))
        tunings.pop(id(rt), None)
        runner, port = await webhooks.serve(
            webhooks.build_app(app, rt.verifier), rt.settings.host, rt.settings.messaging_http_port
        )
        rt.state["http_port"] = port
        dispatcher, outbox, stream = Dispatcher(app), OutboxDeliverer(app), IdentityStream(app)
        rt.state.update(dispatcher=dispatcher, outbox=outbox, identity_stream=stream)
        if app.tuning.background:
            rt.spawn(dispatcher.run(), name="messaging-dispatcher")
            rt.spawn(outbox.run(), name="messaging-outbox")
            rt.spawn(janitor.run(app), name="messaging-retention")
            if app.tuning.consume_identity_stream:
                rt.spawn(stream.run(), name="messaging-identity-stream")

        async def stop() -> None:
            # First, while the provider client is open: stop claiming, and let the batches at the
            # provider be recorded (within the grace), so an accepted message is not sent again.
            await dispatcher.stop()
            await runner.cleanup()
            await app.provider.close()
            await app.identity.close()
            await outbox.close()

        rt.on_stop(stop)

    return ServiceModule(
        name=NAME,
        migrations=Path(__file__).with_name("migrations"),
        register=register,
        on_start=on_start,
        port_setting="messaging_port",
    )


MODULE = build_module()
