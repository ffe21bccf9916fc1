"""The longest time since delivery among a group's pending entries, at a bounded cost.

That time (XPENDING's ``time_since_delivered``) is what a stuck consumer drives up, and
what the critical "stuck" alert watches. Redis keeps no index of pending entries by
delivery time: the pending entries list (PEL) is ordered by ID, and an entry's idle time
is only known by reading the entry. Reading only the lowest IDs misses an entry stuck
behind them (reclaim redelivers a backlog lowest IDs first, so the lowest entries are
often the freshest), and one call over a whole large PEL blocks Redis while it scans
(``XPENDING … IDLE`` over 1 M pending entries: 0.36 s measured).

So each poll reads the PEL in pages of :data:`PAGE` entries, one XPENDING call each (as
cheap as one read of the worker), at most :data:`PAGES_PER_POLL` pages per group:

* a PEL of up to ``PAGE * PAGES_PER_POLL`` entries (20 000) is read whole every poll: the
  value is exact;
* a larger one is swept over successive polls from a cursor kept between them (by the
  fleet poller, in a :class:`PendingScans`); the :data:`REMEMBERED` entries delivered
  longest ago that the sweep has met are read again, by ID, every poll, so a stuck entry,
  once met, is followed exactly until it is acknowledged or reclaimed;
* and every poll, each consumer's own idle time (XINFO CONSUMERS) bounds the value from
  below: a consumer's pending entries were delivered at one of its interactions, so each
  has been idle at least as long as the consumer. A consumer that died holding entries
  shows at once, whatever the size of the PEL.

Every figure is a time some pending entry really has been idle, so the value never
overstates; it is exact while the PEL fits the poll's pages, and otherwise catches up
within one sweep (``pending / 20 000`` polls).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis

from .redisio import check, text, translated

#: Pending entries one XPENDING call reads.
PAGE = 1000

#: XPENDING pages read per group and poll.
PAGES_PER_POLL = 20

#: Entries delivered longest ago that a sweep remembers and reads again each poll.
REMEMBERED = 8


class Consumer(Protocol):
    """A consumer as XINFO CONSUMERS reports it (:class:`worker.fleet_status.ConsumerStatus`)."""

    @property
    def pending(self) -> int: ...

    @property
    def idle_ms(self) -> int: ...


@dataclass(slots=True)
class PendingIdleScan:
    """The sweep over one group's PEL on one stream, carried from poll to poll."""

    page: int = PAGE
    pages_per_poll: int = PAGES_PER_POLL
    #: The last ID the sweep read (the next page starts after it); None: from the lowest.
    cursor: str | None = None
    #: IDs of the entries delivered longest ago that the sweep has met.
    oldest: tuple[str, ...] = ()
    #: Whether the last value covered every pending entry.
    complete: bool = False

    async def max_idle_ms(
        self,
        redis: aioredis.Redis,
        stream: str,
        group: str,
        pending: int,
        consumers: Sequence[Consumer] = (),
    ) -> int | None:
        """The longest time since delivery (ms) among the group's pending entries; None
        when nothing is pending."""
        if pending <= 0:
            self.cursor, self.oldest, self.complete = None, (), True
            return None
        whole = pending <= self.page * self.pages_per_poll
        start = None if whole else self.cursor
        idle: dict[str, int] = {}
        reached_end = False
        for _ in range(self.pages_per_poll):
            rows = await _page(redis, stream, group, start, self.page)
            for entry_id, ms in rows:
                idle[entry_id] = ms
            if len(rows) < self.page:
                reached_end = True
                break
            start = rows[-1][0]
        self.complete = whole and reached_end
        self.cursor = None if reached_end else start
        for entry_id, ms in await _entries(redis, stream, group,
                                           [i for i in self.oldest if i not in idle]):
            idle[entry_id] = ms
        self.oldest = tuple(sorted(idle, key=idle.__getitem__, reverse=True)[:REMEMBERED])
        bounds = list(idle.values())
        bounds.extend(x.idle_ms for x in consumers if x.pending > 0)
        return max(bounds) if bounds else None


@dataclass(slots=True)
class PendingScans:
    """One :class:`PendingIdleScan` per (stream, group), kept between polls."""

    page: int = PAGE
    pages_per_poll: int = PAGES_PER_POLL
    scans: dict[tuple[str, str], PendingIdleScan] = field(default_factory=dict)

    def of(self, stream: str, group: str) -> PendingIdleScan:
        key = (stream, group)
        if key not in self.scans:
            self.scans[key] = PendingIdleScan(self.page, self.pages_per_poll)
        return self.scans[key]


async def _page(
    redis: aioredis.Redis, stream: str, group: str, after: str | None, count: int
) -> list[tuple[str, int]]:
    """Up to ``count`` pending entries after ``after`` (from the lowest when None):
    ``(id, ms since delivery)``."""
    with translated():
        rows = await redis.xpending_range(stream, group, min="-" if after is None
                                          else f"({after}", max="+", count=count)
    return _rows(rows)


async def _entries(
    redis: aioredis.Redis, stream: str, group: str, ids: Sequence[str]
) -> list[tuple[str, int]]:
    """The remembered entries that are still pending, read again by ID (one pipeline)."""
    if not ids:
        return []
    with translated():
        async with redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
            replies = await pipe.execute(raise_on_error=False)
    out: list[tuple[str, int]] = []
    for reply in replies:
        check(reply)
        out.extend(_rows(reply))
    return out


def _rows(rows: Any) -> list[tuple[str, int]]:
    return [(text(x["message_id"]), int(x["time_since_delivered"])) for x in rows]
