"""TLS and ACL users on a Redis Cluster and behind Sentinel, on private servers.

The cluster speaks TLS only (clients, replication and the cluster bus; a throwaway CA)
and refuses unauthenticated clients; the producer and worker users are those of
docs/events.md with what a cluster client needs besides (docs/scaling.md, "TLS and ACL
users"). The Sentinel set-up is TLS everywhere with an ACL user on the master and
another on Sentinel itself. In each, the SDK emits and ``audit-fleet run``'s code path
(settings → the client factory → worker → store) stores every run.
"""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import AuthenticationError, NoPermissionError

from tests.helpers import CLUSTER_ACL
from tests.redis_servers import RedisCluster, SentinelSetup
from worker import samples
from worker.emitter import AuditEmitter
from worker.redisclient import connect
from worker.service import run_worker
from worker.settings import Settings
from worker.stores import open_store

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

STREAMS = ("audit:events:{0}", "audit:events:{1}", "audit:events:{2}", "audit:events:{3}")


def url(scheme: str, user: str, port: int, path: str, query: str) -> str:
    return f"{scheme}://{user}:{user}-pw@127.0.0.1:{port}/{path}?{query}"


async def produce_and_drain(producer_url: str, worker_url: str, mode: str, streams: tuple[str, ...],
                            tmp_path: Path) -> None:
    rng = random.Random(5)
    runs = [samples.lead_triage_run(rng, "ws_tls", f"run{i}", prompt_size=lambda r: 100)
            for i in range(6)]
    emitter = await AuditEmitter.connect(producer_url, mode=mode, streams=streams)
    try:
        await emitter.emit_many([e for r in runs for e in samples.run_events(r)])
    finally:
        await emitter.aclose()
    store_url = f"sqlite:///{tmp_path}/audit.db"
    settings = Settings(redis_url=worker_url, streams=streams, store_url=store_url,
                        metrics_port=0, block_ms=50, burst=True, consumer="w1")
    with anyio.fail_after(60):
        await run_worker(settings)
    store = open_store(store_url)
    await store.open()
    try:
        for run in runs:
            doc = await store.get_run("ws_tls", run["runId"])
            assert doc is not None, run["runId"]
            assert doc["summary"]["nodeExecutions"] == len(run["nodes"])
    finally:
        await store.close()
    client = await connect(worker_url, mode, streams=streams)
    try:
        for stream in streams:
            assert (await client.xpending(stream, settings.group))["pending"] == 0
            assert await client.xlen(stream + ":dlq") == 0
    finally:
        await client.aclose()


async def test_worker_and_sdk_on_a_tls_cluster_with_acl_users(
    secure_cluster: RedisCluster, tmp_path: Path
) -> None:
    """``rediss://worker:…@node/0?ssl_ca_certs=…``: the SDK (AUDIT_REDIS_MODE=cluster)
    writes the shards on every master, the worker (auto) finds the cluster and drains
    them; without credentials, or with the producer's, other commands are refused."""
    port = secure_cluster.ports[0]
    query = f"ssl_ca_certs={secure_cluster.security.tls[0]}"  # type: ignore[index]
    producer = url("rediss", "producer", port, "0", query)
    worker = url("rediss", "worker", port, "0", query)
    assert len({secure_cluster.master_of(s) for s in STREAMS}) == 3
    await produce_and_drain(producer, worker, "cluster", STREAMS, tmp_path)
    # the worker's own mode "auto" asks the server: check that path too
    client = await connect(worker, "auto", streams=STREAMS)
    await client.aclose()

    anonymous = aioredis.Redis.from_url(f"rediss://127.0.0.1:{port}/0?{query}")
    try:
        with pytest.raises((AuthenticationError, NoPermissionError)):
            await anonymous.xlen(STREAMS[0])
    finally:
        await anonymous.aclose()
    as_producer = await connect(producer, "cluster", streams=STREAMS)
    try:
        with pytest.raises(NoPermissionError):
            await as_producer.xrange(STREAMS[0])
    finally:
        await as_producer.aclose()


async def test_worker_and_sdk_behind_sentinel_with_tls_and_acl_users(
    secure_sentinel: SentinelSetup, tmp_path: Path
) -> None:
    """``rediss+sentinel://worker:…@sentinel/audit/0?ssl_ca_certs=…&sentinel_username=…``:
    the client authenticates to Sentinel and to the master, both over TLS; a wrong
    Sentinel password finds no master."""
    ca = secure_sentinel.security.tls[0]  # type: ignore[index]
    port, master = secure_sentinel.ports["sentinel"], secure_sentinel.master_name
    query = f"ssl_ca_certs={ca}&sentinel_username=fleet&sentinel_password=sentinel-pw"
    producer = url("rediss+sentinel", "producer", port, f"{master}/0", query)
    worker = url("rediss+sentinel", "worker", port, f"{master}/0", query)
    await produce_and_drain(producer, worker, "sentinel", ("audit:events",), tmp_path)

    wrong = url("rediss+sentinel", "worker", port, f"{master}/0",
                f"ssl_ca_certs={ca}&sentinel_username=fleet&sentinel_password=nope")
    client = await connect(wrong, "sentinel")
    try:
        with pytest.raises(MasterNotFoundError):  # Sentinel refused the password
            await client.ping()
    finally:
        await client.aclose()


def test_the_cluster_acl_additions_are_the_documented_ones() -> None:
    """docs/scaling.md names exactly the commands a cluster client adds to the ACL."""
    docs = (Path(__file__).parents[2] / "docs" / "scaling.md").read_text()
    assert CLUSTER_ACL in docs
