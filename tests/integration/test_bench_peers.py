"""The benchmark's peer baseline against real Redis: the FastStream consumer drains and acks."""

from __future__ import annotations

import msgspec
import pytest
import redis.asyncio as aioredis

from benchmarks.baselines import faststream_consumer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def test_faststream_peer_reads_groups_and_acks_every_entry(
        redis_url: str, stream: str, redis_client: aioredis.Redis) -> None:
    """30 entries of 3 runs in batches of 10: all read, grouped into 3 runs, none pending."""
    pytest.importorskip("faststream")  # the bench extra; .ci/run installs it
    await redis_client.xgroup_create(stream, "g", id="0", mkstream=True)
    for i in range(30):
        event = {"workspaceId": "ws", "runId": f"run_{i % 3}", "eventId": f"e{i}"}
        await redis_client.xadd(stream, {"event": msgspec.json.encode(event)})
    result = await faststream_consumer(redis_url, stream, "g", "c1", 10, 30)
    assert result["events"] == 30
    assert result["runs"] == 3
    pending = await redis_client.xpending(stream, "g")
    assert pending["pending"] == 0
