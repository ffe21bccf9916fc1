"""The fault matrix: every fault ends with nothing lost and nothing duplicated.

Each scenario emits a workload (mixed snapshots and events, shuffled runs, 4% of the
events emitted twice, a few poison entries), injects one fault while the fleet works,
and then checks the final state against the ground truth:

- emitted: distinct event IDs the producers appended (poison included);
- stored: distinct event IDs found in the store (run ``eventIds`` + node ``eventId``);
- dead-lettered: distinct event IDs in the dead-letter stream (only the poison belongs);
- lost: emitted IDs neither stored nor dead-lettered;
- duplicated: dead letters written twice for one entry, plus every run whose quantities
  would change if an event were applied twice (node executions, total tokens, failed
  nodes) and differ from the ground truth, plus runs with a wrong final status.

Each test prints one line of figures (``pytest -s -m slow tests/integration/test_fault_matrix.py``).
Workers run against a private ``redis-server`` and PostgreSQL (through a TCP proxy for the
store faults). The store cut lasts 30 s, as long as the outages the fleet must ride out.
"""

from __future__ import annotations

import json
import random
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tests.helpers import (
    ControlledStore,
    RawEntry,
    ReadWriteStore,
    TcpProxy,
    fill_to_maxmemory,
    free_padding,
    spawn_worker,
    stream_range,
    through,
    wait_until,
    workload,
)
from tests.redis_servers import RedisServers
from worker.consumer import Worker
from worker.documents import WriteBatch, node_tokens
from worker.emitter import AuditEmitter
from worker.settings import Settings
from worker.stores import migrate, open_store
from worker.stores.base import Store, WriteResult, WriteStore

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

WS = "ws_faults"
GROUP = "audit-writers"
STREAM = "faults:events"
POISON = 5


def poison_entries(seed: int) -> list[bytes]:
    """Entries that break the contract (each dead-lettered with its eventId readable)."""
    return [json.dumps({"v": 1, "eventId": f"poison{seed}x{i}", "type": "run.exploded",
                        "workspaceId": WS, "runId": f"bad{i}"}).encode() for i in range(POISON)]


class Fleet:
    """Ground truth, producers and the checker of one scenario."""

    def __init__(self, seed: int, target: int, redis_url: str, pg_url: str) -> None:
        self.runs, self.events = workload(seed, target, workspace=WS, prompt_bytes=200)
        self.poison = poison_entries(seed)
        self.redis_url = redis_url
        self.pg_url = pg_url
        self.client = aioredis.Redis.from_url(redis_url)
        self.emitter = AuditEmitter(self.client, [STREAM])
        self.sent = 0
        #: Dead letters saved before a Redis restart without persistence wiped the stream.
        self.saved_dead: list[RawEntry] = []

    async def emit(self, upto: int) -> None:
        """Emit the next events up to index ``upto``, retrying while Redis is away (a
        retried chunk may append some events twice: the store must not count them twice)."""
        while self.sent < min(upto, len(self.events)):
            chunk = self.events[self.sent:min(upto, self.sent + 200)]
            try:
                await self.emitter.emit_many(chunk)
                if self.sent == 0:
                    for raw in self.poison:
                        await self.emitter.emit_raw(STREAM, raw)
            except (RedisError, OSError):
                await anyio.sleep(0.1)
                continue
            self.sent += len(chunk)

    def settings(self, name: str, **extra: Any) -> Settings:
        base: dict[str, Any] = dict(
            redis_url=self.redis_url, streams=(STREAM,), group=GROUP, consumer=name,
            metrics_port=0, block_ms=50, batch_size=200, claim_idle_ms=1000,
            reclaim_interval_s=0.2, trim=False, shutdown_grace_s=5)
        base.update(extra)
        return Settings(**base)

    async def figures(self) -> dict[str, int]:
        emitted = {e["eventId"] for e in self.events} | {
            json.loads(p)["eventId"] for p in self.poison}
        conn = await asyncpg.connect(self.pg_url)
        try:
            run_rows = await conn.fetch("SELECT run_id, status, doc::text AS doc "
                                        "FROM workflow_runs WHERE workspace_id = $1", WS)
            node_ids = [r[0] for r in await conn.fetch(
                "SELECT doc->>'eventId' FROM workflow_node_runs WHERE workspace_id = $1", WS)]
        except asyncpg.UndefinedTableError:
            run_rows, node_ids = [], []
        finally:
            await conn.close()
        docs = {r["run_id"]: (r["status"], json.loads(r["doc"])) for r in run_rows}
        run_ids = [i for _, doc in docs.values() for i in doc["eventIds"]]
        stored = set(run_ids) | set(node_ids)
        try:
            dead_rows = self.saved_dead + await stream_range(self.client, STREAM + ":dlq")
        except (RedisError, OSError):
            dead_rows = list(self.saved_dead)
        dead_sources = [f[b"id"] for _, f in dead_rows]
        dead = {json.loads(f[b"event"]).get("eventId") for _, f in dead_rows}
        wrong = 0
        for run in self.runs:
            status, doc = docs.get(run["runId"], (None, None))
            if doc is None:
                continue  # counted as lost through its event IDs
            summary = doc["summary"]
            truth = (len(run["nodes"]), sum(node_tokens(n) for n in run["nodes"]),
                     sum(1 for n in run["nodes"] if n.get("error")), run["status"])
            if (summary["nodeExecutions"], summary["totalTokens"], summary["failedNodes"],
                    status) != truth:
                wrong += 1
        return {
            "emitted": len(emitted),
            "stored": len(stored & emitted),
            "dead-lettered": len(dead & emitted),
            "lost": len(emitted - stored - dead),
            "duplicated": (len(dead_sources) - len(set(dead_sources))) + wrong
            + (len(run_ids) - len(set(run_ids))),
        }

    async def settled(self) -> bool:
        f = await self.figures()
        return self.sent == len(self.events) and f["lost"] == 0 and f[
            "dead-lettered"] == POISON

    async def finish(self, scenario: str) -> dict[str, int]:
        await wait_until(self.settled, 60, interval=0.3, what=f"{scenario}: every event settled")
        figures = await self.figures()
        print(f"\nfault-matrix {scenario}: " + " ".join(f"{k}={v}" for k, v in figures.items()))
        assert figures["lost"] == 0
        assert figures["duplicated"] == 0
        assert figures["dead-lettered"] == POISON
        assert figures["stored"] == figures["emitted"] - POISON
        await self.client.aclose()
        return figures


@asynccontextmanager
async def workers(fleet: Fleet, store: WriteStore, *names: str, **extra: Any
                  ) -> AsyncIterator[list[Worker]]:
    """In-process workers on their own Redis clients; stopped (drained) on exit."""
    clients = [aioredis.Redis.from_url(fleet.redis_url) for _ in names]
    running = [Worker(fleet.settings(n, retry_max_backoff_s=0.3, **extra), store, c)
               for n, c in zip(names, clients, strict=True)]
    try:
        async with anyio.create_task_group() as tg:
            for w in running:
                tg.start_soon(w.run)
            yield running
            for w in running:
                w.stop()
    finally:
        for c in clients:
            await c.aclose()


async def _store(url: str) -> Store:
    store = open_store(url)
    await store.open()
    await migrate(store)
    return store


async def test_kill_9_at_random_moments(
    redis_servers: RedisServers, pg_url: str, tmp_path: Path
) -> None:
    """Two worker processes; one is SIGKILLed three times at random moments and restarted."""
    fleet = Fleet(31, 3000, redis_servers.start(), pg_url)
    rng = random.Random(31)
    spawn: Callable[[str], Any] = lambda n: spawn_worker(  # noqa: E731
        n, STREAM, fleet.redis_url, pg_url, tmp_path / f"{n}.log", AUDIT_CLAIM_IDLE_MS="800")
    a, b = spawn("w-a"), spawn("w-b")
    try:
        for kill in range(3):
            await fleet.emit(fleet.sent + 800)
            await anyio.sleep(rng.uniform(0.2, 1.2))
            a.send_signal(signal.SIGKILL)
            a.wait()
            a = spawn(f"w-a{kill}")
        await fleet.emit(len(fleet.events))
        await fleet.finish("kill -9 at random moments")
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


class DiesAfterWrite(ControlledStore):
    """The worker dies right after a durable write, before its XACK (once)."""

    def __init__(self, inner: ReadWriteStore, after: int) -> None:
        super().__init__(inner)
        self.after = after
        self.scope: anyio.CancelScope | None = None

    async def write(self, batch: WriteBatch) -> WriteResult:
        result = await super().write(batch)
        if self.writes >= self.after and self.scope is not None:
            self.scope.cancel()  # nothing after this point runs: no settle, no XACK
            self.scope = None
            await anyio.lowlevel.checkpoint()
        return result


async def test_kill_between_store_write_and_xack(
    redis_servers: RedisServers, pg_url: str
) -> None:
    """A worker dies between a write and its XACK; a peer reclaims and writes it again."""
    fleet = Fleet(32, 1500, redis_servers.start(), pg_url)
    inner = await _store(pg_url)
    try:
        dying = DiesAfterWrite(inner, after=2)
        await fleet.emit(len(fleet.events))
        with anyio.CancelScope() as scope:
            dying.scope = scope
            async with workers(fleet, dying, "w-dies"):
                await anyio.sleep_forever()
        assert dying.writes >= 2
        async with workers(fleet, inner, "w-peer"):
            await fleet.finish("kill between store write and XACK")
    finally:
        await inner.close()


async def _redis_restart(redis_servers: RedisServers, pg_url: str, seed: int, label: str,
                         *args: str, kill: bool, wait_stored: bool) -> None:
    url = redis_servers.start(*args)
    fleet = Fleet(seed, 2000, url, pg_url)
    store = await _store(pg_url)
    try:
        async with workers(fleet, store, "w-1", "w-2"):
            await fleet.emit(1000)
            if wait_stored:  # without persistence, wait until the first part is stored
                async def first_part() -> bool:
                    f = await fleet.figures()
                    return f["stored"] + f["dead-lettered"] >= len(
                        {e["eventId"] for e in fleet.events[:1000]}) + POISON
                await wait_until(first_part, 60, interval=0.2, what="the first part stored")
                # The dead-letter stream goes with the data: keep what it held for the count.
                fleet.saved_dead = await stream_range(fleet.client, STREAM + ":dlq")
            redis_servers.restart(url, kill=kill)
            await fleet.emit(len(fleet.events))
            await fleet.finish(label)
    finally:
        await store.close()


async def test_redis_restart_with_aof_everysec(redis_servers: RedisServers, pg_url: str) -> None:
    """Redis restarts (AOF everysec) mid-flow; workers and producers reconnect."""
    await _redis_restart(redis_servers, pg_url, 33, "Redis restart with AOF everysec",
                         "--appendonly", "yes", "--appendfsync", "everysec",
                         kill=False, wait_stored=False)


async def test_redis_restart_without_persistence(
    redis_servers: RedisServers, pg_url: str
) -> None:
    """Redis comes back empty: the group is recreated and the producers resume."""
    await _redis_restart(redis_servers, pg_url, 34, "Redis restart without persistence",
                         kill=True, wait_stored=True)


async def test_store_cut_for_30_s(redis_servers: RedisServers, pg_url: str) -> None:
    """PostgreSQL unreachable for 30 s mid-flow (connections dropped, new ones refused)."""
    fleet = Fleet(35, 2000, redis_servers.start(), pg_url)
    pg = urlsplit(pg_url)
    async with TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432) as proxy:
        store = await _store(through(proxy, pg_url))
        try:
            async with workers(fleet, store, "w-1", "w-2"):
                await fleet.emit(800)
                await proxy.set_cut(True)
                await fleet.emit(1600)
                await anyio.sleep(30)
                await proxy.set_cut(False)
                await fleet.emit(len(fleet.events))
                await fleet.finish("store cut for 30 s")
        finally:
            await store.close()


async def test_store_slowed(redis_servers: RedisServers, pg_url: str) -> None:
    """Every write takes 200 ms longer: batches grow, nothing is lost or doubled."""
    fleet = Fleet(36, 2000, redis_servers.start(), pg_url)
    inner = await _store(pg_url)
    slow = ControlledStore(inner)
    slow.delay = 0.2
    try:
        async with workers(fleet, slow, "w-1"):
            await fleet.emit(len(fleet.events))
            await fleet.finish("store slowed by 200 ms per write")
    finally:
        await inner.close()


async def test_redis_at_maxmemory(redis_servers: RedisServers, pg_url: str) -> None:
    """Redis reaches maxmemory while poison waits to be dead-lettered; memory is freed 3 s
    later. No entry is ACKed without its dead letter; everything settles."""
    url = redis_servers.start("--maxmemory", "64mb", "--maxmemory-policy", "noeviction")
    fleet = Fleet(37, 1500, url, pg_url)
    await fleet.emit(len(fleet.events))
    await fill_to_maxmemory(fleet.client)
    store = await _store(pg_url)
    try:
        async with workers(fleet, store, "w-1", "w-2"):
            await anyio.sleep(3)
            assert await fleet.client.xlen(STREAM + ":dlq") == 0  # refused, not ACKed
            await free_padding(fleet.client)
            await fleet.finish("Redis at maxmemory")
    finally:
        await store.close()


async def test_sigterm_during_a_store_outage(
    redis_servers: RedisServers, pg_url: str, tmp_path: Path
) -> None:
    """A worker process gets SIGTERM while PostgreSQL is cut: it exits 0 within its grace
    period, unacknowledged; a new worker stores everything once the store is back."""
    fleet = Fleet(38, 1500, redis_servers.start(), pg_url)
    pg = urlsplit(pg_url)
    async with TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432) as proxy:
        store_url = through(proxy, pg_url)
        first = spawn_worker("w-term", STREAM, fleet.redis_url, store_url,
                             tmp_path / "w-term.log", AUDIT_SHUTDOWN_GRACE_S="2",
                             AUDIT_SHUTDOWN_DEADLINE_S="3", AUDIT_CLAIM_IDLE_MS="800")
        try:
            await fleet.emit(700)

            async def working() -> bool:
                assert first.poll() is None
                return (await fleet.figures())["stored"] > 0

            await wait_until(working, 30, interval=0.2, what="the worker storing events")
            await proxy.set_cut(True)
            await fleet.emit(len(fleet.events))
            await anyio.sleep(0.5)
            first.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                while first.poll() is None:
                    await anyio.sleep(0.05)
            assert first.returncode == 0
            await proxy.set_cut(False)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        store = await _store(pg_url)
        try:
            async with workers(fleet, store, "w-next", claim_idle_ms=800):
                await fleet.finish("SIGTERM during a store outage")
        finally:
            await store.close()
