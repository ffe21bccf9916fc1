"""The worker: read → decode/validate → coalesce per run → upsert → ack.

Reading, writing and acknowledging overlap: one reader task feeds a bounded
channel that ``max_inflight`` writer tasks drain, so the next XREADGROUP runs
while the previous batch is decoded and written, and a slow or unavailable
store stops the reader (backpressure) instead of piling entries up in memory.
Reclaiming, lease renewal and the operational loops run beside it in one task
group; all of them stop together on SIGTERM/SIGINT:

1. stop reading (the reader finishes its current XREADGROUP BLOCK),
2. drain: in-flight batches are written and acknowledged within the grace period,
3. cancel whatever is left under the hard deadline; unacknowledged entries stay
   pending in the group and a peer (or this worker's next run) reclaims them.
"""

from __future__ import annotations

import gc
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from operator import attrgetter
from typing import Any, TypeVar

import anyio
import redis.asyncio as aioredis
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from tenacity import RetryCallState

from . import retry
from .batch import Batch
from .budget import MemoryBudget, payload_bytes
from .errors import GroupMissing, RedisRefused, RedisUnavailable
from .logs import get_logger
from .metrics import Metrics
from .redisclient import connect_settings
from .redisio import (
    Entry,
    ensure_group,
    group_drained,
    read_group,
    refresh_leases,
)
from .settings import Settings
from .sized_read import read_group_sized
from .stores.base import WriteStore
from .writer import BatchWriter, Outcome

T = TypeVar("T")

Loop = Callable[[], Awaitable[None]]
_ID = attrgetter("id")


class Worker:
    """One member of the fleet: a consumer in the group, with one reader and one reclaimer
    per stream (shard), sharing the writers.

    Each shard's reader asks for ``batch_size / shards`` entries at a time, so the memory
    a worker holds does not grow with the number of shards, and each shard may have at
    most :attr:`shard_budget` batches in the writers (or waiting for one) at once, so a
    backlog on one shard leaves writers free for the others.
    """

    def __init__(
        self,
        settings: Settings,
        store: WriteStore,
        redis: aioredis.Redis | None = None,
        metrics: Metrics | None = None,
        *,
        side_loops: Sequence[Loop] = (),
        handle_signals: bool = False,
    ) -> None:
        self.settings = settings
        #: How long the reader waits after a read that did not fill a batch (AUDIT_LINGER_MS).
        self.linger_s = settings.linger_ms / 1000
        self.store = store
        self._own_redis = redis is None
        self.redis: aioredis.Redis = redis  # type: ignore[assignment]  # connected in run()
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.prime(settings.streams, settings.group, store.name)
        self.side_loops = list(side_loops)
        self.handle_signals = handle_signals
        self.log = get_logger(group=settings.group, consumer=settings.consumer)
        self.held: dict[str, set[str]] = {s: set() for s in settings.streams}
        self.inflight = 0
        self.budget = MemoryBudget(settings.inflight_bytes, settings.batch_size,
                                   settings.max_event_bytes)
        self.stopping = False
        self._stop = anyio.Event()
        self._pipe_scope: anyio.CancelScope | None = None
        shards = len(settings.streams)
        #: Entries one read asks for: the batch size split between the shards.
        self.read_count = max(1, settings.batch_size // shards)
        #: Batches of one shard that may be in the writers (or waiting for one) at once.
        self.shard_budget = (settings.max_inflight if shards == 1
                             else max(1, (settings.max_inflight + 1) // 2))
        self._slots: dict[str, anyio.Semaphore] = {}
        self.writer = BatchWriter(self)

    # -- lifecycle -----------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop reading and drain (safe to call more than once)."""
        if not self.stopping:
            self.stopping = True
            self._stop.set()

    def count_read(self, entries: Sequence[Entry]) -> None:
        """Count entries read (new or reclaimed) and their payload bytes (a read is of one
        stream, as a :class:`Batch` is: one count per read, not per entry)."""
        if entries:
            stream = entries[0].stream
            self.metrics.events_read.labels(stream).inc(len(entries))
            self.metrics.bytes_read.labels(stream).inc(payload_bytes(entries))

    def beat(self, loop: str) -> None:
        self.metrics.heartbeat(loop)

    async def ensure_groups(self, streams: Sequence[str] | None = None) -> bool:
        """Create the consumer groups, waiting (backoff with jitter) while Redis cannot:
        unreachable, or at ``maxmemory`` (XGROUP CREATE is refused then). Returns False
        if the worker was stopped meanwhile."""
        retrying = retry.retrying(
            RedisUnavailable, initial_s=0.1, max_s=self.settings.retry_max_backoff_s,
            stop=lambda _: self.stopping,
            before_sleep=self.on_redis_retry("create_group"),
            sleep=self.sleep_or_stop,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    for stream in self.settings.streams if streams is None else streams:
                        if await ensure_group(self.redis, stream, self.settings.group):
                            self.log.info("group_created", stream=stream)
        except RedisUnavailable:
            return False  # stopped while waiting
        return True

    def redis_error(self, exc: RedisUnavailable | RedisRefused, op: str, **extra: Any) -> None:
        """Count and report one failed Redis command."""
        self.metrics.redis_error(exc)
        self.log.warning("redis_error", op=op, kind=exc.kind, error=exc.detail[:300], **extra)

    def on_redis_retry(self, op: str) -> Callable[[RetryCallState], None]:
        def report(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            if isinstance(exc, RedisUnavailable | RedisRefused):
                self.redis_error(exc, op, attempt=state.attempt_number,
                                 retry_in_s=round(wait, 3))
        return report

    def shard_slots(self, stream: str) -> anyio.Semaphore:
        """The in-flight budget of one shard (:attr:`shard_budget` batches)."""
        sem = self._slots.get(stream)
        if sem is None:
            sem = self._slots[stream] = anyio.Semaphore(self.shard_budget)
        return sem

    async def run(self) -> None:
        """Run until stopped (signal, :meth:`stop`, or an idle group in burst mode)."""
        if self.redis is None:
            self.redis = await connect_settings(self.settings)
        try:
            async with anyio.create_task_group() as outer:
                if self.handle_signals:
                    outer.start_soon(self._signal_watcher)
                try:
                    if await self.ensure_groups():
                        await self._run()
                finally:
                    outer.cancel_scope.cancel()
        finally:
            if self._own_redis:
                with anyio.move_on_after(2.0, shield=True):
                    await self.redis.aclose()
        self.log.info("worker_stopped")

    async def _run(self) -> None:
        from .reclaim import Reclaimer

        reclaimer = Reclaimer(self)
        send, recv = anyio.create_memory_object_stream[Batch](0)
        self.log.info("worker_started", streams=list(self.settings.streams),
                      store=self.store.name, burst=self.settings.burst,
                      read_count=self.read_count, shard_budget=self.shard_budget)
        with tuned_gc(self.settings.batch_size * GC_GEN0_PER_EVENT):
            await self._run_loops(reclaimer, send, recv)

    async def _run_loops(self, reclaimer: Any, send: MemoryObjectSendStream[Batch],
                         recv: MemoryObjectReceiveStream[Batch]) -> None:
        async with anyio.create_task_group() as side:
            side.start_soon(self._grace_watchdog)
            side.start_soon(self._supervise, "leases", self._lease_keeper)
            for loop in self.side_loops:
                side.start_soon(self._supervise, getattr(loop, "__name__", "loop"), loop)
            async with anyio.create_task_group() as pipe:
                self._pipe_scope = pipe.cancel_scope
                async with send, recv:
                    for stream in self.settings.streams:
                        pipe.start_soon(self._reader, send.clone(), stream)
                        pipe.start_soon(reclaimer.run, send.clone(), stream)
                    for _ in range(self.settings.max_inflight):
                        pipe.start_soon(self._writer, recv.clone())
            side.cancel_scope.cancel()

    async def _grace_watchdog(self) -> None:
        await self._stop.wait()
        if self._pipe_scope is not None:
            self._pipe_scope.deadline = anyio.current_time() + self.settings.shutdown_grace_s

    async def _signal_watcher(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if self.stopping:
                    self.log.warning("second_signal_cancelling", signal=signum)
                    if self._pipe_scope is not None:
                        self._pipe_scope.cancel()
                    return
                self.log.info("signal_received_draining", signal=signum,
                              grace_s=self.settings.shutdown_grace_s)
                self.stop()

    async def _supervise(self, name: str, loop: Loop) -> None:
        """Run a side loop forever; log a failure and start it again after a pause (1 s,
        doubling up to 30 s while it keeps failing)."""

        def report(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self.log.error("loop_failed", loop=name, exc_info=exc)

        async for attempt in retry.retrying(Exception, initial_s=1.0, max_s=30.0,
                                            before_sleep=report):
            with attempt:
                await loop()

    async def sleep_or_stop(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stop.wait()

    # -- reading -------------------------------------------------------------------

    async def _retrying_read(self, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, retried with backoff while Redis is unavailable (an outage, a cluster
        failover; the reader keeps beating meanwhile); re-raises RedisUnavailable if the
        worker stops."""
        async for attempt in retry.retrying(
            RedisUnavailable, initial_s=0.1, max_s=5.0, stop=lambda _: self.stopping,
            before_sleep=self.on_redis_retry("read"), sleep=self.sleep_or_stop,
        ):
            with attempt:
                self.beat("reader")
                return await read()
        raise AssertionError("unreachable: retrying re-raises")

    def shard_shares(self) -> int:
        """Readers the free budget is split between, one per shard, so the payload held
        does not grow with the number of shards."""
        return len(self.settings.streams)

    async def _read_sized(self, stream: str, count: int, *, first: bool
                          ) -> tuple[list[Entry], bool]:
        """What waits on ``stream`` and fits in the budget's grant (reserved meanwhile),
        at most ``count``; with ``first`` the first whatever its size (so an entry larger
        than the grant is not starved). Returns the entries and whether the next one did
        not fit."""
        s = self.settings
        with self.budget.reading(self.shard_shares()) as grant:
            return await read_group_sized(self.redis, s.group, s.consumer, stream, count,
                                          grant.nbytes, alone=first,
                                          max_event_bytes=s.max_event_bytes)

    async def _reader(self, send: ObjectSendStream[Batch], stream: str) -> None:
        """Read one shard: XREADGROUP on ``stream`` only, what the memory budget grants.

        What waits is sized before it is taken (worker/budget.py); only when nothing waits
        does the reader block, for one entry (its size unknown), then linger for the rest.
        """
        s = self.settings
        async with send:
            while not self.stopping:
                self.beat("reader")
                await self.budget.wait_for_room(lambda: self.beat("reader"),
                                                lambda: self.stopping)
                try:
                    entries, full = await self._retrying_read(
                        lambda: self._read_sized(stream, self.read_count, first=True))
                    if full:  # the next entry does not fit: until a batch is settled
                        await self.budget.wait_for_release(s.block_ms / 1000)
                        continue
                    if not entries:
                        entries = await self._retrying_read(lambda: read_group(
                            self.redis, s.group, s.consumer, stream, 1, s.block_ms))
                except RedisUnavailable:
                    continue  # stopped while Redis was unavailable
                except GroupMissing as exc:
                    self.log.warning("nogroup_recreating", stream=stream, error=exc.detail)
                    await self.ensure_groups([stream])
                    continue
                if not entries:
                    if s.burst and await self.drained():
                        self.log.info("burst_drained")
                        self.stop()
                    continue
                self.hold(entries)
                nbytes = self.budget.take(entries)
                if self.linger_s > 0 and len(entries) < self.read_count:
                    more = await self._linger(stream, len(entries))
                    self.hold(more)
                    nbytes += self.budget.take(more)
                    entries += more
                self.count_read(entries)
                await self.hand_over(send, Batch(entries, nbytes=nbytes), "reader")

    async def _linger(self, stream: str, have: int) -> list[Entry]:
        """After a short read, wait ``linger_s`` and read what arrived meanwhile (what the
        budget grants, up to a full read with the ``have`` entries already read).

        Under moderate load a blocking XREADGROUP returns as soon as one entry arrives,
        so without this every batch held two or three events, and the per-batch work
        (two Redis round trips, a store transaction, task switches: ~0.7 ms of CPU)
        dominated: 290 us of worker CPU per event at 3,000 events/s against 45 us at
        full speed. Waiting a few milliseconds for the rest of the batch costs at most
        that much latency and is skipped whenever a read fills a whole batch. With a
        store the same holds for its side: fewer, larger transactions (20 ms against
        5 ms at 3,100 events/s on PostgreSQL: 87 instead of 32 events per batch, 25%
        less worker CPU and 17% less server CPU per event, p50 +15 ms).
        """
        await anyio.sleep(self.linger_s)
        try:
            more, _ = await self._read_sized(stream, self.read_count - have, first=False)
        except (RedisUnavailable, GroupMissing):
            return []  # hand over what was read; the next read meets the error
        return more

    async def hand_over(self, send: ObjectSendStream[Batch], batch: Batch, loop: str) -> None:
        """Pass a batch to the writers, waiting while they are busy (backpressure).

        A batch first takes a place in its shard's budget (given back once it is
        settled), then waits for a writer. The wait can be long during a store outage;
        the loop keeps beating its heartbeat meanwhile, so /healthz reports a live
        process, not a stuck one.
        """
        slots = self.shard_slots(batch.stream)
        try:  # a place is free: no timeout scope needed
            slots.acquire_nowait()
        except anyio.WouldBlock:
            while True:
                with anyio.move_on_after(1.0):
                    await slots.acquire()
                    break
                self.beat(loop)
        try:
            if isinstance(send, MemoryObjectSendStream):
                try:  # a writer is already waiting: no timeout scope needed
                    send.send_nowait(batch)
                    return
                except anyio.WouldBlock:
                    pass
            while True:
                with anyio.move_on_after(1.0):
                    await send.send(batch)
                    return
                self.beat(loop)
        except BaseException:
            slots.release()
            raise

    def hold(self, entries: Sequence[Entry]) -> None:
        """Entries read, not yet settled (a read is of one stream: one set update)."""
        if entries:
            self.held.setdefault(entries[0].stream, set()).update(map(_ID, entries))

    def release(self, entries: Sequence[Entry]) -> None:
        if entries:
            self.held.get(entries[0].stream, set()).difference_update(map(_ID, entries))

    async def drained(self) -> bool:
        """True when nothing is in flight here and the group has no undelivered or
        pending entries on any stream (the ``--burst`` exit condition)."""
        if self.inflight or any(self.held.values()):
            return False
        for stream in self.settings.streams:
            try:
                if not await group_drained(self.redis, stream, self.settings.group):
                    return False
            except (RedisUnavailable, GroupMissing):
                return False
        return True

    # -- writing -------------------------------------------------------------------

    async def _writer(self, recv: ObjectReceiveStream[Batch]) -> None:
        async with recv:
            async for batch in recv:
                self.inflight += 1
                self.metrics.batches_in_flight.inc()
                try:
                    await self.process(batch)
                finally:
                    self.budget.release(batch.nbytes)
                    self.shard_slots(batch.stream).release()
                    self.inflight -= 1
                    self.metrics.batches_in_flight.dec()
                    self.beat("writer")

    async def process(self, batch: Batch) -> Outcome:
        """Decode, write durably, dead-letter what can never be stored, then acknowledge
        (:meth:`worker.writer.BatchWriter.process`)."""
        return await self.writer.process(batch)

    # -- leases ----------------------------------------------------------------------

    async def _lease_keeper(self) -> None:
        """Keep entries held here from looking idle to peers' XAUTOCLAIM.

        XCLAIM ... JUSTID resets an entry's idle time without incrementing its
        delivery count, so a batch waiting out a long store outage is neither stolen
        nor pushed towards the dead-letter threshold.
        """
        interval = max(0.05, self.settings.claim_idle_ms / 3000)
        while True:
            await anyio.sleep(interval)
            self.beat("leases")
            for stream, ids in list(self.held.items()):
                try:
                    await refresh_leases(self.redis, stream, self.settings.group,
                                         self.settings.consumer, list(ids))
                except RedisUnavailable as exc:
                    self.redis_error(exc, "lease")


#: Young-generation GC threshold per event of a batch while a worker runs.
GC_GEN0_PER_EVENT = 40

_gc_lock = threading.Lock()
_gc_users = 0
_gc_saved: tuple[int, int, int] = (700, 10, 10)


@contextmanager
def tuned_gc(gen0: int) -> Iterator[None]:
    """Make the cyclic garbage collector cheap for the worker's allocation pattern.

    Decoding and coalescing a batch creates tens of thousands of small dicts and lists
    that all live until the batch is acknowledged, and almost none form cycles. With
    the default young-generation threshold (700) the collector runs every few events
    and traverses every one of those still-live objects again each time, and its full
    collections walk every module object loaded at start-up (measured: a sixth of a
    worker's CPU on the null store). While any worker of the process runs, the
    start-up objects are
    frozen (``gc.freeze``: never traversed again) and the young generation is
    collected every ``gen0`` allocations (a few batches' worth), so most of a batch's
    objects are freed by reference counting before a collection sees them. The
    previous settings come back when the last worker stops.
    """
    global _gc_users, _gc_saved
    with _gc_lock:
        if _gc_users == 0:
            _gc_saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(max(gen0, _gc_saved[0]), _gc_saved[1], _gc_saved[2])
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0:
                gc.set_threshold(*_gc_saved)
                gc.unfreeze()
