"""Crash safety end to end: two worker processes on PostgreSQL, one killed with SIGKILL."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tests.helpers import spawn_worker, workload
from worker.emitter import AuditEmitter

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

GROUP = "audit-writers"


async def _pending_of(client: aioredis.Redis, stream: str, consumer: str) -> int:
    try:
        consumers = await client.xinfo_consumers(stream, GROUP)
    except ResponseError as exc:  # the workers have not created the group yet
        if "NOGROUP" in str(exc):
            return 0
        raise
    for c in consumers:
        if c["name"].decode() == consumer:
            return int(c["pending"])
    return 0


async def test_kill_9_mid_batch_loses_and_duplicates_nothing(
    redis_client: aioredis.Redis, stream: str, redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """Every emitted event is stored exactly once though a worker dies mid-batch."""
    runs, stream_order = workload(seed=11, target=20_000)
    emitter = AuditEmitter(redis_client, [stream])
    await emitter.emit_many(stream_order[:2000])
    a = spawn_worker("w-a", stream, redis_url, pg_url, tmp_path / "a.log")
    b = spawn_worker("w-b", stream, redis_url, pg_url, tmp_path / "b.log")
    try:
        sent = 2000
        killed_pending = 0
        with anyio.fail_after(120):
            while sent < len(stream_order):  # events keep flowing while A dies
                await emitter.emit_many(stream_order[sent:sent + 500])
                sent += 500
                if a.poll() is None and sent >= 8000:
                    while await _pending_of(redis_client, stream, "w-a") == 0:
                        await anyio.sleep(0.001)
                    a.send_signal(signal.SIGKILL)
                    a.wait()
                    killed_pending = await _pending_of(redis_client, stream, "w-a")
                await anyio.sleep(0.05)
            assert killed_pending > 0, "worker A must die holding unacknowledged entries"
            while True:  # B drains the rest and reclaims A's pending entries
                summary = await redis_client.xpending(stream, GROUP)
                groups = await redis_client.xinfo_groups(stream)
                if summary["pending"] == 0 and groups[0]["lag"] == 0:
                    break
                assert b.poll() is None, (tmp_path / "b.log").read_text()[-3000:]
                await anyio.sleep(0.2)
        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=30) == 0
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()

    assert await _pending_of(redis_client, stream, "w-a") == 0
    reclaimed = [json.loads(line) for line in (tmp_path / "b.log").read_text().splitlines()
                 if '"reclaimed"' in line]
    assert sum(r["count"] for r in reclaimed) >= killed_pending
    assert not await redis_client.exists(stream + ":dlq")

    conn = await asyncpg.connect(pg_url)
    try:
        run_rows = await conn.fetch(
            "SELECT run_id, status, started_at, completed_at, doc::text AS doc "
            "FROM workflow_runs WHERE workspace_id = 'ws_crash'")
        node_rows = await conn.fetch(
            "SELECT run_id, node_id, attempt, doc::text AS doc "
            "FROM workflow_node_runs WHERE workspace_id = 'ws_crash'")
    finally:
        await conn.close()
    check_exactly_once(runs, stream_order, run_rows, node_rows)


def _tokens(node: dict[str, Any]) -> int:
    used = node.get("tokens_used") or {}
    return int(used.get("input", 0)) + int(used.get("output", 0))


def check_exactly_once(runs: list[dict[str, Any]], stream_order: list[dict[str, Any]],
                       run_rows: list[Any], node_rows: list[Any]) -> None:
    """The stored documents against the ground truth the test generated.

    The stream replays every 25th event and the killed worker's batches are written again
    by its peer, so each quantity below would change if an event were applied twice:
    event IDs per run (a list, not a set, in the comparison), node executions, summed
    tokens, failed nodes and AI calls per run, retries per node, and which event each node
    document comes from.
    """
    run_events: dict[str, list[str]] = {}
    node_source: dict[tuple[str, str, int], str] = {}
    for e in {e["eventId"]: e for e in stream_order}.values():  # each emitted event once
        if e["type"] == "run.snapshot":
            for n in e["nodes"]:
                node_source[(e["runId"], n["nodeId"], n.get("attempt", 1))] = e["eventId"]
        if e["type"].startswith("node."):
            n = e["node"]
            node_source[(e["runId"], n["nodeId"], n.get("attempt", 1))] = e["eventId"]
        else:
            run_events.setdefault(e["runId"], []).append(e["eventId"])

    by_id = {r["run_id"]: r for r in run_rows}
    assert sorted(by_id) == sorted(run["runId"] for run in runs)
    assert len(run_rows) == len(runs)
    for run in runs:
        row = by_id[run["runId"]]
        doc = json.loads(row["doc"])
        assert sorted(doc["eventIds"]) == sorted(run_events[run["runId"]]), run["runId"]
        assert row["status"] == run["status"]
        assert row["started_at"] == run["startedAt"]
        assert row["completed_at"] == run["completedAt"]
        nodes = run["nodes"]
        assert doc["summary"] == {
            "nodesExecuted": len({n["nodeId"] for n in nodes}),
            "nodeExecutions": len(nodes),
            "aiCallsMade": sum(1 for n in nodes if n["type"] == "ai"),
            "actionsPerformed": sorted({a["type"] for n in nodes for a in n.get("actions", [])}),
            "totalTokens": sum(_tokens(n) for n in nodes),
            "failedNodes": sum(1 for n in nodes if n.get("error")),
        }, run["runId"]

    truth = {(run["runId"], n["nodeId"], n.get("attempt", 1)): n for run in runs
             for n in run["nodes"]}
    stored = {(r["run_id"], r["node_id"], r["attempt"]): json.loads(r["doc"]) for r in node_rows}
    assert len(node_rows) == len(truth)
    assert sorted(stored) == sorted(truth)
    for key, node in truth.items():
        doc = stored[key]
        assert doc["eventId"] == node_source[key], key
        assert doc.get("tokens_used") == node.get("tokens_used"), key
        assert (doc.get("error") or {}).get("retries") == (node.get("error") or {}).get(
            "retries"), key
    assert sum(_tokens(d) for d in stored.values()) == sum(_tokens(n) for n in truth.values())
