"""Batches of this process that hold (or are taking) their locks, and the split of a new batch
into the events that can go ahead now and those that must wait for an earlier batch.

Two batches of one workspace almost always share a few users (any two batches of 1,000 events
over 50,000 users do), so a batch that took all its locks up front waited for the whole of the
earlier batch's transaction. Instead, the events whose ids, phones and message ids are
untouched by earlier batches of this process — groups closed under the ids, phones and message
ids they share — are locked, resolved and written first, while the earlier batch still runs;
the rest after, once its locks are free. Both parts are one transaction: the batch still commits
whole or not at all. Stored links can join groups the batch does not show as joined (one user's
anonymous id and user id in two groups, users sharing a contact, a stored user joined into a new
one): when the later part reaches a user or contact the first one had or created, the batch runs
again unsplit (``record._record``), so a batch
always means what it means resolved whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass
class Claim:
    """One batch's claim on its lock keys, from before its transaction starts until it ends."""

    keys: Sequence[int]
    # Of ``keys``, those an earlier batch of this process had claimed, and the ends of those batches.
    busy: set[int]
    earlier: set[asyncio.Future[None]]
    done: asyncio.Future[None]

    async def wait_for_earlier(self, within: float) -> None:
        """Until the earlier batches sharing a key have ended, or for ``within`` seconds at most.

        The part that waits takes its locks only then, so it never queues in PostgreSQL ahead
        of the earlier batch that still needs the same key (two such batches deadlocked). The
        wait is bounded: a cycle through a batch of another process, or a user row reached
        through two different ids, then becomes a PostgreSQL lock wait, which PostgreSQL
        detects as a deadlock, and the batch that loses runs again.
        """
        if self.earlier:
            await asyncio.wait(self.earlier, timeout=within)


class InFlight:
    """The lock keys claimed by this process's batches."""

    def __init__(self) -> None:
        self._holders: dict[int, list[asyncio.Future[None]]] = {}

    def claim(self, keys: Sequence[int]) -> Claim:
        """Register ``keys`` for a new batch: later batches will wait for it where they share one."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        busy: set[int] = set()
        earlier: set[asyncio.Future[None]] = set()
        holders = self._holders
        for k in keys:
            held = holders.get(k)
            if held:
                busy.add(k)
                earlier.update(held)
                held.append(done)
            else:
                holders[k] = [done]
        return Claim(keys, busy, earlier, done)

    def release(self, claim: Claim) -> None:
        """The batch has ended (committed or rolled back)."""
        holders = self._holders
        for k in claim.keys:
            held = holders[k]
            held.remove(claim.done)
            if not held:
                del holders[k]
        claim.done.set_result(None)

    def __len__(self) -> int:
        return len(self._holders)


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
        first = find(("message", message_id))
        for k in keys:
            other = find(k)
            if other != first:
                parent[other] = first
        firsts.append(first)
    return Groups([find(f) for f in firsts], {k: find(k) for keys in event_keys for k in keys})
