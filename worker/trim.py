"""Stream hygiene: trim what every group has acknowledged, remove dead consumers.

Trimming
--------
A stream entry may go only when *every* consumer group on the stream has both
delivered and acknowledged it, and it is older than the retention floor. For each
group, the oldest entry it still needs is the smaller of

* the oldest entry in its pending entries list (delivered, not acknowledged), and
* the entry right after its ``last-delivered-id`` (everything later is undelivered).

``XTRIM MINID`` at the smallest of these floors and the retention floor removes only
entries below all of them. The groups are read (XINFO GROUPS) *before* their pending
lists (XPENDING): a group only moves forward, so an entry delivered in between is
newer than the ``last-delivered-id`` already read and stays. Never ``MAXLEN``: a
length cap would cut unprocessed entries during a backlog.

Dead consumers
--------------
A consumer is removed (XGROUP DELCONSUMER) only when it has no pending entries (the
reclaimer has claimed them all) and has been idle for long. DELCONSUMER drops the
consumer's pending entries, so the check and the delete run in one Lua script:
nothing can be delivered to it in between.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .dlq_bound import bound_dead_letters
from .errors import GroupMissing, RedisFailure, StreamMissing
from .fleet import acquire_poller, redis_time_ms
from .logs import get_logger
from .redisio import check, parse_id, text, translated

if TYPE_CHECKING:
    from .metrics import Metrics
    from .settings import Settings

#: The largest sequence number of a stream ID.
_MAX_SEQ = 2**64 - 1

#: Remove a consumer with nothing pending after it has been idle this long, at the least.
MIN_DEAD_CONSUMER_IDLE_MS = 15 * 60 * 1000

_DELCONSUMER = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then return -1 end
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, entry in ipairs(consumers) do
  local name, idle
  for i = 1, #entry, 2 do
    if entry[i] == 'name' then name = entry[i + 1] end
    if entry[i] == 'idle' then idle = entry[i + 1] end
  end
  if name == ARGV[2] then
    if idle < tonumber(ARGV[3]) then return -2 end
    return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  end
end
return -3
"""


@dataclass(frozen=True, slots=True)
class TrimPlan:
    """What may be trimmed from one stream, and why.

    ``minid`` is None when nothing may be trimmed (``reason`` says why); otherwise every
    entry with an ID below it is acknowledged by every group and older than the floor.
    """

    stream: str
    minid: str | None
    reason: str
    retention_floor: str | None = None
    group_floors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "minid": self.minid,
            "reason": self.reason,
            "retention_floor": self.retention_floor,
            "group_floors": dict(self.group_floors),
        }


@dataclass(frozen=True, slots=True)
class TrimResult:
    plan: TrimPlan
    trimmed: int


def successor(entry_id: str) -> str:
    """The smallest stream ID greater than ``entry_id``."""
    ms, seq = parse_id(entry_id)
    return f"{ms + 1}-0" if seq >= _MAX_SEQ else f"{ms}-{seq + 1}"


def _format(entry_id: tuple[int, int]) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


async def plan_trim(redis: aioredis.Redis, stream: str, retention_s: float) -> TrimPlan:
    """The MINID that keeps every unacknowledged entry and everything newer than the floor."""
    now_ms = await redis_time_ms(redis, stream)  # the clock of the node owning the stream
    try:
        with translated():
            groups = await redis.xinfo_groups(stream)
    except StreamMissing:
        return TrimPlan(stream, None, "no_stream")
    if not groups:
        return TrimPlan(stream, None, "no_groups")
    retention_floor = (max(0, now_ms - int(retention_s * 1000)), 0)
    names = [text(g["name"]) for g in groups]
    # After XINFO GROUPS, never before: see the module docstring.
    with translated():
        async with redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.xpending(stream, name)
            pendings = await pipe.execute(raise_on_error=False)
    floors: dict[str, str] = {}
    for g, name, pending in zip(groups, names, pendings, strict=True):
        try:
            check(pending)
        except GroupMissing:
            return TrimPlan(stream, None, "groups_changed")
        floor = parse_id(successor(text(g["last-delivered-id"])))
        if pending.get("pending") and pending.get("min") is not None:
            floor = min(floor, parse_id(text(pending["min"])))
        floors[name] = _format(floor)
    minid = min([retention_floor, *(parse_id(f) for f in floors.values())])
    if minid <= (0, 1):
        return TrimPlan(stream, None, "nothing_acknowledged", _format(retention_floor), floors)
    return TrimPlan(stream, _format(minid), "ok", _format(retention_floor), floors)


async def trim_stream(
    redis: aioredis.Redis,
    stream: str,
    retention_s: float,
    *,
    approximate: bool = True,
    dry_run: bool = False,
) -> TrimResult:
    """Trim ``stream`` below what every group has acknowledged (see :func:`plan_trim`).

    ``approximate`` trims whole radix-tree nodes only (``XTRIM MINID ~``): cheaper, and it
    removes at most what the exact trim would.
    """
    plan = await plan_trim(redis, stream, retention_s)
    if plan.minid is None or dry_run:
        return TrimResult(plan, 0)
    with translated():
        trimmed = await redis.xtrim(stream, minid=plan.minid, approximate=approximate)
    return TrimResult(plan, int(trimmed))


def dead_consumer_idle_ms(settings: Settings) -> int:
    """How long a consumer with nothing pending must idle before it counts as dead."""
    return max(2 * settings.claim_idle_ms, MIN_DEAD_CONSUMER_IDLE_MS)


async def remove_dead_consumers(
    redis: aioredis.Redis,
    stream: str,
    group: str,
    *,
    idle_ms: int,
    keep: Sequence[str] = (),
) -> list[str]:
    """Delete consumers idle for ``idle_ms`` or more with no pending entries; their names."""
    try:
        with translated():
            consumers = await redis.xinfo_consumers(stream, group)
    except (GroupMissing, StreamMissing):
        return []
    removed: list[str] = []
    for consumer in consumers:
        name = text(consumer["name"])
        if name in keep or int(consumer["pending"]) > 0 or int(consumer["idle"]) < idle_ms:
            continue
        with translated():
            result = await redis.eval(_DELCONSUMER, 1, stream, group, name, idle_ms)
        if int(result) >= 0:
            removed.append(name)
    return removed


async def hygiene_once(
    redis: aioredis.Redis, settings: Settings, metrics: Metrics, *, approximate: bool = True
) -> list[TrimResult]:
    """One round over every stream: trim (if ``settings.trim``), bound its dead-letter
    stream (if a bound is set, see :mod:`worker.dlq_bound`) and remove dead consumers."""
    log = get_logger(loop="trim", group=settings.group)
    results: list[TrimResult] = []
    for stream in settings.streams:
        if settings.trim:
            result = await trim_stream(
                redis, stream, settings.trim_retention_s, approximate=approximate
            )
            results.append(result)
            if result.trimmed:
                metrics.trimmed_entries.labels(stream).inc(result.trimmed)
                log.info("stream_trimmed", stream=stream, minid=result.plan.minid,
                         trimmed=result.trimmed)
        if settings.dlq_bounded:
            await bound_dead_letters(redis, settings, metrics, streams=(stream,))
        removed = await remove_dead_consumers(
            redis, stream, settings.group, idle_ms=dead_consumer_idle_ms(settings),
            keep=(settings.consumer,),
        )
        if removed:
            metrics.consumers_deleted.labels(stream, settings.group).inc(len(removed))
            log.info("dead_consumers_removed", stream=stream, consumers=removed)
    return results


async def trim_loop(
    redis: aioredis.Redis,
    settings: Settings,
    metrics: Metrics,
    *,
    interval_s: float | None = None,
) -> None:
    """Every ``trim_interval_s``: if this worker is the elected fleet poller, run hygiene.

    One worker trims for the fleet (the holder of the fleet poller lock); the others only
    keep their heartbeat. A failed round is logged and counted, and the loop carries on.
    """
    interval = settings.trim_interval_s if interval_s is None else interval_s
    log = get_logger(loop="trim", group=settings.group, consumer=settings.consumer)
    while True:
        try:
            if await acquire_poller(redis, settings):
                await hygiene_once(redis, settings, metrics)
        except Exception as exc:
            metrics.loop_errors.labels("trim").inc()
            if isinstance(exc, RedisError | RedisFailure | OSError):
                metrics.redis_error(exc)
            log.warning("trim_failed", error=f"{type(exc).__name__}: {exc}"[:300])
        metrics.heartbeat("trim")
        await anyio.sleep(interval)


def trim_side_loop(
    redis: aioredis.Redis, settings: Settings, metrics: Metrics
) -> Callable[[], Awaitable[None]]:
    """:func:`trim_loop` as a zero-argument side loop named ``trim`` (for ``Worker``)."""

    async def trim() -> None:
        await trim_loop(redis, settings, metrics)

    return trim
