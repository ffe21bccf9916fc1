"""Fleet status from real Redis, and the fleet gauges exported by one elected poller."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import as_text, wait_until
from worker import constants as c
from worker.fleet import (
    FleetCollector,
    acquire_poller,
    fleet_loop,
    fleet_side_loop,
    fleet_status,
    id_ms,
    poll_fleet,
    poller_lock_key,
    release_poller,
)
from worker.metrics import Metrics
from worker.settings import Settings

pytestmark = [pytest.mark.redis, pytest.mark.anyio]


def settings_for(stream: str, consumer: str, **kw: Any) -> Settings:
    return Settings(streams=(stream,), group="writers", consumer=consumer,
                    store_url="null://", **kw)


async def add(redis: aioredis.Redis, stream: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        ids.append(as_text(await redis.xadd(stream, {c.EVENT_FIELD: f'{{"n": {i}}}'})))
    return ids


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the text exposition, keyed by name and sorted labels."""
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_status_reports_length_lag_pending_age_consumers_and_dlq(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """Length, lag, pending, oldest pending age, consumers and DLQ size match what Redis holds."""
    ids = await add(redis_client, stream, 10)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await redis_client.xreadgroup("writers", "alice", {stream: ">"}, count=4)
    await redis_client.xreadgroup("writers", "bob", {stream: ">"}, count=2)
    await redis_client.xack(stream, "writers", ids[0])
    await redis_client.xadd(c.dlq_key(stream), {"reason": c.Reason.INVALID_JSON, "event": b"{"})
    await redis_client.xadd(c.dlq_key(stream), {"reason": c.Reason.SCHEMA, "event": b"{}"})

    status = await fleet_status(redis_client, [stream], "writers")

    (s,) = status.streams
    assert (s.exists, s.length, s.first_id, s.last_id, s.dlq_length) == (
        True, 10, ids[0], ids[-1], 2
    )
    (g,) = s.groups
    assert g.exists
    assert g.name == "writers"
    assert g.lag == 4
    assert g.pending == 5
    assert g.entries_read == 6
    assert g.last_delivered_id == ids[5]
    assert g.oldest_pending_id == ids[1]
    expected_age = (status.taken_at_ms - id_ms(ids[1])) / 1000
    assert g.oldest_pending_age_s == pytest.approx(expected_age, abs=0.001)
    assert [(x.name, x.pending) for x in g.consumers] == [("alice", 3), ("bob", 2)]
    assert all(0 <= x.idle_ms < 60_000 for x in g.consumers)
    assert g.active_consumers() == 2
    assert abs(status.taken_at_ms / 1000 - time.time()) < 5


async def test_a_drained_backlog_is_old_but_not_idle(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """Regression: the stuck alert read the time since append, so it fired on every drain of
    a backlog older than 15 minutes. Entries appended 20 minutes ago and delivered now are
    old (latency) but have waited only since their delivery (not stuck)."""
    now_ms = int(time.time() * 1000)
    appended = now_ms - 20 * 60 * 1000
    ids = [as_text(await redis_client.xadd(stream, {c.EVENT_FIELD: b"{}"}, id=f"{appended + i}-0"))
           for i in range(3)]
    await redis_client.xgroup_create(stream, "writers", id="0")
    await redis_client.xreadgroup("writers", "alice", {stream: ">"}, count=3)

    status = await fleet_status(redis_client, [stream], "writers")

    (g,) = status.streams[0].groups
    assert g.oldest_pending_id == ids[0]
    assert g.oldest_pending_age_s == pytest.approx((status.taken_at_ms - appended) / 1000,
                                                   abs=0.001)
    assert g.oldest_pending_age_s is not None
    assert g.oldest_pending_age_s > 1199
    assert g.max_pending_idle_s is not None
    assert 0 <= g.max_pending_idle_s < 5

    collector = FleetCollector("audit_fleet")
    collector.update(status)
    got = {(f.name, s.value) for f in collector.collect() for s in f.samples
           if f.name.startswith("audit_fleet_group_")}
    assert ("audit_fleet_group_pending_max_idle_seconds", g.max_pending_idle_s) in got
    assert ("audit_fleet_group_oldest_pending_age_seconds", g.oldest_pending_age_s) in got


async def test_pending_idle_is_the_longest_time_since_delivery(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """An entry a consumer holds without acknowledging grows its idle time; a fresh claim
    of another resets only that one."""
    ids = await add(redis_client, stream, 3)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await redis_client.xreadgroup("writers", "alice", {stream: ">"}, count=3)
    await anyio.sleep(0.3)
    await redis_client.xclaim(stream, "writers", "bob", 0, [ids[0]], justid=True)

    status = await fleet_status(redis_client, [stream], "writers")

    (g,) = status.streams[0].groups
    assert g.max_pending_idle_s is not None
    assert 0.3 <= g.max_pending_idle_s < 5
    assert g.to_dict()["max_pending_idle_s"] == g.max_pending_idle_s


async def test_status_of_missing_stream_and_group(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """A missing stream, and a group asked for but absent, are reported as missing."""
    other = stream + "-other"
    await add(redis_client, other, 3)
    await redis_client.xadd(c.dlq_key(stream), {"reason": "x", "event": b""})

    status = await fleet_status(redis_client, [stream, other], "writers")

    missing, present = status.streams
    assert (missing.exists, missing.length, missing.dlq_length) == (False, 0, 1)
    assert [(g.name, g.exists) for g in missing.groups] == [("writers", False)]
    assert present.exists
    assert present.length == 3
    assert [(g.name, g.exists) for g in present.groups] == [("writers", False)]


async def test_status_of_all_groups(redis_client: aioredis.Redis, stream: str) -> None:
    """With group=None every group of the stream is described, sorted by name."""
    await add(redis_client, stream, 5)
    await redis_client.xgroup_create(stream, "zeta", id="0")
    await redis_client.xgroup_create(stream, "alpha", id="$")

    status = await fleet_status(redis_client, [stream], None)

    (s,) = status.streams
    assert [(g.name, g.lag, g.pending) for g in s.groups] == [("alpha", 0, 0), ("zeta", 5, 0)]
    assert s.groups[0].oldest_pending_age_s is None


async def test_lag_falls_back_to_zero_for_a_caught_up_group_after_xdel(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """After an XDEL Redis reports no lag: it is counted instead (entries after the group's
    last delivered ID), and a group that has read everything shows 0."""
    ids = await add(redis_client, stream, 3)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await redis_client.xgroup_create(stream, "behind", id="0")
    await redis_client.xreadgroup("writers", "a", {stream: ">"}, count=10)
    await redis_client.xdel(stream, ids[1])

    status = await fleet_status(redis_client, [stream], None)

    lags = {g.name: (g.lag, g.lag_source) for g in status.streams[0].groups}
    assert lags == {"behind": (2, "counted"), "writers": (0, "redis")}


async def test_status_json_form_is_stable(redis_client: aioredis.Redis, stream: str) -> None:
    """The JSON form carries a schema version and a fixed set of keys at every level."""
    await add(redis_client, stream, 2)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await redis_client.xreadgroup("writers", "a", {stream: ">"}, count=1)

    doc = (await fleet_status(redis_client, [stream], "writers")).to_dict()

    assert set(doc) == {"version", "taken_at", "group", "streams"}
    assert doc["version"] == 1
    assert doc["taken_at"].endswith("Z")
    (s,) = doc["streams"]
    assert set(s) == {"stream", "exists", "length", "first_id", "last_id",
                      "dead_letter_stream", "dead_letter_length", "dead_letter_oldest_id",
                      "dead_letter_bytes", "groups", "error", "node"}
    assert s["dead_letter_stream"] == stream + ":dlq"
    (g,) = s["groups"]
    assert set(g) == {"group", "exists", "lag", "lag_source", "pending", "entries_read",
                      "last_delivered_id", "oldest_pending_id", "oldest_pending_age_s",
                      "max_pending_idle_s", "consumers"}
    assert g["consumers"] == [{"name": "a", "pending": 1, "idle_ms": g["consumers"][0]["idle_ms"]}]


async def test_one_poller_exports_fleet_gauges(redis_client: aioredis.Redis, stream: str) -> None:
    """Of two workers only the lock holder exports fleet gauges; the other exports none."""
    await add(redis_client, stream, 6)
    await redis_client.xgroup_create(stream, "writers", id="0")
    await redis_client.xreadgroup("writers", "w1", {stream: ">"}, count=2)
    await redis_client.xadd(c.dlq_key(stream), {"reason": "x", "event": b""})
    m1, m2 = Metrics(), Metrics()
    s1, s2 = settings_for(stream, "w1"), settings_for(stream, "w2")

    assert await poll_fleet(redis_client, s1, m1) is True
    assert await poll_fleet(redis_client, s2, m2) is False

    got1, got2 = samples(m1), samples(m2)
    sg = (("group", "writers"), ("stream", stream))
    assert got1[("audit_fleet_stream_length", (("stream", stream),))] == 6
    assert got1[("audit_fleet_dead_letter_length", (("stream", stream),))] == 1
    assert got1[("audit_fleet_group_lag", sg)] == 4
    assert got1[("audit_fleet_group_pending", sg)] == 2
    assert got1[("audit_fleet_group_oldest_pending_age_seconds", sg)] >= 0
    assert got1[("audit_fleet_group_consumers", sg)] == 1
    assert got1[("audit_fleet_group_active_consumers", sg)] == 1
    assert got1[("audit_fleet_consumer_pending", (("consumer", "w1"), *sg))] == 2
    assert ("audit_fleet_consumer_idle_seconds", (("consumer", "w1"), *sg)) in got1
    assert got1[("audit_fleet_fleet_poller", ())] == 1
    assert got2[("audit_fleet_fleet_poller", ())] == 0
    fleet_names = {d.name for d in m2.fleet.describe()}
    assert not [key for key in got2 if key[0] in fleet_names]


async def test_poller_hand_over(redis_client: aioredis.Redis, stream: str) -> None:
    """When the poller releases its lock, the next poll of another worker takes over."""
    await add(redis_client, stream, 1)
    m1, m2 = Metrics(), Metrics()
    s1, s2 = settings_for(stream, "w1"), settings_for(stream, "w2")
    assert await poll_fleet(redis_client, s1, m1)
    assert not await poll_fleet(redis_client, s2, m2)
    assert await poll_fleet(redis_client, s1, m1), "the holder renews its own lock"

    assert await release_poller(redis_client, s1)
    assert not await release_poller(redis_client, s2), "only the holder can release"
    assert await poll_fleet(redis_client, s2, m2)
    assert not await poll_fleet(redis_client, s1, m1)

    assert m1.fleet.status is None, "a worker that lost the lock stops exporting"
    assert m2.fleet.status is not None


async def test_poller_lock_expires(redis_client: aioredis.Redis, stream: str) -> None:
    """The lock lives for three poll intervals, so a dead poller is replaced."""
    s1 = settings_for(stream, "w1", fleet_poll_interval_s=0.05)
    s2 = settings_for(stream, "w2", fleet_poll_interval_s=0.05)
    assert await acquire_poller(redis_client, s1)
    ttl = await redis_client.pttl(poller_lock_key(s1.streams, s1.group))
    assert 0 < ttl <= 1000
    assert not await acquire_poller(redis_client, s2)
    waited = await wait_until(lambda: acquire_poller(redis_client, s2), within_s=10,
                              interval=0.01, what="the lock expired and w2 took it")
    assert waited >= (ttl - 50) / 1000  # not before its time-to-live ran out
    assert await redis_client.get(poller_lock_key(s1.streams, s1.group)) == b"w2"


async def test_stale_snapshot_is_not_exported(redis_client: aioredis.Redis, stream: str) -> None:
    """A snapshot older than the lock's lifetime disappears from the exposition."""
    await add(redis_client, stream, 1)
    m = Metrics()
    assert await poll_fleet(redis_client, settings_for(stream, "w1"), m)
    assert ("audit_fleet_stream_length", (("stream", stream),)) in samples(m)
    m.fleet.max_age_s = 0.0
    await anyio.sleep(0.01)
    assert ("audit_fleet_stream_length", (("stream", stream),)) not in samples(m)


async def test_fleet_loop_polls_beats_and_releases_on_cancel(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """The loop polls and heartbeats until cancelled, then releases the lock and clears."""
    await add(redis_client, stream, 2)
    m = Metrics()
    s = settings_for(stream, "w1", fleet_poll_interval_s=0.05)
    key = poller_lock_key(s.streams, s.group)
    async with anyio.create_task_group() as tg:
        tg.start_soon(fleet_loop, redis_client, s, m)
        with anyio.fail_after(5):
            while m.fleet.status is None or "fleet" not in m.heartbeats():
                await anyio.sleep(0.02)
        assert await redis_client.get(key) == b"w1"
        tg.cancel_scope.cancel()
    assert await redis_client.get(key) is None
    assert m.fleet.status is None
    assert samples(m)[("audit_fleet_fleet_poller", ())] == 0


async def test_fleet_loop_counts_failures_and_carries_on(stream: str) -> None:
    """With Redis unreachable the loop counts errors, keeps beating and does not crash."""
    from tests.helpers import free_port

    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0",
                                   socket_connect_timeout=0.2)
    m = Metrics()
    s = settings_for(stream, "w1")
    errors = ("audit_fleet_loop_errors_total", (("loop", "fleet"),))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(fleet_loop, dead, s, m, interval_s=0.05))
            await wait_until(lambda: samples(m).get(errors, 0) >= 3, what="three failed polls")
            assert "fleet" in m.heartbeats()  # it beats while Redis is unreachable
            tg.cancel_scope.cancel()
    finally:
        await dead.aclose()


async def test_fleet_side_loop_is_named(redis_client: aioredis.Redis, stream: str) -> None:
    """The side-loop factory gives a zero-argument coroutine function named 'fleet'."""
    loop = fleet_side_loop(redis_client, settings_for(stream, "w1"), Metrics())
    assert loop.__name__ == "fleet"


def test_rates_between_two_snapshots() -> None:
    """`status --watch` rates: appended, delivered and dead-lettered per second, lag change."""
    from worker.fleet import FleetStatus, GroupStatus, StreamStatus
    from worker.fleet_checks import rates

    def snap(ms: int, length: int, last: str, read: int, lag: int, dlq: int) -> FleetStatus:
        group = GroupStatus("g", entries_read=read, lag=lag)
        return FleetStatus(ms, "g", (StreamStatus("s", True, length, "1-0", last, dlq,
                                                   groups=(group,)),))

    before = snap(10_000, 100, "100-0", 40, 60, 1)
    after = snap(12_000, 140, "140-0", 120, 20, 5)
    assert rates(before, after) == [{
        "stream": "s", "group": "g", "appended_per_s": 20.0, "delivered_per_s": 40.0,
        "lag_change_per_s": -20.0, "dead_lettered_per_s": 2.0,
    }]
    assert rates(after, after) == []
