"""A batch that runs past the store's command timeout is split, not retried whole forever.

PostgreSQL is made slow per row written (a trigger that sleeps in every inserted node
row), so a batch mixing a few large snapshots with many small events takes longer than
the store's ``command_timeout`` while each run alone fits well within it.
"""

from __future__ import annotations

import random
from typing import Any

import anyio
import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.helpers import pending_count
from worker import samples
from worker.consumer import Worker
from worker.emitter import AuditEmitter
from worker.metrics import Metrics
from worker.settings import Settings
from worker.stores import open_store

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.postgres]

SLOW_ROWS = """
CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep(0.004); RETURN NEW; END $$;
CREATE TRIGGER slow_row BEFORE INSERT ON workflow_node_runs
FOR EACH ROW EXECUTE FUNCTION slow_row();
"""


def big_run(rng: random.Random, run_id: str, steps: int) -> dict[str, Any]:
    """A run with ``steps`` extra node executions (a large snapshot)."""
    run = samples.lead_triage_run(rng, "ws_slow", run_id, prompt_size=lambda r: 50)
    template = run["nodes"][0]
    run["nodes"] = run["nodes"] + [dict(template, nodeId=f"step{k}") for k in range(steps)]
    return run


async def test_batch_past_the_command_timeout_is_split_and_stored(
    redis_client: aioredis.Redis, stream: str, redis_url: str, pg_url: str
) -> None:
    """Eight 60-node snapshots and 30 small runs in one batch (~2.4 s of writing against
    a 1.5 s command timeout): the batch is split per run and everything is stored."""
    rng = random.Random(8)
    big = [big_run(rng, f"big{i}", 60) for i in range(8)]
    small = [samples.lead_triage_run(rng, "ws_slow", f"small{i}", prompt_size=lambda r: 50)
             for i in range(30)]
    events = [e for r in big for e in samples.run_events(r, snapshot=True)]
    events += [e for r in small for e in samples.run_events(r)]
    await AuditEmitter(redis_client, [stream]).emit_many(events)

    store = open_store(pg_url + "?command_timeout=1.5")
    await store.open()
    await store.migrate()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(SLOW_ROWS)
    finally:
        await conn.close()
    settings = Settings(redis_url=redis_url, streams=(stream,), metrics_port=0, block_ms=50,
                        batch_size=500, linger_ms=200, consumer="w1", burst=True,
                        retry_max_backoff_s=0.5)
    metrics = Metrics()
    try:
        with anyio.fail_after(60):
            await Worker(settings, store, redis_client, metrics).run()
        assert await pending_count(redis_client, stream, settings.group) == 0
        assert not await redis_client.exists(stream + ":dlq")
        timeouts = metrics.registry.get_sample_value(
            "audit_fleet_store_write_seconds_count", {"store": "postgresql", "outcome": "timeout"})
        assert timeouts == 1  # the whole batch once; every run alone fits
        for run in big + small:
            doc = await store.get_run("ws_slow", run["runId"])
            assert doc is not None, run["runId"]
            assert doc["summary"]["nodeExecutions"] == len(run["nodes"])
    finally:
        await store.close()
