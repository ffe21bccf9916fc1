"""The worker's memory budget, in bytes of event payload held (read, not yet settled).

Events range from a few hundred bytes to ``AUDIT_MAX_EVENT_BYTES`` (16 MiB), so a bound
in entries (``AUDIT_BATCH_SIZE`` x ``AUDIT_MAX_INFLIGHT``) is no bound at all: 500 events
of 1 MB are 500 MB of payload and several times that once decoded. Instead every read
is granted bytes, not entries, and the grant is reserved until the read returns:

- a read of new entries (XREADGROUP) measures the entries that wait before it takes them:
  one script sums their sizes after the group's last-delivered-id and delivers only those
  that fit in the grant (``worker.sized_read``), atomically, so a sudden jump
  from small entries to large ones cannot overshoot; its first entry is taken whatever its
  size, so an entry larger than the grant is never starved. Only when nothing waits does
  the reader block, for one entry (its size unknown until it arrives), and then read what
  arrived meanwhile the same sized way (without that first-entry allowance);
- a claim (XAUTOCLAIM) cannot measure first, so it takes as many entries as the grant holds
  at ``AUDIT_MAX_EVENT_BYTES`` each, and at least one;
- the grant is the free budget split between the shards; it is reserved while the read
  runs, so concurrent reads (shards, reclaim) never spend the same bytes twice;
- no read starts while the budget is spent, so with nothing held a single entry up to
  ``AUDIT_MAX_EVENT_BYTES`` is always processable alone.

So each of a shard's two reading loops (reader, reclaimer) adds at most its grant plus one
entry, and only while the budget is not spent: the payload held never exceeds
``AUDIT_INFLIGHT_BYTES + 2 x S x AUDIT_MAX_EVENT_BYTES`` for S shards, however entry sizes
jump (claimed entries are counted at ``AUDIT_MAX_EVENT_BYTES``: a larger one, dead-lettered
as ``too_large``, adds its excess). A worker's peak memory is about ``idle + F x
(AUDIT_INFLIGHT_BYTES + 2 x S x AUDIT_MAX_EVENT_BYTES)``, with F the memory per payload
byte while a batch is decoded and written (see docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import anyio

from .redisio import Entry


def payload_bytes(entries: Sequence[Entry]) -> int:
    return sum(len(e.payload or b"") for e in entries)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one read may take: ``nbytes`` of payload (reserved while it runs)."""

    nbytes: int


class MemoryBudget:
    """Payload bytes held by one worker, and what the next read may take."""

    def __init__(self, limit_bytes: int, batch_size: int, max_entry_bytes: int) -> None:
        self.limit = limit_bytes
        self.batch_size = batch_size
        self.max_entry = max_entry_bytes
        self.held = 0
        self._freed = anyio.Event()

    @contextmanager
    def reading(self, shares: int = 1) -> Iterator[Grant]:
        """Grant the next read the free budget split in ``shares``, reserved until the read
        has returned (then count what it read with :meth:`take`)."""
        grant = Grant(max(0, self.limit - self.held) // max(1, shares))
        self.held += grant.nbytes
        try:
            yield grant
        finally:
            self.held -= grant.nbytes
            if grant.nbytes:
                self._notify()

    def claim_count(self, grant: Grant) -> int:
        """Entries a claim may take, sizes unknown: what ``grant`` holds at
        ``AUDIT_MAX_EVENT_BYTES`` each (at most ``AUDIT_BATCH_SIZE``), and always one, so
        reclaim progresses while readers keep the budget busy."""
        return max(1, min(self.batch_size, grant.nbytes // self.max_entry))

    def take(self, entries: Sequence[Entry]) -> int:
        """Count ``entries`` as held; returns their payload bytes."""
        size = payload_bytes(entries)
        self.held += size
        return size

    def release(self, size: int) -> None:
        self.held = max(0, self.held - size)
        self._notify()

    def _notify(self) -> None:
        self._freed.set()
        self._freed = anyio.Event()

    async def wait_for_release(self, timeout_s: float) -> None:
        """Until some budget is given back (or ``timeout_s`` passed)."""
        with anyio.move_on_after(timeout_s):
            await self._freed.wait()

    async def wait_for_room(self, beat: Callable[[], None], stopping: Callable[[], bool]) -> None:
        """Wait while the budget is spent (never while nothing is held)."""
        while self.held and self.held >= self.limit and not stopping():
            await self.wait_for_release(1.0)
            beat()
