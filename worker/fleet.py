"""The fleet-level gauges and the poller that exports them.

The status itself (its data model and how it is read, shard by shard) is in
:mod:`worker.fleet_status`, re-exported here. ``audit-fleet status`` renders it; the
fleet poller exports it as gauges.

One poller per fleet
--------------------
Fleet-level numbers are facts about Redis, not about one worker. If every worker exported
them, N workers would produce N copies (with N slightly different values) and every
dashboard would have to deduplicate them. Instead, the workers of a group elect one
poller with a short Redis lock (``SET NX PX``, renewed by its holder on every poll, see
:func:`acquire_poller`). Only the holder exports the fleet gauges; the others export
nothing for them. If the poller dies, its lock expires after three poll intervals and
another worker takes over; dashboards aggregate with ``max by (stream, group)`` so the
short overlap of a hand-over never shows twice.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import anyio
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from .errors import RedisFailure
from .fleet_status import (
    ACTIVE_CONSUMER_IDLE_S,
    STATUS_SCHEMA_VERSION,
    ConsumerStatus,
    FleetStatus,
    GroupStatus,
    StreamStatus,
    fleet_status,
    redis_time_ms,
)
from .logs import get_logger
from .pending_idle import PendingScans
from .redisio import id_ms, parse_id, text, translated

__all__ = [
    "ACTIVE_CONSUMER_IDLE_S", "STATUS_SCHEMA_VERSION", "ConsumerStatus",
    "FleetCollector", "FleetStatus", "GroupStatus", "StreamStatus", "acquire_poller",
    "fleet_loop", "fleet_side_loop", "fleet_status", "id_ms", "parse_id", "poll_fleet",
    "poller_lock_key", "redis_time_ms", "release_poller", "text",
]

if TYPE_CHECKING:
    from .settings import Settings


class Metrics(Protocol):
    """What the fleet poller uses of :class:`worker.metrics.Metrics` (which imports this
    module for :class:`FleetCollector`)."""

    fleet: FleetCollector
    fleet_poller: Gauge
    loop_errors: Counter

    def redis_error(self, exc: BaseException) -> str: ...

    def heartbeat(self, loop: str) -> None: ...

#: Renew the poller lock for this many poll intervals.
LOCK_INTERVALS = 3

_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# -- the fleet gauges ---------------------------------------------------------------------


class FleetCollector(Collector):
    """Exports the last :class:`FleetStatus` as gauges; nothing while it holds none.

    A snapshot older than ``max_age_s`` is not exported: a poller that cannot reach
    Redis any more stops reporting numbers instead of repeating old ones.
    """

    def __init__(self, prefix: str, *, active_idle_s: float = ACTIVE_CONSUMER_IDLE_S) -> None:
        self.prefix = prefix
        self.active_idle_s = active_idle_s
        self.max_age_s: float | None = None
        #: The poller's dead-letter bounds (AUDIT_DLQ_MAX_AGE_S, AUDIT_DLQ_MAX_BYTES; 0:
        #: none), exported beside the dead-letter gauges for the alerts to compare.
        self.dlq_max_age_s = 0.0
        self.dlq_max_bytes = 0
        self._status: FleetStatus | None = None
        self._updated = 0.0

    @property
    def status(self) -> FleetStatus | None:
        if self._status is None:
            return None
        if self.max_age_s is not None and time.monotonic() - self._updated > self.max_age_s:
            return None
        return self._status

    def update(self, status: FleetStatus) -> None:
        self._status = status
        self._updated = time.monotonic()

    def clear(self) -> None:
        self._status = None

    def _families(self) -> dict[str, GaugeMetricFamily]:
        p = self.prefix
        specs: tuple[tuple[str, str, list[str]], ...] = (
            ("stream_length", "Entries in the stream (XLEN)", ["stream"]),
            ("dead_letter_length", "Entries in the stream's dead-letter stream <stream>:dlq",
             ["stream"]),
            ("dead_letter_bytes", "Memory of <stream>:dlq (MEMORY USAGE, every node counted)",
             ["stream"]),
            ("dead_letter_oldest_age_seconds", "Time since the oldest entry of <stream>:dlq "
             "was dead-lettered; 0 when there is none", ["stream"]),
            ("dead_letter_max_bytes", "AUDIT_DLQ_MAX_BYTES: beyond it the oldest dead letters "
             "are dropped (absent: no size bound)", ["stream"]),
            ("dead_letter_max_age_seconds", "AUDIT_DLQ_MAX_AGE_S: older dead letters are "
             "dropped (absent: no age bound)", ["stream"]),
            ("group_lag", "Entries not yet delivered to the group (XINFO GROUPS lag)",
             ["stream", "group"]),
            ("group_pending", "Entries delivered but not acknowledged (XPENDING)",
             ["stream", "group"]),
            ("group_oldest_pending_age_seconds",
             "Time since the oldest pending entry was appended (from its ID; latency); 0 when "
             "none is pending", ["stream", "group"]),
            ("group_pending_max_idle_seconds",
             "Longest time since delivery among pending entries (XPENDING idle; a stuck "
             "consumer); 0 when none is pending",
             ["stream", "group"]),
            ("group_consumers", "Consumers registered in the group (alive or dead)",
             ["stream", "group"]),
            ("group_active_consumers",
             f"Consumers that tried to read in the last {self.active_idle_s:g} seconds",
             ["stream", "group"]),
            ("consumer_pending", "Entries pending on one consumer",
             ["stream", "group", "consumer"]),
            ("consumer_idle_seconds", "Seconds since the consumer last tried to read",
             ["stream", "group", "consumer"]),
            ("fleet_poll_timestamp_seconds", "When the fleet poller last read Redis", []),
        )
        return {
            name: GaugeMetricFamily(f"{p}_{name}", doc, labels=labels)
            for name, doc, labels in specs
        }

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        status = self.status
        if status is None:
            return []
        f = self._families()
        for s in status.streams:
            if s.error is not None:
                continue  # its node could not be read: no numbers rather than zeros
            f["dead_letter_length"].add_metric([s.name], s.dlq_length)
            if s.dlq_bytes is not None:
                f["dead_letter_bytes"].add_metric([s.name], s.dlq_bytes)
            oldest_ms = id_ms(s.dlq_oldest_id) if s.dlq_oldest_id else status.taken_at_ms
            f["dead_letter_oldest_age_seconds"].add_metric(
                [s.name], max(0, status.taken_at_ms - oldest_ms) / 1000)
            if self.dlq_max_bytes:
                f["dead_letter_max_bytes"].add_metric([s.name], self.dlq_max_bytes)
            if self.dlq_max_age_s:
                f["dead_letter_max_age_seconds"].add_metric([s.name], self.dlq_max_age_s)
            if not s.exists:
                continue
            f["stream_length"].add_metric([s.name], s.length)
            for g in s.groups:
                if not g.exists:
                    continue
                labels = [s.name, g.name]
                if g.lag is not None:
                    f["group_lag"].add_metric(labels, g.lag)
                f["group_pending"].add_metric(labels, g.pending)
                f["group_oldest_pending_age_seconds"].add_metric(
                    labels, g.oldest_pending_age_s or 0.0
                )
                f["group_pending_max_idle_seconds"].add_metric(
                    labels, g.max_pending_idle_s or 0.0
                )
                f["group_consumers"].add_metric(labels, len(g.consumers))
                f["group_active_consumers"].add_metric(
                    labels, g.active_consumers(self.active_idle_s)
                )
                for x in g.consumers:
                    f["consumer_pending"].add_metric([*labels, x.name], x.pending)
                    f["consumer_idle_seconds"].add_metric([*labels, x.name], x.idle_ms / 1000)
        f["fleet_poll_timestamp_seconds"].add_metric([], status.taken_at_ms / 1000)
        return list(f.values())


# -- electing the poller and polling ------------------------------------------------------


def poller_lock_key(streams: Sequence[str], group: str) -> str:
    """The lock that elects the fleet poller of ``group`` on ``streams``.

    ``audit:events:fleet-poller:{audit-writers}`` for ``audit:events:{0..7}`` (or plain
    ``audit:events``): named after the streams (so ACL key patterns such as
    ``~audit:events*`` cover it) with a hash tag of its own, the group, so on a cluster it
    does not live in whichever shard's slot the configuration lists first.
    """
    base = re.sub(r"\{[^}]*\}", "", streams[0]).rstrip(":") or "audit-fleet"
    return f"{base}:fleet-poller:{{{group.replace('{', '').replace('}', '')}}}"


def lock_ttl_ms(settings: Settings) -> int:
    return int(max(LOCK_INTERVALS * settings.fleet_poll_interval_s, 1.0) * 1000)


async def acquire_poller(redis: aioredis.Redis, settings: Settings) -> bool:
    """Take or renew the poller lock for this consumer; True if this worker holds it."""
    with translated():
        held = await redis.eval(
                _ACQUIRE, 1, poller_lock_key(settings.streams, settings.group), settings.consumer,
            lock_ttl_ms(settings),
        )
    return bool(held)


async def release_poller(redis: aioredis.Redis, settings: Settings) -> bool:
    """Give the lock up if this consumer holds it (on shutdown), so another takes over now."""
    with translated():
        released = await redis.eval(
            _RELEASE, 1, poller_lock_key(settings.streams, settings.group), settings.consumer
        )
    return bool(released)


async def poll_fleet(redis: aioredis.Redis, settings: Settings, metrics: Metrics,
                     scans: PendingScans | None = None) -> bool:
    """One poll: export the fleet gauges if this worker is (or becomes) the poller.

    Returns True when this worker is the poller. A worker that is not clears whatever
    fleet gauges it exported before, so two workers never export the same series for long.
    ``scans`` carries the sweeps over large pending lists between polls.
    """
    if not await acquire_poller(redis, settings):
        metrics.fleet.clear()
        metrics.fleet_poller.set(0)
        return False
    metrics.fleet_poller.set(1)
    status = await fleet_status(redis, settings.streams, settings.group, scans)
    metrics.fleet.max_age_s = lock_ttl_ms(settings) / 1000
    metrics.fleet.dlq_max_age_s = settings.dlq_max_age_s
    metrics.fleet.dlq_max_bytes = settings.dlq_max_bytes
    metrics.fleet.update(status)
    return True


async def fleet_loop(
    redis: aioredis.Redis,
    settings: Settings,
    metrics: Metrics,
    *,
    interval_s: float | None = None,
) -> None:
    """Poll every ``fleet_poll_interval_s`` until cancelled; a failed poll is logged and counted.

    On the way out it clears its gauges and releases the lock, so a peer takes over at its
    next poll instead of after the lock expires.
    """
    interval = settings.fleet_poll_interval_s if interval_s is None else interval_s
    log = get_logger(loop="fleet", group=settings.group, consumer=settings.consumer)
    scans = PendingScans()
    try:
        while True:
            try:
                leader = await poll_fleet(redis, settings, metrics, scans)
            except Exception as exc:
                metrics.loop_errors.labels("fleet").inc()
                if isinstance(exc, RedisError | RedisFailure | OSError):
                    metrics.redis_error(exc)
                log.warning("fleet_poll_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            else:
                log.debug("fleet_polled", poller=leader)
            metrics.heartbeat("fleet")
            await anyio.sleep(interval)
    finally:
        metrics.fleet.clear()
        metrics.fleet_poller.set(0)
        with anyio.move_on_after(2.0, shield=True):
            try:
                await release_poller(redis, settings)
            except Exception as exc:
                log.debug("fleet_lock_release_failed", error=str(exc)[:300])


def fleet_side_loop(
    redis: aioredis.Redis, settings: Settings, metrics: Metrics
) -> Callable[[], Awaitable[None]]:
    """:func:`fleet_loop` as a zero-argument side loop named ``fleet`` (for ``Worker``)."""

    async def fleet() -> None:
        await fleet_loop(redis, settings, metrics)

    return fleet
