"""The campaign service as the chassis runs it: servicer, event consumer and timer loop."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from parley.campaign.v1 import campaign_service_pb2, campaign_service_pb2_grpc
from parley.identity.v1 import identity_service_pb2 as id_pb

from services.campaign.clock import Clock, SystemClock
from services.campaign.effects import Effects, GrpcEffects
from services.campaign.engine import NOTIFY_CHANNEL, Engine
from services.campaign.servicer import CampaignServicer
from services.common.server import Runtime, ServiceModule

# How often each replica polls for due timers when nothing wakes it (NOTIFY does, sooner).
POLL_SECONDS = 0.25
TIMER_WORKERS = 4
# Runners of fresh enrollments: each takes everything the consumer committed meanwhile.
FRESH_RUNNERS = 4


def open_runs_budget(db_pool_max: int) -> int:
    """How many timer batches and fresh runs may hold a connection (and their row locks) at once.

    The pool budget: one connection for the NOTIFY listener, one for the consumer's advisory
    lock, at least one for the consumer's batches and the API; the rest (at least one) for open
    runs. A run reads only on its own connection and never waits for a second one while it
    holds its rows, so it always finishes and releases them: whoever waits on those rows (the
    consumer's exits, Pause, Archive) waits for a run that needs nothing more. Even a pool of
    4 or 5 cannot deadlock; a small pool only queues work.
    """
    return max(1, db_pool_max - 3)


def make_module(
    *, clock: Clock | None = None, run_timers: bool = True, consume: bool = True, effects: Effects | None = None
) -> ServiceModule:
    """The module; tests pass a manual clock and run timers themselves with ``engine.run_due()``."""
    engine_clock = clock or SystemClock()

    def register(server: grpc.aio.Server, rt: Runtime) -> Sequence[str]:
        fx = effects or GrpcEffects(rt.settings, rt.internal_token)
        # A replica that runs timers also runs the first steps of what its consumer enrolls,
        # right after the commit; tests driving time by hand run everything through run_due.
        engine = Engine(
            rt.pool,
            fx,
            engine_clock,
            run_fresh=run_timers,
            max_open_runs=open_runs_budget(rt.settings.db_pool_max),
        )
        rt.state["engine"] = engine
        rt.state["effects"] = fx
        campaign_service_pb2_grpc.add_CampaignServiceServicer_to_server(CampaignServicer(rt.pool, engine), server)
        return [campaign_service_pb2.DESCRIPTOR.services_by_name["CampaignService"].full_name]

    async def on_start(rt: Runtime) -> None:
        engine: Engine = rt.state["engine"]
        fx = rt.state["effects"]
        if isinstance(fx, GrpcEffects):
            rt.on_stop(fx.close)
        if run_timers:
            listener = await rt.pool.acquire()

            def _notified(*_: Any) -> None:
                engine.wake()

            await listener.add_listener(NOTIFY_CHANNEL, _notified)

            async def _release() -> None:
                await listener.remove_listener(NOTIFY_CHANNEL, _notified)
                await rt.pool.release(listener)

            rt.on_stop(_release)
            rt.spawn(engine.timer_loop(TIMER_WORKERS, POLL_SECONDS), name="campaign-timers")
            rt.spawn(engine.fresh_loop(FRESH_RUNNERS), name="campaign-fresh")
        if consume and isinstance(fx, GrpcEffects):
            identity = fx.identity
            md = fx.md(None)

            def subscribe(cursor: str) -> Any:
                return identity.SubscribeEvents(id_pb.SubscribeEventsRequest(cursor=cursor), metadata=md)

            rt.spawn(engine.consume(subscribe), name="campaign-events")

    return ServiceModule(
        name="campaign",
        migrations=Path(__file__).parent / "migrations",
        register=register,
        on_start=on_start,
        port_setting="campaign_port",
    )


MODULE = make_module()
