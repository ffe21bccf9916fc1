"""The fleet on a real Redis Cluster (3 masters, 3 replicas on loopback).

Sharded produce/consume across masters with two workers, poison entries in their
shard's dead-letter stream, the operator commands and the demo on the cluster, the
slot check, a master SIGKILL failover mid-flow and a live slot migration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot

from tests.flow import (
    CountingStore,
    assert_exact,
    produce,
    run_level_ids,
    run_until_stored,
    workload,
)
from tests.helpers import MemoryStore, read_group, stream_range
from tests.redis_servers import RedisCluster, cli, wait_for
from worker.cli import dlq, groups, status, trim
from worker.constants import Reason, dlq_key
from worker.consumer import Worker
from worker.emitter import AuditEmitter, shard_index
from worker.errors import ConfigError, RedisUnavailable
from worker.metrics import Metrics
from worker.redisclient import connect
from worker.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]


def shards(n: int) -> tuple[str, ...]:
    prefix = f"t{uuid.uuid4().hex[:8]}:events"
    return tuple(f"{prefix}:{{{i}}}" for i in range(n))


def cluster_settings(url: str, streams: tuple[str, ...], **kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        redis_url=url, redis_mode="cluster", streams=streams, metrics_port=0, block_ms=100,
        burst=True, batch_size=40, claim_idle_ms=500, reclaim_interval_s=0.2,
        consumer="w1", shutdown_grace_s=5, linger_ms=0,
    )
    base.update(kw)
    return Settings(**base)


@pytest.fixture
async def cluster_client(redis_cluster: RedisCluster) -> AsyncIterator[aioredis.Redis]:
    client = await connect(redis_cluster.url, "auto")
    try:
        yield client
    finally:
        await client.aclose()


async def test_auto_mode_finds_the_cluster_and_the_standalone_server(
    redis_cluster: RedisCluster, redis_url: str
) -> None:
    """AUDIT_REDIS_MODE=auto asks the server: a cluster client for a cluster node."""
    client = await connect(redis_cluster.url, "auto")
    plain = await connect(redis_url, "auto")
    try:
        assert isinstance(client, ClusterClient)
        assert not isinstance(plain, ClusterClient)
        assert len(client.get_primaries()) == 3
    finally:
        await client.aclose()
        await plain.aclose()


async def test_slot_check_refuses_a_mis_tagged_stream(redis_cluster: RedisCluster) -> None:
    """An untagged stream (its dead-letter key in another slot) is refused by connect()."""
    with pytest.raises(ConfigError, match="hash tag"):
        await connect(redis_cluster.url, "auto", streams=("audit:events",))
    await (await connect(redis_cluster.url, "auto", streams=shards(2))).aclose()


def test_worker_refuses_a_mis_tagged_stream_in_one_line(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """``audit-fleet run`` on a cluster with an untagged stream exits with one clear line."""
    env = dict(os.environ, AUDIT_REDIS_URL=redis_cluster.url, AUDIT_STREAM="audit:events",
               AUDIT_STORE_URL=f"sqlite:///{tmp_path / 'x.db'}", AUDIT_METRICS_PORT="0")
    done = subprocess.run([sys.executable, "-m", "worker", "run", "--burst"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "audit-fleet: configuration error:" in lines[0]
    assert "hash tag" in lines[0]


async def test_sharded_streams_across_masters_two_workers_lose_and_duplicate_nothing(
    redis_cluster: RedisCluster, cluster_client: aioredis.Redis
) -> None:
    """4 shards on 3 masters, 2 workers: every run exact, each event written once, the
    poison entry in its own shard's dead-letter stream."""
    streams = shards(4)
    masters = {redis_cluster.master_of(s) for s in streams}
    assert len(masters) == 3, "the shards must spread over every master"
    settings = cluster_settings(redis_cluster.url, streams)
    emitter = await AuditEmitter.from_settings(settings)
    runs, events = workload(40, seed=11)
    try:
        await emitter.emit_many(events)
        poison_id = await emitter.emit_raw(streams[2], b"{broken")
    finally:
        await emitter.aclose()
    counts = [await cluster_client.xlen(s) for s in streams]
    assert sum(counts) == len(events) + 1
    assert all(counts), f"every shard gets runs: {counts}"

    store = CountingStore()
    workers = [Worker(settings.with_(consumer=name), store) for name in ("w1", "w2")]
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for w in workers:
                tg.start_soon(w.run)

    assert_exact(store, runs, events)
    run_level = [e["eventId"] for e in events if not e["type"].startswith("node.")]
    assert [eid for eid in run_level if store.writes[eid] != 1] == []  # no duplicates
    for i, s in enumerate(streams):
        dead = await stream_range(cluster_client, dlq_key(s))
        if i == 2:
            assert [(d[b"reason"], d[b"id"].decode()) for _, d in dead] == [
                (Reason.INVALID_JSON.encode(), poison_id)]
        else:
            assert dead == []
        assert (await cluster_client.xpending(s, settings.group))["pending"] == 0
    # Both workers took part, each shard read by its own reader.
    assert all(sum(w.metrics.events_read.labels(s)._value.get() for s in streams) > 0
               for w in workers)


async def test_status_dlq_trim_and_the_sdk_on_the_cluster(
    redis_cluster: RedisCluster, cluster_client: aioredis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The operator commands read each shard from its own node, with its own clock."""
    streams = shards(3)
    settings = cluster_settings(redis_cluster.url, streams, trim_retention_s=0)
    emitter = await AuditEmitter.from_settings(settings)
    _, events = workload(6, seed=5)
    try:
        await emitter.emit_many(events)
        await emitter.emit_raw(streams[1], b"{nope")
    finally:
        await emitter.aclose()
    await Worker(settings, MemoryStore()).run()
    capsys.readouterr()  # the worker's log lines

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    for module in (status, dlq, trim):
        module.register(sub)
    base = ["--redis-url", redis_cluster.url, "--stream", ",".join(streams)]

    args = parser.parse_args(["status", *base, "--json"])
    assert await args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    by_name = {s["stream"]: s for s in doc["streams"]}
    for s in streams:
        got = by_name[s]
        assert got["error"] is None
        assert got["length"] == await cluster_client.xlen(s)
        assert got["node"] == f"127.0.0.1:{redis_cluster.master_of(s)}"
        (g,) = got["groups"]
        assert (g["lag"], g["pending"]) == (0, 0)
    assert by_name[streams[1]]["dead_letter_length"] == 1
    # MEMORY USAGE and the oldest-ID script reach each dead-letter stream's own node
    assert by_name[streams[1]]["dead_letter_bytes"] > len(b"{nope")
    assert by_name[streams[1]]["dead_letter_oldest_id"] is not None
    assert by_name[streams[0]]["dead_letter_oldest_id"] is None

    args = parser.parse_args(["dlq", "list", *base, "--json"])
    assert await args.func(args) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["count"] == 1

    args = parser.parse_args(["trim", *base, "--retention", "0", "--exact", "--json"])
    assert await args.func(args) == 0
    trimmed = json.loads(capsys.readouterr().out)
    assert sum(t["trimmed"] for t in trimmed) == len(events) + 1
    assert [await cluster_client.xlen(s) for s in streams] == [0, 0, 0]


async def test_groups_and_rewind_on_the_cluster(
    redis_cluster: RedisCluster, cluster_client: aioredis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``groups`` finds the shards on every master (SCAN on each node) and ``rewind`` moves
    one shard's group back on the node that owns it."""
    streams = shards(3)
    assert len({redis_cluster.master_of(s) for s in streams}) > 1
    for i, s in enumerate(streams):
        for n in range(i + 1):
            await cluster_client.xadd(s, {"event": b"{}"}, id=f"{1000 * (n + 1)}-0")
        await cluster_client.xgroup_create(s, "audit-writers", id="$")
    parser = argparse.ArgumentParser()
    groups.register(parser.add_subparsers())
    base = ["--redis-url", redis_cluster.url, "--stream", ",".join(streams)]
    prefix = streams[0].split(":{", 1)[0]

    args = parser.parse_args(["groups", *base, "--match", f"{prefix}:*", "--json"])
    assert await args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)["groups"]
    assert [(r["stream"], r["lastDeliveredId"]) for r in rows] == [
        (s, f"{1000 * (i + 1)}-0") for i, s in enumerate(streams)]

    args = parser.parse_args(["rewind", *base, "--stream-name", streams[2], "--to-id", "0-0"])
    assert await args.func(args) == 0
    assert "3 entries delivered again" in capsys.readouterr().out
    got = await read_group(cluster_client, "audit-writers", "w1", streams[2], 10)
    assert [e[0] for e in got] == [b"1000-0", b"2000-0", b"3000-0"]


def test_demo_runs_on_the_cluster(redis_cluster: RedisCluster, tmp_path: Path) -> None:
    """``audit-fleet demo --redis-url <a cluster node>`` stores every run: its own stream
    ``audit-demo:{token}:events`` is hash-tagged, so the slot check lets it through."""
    env = dict(os.environ, AUDIT_STORE_URL=f"sqlite:///{tmp_path / 'demo.db'}")
    done = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--runs", "20", "--seed", "4",
         "--workers", "1", "--redis-url", redis_cluster.url],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "worker exit codes [0]" in done.stdout
    assert "holds 3 entries" in done.stdout
    assert "Trigger: webhook" in done.stdout


async def test_master_sigkill_failover_mid_flow_loses_nothing(
    redis_cluster: RedisCluster,
) -> None:
    """SIGKILL the master of a shard while events flow: the replica takes over, the worker
    goes on by itself, and every run is exact (entries confirmed by WAIT 1)."""
    streams = shards(2)
    victim = redis_cluster.master_of(streams[0])
    settings = cluster_settings(redis_cluster.url, streams, burst=False,
                                emit_wait_replicas=1, emit_wait_timeout_ms=2000)
    emitter = await AuditEmitter.from_settings(settings)
    runs, events = workload(60, seed=23)
    store = CountingStore()
    worker = Worker(settings, store)
    confirmed: list[str] = []
    run_level = run_level_ids(events)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_until_stored, worker, store, run_level, 90.0)
            tg.start_soon(produce, emitter, events, confirmed)
            with anyio.fail_after(30):
                while len(confirmed) < len(events) // 3:
                    await anyio.sleep(0.02)
            redis_cluster.kill(victim)  # SIGKILL mid-flow
            killed_at = len(confirmed)
            # The replica takes over by itself; then the old master comes back as a
            # replica (as a restarted pod would), so WAIT 1 can be satisfied again.
            await anyio.to_thread.run_sync(lambda: wait_for(
                lambda: victim not in redis_cluster.masters(), 30, "the replica's promotion"))
            await anyio.to_thread.run_sync(lambda: redis_cluster.wait_ok(30))
            redis_cluster.restart(victim)
    finally:
        await emitter.aclose()
        if redis_cluster.procs[victim].poll() is not None:
            redis_cluster.restart(victim)
        redis_cluster.wait_ok()
    assert killed_at < len(events), "the master must die while events still flow"
    assert victim not in redis_cluster.masters()
    assert_exact(store, runs, events)


def _tag_in_slot(slot: int) -> str:
    """A hash tag whose keys hash to ``slot``."""
    for i in range(1_000_000):
        if key_slot(str(i).encode()) == slot:
            return str(i)
    raise LookupError(slot)


async def test_live_reshard_of_a_shard_moves_and_asks_without_loss(
    redis_cluster: RedisCluster,
) -> None:
    """``redis-cli --cluster reshard`` moves a live shard's slot to another master while
    events flow: MOVED/ASK are followed and every run is exact."""
    rows = redis_cluster.nodes()
    masters = [r for r in rows if "master" in r[2] and "fail" not in r[2] and len(r) > 8]
    src, dst = masters[0], masters[1]
    low = int(src[8].split("-")[0])  # --cluster reshard moves the source's lowest slots
    tag = _tag_in_slot(low)
    prefix = f"t{uuid.uuid4().hex[:8]}:events"
    streams = (f"{prefix}:{{{tag}}}",)
    settings = cluster_settings(redis_cluster.url, streams, burst=False)
    emitter = await AuditEmitter.from_settings(settings)
    runs, events = workload(50, seed=31)
    store = CountingStore()
    worker = Worker(settings, store)
    confirmed: list[str] = []
    run_level = run_level_ids(events)
    src_port = int(src[1].split("@")[0].rsplit(":", 1)[1])
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_until_stored, worker, store, run_level, 90.0)
            tg.start_soon(produce, emitter, events, confirmed)
            with anyio.fail_after(30):
                while len(confirmed) < len(events) // 3:
                    await anyio.sleep(0.02)
            moved_at = len(confirmed)
            out = await anyio.to_thread.run_sync(lambda: cli(
                src_port, "--cluster", "reshard", f"127.0.0.1:{src_port}",
                "--cluster-from", src[0], "--cluster-to", dst[0], "--cluster-slots", "1",
                "--cluster-yes", timeout=60))
            assert "Moving slot" in out, out
            assert len(confirmed) < len(events), "events must still flow after the move"
    finally:
        await emitter.aclose()
    assert moved_at < len(events)
    dst_port = int(dst[1].split("@")[0].rsplit(":", 1)[1])
    assert redis_cluster.master_of(streams[0]) == dst_port
    assert_exact(store, runs, events)


async def test_one_unreachable_node_does_not_blank_the_other_shards(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream whose node cannot be read carries the error; the others are read, and
    the gauges export nothing (not zeros) for the unreadable one."""
    from worker import fleet_status as fleet
    from worker.pending_idle import PendingScans

    streams = shards(2)
    bad = streams[0]
    real = fleet._stream_status

    async def failing(redis: aioredis.Redis, name: str, group: str | None,
                      scans: PendingScans) -> tuple[fleet.StreamStatus, int]:
        if name == bad:
            raise RedisUnavailable("connection", "node down")
        return await real(redis, name, group, scans)

    monkeypatch.setattr(fleet, "_stream_status", failing)
    client = await connect(redis_cluster.url, "cluster")
    try:
        for s in streams:
            await client.xadd(s, {"event": b"{}"})
        got = await fleet.fleet_status(client, streams, None)
    finally:
        await client.aclose()
    first, second = got.streams
    assert first.error is not None
    assert "node down" in first.error
    assert second.error is None
    assert second.length == 1
    assert second.node == f"127.0.0.1:{redis_cluster.master_of(second.name)}"
    metrics = Metrics()
    metrics.fleet.update(got)
    exported = [(m.name, sample.labels) for m in metrics.fleet.collect() for sample in m.samples]
    assert [n for n, labels in exported if labels.get("stream") == bad] == []
    assert [n for n, labels in exported if labels.get("stream") == second.name]


async def test_adding_shards_while_the_fleet_runs_loses_nothing(
    redis_cluster: RedisCluster,
) -> None:
    """The documented procedure (docs/scaling.md, "Adding shards"): workers first read the
    new set (a superset of the old), then producers write it; a run whose events straddle
    the switch lands in two shards and is still stored exactly."""
    prefix = f"t{uuid.uuid4().hex[:8]}:events"
    old = tuple(f"{prefix}:{{{i}}}" for i in range(2))
    new = tuple(f"{prefix}:{{{i}}}" for i in range(4))
    runs, events = workload(30, seed=53)
    by_run: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_run.setdefault(e["runId"], []).append(e)
    before = [e for evs in by_run.values() for e in evs[: len(evs) // 2]]
    after = [e for evs in by_run.values() for e in evs[len(evs) // 2:]]
    store = CountingStore()
    run_level = run_level_ids(events)

    old_settings = cluster_settings(redis_cluster.url, old, burst=False, consumer="old")
    new_settings = cluster_settings(redis_cluster.url, new, burst=False, consumer="new")
    old_emitter = await AuditEmitter.from_settings(old_settings)
    new_emitter = await AuditEmitter.from_settings(new_settings)
    old_worker = Worker(old_settings, store)
    new_worker = Worker(new_settings, store)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(old_worker.run)
            await old_emitter.emit_many(before)          # 1. the fleet as it was
            tg.start_soon(run_until_stored, new_worker, store, run_level, 60.0)
            with anyio.fail_after(20):                   # 2. workers on the new set first
                while not new_worker.metrics.heartbeats().get("reader"):
                    await anyio.sleep(0.02)
            await new_emitter.emit_many(after)           # 3. then producers
            old_worker.stop()                            # 4. old-set workers retire
    finally:
        await old_emitter.aclose()
        await new_emitter.aclose()
    moved = [r for r in by_run if shard_index(r, 2) != shard_index(r, 4)]
    assert moved, "some runs must change shard"
    assert_exact(store, runs, events)
