"""Produce/consume accounting for the failover tests (cluster, Sentinel): emitted events
against what the store holds, with duplicates counted."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import anyio

from tests.helpers import MemoryStore
from worker import samples
from worker.consumer import Worker
from worker.documents import WriteBatch
from worker.emitter import AuditEmitter
from worker.stores.base import WriteResult

WORKSPACE = "ws_flow"


class CountingStore(MemoryStore):
    """The reference merge, counting how often each event is written (duplicates)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: Counter[str] = Counter()

    async def write(self, batch: WriteBatch) -> WriteResult:
        for run in batch.runs.values():
            self.writes.update(run.event_ids)
        return await super().write(batch)


def workload(n_runs: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed)
    runs = [samples.lead_triage_run(rng, WORKSPACE, f"run_{seed}_{i}",
                                    prompt_size=lambda r: 200) for i in range(n_runs)]
    events: list[dict[str, Any]] = []
    for i, run in enumerate(runs):
        events.extend(samples.run_events(run, snapshot=i % 2 == 0))
    return runs, events


def run_level_ids(events: list[dict[str, Any]]) -> set[str]:
    """The eventIds a run document keeps (node events are kept as node documents)."""
    return {e["eventId"] for e in events if not e["type"].startswith("node.")}


def assert_exact(store: MemoryStore, runs: list[dict[str, Any]],
                 events: list[dict[str, Any]]) -> None:
    """Every run is stored exactly as emitted: nothing lost, no node twice."""
    run_level = run_level_ids(events)
    stored = set().union(*(r.event_ids for r in store.runs.values()))
    assert stored == run_level, f"lost: {len(run_level - stored)}"
    got_nodes = sorted((n.run_id, n.node_id, n.attempt) for n in store.nodes.values())
    assert got_nodes == sorted((run["runId"], n["nodeId"], n.get("attempt", 1))
                               for run in runs for n in run["nodes"])
    for run in runs:
        doc = store.runs[(WORKSPACE, run["runId"])]
        assert doc.status == run["status"]
        assert doc.started_at == run["startedAt"]
        assert doc.completed_at == run["completedAt"]


async def produce(emitter: AuditEmitter, events: list[dict[str, Any]], confirmed: list[str],
                   chunk: int = 10) -> None:
    """Emit in small chunks; a chunk that fails (failover) is sent again (same eventIds)."""
    for i in range(0, len(events), chunk):
        part = events[i: i + chunk]
        while True:
            try:
                await emitter.emit_many(part)
                break
            except Exception:
                await anyio.sleep(0.1)
        confirmed.extend(e["eventId"] for e in part)
        await anyio.sleep(0.02)


async def run_until_stored(worker: Worker, store: MemoryStore, run_level: set[str],
                            limit_s: float) -> None:
    async def watch() -> None:
        while True:
            stored = set().union(*(r.event_ids for r in store.runs.values())) if store.runs \
                else set()
            if run_level <= stored:
                worker.stop()
                return
            await anyio.sleep(0.1)

    with anyio.fail_after(limit_s):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await watch()
