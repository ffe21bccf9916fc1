"""The worker on the other Redis URL forms the README promises: ``unix://`` and ``rediss://``.

Each runs ``audit-fleet run``'s own code path (settings → Redis client from the URL →
worker → store) in burst mode against a private redis-server that listens only that way:
a unix socket (no TCP port), or TLS (no plain port) with a certificate from a CA made by
the fixture, which the URL names (``?ssl_ca_certs=``).
"""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from tests.helpers import pending_count
from worker import samples
from worker.emitter import AuditEmitter
from worker.service import run_worker
from worker.settings import Settings
from worker.stores import migrate, open_store

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def drain_through(url: str, tmp_path: Path) -> None:
    rng = random.Random(9)
    runs = [samples.lead_triage_run(rng, "ws_url", f"run{i}", prompt_size=lambda r: 100)
            for i in range(3)]
    client = aioredis.Redis.from_url(url)
    try:
        await AuditEmitter(client, ["audit:events"]).emit_many(
            [e for r in runs for e in samples.run_events(r)])
        store_url = f"sqlite:///{tmp_path}/audit.db"
        settings = Settings(redis_url=url, streams=("audit:events",), store_url=store_url,
                            metrics_port=0, block_ms=50, burst=True, trim=False, consumer="w1")
        with anyio.fail_after(30):
            await run_worker(settings)
        assert await pending_count(client, "audit:events", settings.group) == 0
        assert await client.exists("audit:events:dlq") == 0
    finally:
        await client.aclose()
    store = open_store(store_url)
    await store.open()
    await migrate(store)
    try:
        for run in runs:
            doc = await store.get_run("ws_url", run["runId"])
            assert doc is not None, run["runId"]
            assert doc["status"] == run["status"]
            assert doc["summary"]["nodeExecutions"] == len(run["nodes"])
    finally:
        await store.close()


async def test_worker_reads_through_a_unix_socket(unix_redis: str, tmp_path: Path) -> None:
    """AUDIT_REDIS_URL=unix:///path/redis.sock: events are read, stored and acknowledged."""
    assert unix_redis.startswith("unix://")
    await drain_through(unix_redis, tmp_path)


async def test_worker_reads_over_tls(tls_redis: str, tmp_path: Path) -> None:
    """AUDIT_REDIS_URL=rediss://…: the worker verifies the server's certificate and drains."""
    assert tls_redis.startswith("rediss://")
    await drain_through(tls_redis, tmp_path)


async def test_tls_server_refuses_a_client_that_does_not_trust_its_ca(tls_redis: str) -> None:
    """The certificate is really checked: without the CA the connection fails."""
    untrusted = aioredis.Redis.from_url(tls_redis.split("?", 1)[0], socket_timeout=5)
    try:
        with pytest.raises(aioredis.ConnectionError, match="certificate verify failed"):
            await untrusted.ping()
    finally:
        await untrusted.aclose()
