"""The longest time since delivery over every pending entry (the stuck gauge), on real Redis."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis

from worker import constants as c
from worker.fleet import fleet_status
from worker.pending_idle import PendingScans

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

HOUR_MS = 3_600_000


async def pending_list(redis: aioredis.Redis, stream: str, n: int, consumer: str = "alice",
                       read: int | None = None) -> list[str]:
    """``n`` entries appended and ``read`` (all by default) delivered to ``consumer``."""
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(stream, {c.EVENT_FIELD: b"{}"}, id=f"{1_000_000 + i}-0")
        ids = [x.decode() for x in await pipe.execute()]
    await redis.xgroup_create(stream, "writers", id="0")
    await redis.xreadgroup("writers", consumer, {stream: ">"}, count=n if read is None else read)
    return ids


async def stuck(redis: aioredis.Redis, stream: str, entry_id: str, consumer: str = "alice"
                ) -> None:
    """Make ``entry_id`` look delivered an hour ago (XCLAIM … IDLE). The claim counts as an
    interaction of ``consumer``, so its own idle time stays near 0 and cannot give it away."""
    await redis.xclaim(stream, "writers", consumer, 0, [entry_id], idle=HOUR_MS, justid=True)


async def max_idle_s(redis: aioredis.Redis, stream: str, scans: PendingScans | None = None
                     ) -> float:
    (g,) = (await fleet_status(redis, [stream], "writers", scans)).streams[0].groups
    assert g.max_pending_idle_s is not None
    return g.max_pending_idle_s


async def test_an_entry_stuck_behind_thousands_of_pending_is_seen(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """Regression: the stuck gauge read only the 1000 lowest pending IDs, so an entry stuck
    behind them (reclaim redelivers lowest IDs first) never fired the alert. Every pending
    entry counts: the value is the stuck entry's hour."""
    ids = await pending_list(redis_client, stream, 3000)
    await stuck(redis_client, stream, ids[2500])

    assert HOUR_MS / 1000 <= await max_idle_s(redis_client, stream) < HOUR_MS / 1000 + 60


async def test_a_large_pending_list_is_swept_and_a_stuck_entry_then_followed(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """Beyond what one poll reads (here 2 pages of 100), the poller sweeps the list over
    successive polls; once met, the stuck entry is read again every poll (wherever the
    sweep is) until it is acknowledged."""
    ids = await pending_list(redis_client, stream, 3000)
    await stuck(redis_client, stream, ids[2500])
    scans = PendingScans(page=100, pages_per_poll=2)

    seen = [await max_idle_s(redis_client, stream, scans) for _ in range(15)]

    met = next(i for i, v in enumerate(seen) if v >= HOUR_MS / 1000)
    assert met == 12, "page 2500 is met on the 13th poll (200 entries a poll)"
    assert all(v < 60 for v in seen[:met])
    assert all(v >= HOUR_MS / 1000 for v in seen[met:]), "followed after the sweep moved on"
    assert not scans.of(stream, "writers").complete
    await redis_client.xack(stream, "writers", ids[2500])
    assert await max_idle_s(redis_client, stream, scans) < 60


async def test_a_consumer_that_stopped_bounds_it_from_below(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """Each pending entry has been idle at least as long as its consumer, so a consumer that
    stopped while holding entries shows at once, even where no page of this poll reaches."""
    ids = await pending_list(redis_client, stream, 3000, read=2999)
    await redis_client.xreadgroup("writers", "bob", {stream: ">"}, count=1)  # ids[-1]
    await anyio.sleep(1.0)
    await redis_client.xclaim(stream, "writers", "alice", 0, [*ids[:100]], justid=True)

    value = await max_idle_s(redis_client, stream, PendingScans(page=100, pages_per_poll=1))

    assert 1.0 <= value < 60
