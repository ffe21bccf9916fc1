"""A poison entry takes no valid neighbour down, whatever stage it fails in.

One entry of a batch is made to raise an exception no rule foresaw — while it is decoded,
while it is coalesced, or while its write reaches the store — and the batch holds its
neighbours: events of other runs and events of the poison entry's own run. Only the
poison entry is dead-lettered (with a reason), every neighbour is stored exactly once,
and the worker never exits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from tests.helpers import ControlledStore, ReadWriteStore, dlq_entries, pending_count
from worker import constants as c
from worker import documents, intake, samples, writer
from worker.consumer import Worker
from worker.documents import WriteBatch
from worker.emitter import AuditEmitter
from worker.settings import Settings
from worker.stores import open_store
from worker.stores.base import WriteResult

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


class PoisonStore(ControlledStore):
    """Raises an unexpected error on any write that carries the poison event."""

    def __init__(self, inner: ReadWriteStore, poison: str) -> None:
        super().__init__(inner)
        self.poison = poison

    async def write(self, batch: WriteBatch) -> WriteResult:
        ids: set[str | None] = {i for run in batch.runs.values() for i in run.event_ids}
        ids |= {n.doc.get("eventId") for n in batch.nodes.values()}
        if self.poison in ids:
            raise RuntimeError("boom: an unforeseen store adapter failure")
        return await super().write(batch)


@pytest.mark.parametrize("stage", ["decode", "coalesce", "store"])
async def test_an_entry_failing_at_any_stage_is_dead_lettered_alone(
    stage: str, redis_client: aioredis.Redis, stream: str, redis_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the failing entry reaches the dead-letter stream, and the worker logs it with its
    reason; every neighbour (its own run's other events included) is stored exactly once;
    no log event carries a prompt."""
    rng = random.Random(21)
    runs = [samples.lead_triage_run(rng, "ws_poison", f"run{i}", prompt_size=lambda r: 80)
            for i in range(12)]
    events = [e for r in runs for e in samples.run_events(r)]
    poison = next(e for e in events if e["runId"] == "run5" and e["type"].startswith("node."))
    pid = poison["eventId"]

    if stage == "decode":
        real_decode = intake.decode_doc

        def decode(raw: bytes, **kw: Any) -> dict[str, Any]:
            if pid.encode() in raw:
                raise OverflowError("date value out of range")
            return real_decode(raw, **kw)

        monkeypatch.setattr(writer, "decode_doc", decode)
    elif stage == "coalesce":
        real_parts = documents._parts

        def parts(record: documents.Record) -> Any:
            if record[1]["eventId"] == pid:
                raise KeyError("a coalescing defect")
            return real_parts(record)

        monkeypatch.setattr(documents, "_parts", parts)

    await AuditEmitter(redis_client, [stream]).emit_many(events)
    store = PoisonStore(open_store(f"sqlite:///{tmp_path / 'audit.db'}"), pid)
    await store.open()
    await store.migrate()
    settings = Settings(redis_url=redis_url, streams=(stream,), metrics_port=0, block_ms=50,
                        burst=True, batch_size=200, claim_idle_ms=150, reclaim_interval_s=0.05,
                        max_deliveries=2, consumer="w1", shutdown_grace_s=5)
    if stage != "store":
        store.poison = ""
    try:
        with capture_logs() as logs:
            await Worker(settings, store, redis_client).run()  # burst: returns once drained

        dead = await dlq_entries(redis_client, stream)
        assert [json.loads(d["event"])["eventId"] for d in dead] == [pid]
        expected = {"decode": (c.Reason.PROCESSING_ERROR, "decode: OverflowError"),
                    "coalesce": (c.Reason.PROCESSING_ERROR, "coalesce: KeyError"),
                    "store": (c.Reason.MAX_DELIVERIES, "delivered 3 times")}[stage]
        assert dead[0]["reason"] == expected[0]
        assert dead[0]["error"].startswith(expected[1])
        logged = [e for e in logs if e["event"] == "dead_lettered"]
        assert [(e["log_level"], e["stream"], e["id"], e["reason"]) for e in logged] == [
            ("warning", stream, dead[0]["id"], expected[0])]
        assert logged[0]["error"].startswith(expected[1])
        # each line of each prompt: a logged prompt shows its newlines escaped (repr, JSON)
        prompt_lines = {line for e in events
                        for line in e.get("node", {}).get("input", {}).get("prompt", "").split("\n")
                        if line}
        assert prompt_lines
        logged_text = "\n".join(repr(e) for e in logs)
        assert [line for line in prompt_lines if line in logged_text] == []
        assert await pending_count(redis_client, stream, settings.group) == 0

        stored: list[str] = []
        for run in runs:
            doc = await store.get_run("ws_poison", run["runId"])
            assert doc is not None, run["runId"]
            stored.extend(doc["eventIds"])
            stored.extend(n["eventId"] for n in await store.get_nodes("ws_poison", run["runId"]))
            assert doc["status"] == run["status"]
        assert sorted(stored) == sorted(e["eventId"] for e in events if e["eventId"] != pid)
    finally:
        await store.close()
