"""A real PostgreSQL outage: the link to the server is cut for a while, then restored."""

from __future__ import annotations

import random
from urllib.parse import urlsplit

import anyio
import pytest
import redis.asyncio as aioredis

from tests.helpers import TcpProxy, pending_count, through, wait_until
from worker import samples
from worker.consumer import Worker
from worker.emitter import AuditEmitter
from worker.metrics import Metrics
from worker.settings import Settings
from worker.stores import migrate, open_store

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]


async def test_postgres_outage_loses_nothing_and_acks_nothing_early(
    redis_client: aioredis.Redis, stream: str, redis_url: str, pg_url: str
) -> None:
    """Writes fail while PostgreSQL is unreachable; nothing is ACKed; then all is stored."""
    rng = random.Random(5)
    runs = [samples.lead_triage_run(rng, "ws_outage", f"run{i}", prompt_size=lambda r: 300)
            for i in range(150)]
    events = [e for r in runs for e in samples.run_events(r)]
    emitter = AuditEmitter(redis_client, [stream])
    pg = urlsplit(pg_url)
    async with TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432) as proxy:
        store = open_store(through(proxy, pg_url))
        await store.open()
        await migrate(store)
        settings = Settings(redis_url=redis_url, streams=(stream,), metrics_port=0, block_ms=50,
                            batch_size=50, max_inflight=2, claim_idle_ms=500, consumer="w1")
        metrics = Metrics()
        worker = Worker(settings.with_(retry_max_backoff_s=0.2), store, redis_client, metrics)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await emitter.emit_many(events[:100])
                with anyio.fail_after(20):  # the first 100 are read, stored and ACKed
                    while True:
                        groups = await redis_client.xinfo_groups(stream)
                        if groups and groups[0]["entries-read"] == 100 and not groups[0][
                                "pending"]:
                            break
                        await anyio.sleep(0.05)
                await proxy.set_cut(True)  # PostgreSQL becomes unreachable
                await emitter.emit_many(events[100:])

                def failed_writes() -> float:
                    return metrics.registry.get_sample_value(
                        "audit_fleet_store_write_seconds_count",
                        {"store": store.name, "outcome": "unavailable"}) or 0.0

                # each writer has failed and retried its batch a few times
                await wait_until(lambda: failed_writes() >= 3 * settings.max_inflight,
                                 within_s=30, what="writes failing during the outage")
                groups = await redis_client.xinfo_groups(stream)
                read = int(groups[0]["entries-read"])
                pending = await pending_count(redis_client, stream, settings.group)
                assert read > 100  # it did try to write during the outage …
                assert pending == read - 100  # … and ACKed nothing it could not store
                assert read - 100 <= (settings.max_inflight + 1) * settings.batch_size
                await proxy.set_cut(False)  # PostgreSQL is back
                with anyio.fail_after(60):
                    while True:
                        groups = await redis_client.xinfo_groups(stream)
                        if groups[0]["lag"] == 0 and not await pending_count(
                                redis_client, stream, settings.group):
                            break
                        await anyio.sleep(0.1)
                worker.stop()
            for run in runs:
                doc = await store.get_run("ws_outage", run["runId"])
                assert doc is not None, run["runId"]
                assert doc["status"] == run["status"]
                assert len(doc["eventIds"]) == 2
                assert doc["summary"]["nodeExecutions"] == len(run["nodes"])
            assert not await redis_client.exists(stream + ":dlq")
        finally:
            await store.close()
