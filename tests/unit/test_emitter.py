"""The producer SDK: validation before XADD, sharding, pipelining and RunRecorder."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import fakeredis
import pytest

from tests.helpers import stream_range
from worker.emitter import AuditEmitter, RunRecorder, make_event
from worker.errors import InvalidEvent
from worker.events import decode

pytestmark = pytest.mark.anyio


@pytest.fixture
def fake() -> fakeredis.FakeAsyncRedis:
    return fakeredis.FakeAsyncRedis()


async def entries(client: fakeredis.FakeAsyncRedis, stream: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"event"]) for _, f in await stream_range(client, stream)]


async def test_invalid_events_are_refused_before_xadd(fake: fakeredis.FakeAsyncRedis) -> None:
    """A producer bug fails in the producer: nothing reaches the stream."""
    emitter = AuditEmitter(fake, ["s"])
    bad = make_event("run.started", "bad/ws", "wf", "r1")
    with pytest.raises(InvalidEvent):
        await emitter.emit(bad)
    with pytest.raises(InvalidEvent):
        await emitter.emit_many([make_event("run.started", "ws", "wf", "r1"), bad])
    assert await fake.exists("s") == 0


async def test_sharding_keeps_each_run_on_one_stream(fake: fakeredis.FakeAsyncRedis) -> None:
    """With several streams, all events of a run go to the same one."""
    emitter = AuditEmitter(fake, ["s0", "s1", "s2"])
    events = [make_event("run.started", "ws", "wf", f"run{i}") for i in range(60)]
    events += [make_event("run.completed", "ws", "wf", f"run{i}") for i in range(60)]
    ids = await emitter.emit_many(events)
    assert len(ids) == 120
    seen: dict[str, str] = {}
    runs_per_stream: dict[str, int] = {}
    for stream in ("s0", "s1", "s2"):
        got = await entries(fake, stream)
        for e in got:
            assert seen.setdefault(str(e["runId"]), stream) == stream
        runs_per_stream[stream] = len({e["runId"] for e in got})
    assert runs_per_stream == {"s0": 26, "s1": 14, "s2": 20}  # crc32(runId) % 3
    assert len(seen) == 60


async def test_shard_of_a_run_is_crc32_of_its_id_modulo_the_streams(
    fake: fakeredis.FakeAsyncRedis,
) -> None:
    """The mapping producers in any language must reproduce, pinned with exact values:
    stream index = CRC-32 (IEEE, of the UTF-8 bytes of runId) modulo the stream count."""
    emitter = AuditEmitter(fake, ["s0", "s1", "s2", "s3"])
    got = {run: emitter.stream_for(run) for run in
           ("a", "run-1", "7f3e9c1a-0b2d-4c8e-9f61-2a5b7d9e0c13", "über")}
    assert got == {"a": "s3", "run-1": "s3", "7f3e9c1a-0b2d-4c8e-9f61-2a5b7d9e0c13": "s1",
                   "über": "s0"}
    assert AuditEmitter(fake, ["only"]).stream_for("a") == "only"


async def test_run_recorder_flushes_one_snapshot(fake: fakeredis.FakeAsyncRedis) -> None:
    """The default mode writes the whole run as one valid run.snapshot event."""
    emitter = AuditEmitter(fake, ["s"])
    async with RunRecorder(emitter, "ws", "wf_lead_triage",
                           trigger={"type": "webhook", "source": "gmail"}) as run:
        run.record_node(nodeId="classify", type="ai", model="m",
                        tokens_used={"input": 450, "output": 85})
        run.record_node(nodeId="route", type="conditional", result="fast-track")
    (event,) = await entries(fake, "s")
    assert event["type"] == "run.snapshot"
    assert event["status"] == "completed"
    assert [n["nodeId"] for n in event["nodes"]] == ["classify", "route"]
    decode(json.dumps(event).encode(), max_bytes=1 << 20)


async def test_run_recorder_events_mode_and_failure(fake: fakeredis.FakeAsyncRedis) -> None:
    """In events mode a raised exception ends the run with run.failed, then re-raises."""
    emitter = AuditEmitter(fake, ["s"])
    async def failing_run() -> None:
        async with RunRecorder(emitter, "ws", "wf", mode="events") as run:
            run.record_node(nodeId="fetch", type="action",
                            error={"type": "Timeout", "message": "t", "retries": 2})
            raise RuntimeError("engine crashed")

    with pytest.raises(RuntimeError):
        await failing_run()
    types = [e["type"] for e in await entries(fake, "s")]
    assert types == ["run.started", "node.failed", "run.failed"]


async def test_emitter_never_trims(fake: fakeredis.FakeAsyncRedis) -> None:
    """No MAXLEN: every appended entry stays until the fleet trims it."""
    emitter = AuditEmitter(fake, ["s"])
    await emitter.emit_many([make_event("run.started", "ws", "wf", f"r{i}") for i in range(500)])
    assert await fake.xlen("s") == 500


@pytest.mark.parametrize("when", ["0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"])
async def test_times_out_of_range_in_utc_are_invalid_events(
    fake: fakeredis.FakeAsyncRedis, when: str
) -> None:
    """The SDK refuses an out-of-range time (text or datetime) with InvalidEvent."""
    emitter = AuditEmitter(fake, ["s"])
    with pytest.raises(InvalidEvent, match="time out of range"):
        await emitter.emit(make_event("run.started", "ws", "wf", "r1", ts=when))
    with pytest.raises(InvalidEvent, match="time out of range"):
        make_event("run.started", "ws", "wf", "r1", ts=datetime.fromisoformat(when))
    assert await fake.exists("s") == 0
