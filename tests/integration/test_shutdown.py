"""SIGTERM during a write that cannot finish: a write outlasting AUDIT_SHUTDOWN_GRACE_S is
cancelled, left pending and reclaimed; with PostgreSQL unreachable (blackholed: connections
stay open, no byte passes, so a write in flight and a graceful pool close would each wait
for a timeout the server never answers) the process still exits within
AUDIT_SHUTDOWN_GRACE_S + AUDIT_SHUTDOWN_DEADLINE_S."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.helpers import TcpProxy, pending_count, spawn_worker, through, wait_until
from worker import samples
from worker.consumer import Worker
from worker.emitter import AuditEmitter
from worker.settings import Settings
from worker.stores import migrate, open_store

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

GROUP = "audit-writers"
GRACE_S = 2.0
BLACKHOLE_GRACE_S, DEADLINE_S = 2.0, 3.0


async def test_write_outlasting_the_grace_period_is_cancelled_and_left_pending(
    redis_client: aioredis.Redis, stream: str, redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """SIGTERM during a write that cannot finish: the worker waits out the grace period,
    cancels the write and exits 0 without acknowledging; a peer reclaims the entries and
    each event is stored exactly once."""
    rng = random.Random(3)
    runs = [samples.lead_triage_run(rng, "ws_grace", f"run{i}", prompt_size=lambda r: 200)
            for i in range(6)]
    log = tmp_path / "w-a.log"
    proc = spawn_worker("w-a", stream, redis_url, pg_url, log, AUDIT_CLAIM_IDLE_MS="200",
                        AUDIT_SHUTDOWN_GRACE_S=str(GRACE_S))
    lock = await asyncpg.connect(pg_url)
    try:
        emitter = AuditEmitter(redis_client, [stream])
        first = samples.run_events(runs[0])
        await emitter.emit_many(first)

        async def first_run_stored() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            groups = await redis_client.xinfo_groups(stream)  # [] until the worker makes it
            return bool(groups) and (groups[0]["entries-read"], groups[0]["pending"]) == (
                len(first), 0)

        await wait_until(first_run_stored, within_s=60, what="the worker storing a first run")
        # Writers of the run table now wait for this lock: the write cannot finish.
        await lock.execute("BEGIN; LOCK TABLE workflow_runs IN EXCLUSIVE MODE")
        events = [e for r in runs[1:] for e in samples.run_events(r)]
        await emitter.emit_many(events)

        async def write_blocked() -> bool:
            waiting = await lock.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")
            return bool(waiting) and await pending_count(redis_client, stream, GROUP) == len(
                events)

        await wait_until(write_blocked, within_s=30, what="the write waiting on the lock")
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        with anyio.fail_after(GRACE_S + 20):
            while proc.poll() is None:
                await anyio.sleep(0.02)
        elapsed = time.monotonic() - sent
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert GRACE_S <= elapsed < GRACE_S + 15, elapsed  # it waited out the grace period

        rows = await redis_client.xpending_range(stream, GROUP, "-", "+", len(events) + 1)
        assert len(rows) == len(events)  # nothing acknowledged …
        assert {r["consumer"] for r in rows} == {b"w-a"}
        assert {r["times_delivered"] for r in rows} == {1}
        await lock.execute("ROLLBACK")
        stored = await lock.fetchval("SELECT count(*) FROM workflow_runs")
        assert stored == 1  # … nor stored: only the first run, from before the lock
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await lock.close()

    store = open_store(pg_url)
    await store.open()
    await migrate(store)
    try:
        peer = Settings(redis_url=redis_url, streams=(stream,), group=GROUP, consumer="w-b",
                        metrics_port=0, block_ms=50, claim_idle_ms=200, reclaim_interval_s=0.1,
                        burst=True, trim=False)
        with anyio.fail_after(60):
            await Worker(peer, store, redis_client).run()
        assert await pending_count(redis_client, stream, GROUP) == 0
        for run in runs[1:]:
            doc = await store.get_run("ws_grace", run["runId"])
            assert doc is not None, run["runId"]
            assert sorted(doc["eventIds"]) == sorted(
                e["eventId"] for e in events if e["runId"] == run["runId"]
                and not e["type"].startswith("node."))
            assert doc["summary"]["nodeExecutions"] == len(run["nodes"])
            assert len(await store.get_nodes("ws_grace", run["runId"])) == len(run["nodes"])
    finally:
        await store.close()
    assert not await redis_client.exists(stream + ":dlq")
    stopped = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert "signal_received_draining" in {e.get("event") for e in stopped}


async def test_sigterm_during_a_store_blackhole_exits_within_grace_and_deadline(
    redis_client: aioredis.Redis, stream: str, redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """Exit 0 within grace + deadline (not the 60 s command timeout plus a pool close that
    never returns); the entries it held stay pending."""
    rng = random.Random(4)
    runs = [samples.lead_triage_run(rng, "ws_term", f"run{i}", prompt_size=lambda r: 100)
            for i in range(40)]
    events = [e for r in runs for e in samples.run_events(r)]
    emitter = AuditEmitter(redis_client, [stream])
    reader = open_store(pg_url)
    await reader.open()
    await migrate(reader)  # creates the schema before the worker starts
    pg = urlsplit(pg_url)
    async with TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432) as proxy:
        log = tmp_path / "w.log"
        proc = spawn_worker("w-term", stream, redis_url, through(proxy, pg_url), log,
                            AUDIT_SHUTDOWN_GRACE_S=str(BLACKHOLE_GRACE_S),
                            AUDIT_SHUTDOWN_DEADLINE_S=str(DEADLINE_S))
        try:
            await emitter.emit_many(events[:20])

            async def first_stored() -> bool:
                assert proc.poll() is None, log.read_text()[-2000:]
                return await reader.get_run("ws_term", events[0]["runId"]) is not None

            await wait_until(first_stored, 30, what="the first run stored")
            await proxy.set_blackhole(True)
            await emitter.emit_many(events[20:])

            async def held() -> bool:
                return await pending_count(redis_client, stream, "audit-writers") > 0

            await wait_until(held, 10, what="entries held during the blackhole")
            await anyio.sleep(0.5)  # the write is now waiting on the blackholed link
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(BLACKHOLE_GRACE_S + DEADLINE_S + 5):
                while proc.poll() is None:
                    await anyio.sleep(0.05)
            took = time.monotonic() - start
            assert proc.returncode == 0, log.read_text()[-3000:]
            assert took <= BLACKHOLE_GRACE_S + DEADLINE_S + 1.5, took
            assert await pending_count(redis_client, stream, "audit-writers") > 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            await reader.close()
