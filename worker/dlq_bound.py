"""Bounding the dead-letter streams, by age and by size, with a warning before any drop.

A dead-letter stream keeps every dead letter whole (payloads up to
``AUDIT_MAX_EVENT_BYTES``), so without a bound it grows until Redis reaches
``maxmemory``, and then no stream can take an event. Two bounds, each off at 0:

* ``AUDIT_DLQ_MAX_AGE_S`` (30 days): dead letters older than this, by the time in their
  ID (when they were dead-lettered, Redis's clock), are removed with an exact
  ``XTRIM MINID``;
* ``AUDIT_DLQ_MAX_BYTES`` (512 MiB): while ``MEMORY USAGE <stream>:dlq SAMPLES 0`` (exact)
  is above it, the oldest dead letters are removed, as many as the excess holds at the
  stream's mean entry size, in one Lua script (``XTRIM MAXLEN`` at the length minus that
  number, read and trimmed atomically); the newest dead letter is never removed.

Only the oldest entries ever go, and only past a bound. Nothing goes unannounced: the
fleet poller exports each dead-letter stream's bytes, oldest age and both bounds
(``audit_fleet_dead_letter_*``), and ``deploy/alerts.yaml`` warns at 80% of a bound, days
(for the age) before anything is dropped. What is dropped is counted
(``audit_fleet_dead_letters_dropped_total{stream, bound}``, which alerts on its own) and
logged (``dead_letters_dropped``: stream, bound, count, the ID range). Replay or purge
before a bound is reached what must not be lost (docs/operations.md, "Dead letters").
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from . import constants as c
from .errors import RedisRefused, StreamMissing
from .fleet_status import redis_time_ms
from .logs import get_logger
from .redisio import text, translated

if TYPE_CHECKING:
    from .metrics import Metrics
    from .settings import Settings

#: Rounds of measure-and-trim per hygiene round for the size bound (entry sizes vary: a
#: round at the mean size may leave the stream above the bound; the next one takes more).
SIZE_ROUNDS = 8

#: Remove the ``ARGV[1]`` oldest entries of ``KEYS[1]``, never its newest one; returns
#: {removed, the oldest ID removed} (the ID false when nothing was removed). Length and
#: trim in one script: a dead letter added in between cannot shift the cut.
_DROP_OLDEST = """
local len = redis.call('XLEN', KEYS[1])
local n = math.min(tonumber(ARGV[1]), len - 1)
if n <= 0 then return {0, false} end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
return {redis.call('XTRIM', KEYS[1], 'MAXLEN', len - n), first}
"""


@dataclass(frozen=True, slots=True)
class Dropped:
    """Dead letters one bound removed from one dead-letter stream."""

    stream: str
    bound: str
    count: int
    #: The oldest ID removed, and the bound's cut (entries below it were removed).
    first_id: str | None = None
    below: str | None = None


async def dlq_bytes(redis: aioredis.Redis, stream: str) -> int | None:
    """``MEMORY USAGE <stream>:dlq SAMPLES 0`` (exact, every node counted); 0 when the
    key does not exist, None when Redis refuses the command (an ACL without it)."""
    try:
        with translated():
            usage = await redis.memory_usage(c.dlq_key(stream), samples=0)
    except RedisRefused:
        return None
    return int(usage or 0)


async def drop_older_than(redis: aioredis.Redis, stream: str, max_age_s: float) -> Dropped:
    """Remove the dead letters of ``stream`` dead-lettered more than ``max_age_s`` ago."""
    now_ms = await redis_time_ms(redis, stream)
    below = f"{max(0, now_ms - int(max_age_s * 1000))}-0"
    key = c.dlq_key(stream)
    with translated():
        oldest = await redis.xrange(key, "-", below, count=1)
        if not oldest:
            return Dropped(stream, "age", 0)
        removed = await redis.xtrim(key, minid=below, approximate=False)
    return Dropped(stream, "age", int(removed), text(oldest[0][0]), below)


async def drop_beyond_size(redis: aioredis.Redis, stream: str, max_bytes: int) -> Dropped:
    """Remove the oldest dead letters of ``stream`` while it holds more than ``max_bytes``."""
    key = c.dlq_key(stream)
    total = 0
    first: str | None = None
    for _ in range(SIZE_ROUNDS):
        usage = await dlq_bytes(redis, stream)
        if usage is None:
            get_logger(loop="trim").warning(
                "dead_letter_size_unknown", stream=stream,
                error="MEMORY USAGE refused: the size bound is not applied")
            break
        if usage <= max_bytes:
            break
        with translated():
            length = int(await redis.xlen(key))
        if length <= 1:
            break
        n = max(1, math.ceil((usage - max_bytes) / (usage / length)))
        with translated():
            removed, first_removed = await redis.eval(_DROP_OLDEST, 1, key, n)
        if not int(removed):
            break
        first = first or text(first_removed)
        total += int(removed)
    return Dropped(stream, "size", total, first)


async def bound_dead_letters(
    redis: aioredis.Redis, settings: Settings, metrics: Metrics,
    streams: Sequence[str] | None = None,
) -> list[Dropped]:
    """Apply both bounds to the dead-letter streams of ``streams`` (default: every
    configured stream); count and log each drop."""
    log = get_logger(loop="trim", group=settings.group)
    out: list[Dropped] = []
    for stream in settings.streams if streams is None else streams:
        steps: list[Callable[[], Awaitable[Dropped]]] = []
        if settings.dlq_max_age_s:
            steps.append(partial(drop_older_than, redis, stream, settings.dlq_max_age_s))
        if settings.dlq_max_bytes:
            steps.append(partial(drop_beyond_size, redis, stream, settings.dlq_max_bytes))
        for step in steps:
            try:
                dropped = await step()
            except StreamMissing:
                continue
            if dropped.count:
                metrics.dead_letters_dropped.labels(stream, dropped.bound).inc(dropped.count)
                log.warning("dead_letters_dropped", stream=stream, dlq=c.dlq_key(stream),
                            bound=dropped.bound, dropped=dropped.count,
                            first_id=dropped.first_id, below=dropped.below,
                            max_age_s=settings.dlq_max_age_s,
                            max_bytes=settings.dlq_max_bytes)
                out.append(dropped)
    return out
