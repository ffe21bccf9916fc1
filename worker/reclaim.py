"""Reclaim: take over entries that crashed or stuck peers left pending (XAUTOCLAIM).

One reclaimer loop runs per stream (shard). Each sweep walks the group's pending
entries list with XAUTOCLAIM, carrying the cursor between calls until it wraps to
``0-0``. Claimed entries go through the same pipeline as new ones (same backpressure,
same per-shard budget); an entry delivered more than ``AUDIT_MAX_DELIVERIES`` times is
a poison message and is dead-lettered instead. Redis 7 also returns the IDs of pending
entries that no longer exist in the stream (deleted or trimmed); it has already
removed them from the pending list, so they are counted and logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from anyio.abc import ObjectSendStream

from .batch import Batch
from .budget import MemoryBudget
from .errors import GroupMissing, RedisRefused, RedisUnavailable
from .metrics import Metrics
from .redisio import Entry, autoclaim
from .settings import Settings


def claim_interval(settings: Settings) -> float:
    return max(0.05, min(settings.reclaim_interval_s, settings.claim_idle_ms / 1000))


class Worker(Protocol):
    """What the reclaimer uses of the worker it runs in (:class:`worker.consumer.Worker`)."""

    settings: Settings
    redis: aioredis.Redis
    metrics: Metrics
    log: Any
    budget: MemoryBudget
    #: Entry IDs held (read, not yet settled) per stream.
    held: dict[str, set[str]]

    @property
    def stopping(self) -> bool: ...

    def beat(self, loop: str) -> None: ...

    def redis_error(self, exc: RedisUnavailable | RedisRefused, op: str, **extra: Any) -> None: ...

    async def ensure_groups(self, streams: Sequence[str] | None = None) -> bool: ...

    async def sleep_or_stop(self, seconds: float) -> None: ...

    def count_read(self, entries: list[Entry]) -> None: ...

    def hold(self, entries: list[Entry]) -> None: ...

    def shard_shares(self) -> int: ...

    async def hand_over(self, send: ObjectSendStream[Batch], batch: Batch, loop: str) -> None: ...


class Reclaimer:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.metrics = worker.metrics
        self.log = worker.log
        self.cursors: dict[str, str] = {s: "0-0" for s in self.settings.streams}

    async def run(self, send: ObjectSendStream[Batch], stream: str) -> None:
        """Sweep ``stream`` every claim interval until the worker stops."""
        async with send:
            while not self.worker.stopping:
                self.worker.beat("reclaim")
                try:
                    await self.sweep(stream, send)
                except RedisUnavailable as exc:
                    self.worker.redis_error(exc, "reclaim", stream=stream)
                except GroupMissing:
                    await self.worker.ensure_groups([stream])
                    self.cursors[stream] = "0-0"
                if self.worker.stopping:
                    return
                await self.worker.sleep_or_stop(claim_interval(self.settings))

    async def sweep(self, stream: str, send: ObjectSendStream[Batch] | None = None) -> list[Entry]:
        """One pass over the pending entries list of ``stream``; returns what was claimed.

        With ``send`` the claimed entries are handed to the pipeline batch by batch;
        without it they are returned (tests, tools).
        """
        claimed_all: list[Entry] = []
        budget = self.worker.budget
        while True:
            if send is None:
                count = self.settings.batch_size
            else:
                await budget.wait_for_room(lambda: self.worker.beat("reclaim"),
                                           lambda: self.worker.stopping)
                # Claimed sizes are unknown until claimed: as many as the grant holds at
                # AUDIT_MAX_EVENT_BYTES each (worker/budget.py), the grant reserved meanwhile.
                with budget.reading(self.worker.shard_shares()) as grant:
                    count = budget.claim_count(grant)
                    cursor, claimed, deleted = await self.claim(
                        stream, self.cursors.get(stream, "0-0"), count)
            if send is None:
                cursor, claimed, deleted = await self.claim(
                    stream, self.cursors.get(stream, "0-0"), count)
            self.cursors[stream] = cursor
            held = self.worker.held.get(stream, set())
            if held and claimed:
                # Entries this worker already holds (their lease lapsed while Redis was
                # away) stay with the batch that holds them: processing one twice at once
                # could write its dead letter twice.
                claimed = [e for e in claimed if e.id not in held]
            if deleted:
                self.metrics.entries_reclaimed_deleted.labels(stream).inc(len(deleted))
                self.log.warning("reclaimed_deleted_entries", stream=stream, count=len(deleted),
                                 first=deleted[0])
            if claimed:
                self.metrics.entries_reclaimed.labels(stream).inc(len(claimed))
                self.worker.count_read(claimed)
                self.log.info("reclaimed", stream=stream, count=len(claimed))
                if send is None:
                    claimed_all.extend(claimed)
                else:
                    self.worker.hold(claimed)
                    nbytes = budget.take(claimed)
                    await self.worker.hand_over(send, Batch(claimed, nbytes=nbytes),
                                                "reclaim")
            if cursor == "0-0" or self.worker.stopping:
                return claimed_all

    async def claim(self, stream: str, cursor: str, count: int | None = None
                    ) -> tuple[str, list[Entry], list[str]]:
        """One XAUTOCLAIM call (``count`` entries at most, default AUDIT_BATCH_SIZE), with
        the delivery count of every claimed entry."""
        s = self.settings
        return await autoclaim(self.worker.redis, stream, s.group, s.consumer, s.claim_idle_ms,
                               cursor, count or s.batch_size)
