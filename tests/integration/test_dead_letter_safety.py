"""The dead-letter path never acknowledges an entry whose dead letter Redis did not confirm.

Redis at ``maxmemory`` refuses XADD (and XGROUP CREATE) but serves XACK; a dead-letter key
holding another type answers WRONGTYPE; in a cluster the key may answer MOVED. In each case
the entry stays pending, the worker keeps running and retries, and the dead letter is
written once Redis accepts it — exactly once.
"""

from __future__ import annotations

import random
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests.helpers import (
    MemoryStore,
    as_text,
    dlq_entries,
    fill_to_maxmemory,
    free_padding,
    pending_count,
    wait_until,
)
from tests.redis_servers import RedisServers
from worker import constants as c
from worker import samples
from worker.consumer import Worker
from worker.emitter import AuditEmitter
from worker.metrics import Metrics
from worker.redisio import Entry, dead_letter, dead_lettered_ids, write_dead_letters
from worker.settings import Settings
from worker.writer import DEAD_LETTER_REFUSED_ATTEMPTS

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

GROUP = c.DEFAULT_GROUP
LIMITED = ("--maxmemory", "16mb", "--maxmemory-policy", "noeviction")


def _settings(url: str, stream: str, **extra: Any) -> Settings:
    base: dict[str, Any] = dict(redis_url=url, streams=(stream,), metrics_port=0, block_ms=50,
                                batch_size=100, claim_idle_ms=300, reclaim_interval_s=0.1,
                                consumer="w1", max_deliveries=100)
    base.update(extra)
    return Settings(**base)


def _events(n_runs: int, workspace: str = "ws_dlq") -> tuple[list[dict[str, Any]], list[str]]:
    rng = random.Random(3)
    runs = [samples.lead_triage_run(rng, workspace, f"run{i}", prompt_size=lambda r: 100)
            for i in range(n_runs)]
    return [e for r in runs for e in samples.run_events(r)], [r["runId"] for r in runs]


def _errors(metrics: Metrics, kind: str) -> float:
    value = metrics.registry.get_sample_value("audit_fleet_redis_errors_total", {"kind": kind})
    return value or 0.0


async def test_dead_letter_refused_at_maxmemory_is_never_acked(
    redis_servers: RedisServers,
) -> None:
    """At maxmemory the poison entry stays pending (no ACK without its dead letter), its
    valid neighbours are stored and ACKed, the writer keeps running and counts the OOM
    errors; once memory is freed the dead letter is written exactly once."""
    url = redis_servers.start(*LIMITED)
    client = aioredis.Redis.from_url(url)
    stream = "dlqsafety:events"
    try:
        events, run_ids = _events(5)
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        emitter = AuditEmitter(client, [stream])
        await emitter.emit_many(events[:6])
        poison = await emitter.emit_raw(stream, b"{not json")
        await emitter.emit_many(events[6:])
        await fill_to_maxmemory(client)
        store, metrics = MemoryStore(), Metrics()
        worker = Worker(_settings(url, stream, retry_max_backoff_s=0.05), store, client, metrics)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)

            async def neighbours_settled() -> bool:
                return (len(store.runs) == len(run_ids) and _errors(metrics, "oom") >= 3
                        and await pending_count(client, stream, GROUP) == 1)

            await wait_until(neighbours_settled)
            rows = await client.xpending_range(stream, GROUP, min="-", max="+", count=10)
            assert [as_text(r["message_id"]) for r in rows] == [poison]
            assert await client.xlen(stream + ":dlq") == 0
            await free_padding(client)

            async def dead_lettered() -> bool:
                return (await client.xlen(stream + ":dlq") == 1
                        and await pending_count(client, stream, GROUP) == 0)

            await wait_until(dead_lettered)
            worker.stop()
        dead = await dlq_entries(client, stream)
        assert [(d["id"], d["reason"]) for d in dead] == [(poison, c.Reason.INVALID_JSON)]
        assert sorted(k[1] for k in store.runs) == sorted(run_ids)
        assert metrics.registry.get_sample_value(
            "audit_fleet_events_dead_lettered_total",
            {"stream": stream, "reason": c.Reason.INVALID_JSON}) == 1
    finally:
        await client.aclose()


async def test_worker_starts_at_maxmemory_and_waits_for_its_group(
    redis_servers: RedisServers,
) -> None:
    """XGROUP CREATE refused with OOM: the worker reports, waits and retries (no crash);
    once Redis has memory again it creates the group and stores the backlog."""
    url = redis_servers.start(*LIMITED)
    client = aioredis.Redis.from_url(url)
    stream = "dlqsafety:events"
    try:
        events, run_ids = _events(3)
        await AuditEmitter(client, [stream]).emit_many(events)
        await fill_to_maxmemory(client)
        store, metrics = MemoryStore(), Metrics()
        worker = Worker(_settings(url, stream, retry_max_backoff_s=0.05), store, client, metrics)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)

            async def refused_a_few_times() -> bool:
                return _errors(metrics, "oom") >= 3

            await wait_until(refused_a_few_times)
            assert await client.xinfo_groups(stream) == []
            await free_padding(client)

            async def stored() -> bool:
                return len(store.runs) == len(run_ids)

            await wait_until(stored)
            worker.stop()
        assert await pending_count(client, stream, GROUP) == 0
    finally:
        await client.aclose()


async def test_dead_letter_key_of_another_type_leaves_entries_pending(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """WRONGTYPE on the dead-letter key: none of the bad entries is ACKed, the valid ones
    are stored; once the key is fixed each bad entry is dead-lettered exactly once."""
    events, run_ids = _events(4)
    await redis_client.set(stream + ":dlq", "not a stream")
    emitter = AuditEmitter(redis_client, [stream])
    bad = []
    for i, event in enumerate(events):
        await emitter.emit_many([event])
        if i < 10:
            bad.append(await emitter.emit_raw(stream, b"[not json %d" % i))
    store, metrics = MemoryStore(), Metrics()
    worker = Worker(_settings(redis_url, stream, retry_max_backoff_s=0.02), store,
                    redis_client, metrics)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)

        async def refused() -> bool:
            return (len(store.runs) == len(run_ids)
                    and _errors(metrics, "wrongtype") >= DEAD_LETTER_REFUSED_ATTEMPTS
                    and await pending_count(redis_client, stream, GROUP) == len(bad))

        await wait_until(refused)
        assert await redis_client.type(stream + ":dlq") == b"string"
        await redis_client.delete(stream + ":dlq")

        async def all_dead_lettered() -> bool:
            return (await redis_client.exists(stream + ":dlq") == 1
                    and await redis_client.xlen(stream + ":dlq") >= len(bad)
                    and await pending_count(redis_client, stream, GROUP) == 0)

        await wait_until(all_dead_lettered)
        worker.stop()
    dead = await dlq_entries(redis_client, stream)
    assert sorted(d["id"] for d in dead) == sorted(bad)  # each exactly once
    assert {d["reason"] for d in dead} == {c.Reason.INVALID_JSON}


async def test_dead_letter_written_before_a_crash_is_not_written_twice(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """A peer died between its dead-letter XADD and its XACK: the worker that reclaims the
    entry finds the dead letter and ACKs without writing a second one."""
    await redis_client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    bad = await AuditEmitter(redis_client, [stream]).emit_raw(stream, b"{not json")
    await redis_client.xreadgroup(GROUP, "crashed-peer", {stream: ">"}, count=10)
    entry = Entry(stream, bad, b"{not json")
    refused = await write_dead_letters(redis_client, "crashed-peer",
                                       [dead_letter(entry, c.Reason.INVALID_JSON, "bad")])
    assert refused == []
    worker = Worker(_settings(redis_url, stream, claim_idle_ms=100, reclaim_interval_s=0.05),
                    MemoryStore(), redis_client, Metrics())
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)

        async def reclaimed_and_acked() -> bool:
            return await pending_count(redis_client, stream, GROUP) == 0

        await wait_until(reclaimed_and_acked)
        worker.stop()
    dead = await dlq_entries(redis_client, stream)
    assert [(d["id"], d["consumer"]) for d in dead] == [(bad, "crashed-peer")]


async def test_an_earlier_dead_letter_is_found_past_the_first_page(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """The check that keeps a redelivered entry from being dead-lettered twice reads the
    dead-letter stream page by page (1,000 at a time): a dead letter behind 1,500 others
    is found, and an entry without one is not reported."""
    ids = [await redis_client.xadd(stream, {"event": b"{}"}) for _ in range(2)]
    entries = [Entry(stream, as_text(i), b"{}", deliveries=2) for i in ids]
    async with redis_client.pipeline(transaction=False) as pipe:
        for n in range(1500):
            pipe.xadd(c.dlq_key(stream), {"id": f"0-{n + 1}", "reason": "x"})
        pipe.xadd(c.dlq_key(stream), {"id": entries[0].id, "reason": "x"})
        await pipe.execute()
    assert await dead_lettered_ids(redis_client, stream, [e.id for e in entries]) == {entries[0].id}
