"""Measurement maths, pure and tested: ack times, latency percentiles, throughput,
lost/duplicate accounting and the memory budget.

**End-to-end latency, measured from outside the worker.** A stream entry ID's first
part is the Redis server's clock (ms) when the producer's XADD was applied. A sampler
(see :mod:`benchmarks.monitor`) reads, in one MULTI/EXEC snapshot, the group's
``last-delivered-id`` and the lowest ``detail`` pending IDs (XPENDING ``- +`` COUNT).
In such a snapshot an entry is *settled* (acknowledged after its durable write, or
dead-lettered) exactly when it was delivered (ID ≤ last-delivered) and is not pending;
that is decidable for every ID up to the highest pending ID listed (all of them when
the list is complete). An entry's ack time is the local time the first snapshot that
shows it settled was received, so the measured latency is an *upper bound* on the
true one, too high by at most one sampling interval plus a round trip, never too low.
Both clocks are this machine's.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Bits of an encoded stream ID that hold the sequence part.
SEQ_BITS = 22
_SEQ_MASK = (1 << SEQ_BITS) - 1


def encode_id(entry_id: bytes | str) -> int:
    """A stream entry ID as one sortable int (``ms << 22 | seq``)."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = raw.partition("-")
    s = int(seq or 0)
    if s > _SEQ_MASK:
        raise ValueError(f"sequence part of {raw!r} is too large to encode")
    return (int(ms) << SEQ_BITS) | s


def decode_id(value: int) -> str:
    return f"{value >> SEQ_BITS}-{value & _SEQ_MASK}"


def id_ms(value: int) -> int:
    """The Redis server time (ms since the epoch) at which the entry was appended."""
    return value >> SEQ_BITS


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already *sorted* values, linear interpolation
    between closest ranks (NumPy's default); NaN for no values."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    pos = (len(values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def latency_summary(latencies_ms: Iterable[float]) -> dict[str, float | int | None]:
    values = sorted(v for v in latencies_ms if not math.isnan(v))

    def r(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 1)

    return {
        "count": len(values),
        "p50": r(percentile(values, 50)),
        "p95": r(percentile(values, 95)),
        "p99": r(percentile(values, 99)),
        "max": r(values[-1]) if values else None,
        "mean": r(sum(values) / len(values)) if values else None,
    }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One atomic look at the group, taken at local time ``t`` (seconds since the epoch)."""

    t: float
    length: int
    lag: int | None
    pending: int
    last_delivered: int
    pending_ids: tuple[int, ...]  # the lowest pending IDs, ascending
    complete: bool  # True when pending_ids holds every pending ID

    @property
    def decided_upto(self) -> int:
        """Every entry ID at most this is known to be settled or pending."""
        if self.complete or not self.pending_ids:
            return self.last_delivered
        return min(self.last_delivered, self.pending_ids[-1])

    @property
    def settled(self) -> int | None:
        """Entries settled so far (length - undelivered - pending), when Redis knows lag."""
        if self.lag is None:
            return None
        return max(0, self.length - self.lag - self.pending)


def assign_ack_times(ids: Sequence[int], snapshots: Iterable[Snapshot]) -> list[float]:
    """For each of ``ids`` (ascending), the time of the first snapshot showing it settled.

    NaN for an entry no snapshot showed settled. Work is proportional to the number
    of entries plus the pending IDs listed, not entries times snapshots.
    """
    ack = [math.nan] * len(ids)
    waiting: set[int] = set()  # indexes below ``done_hi`` seen pending, not yet settled
    done_hi = 0  # every index below this was either settled or put in ``waiting``
    for snap in snapshots:
        pending = set(snap.pending_ids)
        hi = bisect_right(ids, snap.decided_upto)
        if waiting:
            for i in [i for i in waiting if i < hi and ids[i] not in pending]:
                ack[i] = snap.t
                waiting.discard(i)
        for i in range(done_hi, hi):
            if ids[i] in pending:
                waiting.add(i)
            else:
                ack[i] = snap.t
        done_hi = max(done_hi, hi)
    return ack


def latencies_ms(ids: Sequence[int], ack_times: Sequence[float]) -> list[float]:
    """End-to-end latency of each entry (NaN where unknown), never negative."""
    return [max(0.0, t * 1000 - id_ms(i)) if not math.isnan(t) else math.nan
            for i, t in zip(ids, ack_times, strict=True)]


def settled_curve(snapshots: Iterable[Snapshot]) -> list[tuple[float, int]]:
    """(time, entries settled) at every snapshot where Redis knew the group's lag.

    Exact at each snapshot (Redis's own counters), unlike per-entry ack times, which
    are upper bounds when more entries are pending than a snapshot lists.
    """
    return [(s.t, n) for s in snapshots if (n := s.settled) is not None]


def crossing(curve: Sequence[tuple[float, int]], value: float) -> float | None:
    """When a non-decreasing ``curve`` first reached ``value`` (linear interpolation)."""
    prev: tuple[float, int] | None = None
    for t, n in curve:
        if n >= value:
            if prev is None or n == prev[1]:
                return t
            t0, n0 = prev
            return t0 + (t - t0) * (value - n0) / (n - n0)
        prev = (t, n)
    return None


def rate_between(curve: Sequence[tuple[float, int]], total: int, lo: float = 0.05,
                 hi: float = 0.95) -> float | None:
    """Steady-state throughput: entries settled between ``lo`` and ``hi`` of ``total``
    divided by the time between those two crossings (start-up and tail excluded)."""
    if total < 20:
        return None
    a = crossing(curve, lo * total)
    b = crossing(curve, hi * total)
    if a is None or b is None or b <= a:
        return None
    return (hi - lo) * total / (b - a)


def series(curve: Sequence[tuple[float, int]], start: float, end: float,
           step: float = 0.25) -> list[tuple[float, float]]:
    """(seconds since ``start``, entries settled per second) over bins of ``step``."""
    if not curve:
        return []
    bins = max(1, math.ceil((end - start) / step))
    out: list[tuple[float, float]] = []
    j = 0
    last = 0.0
    for i in range(bins + 1):
        edge = start + i * step
        while j < len(curve) and curve[j][0] <= edge:
            j += 1
        level = float(curve[j - 1][1]) if j else 0.0
        if i:
            out.append((round((i - 1) * step, 3), (level - last) / step))
        last = level
    return out


def windowed_p99(ids: Sequence[int], latencies: Sequence[float], start: float,
                 step: float = 0.5) -> list[tuple[float, float]]:
    """(seconds since ``start``, p99 latency ms) of the entries appended in each window."""
    windows: dict[int, list[float]] = {}
    for i, lat in zip(ids, latencies, strict=True):
        if not math.isnan(lat):
            windows.setdefault(int((id_ms(i) / 1000 - start) / step), []).append(lat)
    return [(round(k * step, 3), round(percentile(sorted(v), 99), 1))
            for k, v in sorted(windows.items())]


# -- lost and duplicates ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Emitted:
    """One event a producer emitted, and where it must end up (see load.RUN …)."""

    event_id: str
    run_id: str
    kind: str
    nodes: int = 0


@dataclass(slots=True)
class Accounting:
    emitted: int = 0
    stored: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicates: int = 0
    unexpected: int = 0
    lost_examples: list[str] = field(default_factory=list)
    duplicate_examples: list[str] = field(default_factory=list)
    dlq_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "emitted": self.emitted, "stored": self.stored, "dead_lettered": self.dead_lettered,
            "lost": self.lost, "duplicates": self.duplicates, "unexpected": self.unexpected,
            "lost_examples": self.lost_examples[:5],
            "duplicate_examples": self.duplicate_examples[:5],
            "dlq_reasons": self.dlq_reasons,
        }


def account(
    emitted: Iterable[Emitted],
    run_docs: Iterable[Mapping[str, Any]],
    node_docs: Iterable[Mapping[str, Any]],
    dead_letters: Iterable[tuple[str | None, str]],
) -> Accounting:
    """Compare what was emitted with what the store holds plus the dead-letter stream.

    * a run-level event must be in its own run document's ``eventIds``;
    * a node event must be the ``eventId`` of exactly one node document;
    * a snapshot must be in its run's ``eventIds`` and carried by as many node
      documents as it had nodes;
    * a poison entry must be in the dead-letter stream;
    * an event found nowhere is *lost*; one found more than once (stored twice, or
      stored and dead-lettered, or dead-lettered twice) is a *duplicate*; IDs found
      that were never emitted are *unexpected*.

    ``dead_letters`` are (eventId or None when undecodable, reason).
    """
    in_runs: Counter[tuple[str, str]] = Counter()
    for doc in run_docs:
        for event_id in doc.get("eventIds") or ():
            in_runs[(str(doc.get("runId")), str(event_id))] += 1
    in_nodes: Counter[str] = Counter(str(d.get("eventId")) for d in node_docs)
    in_dlq: Counter[str] = Counter()
    out = Accounting()
    for event_id, reason in dead_letters:
        out.dlq_reasons[reason] = out.dlq_reasons.get(reason, 0) + 1
        in_dlq[event_id or ""] += 1
    seen_runs: set[tuple[str, str]] = set()
    seen_nodes: set[str] = set()
    seen_dlq: set[str] = set()
    for e in emitted:
        out.emitted += 1
        dlq = in_dlq.get(e.event_id, 0)
        seen_dlq.add(e.event_id)
        if e.kind == "N":
            stored = in_nodes.get(e.event_id, 0)
            seen_nodes.add(e.event_id)
            short = False
        elif e.kind in ("R", "S"):
            stored = in_runs.get((e.run_id, e.event_id), 0)
            seen_runs.add((e.run_id, e.event_id))
            short = False
            if e.kind == "S" and stored:
                carried = in_nodes.get(e.event_id, 0)
                seen_nodes.add(e.event_id)
                if carried > e.nodes:
                    stored += 1  # more node documents than the snapshot had nodes
                short = carried < e.nodes
        else:  # poison: must only be dead-lettered
            stored = in_runs.get((e.run_id, e.event_id), 0) + in_nodes.get(e.event_id, 0)
            short = False
        found = stored + dlq
        if found == 0 or short:
            out.lost += 1
            out.lost_examples.append(e.event_id)
        elif found > 1:
            out.duplicates += 1
            out.duplicate_examples.append(e.event_id)
        if stored and not short:
            out.stored += 1
        if dlq:
            out.dead_lettered += 1
    out.unexpected = (sum(1 for k in in_runs if k not in seen_runs)
                      + sum(1 for k in in_nodes if k not in seen_nodes)
                      + sum(1 for k in in_dlq if k not in seen_dlq))
    return out


def account_acks(ids: Sequence[int], ack_times: Sequence[float],
                 dead_letters: int) -> Accounting:
    """For a store that keeps nothing (null://): settled entries against emitted ones.

    Duplicates cannot be observed without stored documents; the caller reports them
    as not measurable.
    """
    settled = sum(1 for t in ack_times if not math.isnan(t))
    out = Accounting(emitted=len(ids), stored=settled - dead_letters, dead_lettered=dead_letters)
    out.lost = len(ids) - settled
    out.lost_examples = [str(i) for i, t in zip(ids, ack_times, strict=True) if math.isnan(t)][:5]
    return out


# -- memory ---------------------------------------------------------------------------------

def memory_budget(idle_rss: int, batch_size: int, max_inflight: int, event_bytes: float,
                  footprint: float) -> int:
    """The most a worker may hold: its idle footprint plus every batch it can hold at
    once (one per writer, one the reader has read and is handing over, one the
    reclaimer is handing over), each ``batch_size`` events of ``event_bytes`` that take
    ``footprint`` times their size once read, decoded, coalesced and being written."""
    batches = max_inflight + 2
    return int(idle_rss + batches * batch_size * event_bytes * footprint)
