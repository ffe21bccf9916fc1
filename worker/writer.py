"""The write path of one batch: decode → redact → coalesce → upsert → dead-letter → ack.

A writer task of the worker (:meth:`worker.consumer.Worker._writer`) hands each batch
to :meth:`BatchWriter.process`. Every entry gets its own verdict: stored (then
acknowledged), dead-lettered (acknowledged once Redis confirmed the dead letter), or
left pending for a redelivery. The write is confirmed before the ACK is sent; transient
store and Redis errors are retried with backoff and jitter, without limit, while the
entries stay pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio
import redis.asyncio as aioredis
from tenacity import RetryCallState

from . import constants as c
from . import retry
from .batch import Batch
from .deadletter import DeadLetter
from .documents import SUBJECTS, Record, WriteBatch, coalesce_each, coalesce_records
from .erasure import hash_subjects
from .errors import (
    InvalidEvent,
    RedisRefused,
    RedisUnavailable,
    StoreRejected,
    StoreTimeout,
    StoreUnavailable,
)
from .intake import decode_doc
from .metrics import Metrics
from .redisio import (
    Entry,
    ack,
    dead_letter,
    dead_lettered_ids,
    write_dead_letters,
)
from .settings import Settings
from .signing import UNSIGNED, SignaturePolicy, mismatch
from .stores.base import WriteResult, WriteStore

#: Attempts at a dead letter Redis refuses for good (WRONGTYPE …) before its entry is
#: left pending for a later redelivery instead (it is never acknowledged without one).
DEAD_LETTER_REFUSED_ATTEMPTS = 5

#: After a write timed out: how long a ping may take for the store to count as answering
#: (then the write was too large, and is split); a store that does not answer is down.
STORE_PING_TIMEOUT_S = 5.0


@dataclass(slots=True)
class Outcome:
    """What happened to a batch: acknowledged entries, dead letters, entries left pending."""

    written: list[Entry] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    abandoned: list[Entry] = field(default_factory=list)


def prepare(
    entries: Sequence[Entry], max_bytes: int, max_deliveries: int,
    signatures: SignaturePolicy | None = None,
) -> tuple[list[Record], list[DeadLetter]]:
    """Decode a batch: the records of valid events (their source is the entry's index in
    ``entries``), and dead letters (pure).

    With ``signatures``, each entry's signature is checked before its payload is
    decoded (``worker.signing``)."""
    valid: list[Record] = []
    dead: list[DeadLetter] = []
    for index, entry in enumerate(entries):
        payload = entry.payload
        if entry.deliveries > max_deliveries:
            dead.append(dead_letter(entry, c.Reason.MAX_DELIVERIES,
                                    f"delivered {entry.deliveries} times "
                                    f"(AUDIT_MAX_DELIVERIES={max_deliveries})"))
            continue
        if payload is None:
            dead.append(dead_letter(entry, c.Reason.MISSING_FIELD,
                                    f"entry has no {c.EVENT_FIELD!r} field"))
            continue
        if entry.extra_payloads:
            dead.append(dead_letter(entry, c.Reason.DUPLICATE_FIELD,
                                    f"entry has {1 + len(entry.extra_payloads)} "
                                    f"{c.EVENT_FIELD!r} fields: ambiguous, none is stored"))
            continue
        verdict = UNSIGNED
        if signatures is not None and len(payload) <= max_bytes:
            verdict = signatures.check(payload, entry.sig)
            if verdict.reason is not None:
                dead.append(dead_letter(entry, verdict.reason, verdict.error))
                continue
        try:
            doc = decode_doc(payload, max_bytes=max_bytes)
        except InvalidEvent as exc:
            dead.append(dead_letter(entry, exc.reason, exc.detail))
            continue
        except Exception as exc:  # a defect met by this entry: its verdict, not the batch's
            dead.append(dead_letter(entry, c.Reason.PROCESSING_ERROR, _failure("decode", exc)))
            continue
        if signatures is not None:
            wrong = mismatch(verdict, doc["workspaceId"])
            if wrong is not None and wrong.reason is not None:
                dead.append(dead_letter(entry, wrong.reason, wrong.error))
                continue
        valid.append((index, doc, verdict.key_id))
    return valid, dead


def _failure(stage: str, exc: BaseException) -> str:
    return f"{stage}: {type(exc).__name__}: {exc}"


class Worker(Protocol):
    """What the batch writer uses of the worker it runs in (:class:`worker.consumer.Worker`)."""

    settings: Settings
    store: WriteStore
    redis: aioredis.Redis
    metrics: Metrics
    log: Any

    def beat(self, loop: str) -> None: ...

    def redis_error(self, exc: RedisUnavailable | RedisRefused, op: str, **extra: Any) -> None: ...

    def on_redis_retry(self, op: str) -> Callable[[RetryCallState], None]: ...

    def release(self, entries: Sequence[Entry]) -> None: ...


class BatchWriter:
    """Writes the batches of one worker, each durably before it is acknowledged."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.store = worker.store
        self.metrics = worker.metrics
        self.log = worker.log
        self.signatures = SignaturePolicy.of(worker.settings)
        self.redactor = worker.settings.redactor()

    async def process(self, batch: Batch) -> Outcome:
        """Decode, write durably, dead-letter what can never be stored, then acknowledge."""
        s = self.settings
        valid, dead = prepare(batch.entries, s.max_event_bytes, s.max_deliveries,
                              self.signatures)
        outcome = Outcome(dead=dead)
        key = s.subject_key
        for _, doc, _ in valid:  # before redaction: subjects are hashed, never masked
            if SUBJECTS in doc:
                hash_subjects(doc, key)
        found: dict[str, int] = {}
        if self.redactor is not None:
            valid = self._redact(valid, batch.entries, outcome, found)
        if valid:
            work = _Work(outcome, batch.entries, valid)
            coalesced, failed = coalesce_each(valid)
            for source, exc in failed.items():
                outcome.dead.append(dead_letter(work.entry(source), c.Reason.PROCESSING_ERROR,
                                                _failure("coalesce", exc)))
            if coalesced.runs:
                work.whole = coalesced
                work.stored = [batch.entries[r[0]] for r in valid if r[0] not in failed]
                await self._write_all(coalesced, work)
        if self.redactor is not None:
            self._redact_dead(outcome, found)
        await self._settle(outcome, batch.entries)
        for detector, count in found.items():
            self.metrics.redactions.labels(detector).inc(count)
        self.worker.release(batch.entries)
        if outcome.written:  # a batch is of one stream: one count, one histogram update
            now_ms = time.time() * 1000
            self.metrics.end_to_end_seconds.observe_many(
                [max(0.0, now_ms - int(e.id.partition("-")[0])) / 1000 for e in outcome.written])
            self.metrics.events_written.labels(batch.stream).inc(len(outcome.written))
        for d in outcome.dead:
            self.metrics.events_dead_lettered.labels(d.stream, d.reason).inc()
            self.log.warning("dead_lettered", stream=d.stream, id=d.source_id,
                             reason=d.reason, error=d.error[:300], deliveries=d.deliveries)
        if outcome.written:
            self.metrics.batches.labels(outcome.written[0].stream).inc()
            self.metrics.batch_size.observe(len(outcome.written))
        return outcome

    def _redact(self, valid: list[Record], entries: Sequence[Entry],
                outcome: Outcome, found: dict[str, int]) -> list[Record]:
        """Redact each event before it is coalesced (``worker.redaction``); an error
        redacting one entry is that entry's verdict."""
        assert self.redactor is not None
        kept = []
        for record in valid:
            try:
                self.redactor.event(record[1], found)
            except Exception as exc:
                outcome.dead.append(dead_letter(entries[record[0]],
                                                c.Reason.PROCESSING_ERROR,
                                                _failure("redact", exc)))
                continue
            kept.append(record)
        return kept

    def _redact_dead(self, outcome: Outcome, found: dict[str, int]) -> None:
        """Redact the payloads of the dead letters about to be written."""
        assert self.redactor is not None
        redacted = []
        for d in outcome.dead:
            try:
                if d.event:
                    d = replace(d, event=self.redactor.payload(d.event, found))
                if d.extra_events:
                    d = replace(d, extra_events=tuple(self.redactor.payload(p, found)
                                                      for p in d.extra_events))
            except Exception:  # kept as received: a dead letter is never dropped
                self.log.exception("dead_letter_redaction_failed", stream=d.stream,
                                   id=d.source_id)
            redacted.append(d)
        outcome.dead = redacted

    async def _write_all(self, batch: WriteBatch, work: _Work) -> None:
        """Write ``batch``; a part the store rejects, or fails on unexpectedly, is split
        (per run, then per entry) until only the entries at fault are left."""
        outcome = work.outcome
        try:
            result = await self._write(batch)
        except StoreRejected as exc:
            parts = work.split(batch)
            if parts is None:
                self._reject(batch, str(exc), work, outcome)
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
            entries = [work.entry(src) for src in batch.sources()]
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
            entries = [work.entry(src) for src in batch.sources()]
            self.log.error("write_failed_leaving_pending", error=repr(exc)[:300],
                           entries=len(entries))
            outcome.abandoned.extend(entries)
            return
        if not result.rejected and batch is work.whole:  # the usual case: all of it
            outcome.written.extend(work.stored)
            return
        valid = work.valid_sources()
        rejected: set[int] = set()
        for rejection in result.rejected:
            for source in rejection.sources:
                if source not in rejected and source in valid:
                    rejected.add(source)
                    outcome.dead.append(dead_letter(work.entry(source),
                                                    c.Reason.STORE_REJECTED, rejection.reason))
        outcome.written.extend(work.entry(src)
                               for src in sorted(batch.sources() - rejected))

    def _reject(self, batch: WriteBatch, reason: str, work: _Work, outcome: Outcome) -> None:
        for source in sorted(batch.sources()):
            outcome.dead.append(dead_letter(work.entry(source), c.Reason.STORE_REJECTED, reason))

    async def _write(self, batch: WriteBatch) -> WriteResult:
        """One durable write; transient store errors are retried with exponential
        backoff and jitter (bounded delay, no attempt limit: during an outage entries
        stay pending and unacknowledged, and the reader stops — backpressure)."""
        store = self.store.name
        retrying = retry.retrying(
            StoreUnavailable, initial_s=0.05, max_s=self.settings.retry_max_backoff_s,
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
        self.worker.beat("writer")
        self.log.warning("store_unavailable_retrying", attempt=state.attempt_number,
                         retry_in_s=round(wait, 3), error=str(exc)[:300])

    async def _settle(self, outcome: Outcome, entries: Sequence[Entry]) -> None:
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
            (RedisUnavailable, RedisRefused), initial_s=0.05,
            max_s=self.settings.retry_max_backoff_s,
            stop=_stop_when_refused(DEAD_LETTER_REFUSED_ATTEMPTS),
            before_sleep=self.worker.on_redis_retry("settle"),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._settle_step(state)
        except RedisRefused as exc:
            pending = {(d.stream, d.source_id) for d in state.todo}
            left = [e for e in entries if (e.stream, e.id) in pending]
            self.worker.redis_error(exc, "dead_letter", left_pending=len(left))
            self.log.error("dead_letter_refused_left_pending", entries=len(left),
                           error=exc.detail[:300])
            outcome.abandoned.extend(left)
        outcome.dead = state.confirmed

    async def _settle_step(self, state: _Settling) -> None:
        if state.to_ack or state.dead_to_ack:  # stored: acknowledged whatever dead letters meet
            await state.ack(self.worker.redis, self.settings.group)
        if state.todo and state.check_existing:
            # A previous delivery (or attempt) may have written the dead letter before
            # dying: do not write a second one for the same entry.
            existing: set[tuple[str, str]] = set()
            for stream in {d.stream for d in state.todo}:
                ids = [d.source_id for d in state.todo if d.stream == stream]
                existing |= {(stream, i) for i in
                             await dead_lettered_ids(self.worker.redis, stream, ids)}
            state.confirm([d for d in state.todo if (d.stream, d.source_id) in existing])
            state.check_existing = False
        refused: list[tuple[DeadLetter, RedisUnavailable | RedisRefused]] = []
        if state.todo:
            state.check_existing = True  # if the XADDs fail midway, which were written?
            refused = await write_dead_letters(self.worker.redis, self.settings.consumer,
                                               state.todo)
            state.check_existing = False
            not_written = {id(d) for d, _ in refused}
            state.confirm([d for d in state.todo if id(d) not in not_written])
        if state.to_ack or state.dead_to_ack:
            await state.ack(self.worker.redis, self.settings.group)
        if refused:
            errors = [e for _, e in refused]
            raise next((e for e in errors if isinstance(e, RedisUnavailable)), errors[0])


class _TooSlow(Exception):
    """A write timed out while the store answers pings: split it instead of retrying it."""


@dataclass(slots=True)
class _Work:
    """One batch being written: its outcome, its entries and the records of its valid
    events (a record's source is its entry's index)."""

    outcome: Outcome
    entries: Sequence[Entry]
    records: list[Record]
    #: The write batch of every event that coalesced, and their entries in order.
    whole: WriteBatch | None = None
    stored: list[Entry] = field(default_factory=list)

    def entry(self, source: int) -> Entry:
        return self.entries[source]

    def valid_sources(self) -> set[int]:
        return {r[0] for r in self.records}

    def split(self, batch: WriteBatch) -> list[WriteBatch] | None:
        """Smaller parts of ``batch``: one per run, else one per entry; None for one entry."""
        if len(batch.runs) > 1:
            return batch.split_by_run()
        sources = sorted(batch.sources())
        if len(sources) <= 1:
            return None
        by_source = {r[0]: r for r in self.records}
        return [coalesce_records([by_source[src]]) for src in sources]


@dataclass(slots=True)
class _Settling:
    """Progress of one batch's settle across retries (nothing is written or ACKed twice)."""

    to_ack: list[Entry]
    todo: list[DeadLetter]
    confirmed: list[DeadLetter] = field(default_factory=list)
    #: Confirmed dead letters whose entries are still to be acknowledged.
    dead_to_ack: list[DeadLetter] = field(default_factory=list)
    check_existing: bool = False

    def confirm(self, done: list[DeadLetter]) -> None:
        if not done:
            return
        ids = {id(d) for d in done}
        self.todo = [d for d in self.todo if id(d) not in ids]
        self.confirmed.extend(done)
        self.dead_to_ack.extend(done)

    async def ack(self, redis: aioredis.Redis, group: str) -> None:
        await ack(redis, group, self.to_ack, self.dead_to_ack)
        self.to_ack, self.dead_to_ack = [], []


def _stop_when_refused(attempts: int) -> Callable[[RetryCallState], bool]:
    """Stop retrying a refused dead letter after ``attempts``; never while Redis is
    merely unavailable."""
    def stop(state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        return isinstance(exc, RedisRefused) and state.attempt_number >= attempts
    return stop
