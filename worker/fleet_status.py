"""The fleet status: its data model, and reading it from Redis, shard by shard.

:func:`fleet_status` reads, per stream and consumer group, what ``kafka-consumer-groups
--describe`` shows for Kafka: length, lag, pending entries, the age of the oldest pending
entry, consumers with their pending count and idle time, and the dead-letter length.
Each stream is read from the node that owns it (on a cluster) with that node's clock; a
stream that cannot be read carries its error and the others are reported all the same.
``audit-fleet status`` renders it; the fleet poller (:mod:`worker.fleet`) exports it as
gauges.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

import anyio
import redis.asyncio as aioredis

from . import constants as c
from .errors import GroupMissing, RedisFailure, RedisUnavailable, StreamMissing
from .pending_idle import PendingScans
from .queries import format_time
from .redisclient import is_cluster
from .redisio import check, id_ms, parse_id, text, translated

#: JSON schema version of ``audit-fleet status --json``.
STATUS_SCHEMA_VERSION = 1

#: A consumer that has not tried to read for this long does not count as active.
ACTIVE_CONSUMER_IDLE_S = 120.0

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
    #: Where ``lag`` comes from: ``redis`` (XINFO GROUPS), ``counted`` (entries after the
    #: last delivered ID, counted because the reported value could not be trusted) or
    #: ``estimated`` (too many to count: the reported value, capped at the length).
    lag_source: str = "redis"
    last_delivered_id: str | None = None
    oldest_pending_id: str | None = None
    oldest_pending_age_s: float | None = None
    #: The longest time since delivery among pending entries (XPENDING idle): what a stuck
    #: consumer drives up. A backlog being drained has old entries but short idle times.
    #: Over every pending entry, at a bounded cost (:mod:`worker.pending_idle`).
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
            "lag_source": self.lag_source,
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
    #: ``MEMORY USAGE`` of the dead-letter stream (None: unknown, e.g. an ACL without it).
    dlq_bytes: int | None = None
    #: ID of the oldest dead letter (None when there is none).
    dlq_oldest_id: str | None = None
    groups: tuple[GroupStatus, ...] = ()
    #: Why the stream could not be read (its node down, …); None when it was.
    error: str | None = None
    #: The node that owns the stream on a cluster (``host:port``); None otherwise.
    node: str | None = None

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
            "dead_letter_bytes": self.dlq_bytes,
            "dead_letter_oldest_id": self.dlq_oldest_id,
            "groups": [g.to_dict() for g in self.groups],
            "error": self.error,
            "node": self.node,
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

#: Redis versions from which XINFO GROUPS reports a trustworthy lag on a promoted
#: replica (redis/redis#12898 was fixed in 7.2.4); before it, lag is verified.
TRUSTED_LAG_VERSION = (7, 2, 4)

#: At most this many entries are counted to verify a lag (a Lua XRANGE on the server).
LAG_COUNT_CAP = 1000

_COUNT_AFTER = """
return #redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
"""


def _node_of(redis: aioredis.Redis, key: str) -> Any:
    return redis.get_node_from_key(key) if is_cluster(redis) else None  # type: ignore[attr-defined]


async def redis_time_ms(redis: aioredis.Redis, key: str | None = None) -> int:
    """Redis's clock in milliseconds: entry IDs are made from it, so ages use it too.

    On a cluster, ``key`` picks the node that owns it (each node has its own clock, and
    a stream's IDs come from its own node's).
    """
    node = _node_of(redis, key) if key is not None else None
    with translated():
        if node is not None:
            seconds, micros = await redis.time(target_nodes=node)
        else:
            seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _server_version(redis: aioredis.Redis, key: str) -> tuple[int, ...]:
    node = _node_of(redis, key)
    with translated():
        if node is not None:
            info = await redis.info("server", target_nodes=node)
        else:
            info = await redis.info("server")
    try:
        return tuple(int(x) for x in str(info.get("redis_version", "0")).split(".")[:3])
    except ValueError:
        return (0,)


async def fleet_status(
    redis: aioredis.Redis, streams: Sequence[str], group: str | None,
    scans: PendingScans | None = None,
) -> FleetStatus:
    """Length, lag, pending, oldest pending age, consumers and DLQ size of each stream.

    ``group=None`` describes every group of each stream. Streams are read concurrently,
    each from the node that owns it, with that node's clock (no TIME inside a cluster
    pipeline). A stream that cannot be read (its node down) carries the error and the
    others are reported all the same. ``scans`` carries the sweeps over large pending
    lists from one call to the next (the fleet poller keeps one).
    """
    scans = scans if scans is not None else PendingScans()
    results: list[tuple[StreamStatus, int | None]] = [
        (StreamStatus(name), None) for name in streams
    ]

    async def one(i: int, name: str) -> None:
        try:
            results[i] = await _stream_status(redis, name, group, scans)
        except RedisFailure as exc:
            results[i] = (StreamStatus(name, error=f"{type(exc).__name__}: {exc}"[:300],
                                       node=_node_name(redis, name)), None)

    async with anyio.create_task_group() as tg:
        for i, name in enumerate(streams):
            tg.start_soon(one, i, name)
    clocks = [t for _, t in results if t is not None]
    if not clocks and streams and all(st.error for st, _ in results):
        raise RedisUnavailable("connection", results[0][0].error or "every stream failed")
    now_ms = max(clocks) if clocks else int(time.time() * 1000)
    return FleetStatus(taken_at_ms=now_ms, group=group,
                       streams=tuple(st for st, _ in results))


#: The ID of a stream's oldest entry without sending its fields (a dead letter can hold
#: a 16 MiB payload): false for an empty or missing stream.
_OLDEST_ID = """
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
if first then return first[1] end
return false
"""


class _DlqFacts(NamedTuple):
    length: int
    nbytes: int | None
    oldest_id: str | None


def _node_name(redis: aioredis.Redis, key: str) -> str | None:
    node = _node_of(redis, key)
    return f"{node.host}:{node.port}" if node is not None else None


async def _stream_status(
    redis: aioredis.Redis, name: str, group: str | None, scans: PendingScans
) -> tuple[StreamStatus, int]:
    now_ms = await redis_time_ms(redis, name)
    node = _node_name(redis, name)
    with translated():
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xinfo_stream(name)
            pipe.xlen(c.dlq_key(name))
            pipe.xinfo_groups(name)
            pipe.memory_usage(c.dlq_key(name), samples=0)
            pipe.eval(_OLDEST_ID, 1, c.dlq_key(name))
            info, dlq_len, groups, dlq_bytes, dlq_oldest = await pipe.execute(
                raise_on_error=False)
    check(dlq_len)
    # Either may be refused (an ACL without MEMORY USAGE): unknown, not an error.
    dlq = _DlqFacts(
        int(dlq_len), None if isinstance(dlq_bytes, BaseException) else int(dlq_bytes or 0),
        text(dlq_oldest) if dlq_oldest and not isinstance(dlq_oldest, BaseException) else None,
    )
    try:
        check(info)
    except StreamMissing:
        wanted = [] if group is None else [GroupStatus(group, exists=False)]
        return StreamStatus(name, exists=False, node=node, groups=tuple(wanted),
                            dlq_length=dlq.length, dlq_bytes=dlq.nbytes,
                            dlq_oldest_id=dlq.oldest_id), now_ms
    check(groups)
    first_entry = info.get("first-entry")
    stream = StreamStatus(
        name, exists=True, length=int(info["length"]),
        first_id=text(first_entry[0]) if first_entry else None,
        last_id=text(info["last-generated-id"]), node=node, dlq_length=dlq.length,
        dlq_bytes=dlq.nbytes, dlq_oldest_id=dlq.oldest_id,
    )
    by_name = {text(g["name"]): g for g in groups}
    names = sorted(by_name) if group is None else [group]
    present = [n for n in names if n in by_name]
    details: list[Any] = []
    if present:
        with translated():
            async with redis.pipeline(transaction=False) as pipe:
                for gname in present:
                    pipe.xpending(name, gname)
                    pipe.xinfo_consumers(name, gname)
                details = await pipe.execute(raise_on_error=False)
    version: tuple[int, ...] | None = None
    out: list[GroupStatus] = []
    for gname in names:
        ginfo = by_name.get(gname)
        if ginfo is None:
            out.append(GroupStatus(gname, exists=False))
            continue
        k = present.index(gname)
        pending_summary, consumers = details[2 * k: 2 * k + 2]
        try:
            check(pending_summary)
            check(consumers)
            g = _group(stream, gname, ginfo, pending_summary, consumers, now_ms)
            idle_ms = await scans.of(name, gname).max_idle_ms(
                redis, name, gname, g.pending, g.consumers)
        except GroupMissing:
            out.append(GroupStatus(gname, exists=False))  # deleted meanwhile
            continue
        g = replace(g, max_pending_idle_s=idle_ms / 1000 if idle_ms is not None else None)
        if not _lag_plausible(stream, g):
            g = await _counted_lag(redis, stream, g)
        elif g.lag:
            if version is None:
                version = await _server_version(redis, name)
            if version < TRUSTED_LAG_VERSION:
                g = await _counted_lag(redis, stream, g)
        out.append(g)
    return _replace_groups(stream, tuple(out)), now_ms


def _lag_plausible(stream: StreamStatus, g: GroupStatus) -> bool:
    """False when the reported lag is missing or cannot be true."""
    if g.lag is None:
        return False
    return g.lag <= stream.length


async def _counted_lag(redis: aioredis.Redis, stream: StreamStatus, g: GroupStatus) -> GroupStatus:
    """The lag counted as the entries after the group's last delivered ID.

    Used when Redis's own figure is missing (after an XDEL), impossible (above the
    length) or comes from a version that can report a phantom lag after a failover.
    """
    last = g.last_delivered_id or "0-0"
    if stream.last_id is None or parse_id(last) >= parse_id(stream.last_id):
        return _with_lag(g, 0, "counted")
    if stream.first_id is not None and parse_id(last) < parse_id(stream.first_id):
        return _with_lag(g, stream.length, "counted")
    with translated():
        counted = int(await redis.eval(_COUNT_AFTER, 1, stream.name, last,
                                       LAG_COUNT_CAP + 1))
    if counted <= LAG_COUNT_CAP:
        return _with_lag(g, counted, "counted")
    estimate = stream.length if g.lag is None else min(g.lag, stream.length)
    return _with_lag(g, max(estimate, counted), "estimated")


def _with_lag(g: GroupStatus, lag: int, source: str) -> GroupStatus:
    return replace(g, lag=lag, lag_source=source)


def _replace_groups(stream: StreamStatus, groups: tuple[GroupStatus, ...]) -> StreamStatus:
    return replace(stream, groups=groups)


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
    if (stream.last_id is not None
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
