"""Prometheus metrics of one worker, on an injected registry.

Two kinds of metric live here:

* per-worker metrics (counters, histograms, gauges) that every worker exports about
  its own work: events read and written, batches, store latency, heartbeats …
* fleet-level gauges polled from Redis (lag, pending, stream and dead-letter length,
  consumers). Exactly one worker of a group, elected with a short Redis lock, exports
  them; see :mod:`worker.fleet` and docs/metrics.md.

Every name is prefixed (``audit_fleet_`` by default). Counters appear with ``_total`` in
the exposition, durations end in ``_seconds`` and timestamps in ``_timestamp_seconds``.

Every label combination known in advance (stream x reason, store x outcome, loop, Redis
error kind …) is created at 0 by :meth:`Metrics.prime` when a worker starts: a counter
that first appears at 1 looks like no increase to ``increase()``/``rate()``, so the first
dead letter after a start would never fire an alert. No ``_created`` samples are exported
(they double the series count and no rule uses them).
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from . import constants as c
from .fleet import FleetCollector
from .redaction import COUNTER_LABELS as REDACTION_LABELS
from .redisio import translate

# ``x_created`` samples: one more series per labelled child, used by no rule or dashboard.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
# The default registry is never exposed; keep its process collectors from running twice.
del GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

PREFIX = "audit_fleet"


class BatchHistogram(Collector):
    """A histogram observed a batch at a time, with exact counts per bucket.

    ``prometheus_client.Histogram.observe`` takes a lock and walks the buckets once per
    value; the end-to-end latency is known for a whole batch at once, so it is counted
    here in one pass (``bisect``) and added under one lock. Exposed like any histogram
    (``_bucket{le}``, ``_sum``, ``_count``).
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = (*(float(b) for b in buckets), math.inf)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._lock = threading.Lock()  # a scrape may run on another thread
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        bounds = self.bounds
        with self._lock:
            counts = self._counts
            total = self._sum  # added in order: the same sum as one observe() per value
            for value in values:
                counts[bisect_left(bounds, value)] += 1  # the first bucket with value <= le
                total += value
            self._sum = total

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, counts, strict=True):
            running += n
            cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative,
                                    sum_value=total)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Fine from 10 to 250 ms, where the latency targets and alerts sit (p99 <= 100/150 ms).
_E2E_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.5,
                1, 2.5, 5, 10, 30, 60, 300, 900)
_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

#: Values of the ``outcome`` label of ``store_write_seconds``.
STORE_OUTCOMES = ("ok", "unavailable", "timeout", "rejected", "error")

#: Values of the ``kind`` label of ``redis_errors_total`` (see :func:`redis_error_kind`).
REDIS_ERROR_KINDS = ("connection", "timeout", "oom", "loading", "readonly", "auth", "nogroup",
                     "moved", "cluster", "busy", "wrongtype", "refused", "other")

#: Loops whose failed iterations ``loop_errors_total`` counts.
SIDE_LOOPS = ("fleet", "trim")

#: Suffixes each metric type adds in the text exposition (no ``_created``: disabled above).
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


class Metrics:
    """Every metric a worker exports. One instance per worker (and per test)."""

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = PREFIX) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.prefix = prefix
        p, r = prefix, self.registry

        # -- the worker's own work ----------------------------------------------------
        self.events_read = Counter(
            f"{p}_events_read", "Stream entries read (new and reclaimed)", ["stream"], registry=r
        )
        self.bytes_read = Counter(
            f"{p}_payload_read_bytes", "Payload bytes of the stream entries read (new and "
            "reclaimed)", ["stream"], registry=r,
        )
        self.events_written = Counter(
            f"{p}_events_written", "Events durably written and acknowledged", ["stream"],
            registry=r,
        )
        self.events_dead_lettered = Counter(
            f"{p}_events_dead_lettered", "Events moved to the dead-letter stream",
            ["stream", "reason"], registry=r,
        )
        self.entries_reclaimed = Counter(
            f"{p}_entries_reclaimed", "Pending entries claimed from idle consumers (XAUTOCLAIM)",
            ["stream"], registry=r,
        )
        self.entries_reclaimed_deleted = Counter(
            f"{p}_entries_reclaimed_deleted",
            "Pending entries whose stream entry no longer existed when claimed", ["stream"],
            registry=r,
        )
        self.batches = Counter(f"{p}_batches", "Batches written", ["stream"], registry=r)
        self.redactions = Counter(
            f"{p}_redactions", "Findings masked or fields dropped/masked by redaction before "
            "storage, per detector (email, phone, card, iban) or rule (drop, mask)",
            ["detector"], registry=r,
        )
        for label in REDACTION_LABELS:
            self.redactions.labels(label)  # every series starts at 0
        self.batch_size = Histogram(
            f"{p}_batch_size_events", "Events per batch", buckets=_SIZE_BUCKETS, registry=r
        )
        self.store_write_seconds = Histogram(
            f"{p}_store_write_seconds", "Store write latency", ["store", "outcome"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.end_to_end_seconds = BatchHistogram(
            f"{p}_end_to_end_seconds",
            "From the stream entry ID's time to the durable acknowledgement",
            _E2E_BUCKETS, r,
        )
        self.retries = Counter(
            f"{p}_store_retries", "Store write attempts retried after a transient error",
            ["store"], registry=r,
        )
        self.batches_in_flight = Gauge(
            f"{p}_batches_in_flight", "Batches read but not yet acknowledged", registry=r
        )
        self.loop_heartbeat = Gauge(
            f"{p}_loop_heartbeat_timestamp_seconds", "Last time each worker loop made progress",
            ["loop"], registry=r,
        )

        # -- side loops: errors, hygiene, fleet polling ----------------------------------
        self.loop_errors = Counter(
            f"{p}_loop_errors", "Iterations of a side loop that failed (and were retried)",
            ["loop"], registry=r,
        )
        self.trimmed_entries = Counter(
            f"{p}_trimmed_entries", "Stream entries removed by XTRIM MINID (acknowledged by "
            "every group and older than the retention floor)", ["stream"], registry=r,
        )
        self.dead_letters_dropped = Counter(
            f"{p}_dead_letters_dropped", "Dead letters removed from <stream>:dlq by a bound "
            "(AUDIT_DLQ_MAX_AGE_S: bound=age, AUDIT_DLQ_MAX_BYTES: bound=size)",
            ["stream", "bound"], registry=r,
        )
        self.consumers_deleted = Counter(
            f"{p}_consumers_deleted", "Dead consumers removed with XGROUP DELCONSUMER "
            "(only with no pending entries)", ["stream", "group"], registry=r,
        )
        self.redis_errors = Counter(
            f"{p}_redis_errors", "Redis commands that failed, by kind: " + ", ".join(
                REDIS_ERROR_KINDS), ["kind"], registry=r,
        )
        self.fleet_poller = Gauge(
            f"{p}_fleet_poller", "1 while this worker is the elected fleet poller, else 0",
            registry=r,
        )
        self.build_info = Gauge(
            f"{p}_build_info", "Always 1; the labels say which version runs", ["version"],
            registry=r,
        )
        self.build_info.labels(__version__).set(1)

        #: Fleet-level gauges polled from Redis; empty unless this worker is the poller.
        self.fleet = FleetCollector(prefix)
        r.register(self.fleet)

        # -- the process: RSS, CPU, open file descriptors, GC, Python version -------------
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)

    def prime(self, streams: Iterable[str], group: str, store: str) -> None:
        """Create every label combination known in advance at 0 (see the module docstring)."""
        for stream in streams:
            self.consumers_deleted.labels(stream, group)
            for counter in (self.events_read, self.bytes_read, self.events_written,
                            self.entries_reclaimed, self.entries_reclaimed_deleted,
                            self.batches, self.trimmed_entries):
                counter.labels(stream)
            for reason in c.REASONS:
                self.events_dead_lettered.labels(stream, reason)
            for bound in c.DLQ_BOUNDS:
                self.dead_letters_dropped.labels(stream, bound)
        for outcome in STORE_OUTCOMES:
            self.store_write_seconds.labels(store, outcome)
        self.retries.labels(store)
        for loop in SIDE_LOOPS:
            self.loop_errors.labels(loop)
        for kind in REDIS_ERROR_KINDS:
            self.redis_errors.labels(kind)

    def redis_error(self, exc: BaseException) -> str:
        """Count one failed Redis command; returns its kind."""
        kind = redis_error_kind(exc)
        self.redis_errors.labels(kind).inc()
        return kind

    def heartbeat(self, loop: str) -> None:
        """Record that ``loop`` made progress now (read by ``/healthz``)."""
        self.loop_heartbeat.labels(loop).set(time.time())

    def heartbeats(self) -> dict[str, float]:
        """The last heartbeat (seconds since the epoch) of every loop that has beaten."""
        out: dict[str, float] = {}
        for family in self.loop_heartbeat.collect():
            for sample in family.samples:
                out[sample.labels["loop"]] = sample.value
        return out

    def families(self) -> list[Metric]:
        """Every metric family this worker can export, fleet gauges included."""
        by_name = {f.name: f for f in self.registry.collect()}
        for family in self.fleet.describe():
            by_name.setdefault(family.name, family)
        return list(by_name.values())


def redis_error_kind(exc: BaseException) -> str:
    """The ``kind`` label of a Redis error: one of :data:`REDIS_ERROR_KINDS` (as the Redis
    edge, :func:`worker.redisio.translate`, classifies it)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    mapped = translate(exc)
    if mapped is None or (mapped is not exc and mapped.kind == "refused"):
        return "other"  # a raw reply error the edge has no name for
    return mapped.kind


def exposition_names(families: Iterable[Metric]) -> set[str]:
    """Sample names as they appear in the text exposition (``x_total``, ``x_bucket`` …)."""
    names: set[str] = set()
    for family in families:
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def exported_names(metrics: Metrics) -> set[str]:
    """Every sample name ``metrics`` can export (what alerts and dashboards may use)."""
    return exposition_names(metrics.families())
