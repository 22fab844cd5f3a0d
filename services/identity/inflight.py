"""Batches of this process that hold (or are taking) their locks, and the split of a new batch
into the events that can go ahead now and those that must wait for an earlier batch.

Two batches of one workspace almost always share a few users (any two batches of 1,000 events
over 50,000 users do), so a batch that took all its locks up front waited for the whole of the
earlier batch's transaction. Instead, the events whose ids, phones and message ids are
untouched by earlier batches of this process — groups closed under the ids, phones and message
ids they share — are locked, resolved and written first, while the earlier batches still run
(under a short lock timeout, see ``record._record``); the rest after, once they have ended.
Both parts are one transaction: the batch still commits whole or not at all. Stored links can
join groups the batch does not show as joined (one user's anonymous id and user id in two
groups, users sharing a contact, a stored user joined into a new one): when the later part
reaches a user or contact the first one had or created, the batch runs again unsplit
(``record._record``), so a batch always means what it means resolved whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass


class EarlierBatchBlocked(Exception):
    """An earlier batch of this process waits for a lock this batch holds: this one must give way."""


@dataclass(eq=False)
class Claim:
    """One batch's claim on its lock keys, from before its transaction starts until it ends."""

    workspace: str
    keys: Sequence[int]
    # Of ``keys``, those an earlier batch of this process had claimed.
    busy: set[int]
    # Every batch of the workspace this process had in flight when this one claimed, in claim order.
    earlier: list[Claim]
    done: asyncio.Future[None]
    # The database backend of the batch's connection, once it has one.
    pid: int = 0

    async def wait_for_earlier(
        self, blocked_by_me: Callable[[list[int]], Awaitable[bool]], within: float, poll: float
    ) -> None:
        """Until every earlier batch of this process has ended, or for ``within`` seconds at most.

        What waits takes its locks only then, so it never queues in PostgreSQL ahead of an
        earlier batch that still needs the same lock (two such batches deadlocked), and while it
        waits no earlier batch of this process can be waiting for it: every ``poll`` seconds it
        asks (``blocked_by_me``) whether one waits for a lock it took before, and raises
        ``EarlierBatchBlocked`` if so. The wait is bounded: a cycle through a batch of another
        process then becomes a PostgreSQL lock wait, which PostgreSQL detects as a deadlock.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        pending = {c.done for c in self.earlier if not c.done.done()}
        while pending:
            left = deadline - loop.time()
            if left <= 0:
                return
            _, pending = await asyncio.wait(pending, timeout=min(poll, left))
            running = [c.pid for c in self.earlier if c.pid and not c.done.done()]
            if pending and running and await blocked_by_me(running):
                raise EarlierBatchBlocked


class InFlight:
    """The batches of this process between claiming their lock keys and ending."""

    def __init__(self) -> None:
        self._holders: dict[int, int] = {}
        # Per workspace, in claim order: batches of different workspaces never share a lock.
        self._active: dict[str, dict[Claim, None]] = {}

    def claim(self, workspace: str, keys: Sequence[int]) -> Claim:
        """Register ``keys`` for a new batch; what it shares with earlier batches comes back."""
        holders = self._holders
        busy = {k for k in keys if k in holders}
        for k in keys:
            holders[k] = holders.get(k, 0) + 1
        active = self._active.setdefault(workspace, {})
        claim = Claim(workspace, keys, busy, list(active), asyncio.get_running_loop().create_future())
        active[claim] = None
        return claim

    def release(self, claim: Claim) -> None:
        """The batch has ended (committed or rolled back)."""
        holders = self._holders
        for k in claim.keys:
            left = holders[k] - 1
            if left:
                holders[k] = left
            else:
                del holders[k]
        active = self._active[claim.workspace]
        del active[claim]
        if not active:
            del self._active[claim.workspace]
        # Each claim lists the ones before it: kept, the list would keep every claim since the
        # process was last idle, a chain that under steady load never ends.
        claim.earlier = []
        claim.done.set_result(None)

    def __len__(self) -> int:
        return sum(len(a) for a in self._active.values())


@dataclass(frozen=True)
class Groups:
    """Each event's group: events linked by a shared lock key (an id or phone) or message id."""

    of_event: list[Hashable]
    # The group of each lock key the batch takes.
    of_key: dict[int, Hashable]

    def split(self, busy: set[int]) -> tuple[list[int], list[int]]:
        """Event indexes that need none of ``busy`` (in order), then those that do."""
        waiting = {self.of_key[k] for k in busy}
        if not waiting:
            return list(range(len(self.of_event))), []
        now: list[int] = []
        later: list[int] = []
        for i, group in enumerate(self.of_event):
            (later if group in waiting else now).append(i)
        return now, later


def group_events(event_keys: Sequence[Sequence[int]], message_ids: Sequence[str]) -> Groups:
    """Union-find over each event's lock keys and message id."""
    parent: dict[Hashable, Hashable] = {}

    def find(x: Hashable) -> Hashable:
        root = x
        while (up := parent.get(root, root)) != root:
            root = up
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    firsts: list[Hashable] = []
    for keys, message_id in zip(event_keys, message_ids, strict=True):
        # A message id joins the events that repeat it, so a duplicate goes where the first is.
        # (Message ids are strings and lock keys ints: the two never meet.)
        first = find(message_id)
        for k in keys:
            other = find(k)
            if other != first:
                parent[other] = first
        firsts.append(first)
    return Groups([find(f) for f in firsts], {k: find(k) for keys in event_keys for k in keys})
