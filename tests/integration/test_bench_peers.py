"""The benchmark's peer baseline against real Redis: the FastStream consumer drains and acks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from benchmarks.baselines import faststream_consumer
from tests.helpers import REDIS_URL, ROOT

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


def test_drain_measures_the_checkout_it_is_given(tmp_path: Path) -> None:
    """benchmarks drain: one worker of the named checkout drains its backlog, and one line
    of CPU µs/event and events/s is appended per run; a directory without that worker is
    refused. (In a subprocess: --root swaps the imported worker package.)"""
    out = tmp_path / "runs.txt"

    def drain(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "benchmarks", "drain", "--events", "300", "--out", str(out),
             "--redis-url", REDIS_URL, *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)

    assert drain().returncode == 0
    assert drain("--root", str(ROOT)).returncode == 0
    runs = [line.split() for line in out.read_text().splitlines()]
    assert len(runs) == 2
    assert all(float(cpu) > 0 and float(rate) > 0 for cpu, rate in runs)
    refused = drain("--root", str(tmp_path))
    assert refused.returncode != 0
    assert "not the worker under" in refused.stderr
