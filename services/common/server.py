"""Server bootstrap shared by every service: pool, migrations, interceptors, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import tenancy
from services.common.clients import MAX_MESSAGE_BYTES
from services.common.db import apply_migrations, create_pool
from services.common.embedded import database_url
from services.common.interceptors import ChassisInterceptor
from services.common.logs import configure_logging
from services.common.settings import Settings, load_settings

log = structlog.get_logger("parley.server")

_SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
)


@dataclass
class Runtime:
    """What a running service's handlers and background loops share."""

    settings: Settings
    # The database this process uses (PARLEY_DATABASE_URL, or the embedded server's).
    database_url: str
    pool: asyncpg.Pool
    internal_token: str
    verifier: tenancy.KeyVerifier
    state: dict[str, Any] = field(default_factory=dict)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _stoppers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run a background task for the life of the service; it is cancelled at shutdown."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(_log_task_end)
        return task

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` at shutdown, after in-flight calls finish (e.g. close an HTTP listener)."""
        self._stoppers.append(fn)


def _log_task_end(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background_task_failed", task=task.get_name(), error=repr(task.exception()))


@dataclass
class ServiceModule:
    """A service as the chassis sees it."""

    name: str
    migrations: Path
    register: Callable[[grpc.aio.Server, Runtime], Sequence[str]]
    on_start: Callable[[Runtime], Awaitable[None]] | None = None
    port_setting: str = ""
    # Methods (``/pkg.Service/Method``) that check their requests for what Postgres cannot hold
    # themselves, per item; the chassis checks every other request whole (see interceptors).
    self_checked: frozenset[str] = frozenset()
    # Per method, a request parser to use instead of the generated one, made from the settings
    # (see ingest's salvage.py).
    request_parsers: Callable[[Settings], Mapping[str, Callable[[bytes], Any]]] | None = None
    # Methods a write key may call (sending events); every other method needs a full key.
    write_methods: frozenset[str] = frozenset()


@dataclass
class RunningServer:
    module: ServiceModule
    server: grpc.aio.Server
    runtime: Runtime
    health: health.aio.HealthServicer
    port: int
    service_names: list[str]
    interceptor: ChassisInterceptor
    _stopped: bool = False

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let in-flight ones finish within ``grace``, then release everything."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.runtime.settings.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        # New calls are refused UNAVAILABLE while those in flight finish; only then does gRPC stop
        # (see ChassisInterceptor.drain), with what is left of the grace period for the streams.
        started = time.monotonic()
        self.interceptor.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.interceptor.drained(), grace)
        await self.server.stop(max(0.0, grace - (time.monotonic() - started)))
        for stopper in reversed(self.runtime._stoppers):
            try:
                await stopper()
            except Exception:
                log.exception("stop_hook_failed")
        for task in self.runtime._tasks:
            task.cancel()
        await asyncio.gather(*self.runtime._tasks, return_exceptions=True)
        await self.runtime.pool.close()
        log.info("stopped", service=self.module.name)


class HealthServicer(health.aio.HealthServicer):
    """The library's health service, plus ``List`` (every service's status in one call), which the
    health protocol defines and the library leaves unimplemented."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()
            }
        )


async def start(module: ServiceModule, settings: Settings, *, port: int | None = None) -> RunningServer:
    """Start ``module``: pool up, migrations applied, then listen; health turns SERVING last."""
    # In a thread: starting the embedded server blocks, and the loop may already serve others.
    dsn = await asyncio.to_thread(database_url, settings)
    pool = await create_pool(
        dsn,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        idle_transaction_timeout_ms=settings.db_idle_transaction_timeout_ms,
    )
    try:
        await tenancy.migrate(pool)
        await apply_migrations(pool, module.name, module.migrations)
        token = settings.internal_token or await tenancy.internal_token(pool)
    except BaseException:
        await pool.close()
        raise
    verifier = tenancy.KeyVerifier(pool, token, settings.auth_cache_seconds)
    runtime = Runtime(settings=settings, database_url=dsn, pool=pool, internal_token=token, verifier=verifier)

    parsers = module.request_parsers(settings) if module.request_parsers else None
    interceptor = ChassisInterceptor(
        verifier, self_checked=module.self_checked, parsers=parsers, write_methods=module.write_methods
    )
    server = grpc.aio.server(interceptors=[interceptor], options=_SERVER_OPTIONS)
    names = list(module.register(server, runtime))
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    if port is None:
        port = int(getattr(settings, module.port_setting)) if module.port_setting else 0
    bound = server.add_insecure_port(f"{settings.host}:{port}")
    if bound == 0:
        await pool.close()
        raise OSError(f"{module.name}: cannot listen on {settings.host}:{port}")
    await server.start()
    running = RunningServer(module, server, runtime, health_servicer, bound, names, interceptor)
    try:
        if module.on_start is not None:
            await module.on_start(runtime)
    except BaseException:
        await running.stop(0)
        raise
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("listening", service=module.name, host=settings.host, port=bound, **_extra_ports(runtime))
    return running


def _extra_ports(runtime: Runtime) -> dict[str, Any]:
    return {k: v for k, v in runtime.state.items() if k.endswith("_port") and isinstance(v, int)}


async def serve(module: ServiceModule, settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    running = await start(module, settings)
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting_down", service=module.name, grace_seconds=settings.grace_seconds)
    await running.stop()


# Allocations between young-generation collections (Python's default is 700).
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Collect cycles less often in a service process.

    Reference counting frees almost everything a call allocates; the cycle collector only finds
    cycles, yet with its defaults it ran every 700 allocations and, every hundred of those, scanned
    every object the process holds. Identity's batch resolution allocates thousands of objects
    per call: with the defaults it took ~40% longer (measured in one process, same batches).
    What startup made (modules, descriptors, the pool) is frozen out of the scans for good.
    """
    gc.collect()  # startup's own garbage is not frozen with the rest
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


def main(module: ServiceModule) -> None:
    """Entry point of ``python -m services.<name>``."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    run(serve(module, settings), settings.event_loop)


def run(main_coro: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run a service's main coroutine on the configured event loop."""
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main_coro)
    elif event_loop == "asyncio":
        asyncio.run(main_coro)
    else:
        main_coro.close()
        raise SystemExit(f"PARLEY_EVENT_LOOP must be 'uvloop' or 'asyncio', not {event_loop!r}")
