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
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis.asyncio as aioredis
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from tenacity import RetryCallState

from . import constants as c
from . import retry
from .batch import Batch
from .budget import MemoryBudget
from .documents import SUBJECTS, WriteBatch, coalesce, coalesce_each
from .erasure import hash_subjects
from .errors import (
    GroupMissing,
    InvalidEvent,
    RedisRefused,
    RedisUnavailable,
    StoreRejected,
    StoreTimeout,
    StoreUnavailable,
)
from .events import Decoded, decode
from .logs import get_logger
from .metrics import Metrics
from .redisclient import connect_settings
from .redisio import (
    DeadLetter,
    Entry,
    ack,
    dead_lettered_ids,
    ensure_group,
    group_drained,
    read_group,
    refresh_leases,
    write_dead_letters,
)
from .settings import Settings
from .signing import UNSIGNED, SignaturePolicy, mismatch
from .stores.base import WriteResult, WriteStore

#: Errors that mean Redis is (briefly) unavailable: back off and try again. The Redis
#: edge (:mod:`worker.redisio`) raises :class:`RedisUnavailable` for connection errors,
#: out of memory and cluster failovers alike.
REDIS_TRANSIENT = (RedisUnavailable,)

#: Attempts at a dead letter Redis refuses for good (WRONGTYPE …) before its entry is
#: left pending for a later redelivery instead (it is never acknowledged without one).
DEAD_LETTER_REFUSED_ATTEMPTS = 5

#: After a write timed out: how long a ping may take for the store to count as answering
#: (then the write was too large, and is split); a store that does not answer is down.
STORE_PING_TIMEOUT_S = 5.0

Loop = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Outcome:
    """What happened to a batch: acknowledged entries, dead letters, entries left pending."""

    written: list[Entry] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    abandoned: list[Entry] = field(default_factory=list)


def prepare(
    entries: Sequence[Entry], max_bytes: int, max_deliveries: int,
    signatures: SignaturePolicy | None = None,
) -> tuple[list[tuple[str, Decoded]], list[DeadLetter]]:
    """Decode a batch: valid events keyed by their index, and dead letters (pure).

    With ``signatures``, each entry's signature is checked before its payload is
    decoded (``worker.signing``)."""
    valid: list[tuple[str, Decoded]] = []
    dead: list[DeadLetter] = []
    for index, entry in enumerate(entries):
        if entry.deliveries > max_deliveries:
            dead.append(DeadLetter(entry, c.Reason.MAX_DELIVERIES,
                                   f"delivered {entry.deliveries} times "
                                   f"(AUDIT_MAX_DELIVERIES={max_deliveries})"))
            continue
        if entry.payload is None:
            dead.append(DeadLetter(entry, c.Reason.MISSING_FIELD,
                                   f"entry has no {c.EVENT_FIELD!r} field"))
            continue
        if entry.extra_payloads:
            dead.append(DeadLetter(entry, c.Reason.DUPLICATE_FIELD,
                                   f"entry has {1 + len(entry.extra_payloads)} "
                                   f"{c.EVENT_FIELD!r} fields: ambiguous, none is stored"))
            continue
        verdict = UNSIGNED
        if signatures is not None and len(entry.payload) <= max_bytes:
            verdict = signatures.check(entry.payload, entry.sig)
            if verdict.reason is not None:
                dead.append(DeadLetter(entry, verdict.reason, verdict.error))
                continue
        try:
            decoded = decode(entry.payload, max_bytes=max_bytes)
        except InvalidEvent as exc:
            dead.append(DeadLetter(entry, exc.reason, exc.detail))
            continue
        except Exception as exc:  # a defect met by this entry: its verdict, not the batch's
            dead.append(DeadLetter(entry, c.Reason.PROCESSING_ERROR, _failure("decode", exc)))
            continue
        if signatures is not None:
            wrong = mismatch(verdict, decoded.event.workspaceId)
            if wrong is not None and wrong.reason is not None:
                dead.append(DeadLetter(entry, wrong.reason, wrong.error))
                continue
            if verdict.key_id is not None:
                decoded = Decoded(decoded.event, decoded.doc, verdict.key_id)
        valid.append((str(index), decoded))
    return valid, dead


def _failure(stage: str, exc: BaseException) -> str:
    return f"{stage}: {type(exc).__name__}: {exc}"


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
        retry_max_backoff_s: float = 10.0,
        linger_s: float | None = None,
    ) -> None:
        self.settings = settings
        #: How long the reader waits after a read that did not fill a batch (AUDIT_LINGER_MS).
        self.linger_s = settings.linger_ms / 1000 if linger_s is None else linger_s
        self.store = store
        self._own_redis = redis is None
        self.redis: aioredis.Redis = redis  # type: ignore[assignment]  # connected in run()
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.prime(settings.streams, settings.group, store.name)
        self.side_loops = list(side_loops)
        self.handle_signals = handle_signals
        self.retry_max_backoff_s = retry_max_backoff_s
        self.log = get_logger(group=settings.group, consumer=settings.consumer)
        self.held: dict[str, set[str]] = {s: set() for s in settings.streams}
        self.inflight = 0
        self.budget = MemoryBudget(settings.inflight_bytes, settings.batch_size)
        self.stopping = False
        self._stop = anyio.Event()
        self._pipe_scope: anyio.CancelScope | None = None
        self.signatures = SignaturePolicy.of(settings)
        self.redactor = settings.redactor()
        shards = len(settings.streams)
        #: Entries one read asks for: the batch size split between the shards.
        self.read_count = max(1, settings.batch_size // shards)
        #: Batches of one shard that may be in the writers (or waiting for one) at once.
        self.shard_budget = (settings.max_inflight if shards == 1
                             else max(1, (settings.max_inflight + 1) // 2))
        self._slots: dict[str, anyio.Semaphore] = {}

    # -- lifecycle -----------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop reading and drain (safe to call more than once)."""
        if not self.stopping:
            self.stopping = True
            self._stop.set()

    def count_read(self, entries: Sequence[Entry]) -> None:
        """Count entries read (new or reclaimed) and their payload bytes, per stream."""
        for name, count in _count_by_stream(entries).items():
            self.metrics.events_read.labels(name).inc(count)
        size: dict[str, int] = {}
        for entry in entries:
            size[entry.stream] = size.get(entry.stream, 0) + len(entry.payload or b"")
        for name, total in size.items():
            self.metrics.bytes_read.labels(name).inc(total)

    def beat(self, loop: str) -> None:
        self.metrics.heartbeat(loop)

    async def ensure_groups(self, streams: Sequence[str] | None = None) -> bool:
        """Create the consumer groups, waiting (backoff with jitter) while Redis cannot:
        unreachable, or at ``maxmemory`` (XGROUP CREATE is refused then). Returns False
        if the worker was stopped meanwhile."""
        retrying = retry.retrying(
            RedisUnavailable, initial_s=0.1, max_s=self.retry_max_backoff_s,
            stop=lambda _: self.stopping,
            before_sleep=self._on_redis_retry("create_group"),
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

    def _on_redis_retry(self, op: str) -> Callable[[RetryCallState], None]:
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

    async def _read_group(self, stream: str, count: int) -> list[Entry]:
        """One XREADGROUP on ``stream``, retried with backoff while Redis is unavailable
        (an outage, a cluster failover; the reader keeps beating meanwhile); re-raises
        RedisUnavailable if the worker stops."""
        s = self.settings
        async for attempt in retry.retrying(
            RedisUnavailable, initial_s=0.1, max_s=5.0, stop=lambda _: self.stopping,
            before_sleep=self._on_redis_retry("read"), sleep=self.sleep_or_stop,
        ):
            with attempt:
                self.beat("reader")
                return await read_group(self.redis, s.group, s.consumer, stream, count,
                                        s.block_ms)
        raise AssertionError("unreachable: retrying re-raises")

    def shard_read_count(self) -> int:
        """Entries one shard's read may ask for: the memory budget's count split between
        the shards, so the payload held does not grow with the number of shards."""
        return max(1, self.budget.read_count() // len(self.settings.streams))

    async def _reader(self, send: ObjectSendStream[Batch], stream: str) -> None:
        """Read one shard: XREADGROUP on ``stream`` only."""
        s = self.settings
        async with send:
            while not self.stopping:
                self.beat("reader")
                await self.budget.wait_for_room(lambda: self.beat("reader"),
                                                lambda: self.stopping)
                count = self.shard_read_count()
                try:
                    entries = await self._read_group(stream, count)
                except RedisUnavailable:
                    continue  # stopped while Redis was unavailable
                except GroupMissing as exc:
                    self.log.warning("nogroup_recreating", stream=stream, error=exc.detail)
                    await self.ensure_groups([stream])
                    continue
                if entries and self.linger_s > 0 and len(entries) < count:
                    entries = await self._linger(stream, entries, count)
                if not entries:
                    if s.burst and await self.drained():
                        self.log.info("burst_drained")
                        self.stop()
                    continue
                self.hold(entries)
                self.count_read(entries)
                nbytes = self.budget.take(entries)
                await self.hand_over(send, Batch(entries, nbytes=nbytes), "reader")

    async def _linger(self, stream: str, entries: list[Entry], count: int) -> list[Entry]:
        """After a short read, wait ``linger_s`` and add what arrived meanwhile.

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
        s = self.settings
        await anyio.sleep(self.linger_s)
        try:
            more = await read_group(self.redis, s.group, s.consumer, stream,
                                    count - len(entries), None)
        except (RedisUnavailable, GroupMissing):
            return entries  # hand over what was read; the next read meets the error
        return entries + more

    async def hand_over(self, send: ObjectSendStream[Batch], batch: Batch, loop: str) -> None:
        """Pass a batch to the writers, waiting while they are busy (backpressure).

        A batch first takes a place in its shard's budget (given back once it is
        settled), then waits for a writer. The wait can be long during a store outage;
        the loop keeps beating its heartbeat meanwhile, so /healthz reports a live
        process, not a stuck one.
        """
        slots = self.shard_slots(batch.stream)
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
        for e in entries:
            self.held.setdefault(e.stream, set()).add(e.id)

    def release(self, entries: Sequence[Entry]) -> None:
        for e in entries:
            self.held.get(e.stream, set()).discard(e.id)

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
        """Decode, write durably, dead-letter what can never be stored, then acknowledge."""
        s = self.settings
        valid, dead = prepare(batch.entries, s.max_event_bytes, s.max_deliveries,
                              self.signatures)
        outcome = Outcome(dead=dead)
        key = s.subject_key
        for _, decoded in valid:  # before redaction: subjects are hashed, never masked
            if SUBJECTS in decoded.doc:
                hash_subjects(decoded.doc, key)
        found: dict[str, int] = {}
        if self.redactor is not None:
            valid = self._redact(valid, batch.entries, outcome, found)
        if valid:
            work = _Work(outcome, {src: batch.entries[int(src)] for src, _ in valid}, dict(valid))
            coalesced, failed = coalesce_each(valid)
            for source, exc in failed.items():
                outcome.dead.append(DeadLetter(work.by_source[source], c.Reason.PROCESSING_ERROR,
                                               _failure("coalesce", exc)))
            if coalesced.runs:
                await self._write_all(coalesced, work)
        if self.redactor is not None:
            self._redact_dead(outcome, found)
        await self._settle(outcome)
        for detector, count in found.items():
            self.metrics.redactions.labels(detector).inc(count)
        self.release(batch.entries)
        now_ms = time.time() * 1000
        self.metrics.end_to_end_seconds.observe_many(
            [max(0.0, now_ms - entry.id_ms) / 1000 for entry in outcome.written])
        for name, count in _count_by_stream(outcome.written).items():
            self.metrics.events_written.labels(name).inc(count)
        for d in outcome.dead:
            self.metrics.events_dead_lettered.labels(d.entry.stream, d.reason).inc()
            self.log.warning("dead_lettered", stream=d.entry.stream, id=d.entry.id,
                             reason=d.reason, error=d.error[:300], deliveries=d.entry.deliveries)
        if outcome.written:
            self.metrics.batches.labels(outcome.written[0].stream).inc()
            self.metrics.batch_size.observe(len(outcome.written))
        return outcome

    def _redact(self, valid: list[tuple[str, Decoded]], entries: Sequence[Entry],
                outcome: Outcome, found: dict[str, int]) -> list[tuple[str, Decoded]]:
        """Redact each event before it is coalesced (``worker.redaction``); an error
        redacting one entry is that entry's verdict."""
        assert self.redactor is not None
        kept = []
        for source, decoded in valid:
            try:
                self.redactor.event(decoded.doc, found)
            except Exception as exc:
                outcome.dead.append(DeadLetter(entries[int(source)], c.Reason.PROCESSING_ERROR,
                                               _failure("redact", exc)))
                continue
            kept.append((source, decoded))
        return kept

    def _redact_dead(self, outcome: Outcome, found: dict[str, int]) -> None:
        """Redact the payloads of the dead letters about to be written."""
        assert self.redactor is not None
        for d in outcome.dead:
            try:
                if d.entry.payload:
                    d.entry.payload = self.redactor.payload(d.entry.payload, found)
                if d.entry.extra_payloads:
                    d.entry.extra_payloads = tuple(self.redactor.payload(p, found)
                                                   for p in d.entry.extra_payloads)
            except Exception:  # kept as received: a dead letter is never dropped
                self.log.exception("dead_letter_redaction_failed", stream=d.entry.stream,
                                   id=d.entry.id)

    async def _write_all(self, batch: WriteBatch, work: _Work) -> None:
        """Write ``batch``; a part the store rejects, or fails on unexpectedly, is split
        (per run, then per entry) until only the entries at fault are left."""
        outcome = work.outcome
        try:
            result = await self._write(batch)
        except StoreRejected as exc:
            parts = work.split(batch)
            if parts is None:
                self._reject(batch, str(exc), work.by_source, outcome)
                return
            self.log.warning("batch_rejected_splitting", runs=len(batch.runs), parts=len(parts),
                             error=str(exc)[:300])
            for part in parts:
                await self._write_all(part, work)
            return
        except _TooSlow as exc:
            parts = work.split(batch)
            if parts is not None:
                self.log.warning("batch_timed_out_splitting", runs=len(batch.runs),
                                 parts=len(parts), error=str(exc.__cause__)[:300])
                for part in parts:
                    await self._write_all(part, work)
                return
            # One entry that cannot be written within the store's timeout even alone:
            # left pending, redelivered, dead-lettered after AUDIT_MAX_DELIVERIES.
            entries = [work.by_source[src] for src in batch.sources()]
            self.log.error("entry_timed_out_leaving_pending", error=str(exc.__cause__)[:300],
                           entries=len(entries))
            outcome.abandoned.extend(entries)
            return
        except Exception as exc:
            parts = work.split(batch)
            if parts is not None:
                self.log.exception("batch_failed_splitting", runs=len(batch.runs),
                                   parts=len(parts))
                for part in parts:
                    await self._write_all(part, work)
                return
            # One entry that fails for an unknown reason: leave it pending; it is
            # redelivered by reclaim and dead-lettered after AUDIT_MAX_DELIVERIES.
            entries = [work.by_source[src] for src in batch.sources()]
            self.log.error("write_failed_leaving_pending", error=repr(exc)[:300],
                           entries=len(entries))
            outcome.abandoned.extend(entries)
            return
        rejected: set[str] = set()
        for rejection in result.rejected:
            for source in rejection.sources:
                if source not in rejected and source in work.by_source:
                    rejected.add(source)
                    outcome.dead.append(DeadLetter(work.by_source[source],
                                                   c.Reason.STORE_REJECTED, rejection.reason))
        outcome.written.extend(work.by_source[src]
                               for src in sorted(batch.sources() - rejected, key=int))

    def _reject(self, batch: WriteBatch, reason: str, by_source: dict[str, Entry],
                outcome: Outcome) -> None:
        for source in sorted(batch.sources(), key=int):
            outcome.dead.append(DeadLetter(by_source[source], c.Reason.STORE_REJECTED, reason))

    async def _write(self, batch: WriteBatch) -> WriteResult:
        """One durable write; transient store errors are retried with exponential
        backoff and jitter (bounded delay, no attempt limit: during an outage entries
        stay pending and unacknowledged, and the reader stops — backpressure)."""
        store = self.store.name
        retrying = retry.retrying(
            StoreUnavailable, initial_s=0.05, max_s=self.retry_max_backoff_s,
            before_sleep=self._on_retry,
        )
        async for attempt in retrying:
            with attempt:
                start = time.perf_counter()
                outcome = "ok"
                try:
                    return await self.store.write(batch)
                except StoreTimeout as exc:
                    outcome = "timeout"
                    if await self._store_answers():
                        raise _TooSlow() from exc  # the store is fine: this write is too big
                    raise
                except StoreUnavailable:
                    outcome = "unavailable"
                    raise
                except StoreRejected:
                    outcome = "rejected"
                    raise
                except Exception:
                    outcome = "error"
                    raise
                finally:
                    self.metrics.store_write_seconds.labels(store, outcome).observe(
                        time.perf_counter() - start
                    )
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _store_answers(self) -> bool:
        """Whether the store answers a ping promptly (after a write timed out)."""
        try:
            with anyio.fail_after(STORE_PING_TIMEOUT_S):
                await self.store.ping()
        except (StoreUnavailable, TimeoutError):
            return False
        return True

    def _on_retry(self, state: RetryCallState) -> None:
        self.metrics.retries.labels(self.store.name).inc()
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        self.beat("writer")
        self.log.warning("store_unavailable_retrying", attempt=state.attempt_number,
                         retry_in_s=round(wait, 3), error=str(exc)[:300])

    async def _settle(self, outcome: Outcome) -> None:
        """Dead-letter, check each reply, then ACK only what is stored or confirmed.

        Redis errors are retried with backoff and jitter (unbounded while Redis is
        unavailable or at ``maxmemory``: the writers wait, the reader stops). A dead
        letter Redis refuses for good (WRONGTYPE …) is tried a few times, then its
        entry is left pending for redelivery; ``outcome.dead`` keeps only the dead
        letters Redis confirmed.
        """
        state = _Settling(list(outcome.written), list(outcome.dead))
        # Dead letters are rare: always look for one written before (a peer that died
        # between XADD and XACK, or a Redis restart that rolled a delivery back).
        state.check_existing = bool(state.todo)
        retrying = retry.retrying(
            (RedisUnavailable, RedisRefused), initial_s=0.05, max_s=self.retry_max_backoff_s,
            stop=_stop_when_refused(DEAD_LETTER_REFUSED_ATTEMPTS),
            before_sleep=self._on_redis_retry("settle"),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._settle_step(state)
        except RedisRefused as exc:
            left = [d.entry for d in state.todo]
            self.redis_error(exc, "dead_letter", left_pending=len(left))
            self.log.error("dead_letter_refused_left_pending", entries=len(left),
                           error=exc.detail[:300])
            outcome.abandoned.extend(left)
        outcome.dead = state.confirmed

    async def _settle_step(self, state: _Settling) -> None:
        if state.to_ack:  # what is stored is acknowledged whatever the dead letters meet
            await ack(self.redis, self.settings.group, state.to_ack)
            state.to_ack = []
        if state.todo and state.check_existing:
            # A previous delivery (or attempt) may have written the dead letter before
            # dying: do not write a second one for the same entry.
            existing: set[tuple[str, str]] = set()
            for stream in {d.entry.stream for d in state.todo}:
                entries = [d.entry for d in state.todo if d.entry.stream == stream]
                existing |= {(stream, i) for i in
                             await dead_lettered_ids(self.redis, stream, entries)}
            state.confirm([d for d in state.todo if (d.entry.stream, d.entry.id) in existing])
            state.check_existing = False
        refused: list[tuple[DeadLetter, RedisUnavailable | RedisRefused]] = []
        if state.todo:
            state.check_existing = True  # if the XADDs fail midway, which were written?
            refused = await write_dead_letters(self.redis, self.settings.consumer, state.todo)
            state.check_existing = False
            not_written = {id(d) for d, _ in refused}
            state.confirm([d for d in state.todo if id(d) not in not_written])
        if state.to_ack:
            await ack(self.redis, self.settings.group, state.to_ack)
            state.to_ack = []
        if refused:
            errors = [e for _, e in refused]
            raise next((e for e in errors if isinstance(e, RedisUnavailable)), errors[0])

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


class _TooSlow(Exception):
    """A write timed out while the store answers pings: split it instead of retrying it."""


@dataclass(slots=True)
class _Work:
    """One batch being written: its outcome, and its entries and events by source."""

    outcome: Outcome
    by_source: dict[str, Entry]
    decoded: dict[str, Decoded]

    def split(self, batch: WriteBatch) -> list[WriteBatch] | None:
        """Smaller parts of ``batch``: one per run, else one per entry; None for one entry."""
        if len(batch.runs) > 1:
            return batch.split_by_run()
        sources = sorted(batch.sources(), key=int)
        if len(sources) <= 1:
            return None
        return [coalesce([(src, self.decoded[src])]) for src in sources]


@dataclass(slots=True)
class _Settling:
    """Progress of one batch's settle across retries (nothing is written or ACKed twice)."""

    to_ack: list[Entry]
    todo: list[DeadLetter]
    confirmed: list[DeadLetter] = field(default_factory=list)
    check_existing: bool = False

    def confirm(self, done: list[DeadLetter]) -> None:
        if not done:
            return
        ids = {id(d) for d in done}
        self.todo = [d for d in self.todo if id(d) not in ids]
        self.confirmed.extend(done)
        self.to_ack.extend(d.entry for d in done)


def _stop_when_refused(attempts: int) -> Callable[[RetryCallState], bool]:
    """Stop retrying a refused dead letter after ``attempts``; never while Redis is
    merely unavailable."""
    def stop(state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        return isinstance(exc, RedisRefused) and state.attempt_number >= attempts
    return stop


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


def _count_by_stream(entries: Sequence[Entry]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.stream] = counts.get(e.stream, 0) + 1
    return counts




