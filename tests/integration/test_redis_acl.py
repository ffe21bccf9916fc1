"""The Redis ACL users of docs/events.md ("With Redis ACL users"), on a private redis-server:
a producer may only append events; a worker may read, claim, acknowledge, dead-letter
and trim, and run its fleet lease; signing decides which workspace an event may name."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError
from structlog.testing import capture_logs

from tests.helpers import PRODUCER_ACL, WORKER_ACL, MemoryStore, command, dlq_entries
from worker.constants import Reason
from worker.consumer import Worker
from worker.dlq_bound import dlq_bytes
from worker.emitter import AuditEmitter, make_event
from worker.fleet import acquire_poller, fleet_side_loop
from worker.metrics import Metrics
from worker.settings import Settings
from worker.signing import Keyring, sign
from worker.trim import hygiene_once, trim_side_loop

pytestmark = [pytest.mark.anyio]

SECRET_A = b"workspace-a-secret-0123456789abcdef"
KEYS = {"ws_a": {"2026-01": base64.b64encode(SECRET_A).decode()},
        "ws_b": {"2026-01": base64.b64encode(b"workspace-b-secret-0123456789abcdef").decode()}}


def user_url(private_redis: str, user: str, password: str) -> str:
    return private_redis.replace("redis://", f"redis://{user}:{password}@")


async def test_acl_examples_in_the_docs_are_the_tested_ones() -> None:
    """docs/events.md shows exactly these ACL SETUSER lines."""
    docs = (Path(__file__).parents[2] / "docs" / "events.md").read_text()
    assert f"ACL SETUSER producer {PRODUCER_ACL}" in docs
    assert f"ACL SETUSER worker {WORKER_ACL}" in docs


async def test_producer_and_worker_acl_users(private_redis: str, tmp_path: Path) -> None:
    """The producer user can only XADD to the event streams; the worker user runs the
    whole pipeline (group, read, claim, ack, dead-letter, trim, fleet lease); a forged
    event the producer may append is still dead-lettered by its signature."""
    admin = aioredis.Redis.from_url(private_redis)
    await command(admin, "ACL", "SETUSER", "producer", *PRODUCER_ACL.split())
    await command(admin, "ACL", "SETUSER", "worker", *WORKER_ACL.split())
    producer = aioredis.Redis.from_url(user_url(private_redis, "producer", "producer-pw"))
    worker_redis = aioredis.Redis.from_url(user_url(private_redis, "worker", "worker-pw"))
    stream = "audit:events"
    try:
        emitter = AuditEmitter(producer, [stream], keyring=Keyring.from_json(
            json.dumps({"ws_a": KEYS["ws_a"]})))
        ts = "2026-02-15T10:30:00Z"
        await emitter.emit(make_event("run.started", "ws_a", "wf", "r1", eventId="a1", ts=ts))
        forged = json.dumps(make_event("run.started", "ws_b", "wf", "r9", eventId="f1",
                                       ts=ts)).encode()
        await emitter.emit_raw(stream, forged, sign(forged, "2026-01", SECRET_A))
        denied: list[Any] = [
            producer.xrange(stream), producer.xlen(stream), producer.delete(stream),
            producer.xtrim(stream, maxlen=0), producer.xadd("audit:events:dlq", {"x": "1"}),
            producer.xadd("other:key", {"x": "1"}), producer.flushall(),
            producer.xgroup_create(stream, "g", id="0"),
        ]
        for call in denied:
            with pytest.raises(NoPermissionError):
                await call

        path = tmp_path / "keys.json"
        path.write_text(json.dumps(KEYS))
        settings = Settings(redis_url=user_url(private_redis, "worker", "worker-pw"),
                            streams=(stream,), metrics_port=0, block_ms=50, burst=True,
                            consumer="w1", claim_idle_ms=200, reclaim_interval_s=0.1,
                            fleet_poll_interval_s=0.05, trim_interval_s=0.05,
                            trim_retention_s=0, signing_keys_file=str(path),
                            require_signature=True)
        metrics = Metrics()
        store = MemoryStore()
        worker = Worker(settings, store, worker_redis, metrics, side_loops=[
            fleet_side_loop(worker_redis, settings, metrics),
            trim_side_loop(worker_redis, settings, metrics)])
        with capture_logs() as logs, anyio.fail_after(30):
            await worker.run()
        assert [e for e in logs if e.get("log_level") in ("error", "critical")
                or e["event"] == "loop_failed"] == []
        assert await store.get_run("ws_a", "r1") is not None
        assert await store.get_run("ws_b", "r9") is None
        dead = await dlq_entries(admin, stream)
        assert [d["reason"] for d in dead] == [Reason.SIGNATURE_INVALID]
        assert await acquire_poller(worker_redis, settings) is True
        with capture_logs() as hygiene_logs:
            results = await hygiene_once(worker_redis, settings, metrics)
        assert [r.plan.stream for r in results] == [stream]
        assert [e for e in hygiene_logs if e["log_level"] != "info"] == []
        dlq_size = await dlq_bytes(worker_redis, stream)  # the size bound can measure
        assert dlq_size is not None
        assert dlq_size > len(dead[0]["event"])
        for call in (worker_redis.flushall(), worker_redis.set("other:key", "1"),
                     command(worker_redis, "CONFIG", "GET", "maxmemory")):
            with pytest.raises(NoPermissionError):
                await call
    finally:
        await producer.aclose()
        await worker_redis.aclose()
        await admin.aclose()
