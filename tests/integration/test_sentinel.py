"""The fleet behind Redis Sentinel: a worker follows a failover to the new master."""

from __future__ import annotations

import uuid

import anyio
import pytest
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedConnection

from tests.flow import (
    CountingStore,
    assert_exact,
    produce,
    run_level_ids,
    run_until_stored,
    workload,
)
from tests.helpers import command
from tests.redis_servers import SentinelSetup, wait_for
from worker.consumer import Worker
from worker.emitter import AuditEmitter
from worker.redisclient import connect
from worker.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]


async def test_sentinel_url_connects_to_the_master(sentinel_setup: SentinelSetup) -> None:
    """``redis+sentinel://host:port/<master>/0`` (mode auto) writes to the current master."""
    client = await connect(sentinel_setup.url, "auto")
    try:
        key = f"t{uuid.uuid4().hex[:8]}"
        await client.set(key, b"1")
        role = await command(client, "ROLE")
        assert isinstance(role, list)
        assert role[0] == b"master"
        pool = client.connection_pool
        assert pool.connection_class is SentinelManagedConnection
        assert isinstance(pool, SentinelConnectionPool)
        info = await pool.get_master_address()  # type: ignore[no-untyped-call]  # untyped in redis-py
        assert info == ("127.0.0.1", sentinel_setup.ports["master"])
    finally:
        await client.aclose()


async def test_worker_follows_a_sentinel_failover_without_a_restart(
    sentinel_setup: SentinelSetup,
) -> None:
    """SIGKILL the master mid-flow: Sentinel promotes the replica, the worker and the SDK
    reconnect by themselves, and every run is stored exactly (entries confirmed by WAIT 1
    before the failover, plain XADD after it: the new master has no replica)."""
    stream = f"t{uuid.uuid4().hex[:8]}:events"
    settings = Settings(
        redis_url=sentinel_setup.url, streams=(stream,), metrics_port=0, block_ms=100,
        batch_size=40, claim_idle_ms=500, reclaim_interval_s=0.2, consumer="w1",
        shutdown_grace_s=5, linger_ms=0, emit_wait_replicas=1, emit_wait_timeout_ms=2000,
    )
    emitter = await AuditEmitter.from_settings(settings)
    runs, events = workload(40, seed=41)
    store = CountingStore()
    worker = Worker(settings, store)
    confirmed: list[str] = []
    run_level = run_level_ids(events)
    old_master = sentinel_setup.ports["master"]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_until_stored, worker, store, run_level, 90.0)
            half = len(events) // 2
            await produce(emitter, events[:half], confirmed)
            sentinel_setup.kill("master")
            emitter.wait_replicas = 0  # nothing to replicate to until the old one is back
            await anyio.to_thread.run_sync(lambda: wait_for(
                lambda: sentinel_setup.master_port() != old_master, 30, "Sentinel's failover"))
            await produce(emitter, events[half:], confirmed)
    finally:
        await emitter.aclose()
    assert sentinel_setup.master_port() == sentinel_setup.ports["replica"]
    assert_exact(store, runs, events)
