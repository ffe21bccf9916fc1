"""Stream hygiene against real Redis: trimming never removes an unacknowledged entry."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests.helpers import as_text, read_group, stream_range, wait_until
from worker import constants as c
from worker import trim
from worker.cli import trim as trim_cli
from worker.fleet import acquire_poller, parse_id, poller_lock_key, redis_time_ms
from worker.metrics import Metrics
from worker.settings import Settings
from worker.trim import (
    hygiene_once,
    plan_trim,
    remove_dead_consumers,
    successor,
    trim_loop,
    trim_stream,
)

pytestmark = [pytest.mark.redis, pytest.mark.anyio]


async def add(redis: aioredis.Redis, stream: str, n: int) -> list[str]:
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(stream, {c.EVENT_FIELD: f'{{"n": {i}}}'})
        return [x.decode() for x in await pipe.execute()]


async def ids_in(redis: aioredis.Redis, stream: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in await stream_range(redis, stream)]


async def read(redis: aioredis.Redis, stream: str, group: str, consumer: str, n: int) -> list[str]:
    if n == 0:
        return []
    got = await read_group(redis, group, consumer, stream, n)
    return [entry_id.decode() for entry_id, _ in got]


async def must_keep(redis: aioredis.Redis, stream: str) -> set[str]:
    """Every entry some group has not delivered or not acknowledged."""
    keep: set[str] = set()
    all_ids = await ids_in(redis, stream)
    for g in await redis.xinfo_groups(stream):
        name, last = g["name"].decode(), parse_id(g["last-delivered-id"].decode())
        keep |= {i for i in all_ids if parse_id(i) > last}
        pending = await redis.xpending_range(stream, name, "-", "+", 100_000)
        keep |= {as_text(p["message_id"]) for p in pending}
    return keep


async def tick() -> None:
    """Let Redis's clock pass the newest entry, so a retention of 0 does not cover it."""
    await anyio.sleep(0.005)


def settings_for(stream: str, **kw: Any) -> Settings:
    return Settings(streams=(stream,), group="writers", consumer="me", store_url="null://",
                    **kw)


def test_successor() -> None:
    """The successor of an ID is the next sequence number, or the next millisecond."""
    assert successor("5-0") == "5-1"
    assert successor("5-41") == "5-42"
    assert successor(f"5-{2**64 - 1}") == "6-0"


async def test_two_groups_at_different_positions(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """Trimming follows the slower group and the oldest pending entry, step by step."""
    ids = await add(redis_client, stream, 20)
    await redis_client.xgroup_create(stream, "a", id="0")
    await redis_client.xgroup_create(stream, "b", id="0")
    assert await read(redis_client, stream, "a", "a1", 15) == ids[:15]
    await redis_client.xack(stream, "a", *[i for i in ids[:10] if i not in (ids[4], ids[7])])
    assert await read(redis_client, stream, "b", "b1", 12) == ids[:12]
    await redis_client.xack(stream, "b", *ids[:12])

    # a still needs ids[4] (pending): only 0..3 may go.
    await tick()
    result = await trim_stream(redis_client, stream, 0, approximate=False)
    assert result.plan.minid == ids[4]
    assert result.plan.group_floors == {"a": ids[4], "b": successor(ids[11])}
    assert result.trimmed == 4
    assert await ids_in(redis_client, stream) == ids[4:]

    # a acknowledges 4 and 7: its floor moves to its next pending entry, ids[10].
    await redis_client.xack(stream, "a", ids[4], ids[7])
    await tick()
    result = await trim_stream(redis_client, stream, 0, approximate=False)
    assert result.plan.minid == ids[10]
    assert await ids_in(redis_client, stream) == ids[10:]

    # a acknowledges everything it read; b has not read 12..19: they all stay.
    await redis_client.xack(stream, "a", *ids[10:15])
    await tick()
    result = await trim_stream(redis_client, stream, 0, approximate=False)
    assert result.plan.minid == successor(ids[11])
    assert await ids_in(redis_client, stream) == ids[12:]
    assert set(ids[12:]) >= await must_keep(redis_client, stream)


@pytest.mark.parametrize("seed", range(12))
async def test_random_positions_never_lose_unacknowledged_entries(
    redis_client: aioredis.Redis, stream: str, seed: int
) -> None:
    """Three groups read and acknowledge at random; a trim keeps everything any still needs."""
    rng = random.Random(seed)
    ids = await add(redis_client, stream, 60)
    for g in ("g1", "g2", "g3"):
        await redis_client.xgroup_create(stream, g, id="0")
        got = await read(redis_client, stream, g, g + "-c", rng.randint(0, 60))
        acked = [i for i in got if rng.random() < 0.8]
        if acked:
            await redis_client.xack(stream, g, *acked)
    needed = await must_keep(redis_client, stream)
    approximate = rng.random() < 0.5

    await tick()
    await trim_stream(redis_client, stream, 0, approximate=approximate)

    left = await ids_in(redis_client, stream)
    assert needed <= set(left)
    assert left == ids[len(ids) - len(left):], "what is left is a suffix of the stream"
    oldest = min(needed, key=parse_id) if needed else None
    exact = [i for i in ids if oldest is not None and parse_id(i) >= parse_id(oldest)]
    if not approximate:
        assert left == exact, "an exact trim removes everything no group needs"


async def test_retention_floor_keeps_recent_entries(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """Acknowledged entries newer than the retention floor stay; older ones go."""
    now = await redis_time_ms(redis_client)
    old = [await redis_client.xadd(stream, {"event": b"{}"}, id=f"{now - 7_200_000 + i}-0")
           for i in range(3)]
    recent = await add(redis_client, stream, 3)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await read(redis_client, stream, "writers", "w", 10)
    await redis_client.xack(stream, "writers", *old, *recent)

    result = await trim_stream(redis_client, stream, 3600, approximate=False)

    assert result.trimmed == 3
    assert await ids_in(redis_client, stream) == recent
    assert parse_id(result.plan.minid or "") == parse_id(result.plan.retention_floor or "")


async def test_nothing_to_trim_without_groups_or_progress(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """No stream, no groups, or a group that has delivered nothing: nothing is trimmed."""
    assert (await plan_trim(redis_client, stream, 0)).reason == "no_stream"
    ids = await add(redis_client, stream, 5)
    await tick()
    result = await trim_stream(redis_client, stream, 0, approximate=False)
    assert (result.plan.reason, result.trimmed) == ("no_groups", 0)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await tick()
    result = await trim_stream(redis_client, stream, 0, approximate=False)
    assert (result.plan.reason, result.plan.minid, result.trimmed) == (
        "nothing_acknowledged", None, 0
    )
    assert await ids_in(redis_client, stream) == ids


async def test_dry_run_changes_nothing(redis_client: aioredis.Redis, stream: str) -> None:
    """A dry run computes the plan and leaves the stream alone."""
    ids = await add(redis_client, stream, 5)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await read(redis_client, stream, "writers", "w", 5)
    await redis_client.xack(stream, "writers", *ids)
    await tick()
    result = await trim_stream(redis_client, stream, 0, dry_run=True)
    assert result.plan.minid == successor(ids[-1])
    assert result.trimmed == 0
    assert await ids_in(redis_client, stream) == ids


async def test_approximate_trim_never_passes_minid(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """XTRIM MINID ~ removes whole nodes only: never an entry at or above MINID."""
    ids = await add(redis_client, stream, 1000)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await read(redis_client, stream, "writers", "w", 550)
    await redis_client.xack(stream, "writers", *ids[:550])

    await tick()
    result = await trim_stream(redis_client, stream, 0, approximate=True)

    assert result.plan.minid == successor(ids[549])
    assert 0 < result.trimmed <= 550
    assert await ids_in(redis_client, stream) == ids[result.trimmed:]


async def test_dead_consumers_removed_only_without_pending(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """A consumer with pending entries stays; once none remain it is removed; 'keep' stays."""
    ids = await add(redis_client, stream, 4)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await read(redis_client, stream, "writers", "dead", 2)
    await read(redis_client, stream, "writers", "me", 2)
    await redis_client.xack(stream, "writers", *ids[2:])

    removed = await remove_dead_consumers(redis_client, stream, "writers", idle_ms=0,
                                          keep=("me",))
    assert removed == []
    names = {x["name"] for x in await redis_client.xinfo_consumers(stream, "writers")}
    assert names == {b"dead", b"me"}

    # the reclaimer takes the dead consumer's entries over, and acknowledges them
    await redis_client.xclaim(stream, "writers", "me", 0, [*ids[:2]])
    await redis_client.xack(stream, "writers", *ids[:2])
    assert await remove_dead_consumers(redis_client, stream, "writers", idle_ms=0,
                                       keep=("me",)) == ["dead"]
    names = {x["name"] for x in await redis_client.xinfo_consumers(stream, "writers")}
    assert names == {b"me"}


async def test_dead_consumers_need_to_be_idle(redis_client: aioredis.Redis, stream: str) -> None:
    """A consumer idle for less than the threshold is not removed."""
    await add(redis_client, stream, 1)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await read(redis_client, stream, "writers", "fresh", 1)
    await redis_client.xack(stream, "writers", *(await ids_in(redis_client, stream)))
    assert await remove_dead_consumers(redis_client, stream, "writers",
                                       idle_ms=600_000) == []
    assert await remove_dead_consumers(redis_client, "no-such-stream", "writers",
                                       idle_ms=0) == []


async def test_delete_script_refuses_a_consumer_with_pending(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """The check-and-delete script itself refuses, so a race cannot drop pending entries."""
    await add(redis_client, stream, 2)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await read(redis_client, stream, "writers", "busy", 1)
    assert await redis_client.eval(trim._DELCONSUMER, 1, stream, "writers", "busy", 0) == -1
    assert await redis_client.eval(trim._DELCONSUMER, 1, stream, "writers", "nobody", 0) == -3
    pending = await redis_client.xpending(stream, "writers")
    assert pending["pending"] == 1


async def test_hygiene_once_counts_and_respects_trim_switch(
    redis_client: aioredis.Redis, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One round removes dead consumers and trims (unless AUDIT_TRIM is off), counting both."""
    monkeypatch.setattr(trim, "MIN_DEAD_CONSUMER_IDLE_MS", 0)
    ids = await add(redis_client, stream, 6)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await read(redis_client, stream, "writers", "gone", 6)
    await redis_client.xack(stream, "writers", *ids)
    m = Metrics()
    await tick()

    off = settings_for(stream, trim=False, trim_retention_s=0, claim_idle_ms=1)
    assert await hygiene_once(redis_client, off, m) == []
    assert await ids_in(redis_client, stream) == ids
    assert await redis_client.xinfo_consumers(stream, "writers") == []
    assert m.registry.get_sample_value(
        "audit_fleet_consumers_deleted_total", {"stream": stream, "group": "writers"}
    ) == 1

    on = settings_for(stream, trim_retention_s=0)
    (result,) = await hygiene_once(redis_client, on, m, approximate=False)
    assert result.trimmed == 6
    assert await ids_in(redis_client, stream) == []
    assert m.registry.get_sample_value(
        "audit_fleet_trimmed_entries_total", {"stream": stream}
    ) == 6


async def test_trim_loop_trims_only_as_poller(redis_client: aioredis.Redis, stream: str) -> None:
    """Only the holder of the fleet poller lock trims; the loop heartbeats either way."""
    ids = await add(redis_client, stream, 3)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await read(redis_client, stream, "writers", "w", 3)
    await redis_client.xack(stream, "writers", *ids)
    other = settings_for(stream, trim_retention_s=0).with_(consumer="other")
    assert await acquire_poller(redis_client, other)
    m = Metrics()
    mine = settings_for(stream, trim_retention_s=0)
    await tick()

    beats: set[float] = set()

    def rounds(n: int) -> Callable[[], bool]:
        def done() -> bool:
            if "trim" in m.heartbeats():
                beats.add(m.heartbeats()["trim"])
            return len(beats) >= n
        return done

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(trim_loop, redis_client, mine, m, interval_s=0.05))
        await wait_until(rounds(3), what="three rounds of the loop")
        assert await ids_in(redis_client, stream) == ids  # not the poller: nothing trimmed

        await redis_client.delete(poller_lock_key(mine.streams, mine.group))

        async def trimmed() -> bool:
            return await ids_in(redis_client, stream) == []  # approximate: whole nodes

        await wait_until(trimmed, what="the new poller trimming")
        tg.cancel_scope.cancel()


async def test_trim_command(
    redis_client: aioredis.Redis, stream: str, redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`audit-fleet trim --dry-run --json` prints the plan; without --dry-run it trims."""
    ids = await add(redis_client, stream, 4)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await read(redis_client, stream, "writers", "w", 4)
    await redis_client.xack(stream, "writers", *ids[:2])
    parser = argparse.ArgumentParser()
    trim_cli.register(parser.add_subparsers())
    base = ["trim", "--redis-url", redis_url, "--stream", stream, "--group", "writers",
            "--retention", "0", "--exact"]

    await tick()
    args = parser.parse_args([*base, "--dry-run", "--json"])
    assert await args.func(args) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert (doc["minid"], doc["trimmed"], doc["dry_run"]) == (ids[2], 0, True)

    args = parser.parse_args(base)
    assert await args.func(args) == 0
    assert f"trimmed below {ids[2]}: 2 entries" in capsys.readouterr().out
    assert await ids_in(redis_client, stream) == ids[2:]
