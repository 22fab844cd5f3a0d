"""The journey engine: enrolls contacts from identity's event stream and runs due steps from Postgres timers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time as _time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import structlog
from google.protobuf import json_format
from parley.campaign.v1 import campaign_service_pb2 as pb
from parley.common.v1 import event_pb2
from parley.identity.v1 import identity_service_pb2 as id_pb

from services.campaign import conditions, repository, template, timing
from services.campaign.clock import Clock
from services.campaign.definition import Graph, definition_from_stored, kind_of
from services.campaign.effects import ContactInfo, Effects
from services.common.sendwindow import SendWindow, local_zone, parse_hhmm

log = structlog.get_logger("parley.campaign.engine")

CONSUMER = "identity-events"
# Guards against a definition bug looping inside one run; validation already forbids
# cycles without a wait, so a legitimate run is never this long.
MAX_STEPS_PER_RUN = 200
MAX_RETRY_BACKOFF = 300.0
# A batch of claimed runs keeps its transaction (its claim) open while the runs call identity,
# messaging and ingest, each call up to its own deadline and queued behind the engine's limit
# on concurrent runs: the pool's idle limit (60 s) would roll healthy batches back when a peer
# is slow. This bound still frees the claim of a process that froze.
RUNS_IDLE_TIMEOUT_MS = 300_000
_RUNS_IDLE_TIMEOUT = f"SET LOCAL idle_in_transaction_session_timeout = {RUNS_IDLE_TIMEOUT_MS}"
NOTIFY_CHANNEL = "campaign_due"
# Outcome events from messaging that feed step stats.
DELIVERY_EVENTS = {"SMS Delivered": "delivered", "SMS Failed": "failed"}
TASK_DONE_EVENTS = frozenset({"Call Completed"})
DEFAULT_GOAL_WINDOW = timedelta(days=7)
# A step reads the database only on its run's own connection. Should any path still borrow a
# second one, it gives up after this long (the step fails, rolls back and is retried) rather
# than wait forever for a pool that the row-lock holders have drained.
BORROW_TIMEOUT = 10.0


def cohort_for(campaign_id: str, step_id: str, contact_id: str, cohorts: Sequence[pb.Cohort]) -> pb.Cohort:
    """The contact's cohort at a split: a stable hash, so re-entries and retries land the same way."""
    digest = hashlib.sha256(f"{campaign_id}:{step_id}:{contact_id}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 10_000
    edge = 0
    for c in cohorts:
        edge += c.percent * 100
        if bucket < edge:
            return c
    return cohorts[-1]


def event_data(ev: event_pb2.Event) -> dict[str, Any]:
    """An event's properties as conditions and templates see them (identify: its traits)."""
    data = json_format.MessageToDict(ev.properties)
    if ev.type == event_pb2.EVENT_TYPE_IDENTIFY:
        data = {**json_format.MessageToDict(ev.traits), **data}
    return data


def matcher_matches(m: pb.EventMatcher, ev: event_pb2.Event, data: dict[str, Any]) -> bool:
    return bool(m.name) and ev.name == m.name and conditions.all_match(m.conditions, data)


@dataclass
class Hold:
    """The step waits: until ``due`` (None: only an event wakes it)."""

    phase: str
    due: datetime | None
    outcome: str
    detail: str = ""
    wait: tuple[str | None, str | None, Any] = (None, None, None)


@dataclass
class Move:
    """The step finished with ``outcome``; go to ``next`` ('' completes the journey)."""

    next: str
    outcome: str
    detail: str = ""
    message_id: str = ""
    task_id: str = ""
    end: str = ""  # set: the enrollment ends here with this reason


@dataclass
class Run:
    """One enrollment being advanced: its row, mutated in memory, written back at commit."""

    row: dict[str, Any]
    history: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    contact: ContactInfo | None = None
    sends: int = 0
    # A read of the contact started while the enrollment was being committed (fresh runs).
    prefetch: asyncio.Future[ContactInfo | None] | None = None
    # The connection whose transaction holds this run's row lock, shared by the batch's runs.
    held: _Held | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["row"][name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class Engine:
    """Runs journeys. One per replica; all state is in Postgres, so replicas share the work."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        effects: Effects,
        clock: Clock,
        *,
        batch_size: int = 200,
        concurrency: int = 64,
        contact_ttl: float = 2.0,
        live_ttl: float = 1.0,
        run_fresh: bool = False,
        max_open_runs: int = 0,
        fresh_queue_max: int = 2_000,
    ) -> None:
        self.pool = pool
        self.effects = effects
        self.clock = clock
        self.batch_size = batch_size
        self._sem = asyncio.Semaphore(concurrency)
        self._prefetch_sem = asyncio.Semaphore(concurrency)
        # Timer batches and fresh runs each hold a pool connection in a transaction (and their
        # steps read only through it): this many at once at most (0: no limit), so connections
        # stay free for the consumer and the API.
        self._open_runs = asyncio.Semaphore(max_open_runs) if max_open_runs > 0 else None
        self._graphs: dict[tuple[str, str, int], Graph] = {}
        # Stored versions that do not parse: logged once, then skipped (never retried: immutable).
        self._broken: set[tuple[str, str, int]] = set()
        self._wake = asyncio.Event()
        self._contacts = _ContactCache(contact_ttl)
        # Which campaigns are live, re-read at most every live_ttl seconds (publishing through
        # another replica shows up here within that time).
        self.live_ttl = live_ttl
        self._live: tuple[float, list[Any], dict[str, frozenset[str]]] | None = None
        self.events_seen = 0
        self.steps_run = 0
        # Fresh enrollments this replica committed, run by ``fresh_loop`` right after the commit
        # instead of waiting for a timer worker (whose claim stays the fallback).
        self.run_fresh = run_fresh
        self._fresh: list[_Fresh] = []
        # Bounded: past this many queued, fresh rows wait for a timer worker instead.
        self.fresh_queue_max = fresh_queue_max
        self.fresh_dropped = 0
        self._fresh_ready = asyncio.Event()
        self.fresh_run = 0

    # ---------------------------------------------------------------------------------- graphs

    async def graph(self, workspace_id: str, campaign_id: str, version: int) -> Graph | None:
        """A version's graph; None if it is missing or does not parse (then logged)."""
        key = (str(workspace_id), str(campaign_id), version)
        graph = self._graphs.get(key)
        if graph is None and key not in self._broken:
            stored = await repository.get_version(self.pool, workspace_id, campaign_id, version)
            if stored is None:
                return None
            graph = self._parse(key, stored)
        return graph

    def _parse(self, key: tuple[str, str, int], stored: Any) -> Graph | None:
        try:
            graph = Graph.of(definition_from_stored(stored))
        except Exception:
            log.exception("campaign_version_unparsable", workspace_id=key[0], campaign_id=key[1], version=key[2])
            self._broken.add(key)
            return None
        # Versions are immutable, so caching them forever is safe.
        self._graphs[key] = graph
        return graph

    async def _load_graphs(self, conn: asyncpg.Connection, runs: Sequence[Run]) -> None:
        """Read the versions of a claimed batch not cached yet, on the batch's own connection."""
        missing = {
            k
            for k in ((str(r.workspace_id), str(r.campaign_id), r.version) for r in runs)
            if k not in self._graphs and k not in self._broken
        }
        if missing:
            for v in await repository.get_versions(conn, sorted(missing)):
                self._parse((str(v["workspace_id"]), str(v["campaign_id"]), v["version"]), v["definition"])

    async def _live_campaigns(self) -> list[Any]:
        now = _time.monotonic()
        if self._live is None or now >= self._live[0]:
            live = await repository.live_campaigns(self.pool)
            # Read after the live list, so every version anyone can be enrolled on is in it.
            keys = [
                (str(v["workspace_id"]), str(v["campaign_id"]), v["version"])
                for v in await repository.all_versions(self.pool)
            ]
            missing = [k for k in keys if k not in self._graphs]
            missing = [k for k in missing if k not in self._broken]
            if missing:
                for v in await repository.get_versions(self.pool, missing):
                    key = (str(v["workspace_id"]), str(v["campaign_id"]), v["version"])
                    self._parse(key, v["definition"])
            watched: dict[str, set[str]] = {}
            for k in keys:
                graph = self._graphs.get(k)
                if graph is not None:
                    watched.setdefault(k[0], set()).update(_watched_names(graph))
            self._live = (now + self.live_ttl, live, {ws: frozenset(n) for ws, n in watched.items()})
        return self._live[1]

    def _matters_to_existing(self, workspace_id: str, name: str) -> bool:
        """Whether an event of this name can exit, convert or wake an enrollment of any version.

        (Delivery and task outcomes are matched by message and task id, not through enrollments.)
        """
        watched = self._live[2] if self._live is not None else None
        return watched is None or name in watched.get(workspace_id, frozenset())

    def campaigns_changed(self) -> None:
        """Forget the live-campaign list (this replica published, paused or resumed one)."""
        self._live = None

    # ---------------------------------------------------------------------------------- timers

    def wake(self) -> None:
        self._wake.set()

    async def run_due(self, now: datetime | None = None, *, max_batches: int = 10_000) -> int:
        """Run every step due at ``now`` (default: the clock), batch after batch; returns steps run."""
        total = 0
        for _ in range(max_batches):
            n = await self.tick(now)
            total += n
            if n == 0:
                break
        return total

    async def tick(self, now: datetime | None = None) -> int:
        """Claim one batch of due enrollments (SKIP LOCKED), advance each, commit; returns how many."""
        now = now or self.clock.now()
        async with self._holding(), self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_RUNS_IDLE_TIMEOUT)
            rows = await repository.claim_due(conn, now, self.batch_size)
            done = await self._run_claimed(conn, rows, now)
        self.steps_run += done
        return done

    async def _run_claimed(
        self,
        conn: asyncpg.Connection,
        rows: Sequence[Any],
        now: datetime,
        prefetched: dict[tuple[str, str], asyncio.Future[ContactInfo | None] | None] | None = None,
    ) -> int:
        """Advance claimed rows inside the claiming transaction (their reads go through ``conn``), then save them."""
        if not rows:
            return 0
        held = _Held(conn)
        runs = [Run(dict(r), held=held) for r in rows]
        for run in runs:
            run.prefetch = (prefetched or {}).get((str(run.workspace_id), str(run.id)))
        await self._load_graphs(conn, runs)
        await asyncio.gather(*(self._advance_guarded(run, now) for run in runs))
        await repository.save_runs(conn, [r.row for r in runs], [h for r in runs for h in r.history.values()])
        return len(runs)

    def _holding(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._open_runs if self._open_runs is not None else contextlib.nullcontext()

    async def timer_loop(self, workers: int = 4, poll: float = 0.25) -> None:
        """Production loop: drain due work with several workers, then sleep until woken or ``poll``."""

        async def worker() -> None:
            while True:
                try:
                    n = await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("timer_batch_failed")
                    n = 0
                    await asyncio.sleep(1.0)
                if n < self.batch_size:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), poll)
                    except TimeoutError:
                        pass

        await asyncio.gather(*(worker() for _ in range(workers)))

    async def _advance_guarded(self, run: Run, now: datetime) -> None:
        async with self._sem:
            try:
                await self._advance(run, now)
            except Exception as exc:
                log.warning("step_failed_will_retry", enrollment_id=str(run.id), step_id=run.step_id, error=repr(exc))
                detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
                self._retry(run, now, detail)

    def _retry(self, run: Run, now: datetime, detail: str) -> None:
        attempts = run.row["attempts"] + 1
        delay = min(2.0 ** min(attempts, 12), MAX_RETRY_BACKOFF)
        run.row.update(attempts=attempts, due_at=now + timedelta(seconds=delay))
        if run.row["phase"] == "enter":
            # Nothing of the step happened yet; re-entering it later must not count a new visit.
            run.row["phase"] = "retry_enter"
        key = (run.step_id, run.visit)
        if key in run.history:
            run.history[key].update(outcome="retrying", detail=detail[:500])

    def _hist(self, run: Run, kind: str, now: datetime) -> dict[str, Any]:
        key = (run.step_id, run.visit)
        h = run.history.get(key)
        if h is None:
            h = run.history[key] = {
                "workspace_id": run.workspace_id,
                "enrollment_id": run.id,
                "step_id": run.step_id,
                "visit": run.visit,
                "campaign_id": run.campaign_id,
                "version": run.version,
                "kind": kind,
                "enter_time": now,
                "end_time": None,
                "outcome": "waiting",
                "detail": "",
                "message_id": "",
                "task_id": "",
            }
        return h

    def _end(self, run: Run, state: str, reason: str, now: datetime) -> None:
        run.row.update(state=state, exit_reason=reason, end_time=now, due_at=None, phase="done")

    async def _run_graph(self, run: Run) -> Graph | None:
        """The run's graph: cached (the batch loaded it), else read on the run's own connection."""
        key = (str(run.workspace_id), str(run.campaign_id), run.version)
        graph = self._graphs.get(key)
        if graph is None and key not in self._broken:
            stored = await self._query(run, lambda c: repository.get_version(c, *key))
            graph = None if stored is None else self._parse(key, stored)
        if graph is None and key in self._broken:
            # Not the enrollment's fault: keep it, retrying with backoff, until the code can read it.
            raise RuntimeError(f"campaign version {key[1]}/{key[2]} does not parse")
        return graph

    async def _query(self, run: Run, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run ``fn`` on the connection holding the run's row lock (one statement at a time).

        Never a second pool connection while the lock is held: waiters on these rows could hold
        the rest of the pool, and Postgres cannot see a cycle that goes through our pool.
        """
        if run.held is not None:
            async with run.held.lock:
                return await fn(run.held.conn)
        async with self.pool.acquire(timeout=BORROW_TIMEOUT) as conn:
            return await fn(conn)

    async def _advance(self, run: Run, now: datetime) -> None:
        graph = await self._run_graph(run)
        if graph is None:
            self._end(run, "exited", "version_missing", now)
            return
        for _ in range(MAX_STEPS_PER_RUN):
            step = graph.steps.get(run.step_id)
            if step is None:
                self._end(run, "completed", "completed", now)
                return
            kind = kind_of(step)
            if run.row["phase"] == "enter":
                visits = dict(run.row["visits"])
                visits[step.id] = visits.get(step.id, 0) + 1
                run.row.update(visits=visits, visit=visits[step.id], attempts=0)
            elif run.row["phase"] == "retry_enter":
                run.row["phase"] = "enter"
            hist = self._hist(run, kind, now)
            result = await self._execute(run, graph, step, kind, now)
            if isinstance(result, Hold):
                if result.phase == "retry":
                    self._retry(run, now, result.detail)
                    hist["outcome"] = "retrying"
                    return
                wait_event, wait_key, wait_value = result.wait
                run.row.update(
                    phase=result.phase,
                    due_at=result.due,
                    wait_event=wait_event,
                    wait_key=wait_key,
                    wait_value=wait_value,
                )
                hist.update(outcome=result.outcome, detail=result.detail)
                return
            hist.update(
                end_time=now,
                outcome=result.outcome,
                detail=result.detail[:500],
                message_id=result.message_id or hist["message_id"],
                task_id=result.task_id or hist["task_id"],
            )
            run.row.update(wait_event=None, wait_key=None, wait_value=None, attempts=0)
            if result.end:
                self._end(run, "completed", result.end, now)
                return
            if not result.next:
                self._end(run, "completed", "completed", now)
                return
            run.row.update(step_id=result.next, phase="enter", due_at=now)
        # Still going after the guard: leave it due so the next batch continues from here.
        run.row["due_at"] = now

    async def _contact(self, run: Run) -> ContactInfo | None:
        if run.contact is None:
            key = (str(run.workspace_id), run.contact_id)
            run.contact = self._contacts.get(key)
            if run.contact is None and run.prefetch is not None:
                prefetch, run.prefetch = run.prefetch, None
                try:
                    run.contact = await prefetch
                except Exception:
                    run.contact = None  # read it again below; a failure there retries the step
            if run.contact is None:
                run.contact = await self.effects.get_contact(*key)
            if run.contact is not None:
                run.row.update(phone=run.contact.phone, time_zone=run.contact.time_zone or run.row["time_zone"])
        return run.contact

    def _trigger_data(self, run: Run) -> dict[str, Any]:
        return dict(run.row["trigger_event"].get("properties") or {})

    def _since(self, run: Run) -> datetime:
        ts = run.row["trigger_event"].get("timestamp")
        if ts:
            return datetime.fromisoformat(ts)
        return run.row["enroll_time"]

    async def _execute(self, run: Run, graph: Graph, step: pb.Step, kind: str, now: datetime) -> Hold | Move:
        phase = run.row["phase"]
        d = graph.definition
        if kind == "wait":
            if phase == "timer":
                return Move(step.next, "done")
            return Hold("timer", now + timing.parse_duration(step.wait.duration), "waiting")
        if kind == "wait_until":
            if phase == "timer":
                return Move(step.next, "done")
            contact = await self._contact(run)
            tz = local_zone(contact.time_zone if contact else run.row["time_zone"])
            at = timing.next_time_of_day(
                now, parse_hhmm(step.wait_until.time), [w.lower() for w in step.wait_until.weekdays], tz
            )
            return Move(step.next, "done") if at <= now else Hold("timer", at, "waiting")
        if kind == "wait_for_event":
            w = step.wait_for_event
            if phase == "event_arrived":
                return Move(w.on_event, "event")
            if phase == "event":
                return Move(w.on_timeout, "timeout")
            value = self._trigger_data(run).get(w.match_key) if w.match_key else None
            return Hold(
                "event",
                now + timing.parse_duration(w.timeout),
                "waiting",
                wait=(w.event.name, w.match_key or None, value),
            )
        if kind == "exit":
            return Move("", "done", end="exit_step")
        if kind == "split":
            cohort = cohort_for(str(run.campaign_id), step.id, run.contact_id, step.split.cohorts)
            run.row["cohorts"] = {**run.row["cohorts"], step.id: cohort.name}
            return Move(cohort.next, cohort.name)
        if kind == "branch":
            ok = True
            for c in step.branch.conditions:
                if not await self._condition(run, c):
                    ok = False
                    break
            return Move(step.branch.if_true if ok else step.branch.if_false, "true" if ok else "false")

        contact = await self._contact(run)
        if contact is None:
            return Move("", "failed", "contact not found", end="contact_missing")
        if kind in ("send_sms", "call_task"):
            window = SendWindow.parse(d.send_window.start, d.send_window.end)
            opening = window.next_opening(now, local_zone(contact.time_zone, run.row["time_zone"]))
            if opening is not None:
                return Hold("deferred", opening, "deferred", detail="outside the send window")
        request_id = f"{run.id}:{step.id}:{run.visit}"
        data = contact.template_data()
        trigger = self._trigger_data(run)
        if kind == "send_sms":
            cap = d.frequency_cap
            if cap.max_messages > 0:
                since = now - timing.parse_duration(cap.period)
                sent = await self._query(
                    run,
                    lambda c: repository.sms_sent_count(
                        c,
                        run.workspace_id,
                        run.campaign_id,
                        run.contact_id,
                        since,
                        exclude=(run.id, step.id, run.visit),
                    ),
                )
                if sent + run.sends >= cap.max_messages:
                    return Move(step.next, "skipped", "frequency cap reached")
            body = template.parse(step.send_sms.body).render(data, trigger)
            res = await self.effects.send_sms(
                str(run.workspace_id),
                request_id=request_id,
                contact=contact,
                body=body,
                transactional=step.send_sms.transactional,
                campaign_id=str(run.campaign_id),
            )
            if res.status == "retry":
                return Hold("retry", None, "retrying", detail=res.detail)
            if res.status == "failed":
                return Move(step.next, "failed", res.detail)
            run.sends += 1
            return Move(step.next, "sent", res.detail, message_id=res.id)
        if kind == "call_task":
            ct = step.call_task
            notes = template.parse(ct.notes).render(data, trigger) if ct.notes else ""
            res = await self.effects.create_call_task(
                str(run.workspace_id),
                request_id=request_id,
                contact=contact,
                queue=ct.queue or "default",
                priority=ct.priority,
                notes=notes,
                campaign_id=str(run.campaign_id),
            )
            if res.status == "retry":
                return Hold("retry", None, "retrying", detail=res.detail)
            if res.status == "failed":
                return Move(step.next, "failed", res.detail)
            return Move(step.next, "created", task_id=res.id)
        if kind == "set_property":
            value = json_format.MessageToDict(step.set_property.value)
            res = await self.effects.set_property(
                str(run.workspace_id), request_id=request_id, contact=contact, key=step.set_property.key, value=value
            )
            if res.status == "retry":
                return Hold("retry", None, "retrying", detail=res.detail)
            return Move(step.next, "done" if res.status == "ok" else "failed", res.detail)
        return Move("", "failed", f"unknown step kind {kind!r}", end="invalid_step")

    async def _condition(self, run: Run, c: pb.Condition) -> bool:
        kind = c.WhichOneof("kind")
        if kind == "contact":
            contact = await self._contact(run)
            return contact is not None and conditions.matches(c.contact, contact.template_data())
        if kind == "trigger":
            return conditions.matches(c.trigger, self._trigger_data(run))
        occ: pb.EventOccurrence = getattr(c, kind or "did_event")
        events = await self.effects.events_since(str(run.workspace_id), run.contact_id, occ.name, self._since(run))
        trigger = self._trigger_data(run)
        found = any(
            conditions.all_match(occ.conditions, props)
            and (not occ.match_key or props.get(occ.match_key) == trigger.get(occ.match_key))
            for props in events
        )
        return found if kind == "did_event" else not found

    # ---------------------------------------------------------------------------------- events

    async def handle_events(self, events: Sequence[id_pb.StoredEvent], cursor_before: str, cursor_after: str) -> int:
        """Enroll, exit, wake and convert from one batch of the stream; commit with the cursor.

        Returns the number of new enrollments. Raises repository.CursorMoved when another
        consumer advanced the cursor first (nothing of this batch is then committed).
        """
        now = self.clock.now()
        with_contact = [e for e in events if e.contact_id]
        plan = _Plan()
        if with_contact:
            await self._plan(with_contact, now, plan)
        # Enrollments this replica runs itself need no other worker woken for them.
        notify = bool(plan.wakes or (plan.enrollments and not self.run_fresh))
        try:
            # Most batches only enroll (or decide nothing): one statement, one round trip.
            inserted = None
            if repository.only_enrollments(plan):
                inserted = await repository.commit_enrollments(
                    self.pool,
                    plan.enrollments,
                    CONSUMER,
                    cursor_before,
                    cursor_after,
                    notify=NOTIFY_CHANNEL if notify else "",
                )
            if inserted is None:
                async with self.pool.acquire() as conn, conn.transaction():
                    inserted = await repository.apply_plan(conn, plan, now)
                    await repository.advance_cursor(conn, CONSUMER, cursor_before, cursor_after)
                    if notify:
                        await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
        except BaseException:
            for f in plan.fresh:
                if f.prefetch is not None:
                    f.prefetch.cancel()
            raise
        self.events_seen += len(events)
        if notify:
            self.wake()
        if plan.fresh:
            self._queue_fresh(plan.fresh, set(inserted))
        return len(inserted)

    def _queue_fresh(self, fresh: Sequence[_Fresh], inserted: set[str]) -> None:
        """Queue the fresh runs of rows the commit inserted, up to ``fresh_queue_max``.

        A row the unique index refused gets no run, and its contact read is cancelled. Past the
        bound the overflow is dropped too: its row is due, so a timer worker runs it (woken here).
        """
        room = max(0, self.fresh_queue_max - len(self._fresh))
        keep = [f for f in fresh if str(f.enrollment_id) in inserted]
        dropped = len(keep) > room
        keep = keep[:room]
        kept = {id(f.prefetch) for f in keep if f.prefetch is not None}
        for f in fresh:
            # Entries of one contact share its read; cancel it only when no kept run awaits it.
            if f.prefetch is not None and id(f.prefetch) not in kept:
                f.prefetch.cancel()
        if dropped:
            self.fresh_dropped += len([f for f in fresh if str(f.enrollment_id) in inserted]) - len(keep)
            self.wake()
        if keep:
            self._fresh.extend(keep)
            self._fresh_ready.set()

    async def _plan(self, events: Sequence[id_pb.StoredEvent], now: datetime, plan: _Plan) -> None:
        live = await self._live_campaigns()
        by_ws: dict[str, list[tuple[str, int]]] = {}
        for r in live:
            by_ws.setdefault(str(r["workspace_id"]), []).append((str(r["id"]), r["live_version"]))
        # A contact's enrollments are read only where they can matter: its event may exit, convert
        # or wake one, or it triggers a campaign whose re-entry policy looks at earlier ones. An
        # event that only triggers ``any_time`` campaigns needs none: the partial unique index
        # already refuses a second active enrollment when the insert meets one.
        history: set[tuple[str, str]] = set()
        # Contacts are read once per batch, concurrently, only for events that trigger something:
        # awaited where enrolling depends on them (an audience); otherwise, for fresh runs, started
        # now and left running beside the enrollment query and commit, for the first step to use.
        wanted: set[tuple[str, str]] = set()
        early: set[tuple[str, str]] = set()
        for se in events:
            data = event_data(se.event)
            for campaign_id, version in by_ws.get(se.workspace_id, []):
                graph = await self.graph(se.workspace_id, campaign_id, version)
                if graph is None or not self._triggers(graph, se.event, data):
                    continue
                key = (se.workspace_id, se.contact_id)
                if graph.definition.re_entry.policy != pb.RE_ENTRY_POLICY_ANY_TIME:
                    history.add(key)
                if _needs_contact(graph):
                    wanted.add(key)
                elif self.run_fresh and _first_step_needs_contact(graph):
                    early.add(key)
            if self._matters_to_existing(se.workspace_id, se.event.name):
                history.add((se.workspace_id, se.contact_id))
        prefetch = {key: self._prefetch(*key) for key in early - wanted}
        existing, contacts = await asyncio.gather(
            repository.contact_enrollments(self.pool, sorted(history), now - timedelta(days=400)),
            self._fetch_contacts(wanted),
        )
        # (ws, contact) -> enrollments (newest first) as mutable dicts.
        known: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in existing:
            known.setdefault((str(r["workspace_id"]), r["contact_id"]), []).append(dict(r))

        for se in events:
            ev = se.event
            data = event_data(ev)
            key = (se.workspace_id, se.contact_id)
            mine = known.get(key, [])
            await self._effects_on_existing(se, ev, data, mine, now, plan)
            for campaign_id, version in by_ws.get(se.workspace_id, []):
                graph = await self.graph(se.workspace_id, campaign_id, version)
                if graph is None or not self._triggers(graph, ev, data):
                    continue
                ours = [e for e in mine if str(e["campaign_id"]) == campaign_id]
                if not _may_enter(graph.definition.re_entry, ours, now):
                    continue
                contact = contacts.get(key)
                if _needs_contact(graph) and (
                    contact is None or not conditions.all_match(graph.definition.audience, contact.template_data())
                ):
                    continue
                row = {
                    "workspace_id": se.workspace_id,
                    "id": str(uuid.uuid4()),
                    "campaign_id": campaign_id,
                    "version": version,
                    "contact_id": se.contact_id,
                    "state": "active",
                    "step_id": graph.start,
                    "enroll_time": now,
                    "end_time": None,
                    "conversion_time": None,
                    "phone": contact.phone if contact else "",
                    "time_zone": contact.time_zone if contact else "",
                    "trigger_event": _trigger_json(ev, data),
                    "phase": "enter",
                    "wait_event": None,
                    "wait_key": None,
                    "wait_value": None,
                }
                plan.enrollments.append(row)
                mine.insert(0, row)
                known[key] = mine
                if self.run_fresh:
                    plan.fresh.append(self._fresh_entry(row, graph, contact, prefetch.get(key)))
        # A read started for a contact the re-entry policy then turned away serves no run.
        used = {id(f.prefetch) for f in plan.fresh}
        for task in prefetch.values():
            if id(task) not in used:
                task.cancel()

    def _fresh_entry(
        self,
        row: dict[str, Any],
        graph: Graph,
        contact: ContactInfo | None,
        started: asyncio.Task[ContactInfo | None] | None,
    ) -> _Fresh:
        """A fresh enrollment to run after the commit, with the contact read already under way."""
        prefetch: asyncio.Future[ContactInfo | None] | None = started
        if contact is not None:
            prefetch = asyncio.get_running_loop().create_future()
            prefetch.set_result(contact)
        elif prefetch is None and _first_step_needs_contact(graph):
            prefetch = self._prefetch(row["workspace_id"], row["contact_id"])
        return _Fresh(row["workspace_id"], row["id"], prefetch)

    def _prefetch(self, workspace_id: str, contact_id: str) -> asyncio.Task[ContactInfo | None]:
        task = asyncio.create_task(self._read_contact(workspace_id, contact_id))
        # Awaited by the run; if nothing runs here (no enrollment after all, or another replica
        # claimed the row), its outcome is dropped quietly.
        task.add_done_callback(_quiet)
        return task

    async def _read_contact(self, workspace_id: str, contact_id: str) -> ContactInfo | None:
        # Its own limit: runs holding ``_sem`` wait on these reads.
        async with self._prefetch_sem:
            return await self.effects.get_contact(workspace_id, contact_id)

    async def fresh_loop(self, runners: int = 2) -> None:
        """Run fresh enrollments as the consumer commits them: each runner takes all that are queued."""

        async def runner() -> None:
            while True:
                await self._fresh_ready.wait()
                batch = self._take_fresh()
                if not batch:
                    continue
                try:
                    await self.run_fresh_batch(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Nothing is lost: the rows are due, and a timer worker claims them.
                    log.exception("fresh_run_failed")
                    self.wake()

        await asyncio.gather(*(runner() for _ in range(runners)))

    def _take_fresh(self) -> list[_Fresh]:
        batch = self._fresh[: self.batch_size]
        del self._fresh[: self.batch_size]
        if not self._fresh:
            self._fresh_ready.clear()
        return batch

    async def run_fresh_queued(self) -> int:
        """Run every fresh enrollment queued so far (what ``fresh_loop`` does; tests call it directly)."""
        total = 0
        while batch := self._take_fresh():
            total += await self.run_fresh_batch(batch)
        return total

    async def run_fresh_batch(self, batch: Sequence[_Fresh]) -> int:
        """Claim these just-committed enrollments (SKIP LOCKED, still at their first step), advance, commit.

        Exactly the timer path with the rows named instead of searched for: a row another
        worker holds, or already moved on, is skipped here, and a crash before this commit
        leaves the row due, for a timer worker to run with the same request ids.
        """
        now = self.clock.now()
        prefetched = {(str(f.workspace_id), str(f.enrollment_id)): f.prefetch for f in batch}
        async with self._holding(), self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_RUNS_IDLE_TIMEOUT)
            rows = await repository.claim_fresh(conn, [(f.workspace_id, f.enrollment_id) for f in batch], now)
            done = await self._run_claimed(conn, rows, now, prefetched)
        self.steps_run += done
        self.fresh_run += done
        return done

    async def _fetch_contacts(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], ContactInfo | None]:
        async def one(key: tuple[str, str]) -> tuple[tuple[str, str], ContactInfo | None]:
            async with self._sem:
                contact = await self.effects.get_contact(key[0], key[1])
            if contact is not None:
                self._contacts.put(key, contact)
            return key, contact

        return dict(await asyncio.gather(*(one(k) for k in keys)))

    def _triggers(self, graph: Graph, ev: event_pb2.Event, data: dict[str, Any]) -> bool:
        trig = graph.definition.trigger
        kind = trig.WhichOneof("kind")
        identify = ev.type == event_pb2.EVENT_TYPE_IDENTIFY
        if kind == "event":
            hit = not identify and matcher_matches(trig.event, ev, data)
        elif kind == "property_change":
            pc = trig.property_change
            traits = json_format.MessageToDict(ev.traits)
            hit = (
                identify
                and pc.key in traits
                and all(conditions.matches(_keyed(f, pc.key), traits) for f in pc.conditions)
            )
        elif kind == "audience_entry":
            traits = json_format.MessageToDict(ev.traits)
            keys = {f.key.split(".")[0] for f in graph.definition.audience}
            hit = identify and bool(keys & set(traits))
        else:
            hit = False
        return hit

    async def _effects_on_existing(
        self,
        se: id_pb.StoredEvent,
        ev: event_pb2.Event,
        data: dict[str, Any],
        mine: list[dict[str, Any]],
        now: datetime,
        plan: _Plan,
    ) -> None:
        if ev.name in DELIVERY_EVENTS and data.get("message_id"):
            plan.deliveries.append((se.workspace_id, str(data["message_id"]), DELIVERY_EVENTS[ev.name]))
        if ev.name in TASK_DONE_EVENTS and data.get("task_id"):
            plan.tasks_done.append((se.workspace_id, str(data["task_id"])))
        for e in mine:
            graph = await self.graph(se.workspace_id, str(e["campaign_id"]), e["version"])
            if graph is None:
                continue
            d = graph.definition
            if e["conversion_time"] is None and d.HasField("goal") and matcher_matches(d.goal.event, ev, data):
                window = timing.parse_duration(d.goal.window) if d.goal.window else DEFAULT_GOAL_WINDOW
                if now - e["enroll_time"] <= window:
                    e["conversion_time"] = now
                    plan.conversions.append((se.workspace_id, str(e["id"])))
            if e["state"] != "active":
                continue
            exit_match = next((m for m in d.exit_events if matcher_matches(m, ev, data)), None)
            if exit_match is not None:
                e["state"] = "exited"
                plan.exits.append((se.workspace_id, str(e["id"]), f"exit_event:{exit_match.name}"))
                continue
            if e["phase"] == "event" and e["wait_event"] == ev.name:
                step = graph.steps.get(e["step_id"])
                if step is None or kind_of(step) != "wait_for_event":
                    continue
                w = step.wait_for_event
                if not conditions.all_match(w.event.conditions, data):
                    continue
                if e["wait_key"] and data.get(e["wait_key"]) != e["wait_value"]:
                    continue
                e["phase"] = "event_arrived"
                plan.wakes.append((se.workspace_id, str(e["id"])))

    # ---------------------------------------------------------------------------------- stream

    async def consume(self, subscribe: Callable[[str], Any], *, lock_retry: float = 1.0) -> None:
        """Consume the stream forever as the single active consumer (a Postgres advisory lock)."""
        while True:
            try:
                async with self.pool.acquire() as lock_conn:
                    got = await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", _consumer_lock_key())
                    if not got:
                        await asyncio.sleep(lock_retry)
                        continue
                    try:
                        await self._consume_from_cursor(subscribe)
                    finally:
                        await lock_conn.execute("SELECT pg_advisory_unlock($1)", _consumer_lock_key())
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, repository.CursorMoved, OSError, asyncpg.PostgresError) as exc:
                log.warning("event_stream_interrupted", error=repr(exc))
                await asyncio.sleep(lock_retry)
            except Exception:
                # A batch that fails for another reason is retried from the stored cursor;
                # the consumer must outlive it.
                log.exception("event_batch_failed")
                await asyncio.sleep(lock_retry)

    async def _consume_from_cursor(self, subscribe: Callable[[str], Any]) -> None:
        cursor = await repository.get_cursor(self.pool, CONSUMER)
        stream = subscribe(cursor)
        try:
            async for resp in stream:
                await self.handle_events(resp.events, cursor, resp.cursor)
                cursor = resp.cursor
        finally:
            stream.cancel()


class _ContactCache:
    """Contacts the consumer just read, so the first step of a fresh enrollment need not read again.

    Entries live ``ttl`` seconds (monotonic time): a step may see properties that old, which
    is the price of one less identity round trip on the trigger-to-send path.
    """

    def __init__(self, ttl: float, max_entries: int = 50_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._items: dict[tuple[str, str], tuple[float, ContactInfo]] = {}

    def put(self, key: tuple[str, str], contact: ContactInfo) -> None:
        if self.ttl <= 0:
            return
        if len(self._items) >= self.max_entries:
            now = _time.monotonic()
            self._items = {k: v for k, v in self._items.items() if v[0] > now}
            if len(self._items) >= self.max_entries:
                self._items.clear()
        self._items[key] = (_time.monotonic() + self.ttl, contact)

    def get(self, key: tuple[str, str]) -> ContactInfo | None:
        item = self._items.get(key)
        if item is None or item[0] < _time.monotonic():
            return None
        return item[1]


@dataclass
class _Plan:
    enrollments: list[dict[str, Any]] = field(default_factory=list)
    exits: list[tuple[str, str, str]] = field(default_factory=list)
    wakes: list[tuple[str, str]] = field(default_factory=list)
    conversions: list[tuple[str, str]] = field(default_factory=list)
    deliveries: list[tuple[str, str, str]] = field(default_factory=list)
    tasks_done: list[tuple[str, str]] = field(default_factory=list)
    fresh: list[_Fresh] = field(default_factory=list)


class _Held:
    """A claimed batch's connection, in its transaction; its runs' reads take turns on it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()


@dataclass
class _Fresh:
    """An enrollment just committed by this replica's consumer, to run at once."""

    workspace_id: str
    enrollment_id: str
    prefetch: asyncio.Future[ContactInfo | None] | None = None


def _quiet(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _watched_names(graph: Graph) -> set[str]:
    """Event names that act on existing enrollments of this version: exit, goal, awaited events."""
    d = graph.definition
    names = {m.name for m in d.exit_events}
    if d.HasField("goal"):
        names.add(d.goal.event.name)
    for step in graph.steps.values():
        if kind_of(step) == "wait_for_event":
            names.add(step.wait_for_event.event.name)
    names.discard("")
    return names


def _first_step_needs_contact(graph: Graph) -> bool:
    """Whether the first step reads the contact now (a wait holds first and reads it later, if at all)."""
    step = graph.steps.get(graph.start)
    return step is not None and kind_of(step) not in ("wait", "wait_for_event", "exit", "split")


def _needs_contact(graph: Graph) -> bool:
    """Whether enrolling needs the contact now (an audience to check); else the first step reads it.

    Keeping identity off the consumer's path for such campaigns keeps the stream moving at
    the rate of our own database, not of a round trip per triggering event.
    """
    return bool(graph.definition.audience)


def _consumer_lock_key() -> int:
    return int.from_bytes(hashlib.sha256(b"parley-campaign-consumer").digest()[:8], "big") >> 1


def _keyed(f: Any, key: str) -> Any:
    if f.key:
        return f
    copy = type(f)()
    copy.CopyFrom(f)
    copy.key = key
    return copy


def _trigger_json(ev: event_pb2.Event, data: dict[str, Any]) -> dict[str, Any]:
    ts = ev.timestamp.ToDatetime(tzinfo=UTC).isoformat() if ev.HasField("timestamp") else ""
    return {"name": ev.name, "message_id": ev.message_id, "properties": data, "timestamp": ts}


def _may_enter(re_entry: pb.ReEntry, previous: list[dict[str, Any]], now: datetime) -> bool:
    """Re-entry policy over the contact's previous enrollments in this campaign (newest first)."""
    if not previous:
        return True
    if any(e["state"] == "active" for e in previous):
        return False
    policy = re_entry.policy
    if policy == pb.RE_ENTRY_POLICY_ANY_TIME:
        return True
    if policy == pb.RE_ENTRY_POLICY_AFTER_COOLDOWN:
        last = previous[0]
        ended = last.get("end_time") or last["enroll_time"]
        return now >= ended + timing.parse_duration(re_entry.cooldown)
    return False


async def wait_until(predicate: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    """Poll ``predicate`` until true (tests and tools waiting on the background loops)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


__all__ = ["Engine", "cohort_for", "wait_until"]
