"""The worker's memory budget, in bytes of event payload held (read, not yet settled).

Events range from a few hundred bytes to ``AUDIT_MAX_EVENT_BYTES`` (16 MiB), so a bound
in entries (``AUDIT_BATCH_SIZE`` x ``AUDIT_MAX_INFLIGHT``) is no bound at all: 500 events
of 1 MB are 500 MB of payload and several times that once decoded. Instead:

- every read (XREADGROUP and XAUTOCLAIM) asks for as many entries as the free budget holds
  at the entry size seen so far (a running mean that follows growth at once and decay
  gradually; the very first read takes one entry), never more than ``AUDIT_BATCH_SIZE``;
- no read starts while the payload held is at or over ``AUDIT_INFLIGHT_BYTES``;
- with nothing held, a read asks for at least one entry: a single entry up to
  ``AUDIT_MAX_EVENT_BYTES`` is always processable alone, whatever the budget.

So the payload held stays below ``AUDIT_INFLIGHT_BYTES`` plus the misestimate of one read
(at worst one read of entries larger than the mean seen), and a worker's peak memory is
about ``idle + F * max(AUDIT_INFLIGHT_BYTES, AUDIT_MAX_EVENT_BYTES)``, with F the memory
per payload byte while a batch is decoded and written (see docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio

from .redisio import Entry

#: Weight of the newest read in the running mean of entry sizes when entries get
#: smaller (a larger mean is taken at once, so a shift to large events is not
#: misestimated for more than one read).
MEAN_WEIGHT = 0.5


def payload_bytes(entries: Sequence[Entry]) -> int:
    return sum(len(e.payload or b"") for e in entries)


class MemoryBudget:
    """Payload bytes held by one worker, and how many entries the next read may take."""

    def __init__(self, limit_bytes: int, batch_size: int) -> None:
        self.limit = limit_bytes
        self.batch_size = batch_size
        self.held = 0
        #: Running mean of entry sizes; None until a read has been seen (then reads
        #: take one entry: nothing is known of their size yet).
        self.mean_entry: float | None = None
        self._freed = anyio.Event()

    def read_count(self) -> int:
        """Entries the next read may ask for: what the free budget holds, 1 at least."""
        if self.mean_entry is None:
            return 1
        free = max(0, self.limit - self.held)
        return max(1, min(self.batch_size, int(free // max(self.mean_entry, 1.0))))

    def take(self, entries: Sequence[Entry]) -> int:
        """Count ``entries`` as held and learn their size; returns their payload bytes."""
        size = payload_bytes(entries)
        if entries:
            mean = size / len(entries)
            known = self.mean_entry
            self.mean_entry = (mean if known is None or mean > known
                               else MEAN_WEIGHT * mean + (1 - MEAN_WEIGHT) * known)
        self.held += size
        return size

    def release(self, size: int) -> None:
        self.held = max(0, self.held - size)
        self._freed.set()
        self._freed = anyio.Event()

    async def wait_for_room(self, beat: Callable[[], None], stopping: Callable[[], bool]) -> None:
        """Wait while the budget is spent (never while nothing is held)."""
        while self.held and self.held >= self.limit and not stopping():
            with anyio.move_on_after(1.0):
                await self._freed.wait()
            beat()
