"""The fleet as Redis sees it: the status data model, and the fleet-level gauges.

:func:`fleet_status` reads, per stream and consumer group, what ``kafka-consumer-groups
--describe`` shows for Kafka: length, lag, pending entries, the age of the oldest pending
entry, consumers with their pending count and idle time, and the dead-letter length.
``audit-fleet status`` renders it; the fleet poller exports it as gauges.

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

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError, ResponseError

from . import constants as c
from .logs import get_logger
from .queries import format_time

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

#: JSON schema version of ``audit-fleet status --json``.
STATUS_SCHEMA_VERSION = 1

#: A consumer that has not tried to read for this long does not count as active.
ACTIVE_CONSUMER_IDLE_S = 120.0

#: Pending entries (lowest IDs first) whose time since delivery is read per group and poll.
PENDING_IDLE_SCAN = 1000

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


# -- stream IDs -----------------------------------------------------------------------


def text(value: Any) -> str:
    """A Redis reply value as ``str`` (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_id(entry_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` → ``(1700000000000, 3)``; a bare ``ms`` means ``ms-0``."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def id_ms(entry_id: str) -> int:
    """Milliseconds since the epoch encoded in a stream entry ID."""
    return parse_id(entry_id)[0]


# -- the status data model ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsumerStatus:
    """One consumer of a group, as XINFO CONSUMERS reports it."""

    name: str
    pending: int
    idle_ms: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pending": self.pending, "idle_ms": self.idle_ms}


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """One consumer group of a stream. ``exists`` is False for a group asked for but absent."""

    name: str
    exists: bool = True
    lag: int | None = None
    pending: int = 0
    entries_read: int | None = None
    last_delivered_id: str | None = None
    oldest_pending_id: str | None = None
    oldest_pending_age_s: float | None = None
    #: The longest time since delivery among pending entries (XPENDING idle): what a stuck
    #: consumer drives up. A backlog being drained has old entries but short idle times.
    max_pending_idle_s: float | None = None
    consumers: tuple[ConsumerStatus, ...] = ()

    def active_consumers(self, idle_s: float = ACTIVE_CONSUMER_IDLE_S) -> int:
        """Consumers that tried to read within ``idle_s`` seconds."""
        return sum(1 for x in self.consumers if x.idle_ms < idle_s * 1000)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.name,
            "exists": self.exists,
            "lag": self.lag,
            "pending": self.pending,
            "entries_read": self.entries_read,
            "last_delivered_id": self.last_delivered_id,
            "oldest_pending_id": self.oldest_pending_id,
            "oldest_pending_age_s": self.oldest_pending_age_s,
            "max_pending_idle_s": self.max_pending_idle_s,
            "consumers": [x.to_dict() for x in self.consumers],
        }


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """One stream, its dead-letter stream, and the groups asked about."""

    name: str
    exists: bool = False
    length: int = 0
    first_id: str | None = None
    last_id: str | None = None
    dlq_length: int = 0
    groups: tuple[GroupStatus, ...] = ()

    @property
    def dlq(self) -> str:
        return c.dlq_key(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stream": self.name,
            "exists": self.exists,
            "length": self.length,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "dead_letter_stream": self.dlq,
            "dead_letter_length": self.dlq_length,
            "groups": [g.to_dict() for g in self.groups],
        }


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """A snapshot of every stream a fleet reads, taken at Redis's own clock."""

    taken_at_ms: int
    group: str | None
    streams: tuple[StreamStatus, ...] = field(default=())

    @property
    def taken_at(self) -> datetime:
        return datetime.fromtimestamp(self.taken_at_ms / 1000, tz=UTC)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form (``audit-fleet status --json``), schema version 1."""
        return {
            "version": STATUS_SCHEMA_VERSION,
            "taken_at": format_time(self.taken_at),
            "group": self.group,
            "streams": [s.to_dict() for s in self.streams],
        }


# -- reading it from Redis ---------------------------------------------------------------


def _is_missing_key(exc: object) -> bool:
    return isinstance(exc, ResponseError) and "no such key" in str(exc).lower()


def _is_nogroup(exc: object) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


def _raise_unexpected(result: object) -> None:
    if isinstance(result, Exception):
        raise result


async def redis_time_ms(redis: aioredis.Redis) -> int:
    """Redis's clock in milliseconds: entry IDs are made from it, so ages use it too."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def fleet_status(
    redis: aioredis.Redis, streams: Sequence[str], group: str | None
) -> FleetStatus:
    """Length, lag, pending, oldest pending age, consumers and DLQ size of each stream.

    ``group=None`` describes every group of each stream. Two pipelined round trips,
    whatever the number of streams and groups.
    """
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        for name in streams:
            pipe.xinfo_stream(name)
            pipe.xlen(c.dlq_key(name))
            pipe.xinfo_groups(name)
        first = await pipe.execute(raise_on_error=False)
    _raise_unexpected(first[0])
    seconds, micros = first[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000

    partial: list[tuple[StreamStatus, list[dict[str, Any]]]] = []
    for i, name in enumerate(streams):
        info, dlq_len, groups = first[1 + 3 * i: 4 + 3 * i]
        _raise_unexpected(dlq_len)
        if _is_missing_key(info):
            partial.append((StreamStatus(name, exists=False, dlq_length=int(dlq_len)), []))
            continue
        _raise_unexpected(info)
        _raise_unexpected(groups)
        first_entry = info.get("first-entry")
        stream = StreamStatus(
            name,
            exists=True,
            length=int(info["length"]),
            first_id=text(first_entry[0]) if first_entry else None,
            last_id=text(info["last-generated-id"]),
            dlq_length=int(dlq_len),
        )
        partial.append((stream, list(groups)))

    wanted: list[tuple[int, str, dict[str, Any] | None]] = []
    for i, (_, groups) in enumerate(partial):
        by_name = {text(g["name"]): g for g in groups}
        names = sorted(by_name) if group is None else [group]
        for gname in names:
            wanted.append((i, gname, by_name.get(gname)))

    details: list[Any] = []
    present = [(i, gname) for i, gname, info in wanted if info is not None]
    if present:
        async with redis.pipeline(transaction=False) as pipe:
            for i, gname in present:
                pipe.xpending(partial[i][0].name, gname)
                pipe.xinfo_consumers(partial[i][0].name, gname)
                pipe.xpending_range(partial[i][0].name, gname, min="-", max="+",
                                    count=PENDING_IDLE_SCAN)
            details = await pipe.execute(raise_on_error=False)

    group_lists: list[list[GroupStatus]] = [[] for _ in partial]
    k = 0
    for i, gname, ginfo in wanted:
        stream = partial[i][0]
        if ginfo is None:
            if stream.exists or group is not None:
                group_lists[i].append(GroupStatus(gname, exists=False))
            continue
        pending_summary, consumers, pending = details[3 * k: 3 * k + 3]
        k += 1
        if any(_is_nogroup(x) for x in (pending_summary, consumers, pending)):
            group_lists[i].append(GroupStatus(gname, exists=False))  # deleted meanwhile
            continue
        _raise_unexpected(pending_summary)
        _raise_unexpected(consumers)
        _raise_unexpected(pending)
        described = _group(stream, gname, ginfo, pending_summary, consumers, now_ms)
        idle_ms = [int(x["time_since_delivered"]) for x in pending]
        group_lists[i].append(replace(
            described, max_pending_idle_s=max(idle_ms) / 1000 if idle_ms else None
        ))

    return FleetStatus(
        taken_at_ms=now_ms,
        group=group,
        streams=tuple(
            _replace_groups(stream, tuple(gs))
            for (stream, _), gs in zip(partial, group_lists, strict=True)
        ),
    )


def _replace_groups(stream: StreamStatus, groups: tuple[GroupStatus, ...]) -> StreamStatus:
    return StreamStatus(stream.name, stream.exists, stream.length, stream.first_id,
                        stream.last_id, stream.dlq_length, groups)


def _group(
    stream: StreamStatus,
    name: str,
    info: dict[str, Any],
    pending_summary: dict[str, Any],
    consumers: list[dict[str, Any]],
    now_ms: int,
) -> GroupStatus:
    last_delivered = text(info["last-delivered-id"])
    lag = info.get("lag")
    # Redis cannot compute the lag after an XDEL inside the group's range; a group
    # that has read up to the last entry has none all the same.
    if (lag is None and stream.last_id is not None
            and parse_id(last_delivered) >= parse_id(stream.last_id)):
        lag = 0
    oldest = pending_summary.get("min")
    oldest_id = text(oldest) if oldest is not None else None
    entries_read = info.get("entries-read")
    return GroupStatus(
        name=name,
        exists=True,
        lag=int(lag) if lag is not None else None,
        pending=int(pending_summary.get("pending") or 0),
        entries_read=int(entries_read) if entries_read is not None else None,
        last_delivered_id=last_delivered,
        oldest_pending_id=oldest_id,
        oldest_pending_age_s=(
            max(0, now_ms - id_ms(oldest_id)) / 1000 if oldest_id is not None else None
        ),
        consumers=tuple(
            sorted(
                (
                    ConsumerStatus(text(x["name"]), int(x["pending"]), int(x["idle"]))
                    for x in consumers
                ),
                key=lambda x: x.name,
            )
        ),
    )


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
            ("group_lag", "Entries not yet delivered to the group (XINFO GROUPS lag)",
             ["stream", "group"]),
            ("group_pending", "Entries delivered but not acknowledged (XPENDING)",
             ["stream", "group"]),
            ("group_oldest_pending_age_seconds",
             "Time since the oldest pending entry was appended (from its ID; latency); 0 when "
             "none is pending", ["stream", "group"]),
            ("group_pending_max_idle_seconds",
             "Longest time since delivery among pending entries (XPENDING idle; a stuck "
             f"consumer; the {PENDING_IDLE_SCAN} lowest IDs); 0 when none is pending",
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
            f["dead_letter_length"].add_metric([s.name], s.dlq_length)
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
    """The lock that elects the fleet poller of ``group`` on ``streams``."""
    return f"{streams[0]}:fleet-poller:{group}"


def lock_ttl_ms(settings: Settings) -> int:
    return int(max(LOCK_INTERVALS * settings.fleet_poll_interval_s, 1.0) * 1000)


async def acquire_poller(redis: aioredis.Redis, settings: Settings) -> bool:
    """Take or renew the poller lock for this consumer; True if this worker holds it."""
    held = await redis.eval(
        _ACQUIRE, 1, poller_lock_key(settings.streams, settings.group), settings.consumer,
        lock_ttl_ms(settings),
    )
    return bool(held)


async def release_poller(redis: aioredis.Redis, settings: Settings) -> bool:
    """Give the lock up if this consumer holds it (on shutdown), so another takes over now."""
    released = await redis.eval(
        _RELEASE, 1, poller_lock_key(settings.streams, settings.group), settings.consumer
    )
    return bool(released)


async def poll_fleet(redis: aioredis.Redis, settings: Settings, metrics: Metrics) -> bool:
    """One poll: export the fleet gauges if this worker is (or becomes) the poller.

    Returns True when this worker is the poller. A worker that is not clears whatever
    fleet gauges it exported before, so two workers never export the same series for long.
    """
    if not await acquire_poller(redis, settings):
        metrics.fleet.clear()
        metrics.fleet_poller.set(0)
        return False
    metrics.fleet_poller.set(1)
    status = await fleet_status(redis, settings.streams, settings.group)
    metrics.fleet.max_age_s = lock_ttl_ms(settings) / 1000
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
    try:
        while True:
            try:
                leader = await poll_fleet(redis, settings, metrics)
            except Exception as exc:
                metrics.loop_errors.labels("fleet").inc()
                if isinstance(exc, RedisError | OSError):
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
