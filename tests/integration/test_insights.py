"""``insights`` on a generated dataset equals what this test computes on its own."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.dataset import BASE, Spec, make_dataset
from tests.helpers import run_cli, workspace_name, write_events
from worker import insights
from worker.cli import insights as insights_cli
from worker.stores import Store

pytestmark = pytest.mark.anyio


def expected(specs: list[Spec], *, since: datetime | None, until: datetime | None,
             threshold: float, limit: int) -> dict[str, Any]:
    """The insights, computed here from the generator's own record, not by worker code."""
    chosen = [s for s in specs if (since is None or s.started >= since)
              and (until is None or s.started < until)]
    low = [s for s in chosen if s.type == "ai" and s.confidence is not None
           and s.confidence < threshold]
    low.sort(key=lambda s: (s.confidence, -s.started.timestamp(), s.run, s.node, s.attempt))
    durations: dict[tuple[str, str], list[int]] = defaultdict(list)
    for s in chosen:
        durations[(s.workflow, s.node)].append(s.duration_ms)
    slow: list[dict[str, Any]] = []
    for (wf, node), values in durations.items():
        values = sorted(values)
        n = len(values)
        slow.append({"workflowId": wf, "nodeId": node, "count": n,
                     "p50Ms": values[math.ceil(0.50 * n) - 1],
                     "p95Ms": values[math.ceil(0.95 * n) - 1], "maxMs": values[-1]})
    slow.sort(key=lambda d: (-d["p95Ms"], -d["p50Ms"], d["workflowId"], d["nodeId"]))
    errors: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s in chosen:
        if s.failed:
            errors[s.error_type or "unknown"][0] += 1
            errors[s.error_type or "unknown"][1] += s.retries
    total = sum(v[0] for v in errors.values())
    groups: list[dict[str, Any]] = sorted(
        ({"type": k, "count": v[0], "share": round(v[0] / total, 6), "retries": v[1]}
         for k, v in errors.items()),
        key=lambda d: (-d["count"], d["type"]))
    branches: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for s in chosen:
        if s.type == "conditional":
            hit = s.result == (s.default_branch or "default")
            branches[(s.workflow, s.node)][0] += 1
            branches[(s.workflow, s.node)][1] += int(hit)
    default: list[dict[str, Any]] = sorted(
        ({"workflowId": w, "nodeId": n, "evaluations": v[0], "defaultHits": v[1],
          "share": round(v[1] / v[0], 6)} for (w, n), v in branches.items()),
        key=lambda d: (-d["defaultHits"], d["workflowId"], d["nodeId"]))
    by_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    by_wf: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for s in chosen:
        if s.has_tokens:
            for bucket, key in ((by_model, s.model or "unknown"), (by_wf, s.workflow)):
                bucket[key][0] += 1
                bucket[key][1] += s.tin
                bucket[key][2] += s.tout

    def usage(bucket: dict[str, list[int]], label: str) -> list[dict[str, Any]]:
        rows = [{label: k, "calls": v[0], "input": v[1], "output": v[2], "total": v[1] + v[2]}
                for k, v in bucket.items()]
        return sorted(rows, key=lambda d: (-d["total"], d[label]))

    def stamp(when: datetime | None) -> str | None:
        return None if when is None else when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    return {
        "insightsVersion": 1,
        "window": {"since": stamp(since), "until": stamp(until)},
        "nodesScanned": len(chosen),
        "lowConfidence": {"threshold": threshold, "count": len(low), "items": [
            {"runId": s.run, "workflowId": s.workflow, "nodeId": s.node, "attempt": s.attempt,
             "startedAt": stamp(s.started), "model": s.model, "confidence": s.confidence}
            for s in low[:limit]]},
        "slowestNodes": slow,
        "errorGroups": {"total": total, "groups": groups},
        "defaultBranches": default,
        "tokenUsage": {"byModel": usage(by_model, "model"), "byWorkflow": usage(by_wf,
                                                                                "workflowId")},
    }


async def test_insights_equal_independent_computation(store: Store) -> None:
    """Every insight over a time window equals the test's own computation from the spec."""
    ws = workspace_name()
    events, specs = make_dataset(ws)
    await write_events(store, events)
    since = BASE + timedelta(minutes=30)
    until = BASE + timedelta(minutes=7 * 50)
    got = await insights.compute(store, ws, since=since, until=until, threshold=0.7, limit=10)
    want = expected(specs, since=since, until=until, threshold=0.7, limit=10)
    assert got.pop("workspace") == ws
    assert got == want
    assert got["errorGroups"]["total"] == 23
    assert got["lowConfidence"]["count"] == 16
    assert all(d["defaultHits"] for d in got["defaultBranches"])


async def test_insights_without_window_and_other_threshold(store: Store) -> None:
    """With no window every node counts; the threshold is strict (0.7 itself is not low)."""
    ws = workspace_name()
    events, specs = make_dataset(ws, runs=30, seed=5)
    await write_events(store, events)
    got = await insights.compute(store, ws, threshold=0.5, limit=1000)
    got.pop("workspace")
    assert got == expected(specs, since=None, until=None, threshold=0.5, limit=1000)
    at_threshold = await insights.compute(store, ws, threshold=0.7, limit=1000)
    assert all(i["confidence"] < 0.7 for i in at_threshold["lowConfidence"]["items"])
    assert any(s.confidence == 0.7 for s in specs)


def test_fold_is_order_independent() -> None:
    """The fold gives the same result whatever order the documents stream in."""
    docs = [{"workflowId": "w", "nodeId": f"n{i % 3}", "runId": f"r{i}", "attempt": 1,
             "type": "ai", "durationMs": float(i * 7 % 23),
             "startedAt": BASE + timedelta(seconds=i),
             "output": {"confidence": (i % 10) / 10}, "model": "m",
             "tokens_used": {"input": i, "output": 1},
             "status": "failed" if i % 4 == 0 else "completed",
             "error": {"type": "E" + str(i % 2)} if i % 4 == 0 else None} for i in range(40)]
    a = insights.Insights().add_all(docs).result()
    b = insights.Insights().add_all(reversed(docs)).result()
    assert a == b
    assert a["errorGroups"]["total"] == 10


def test_nearest_rank_definition() -> None:
    """Nearest rank: the value at rank ceil(p/100 * n) of the sorted values."""
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert insights.nearest_rank(values, 5) == 15.0
    assert insights.nearest_rank(values, 30) == 20.0
    assert insights.nearest_rank(values, 40) == 20.0
    assert insights.nearest_rank(values, 50) == 35.0
    assert insights.nearest_rank(values, 95) == 50.0
    assert insights.nearest_rank([7.0], 50) == 7.0
    with pytest.raises(ValueError, match="no values"):
        insights.nearest_rank([], 50)


def test_default_branch_definition() -> None:
    """A node's own defaultBranch wins; otherwise the result 'default' is the default."""
    assert insights.is_default_branch({"result": "default"})
    assert not insights.is_default_branch({"result": "fast-track"})
    assert insights.is_default_branch({"result": "other", "defaultBranch": "other"})
    assert not insights.is_default_branch({"result": "default", "defaultBranch": "other"})


async def test_insights_cli_json_and_table(store: Store, store_url: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI prints stable JSON and a readable table with every section."""
    ws = workspace_name()
    events, specs = make_dataset(ws, runs=12, seed=3)
    await write_events(store, events)
    args = run_cli(insights_cli.register, ["insights", "-w", ws, "--store-url", store_url,
                                       "--since", "2026-03-01", "--until", "2026-03-02",
                                       "--json"])
    assert await args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["nodesScanned"] == len(specs)
    args = run_cli(insights_cli.register, ["insights", "-w", ws, "--store-url", store_url,
                                       "--since", "2026-03-01", "--until", "2026-03-02"])
    assert await args.func(args) == 0
    text = capsys.readouterr().out
    for heading in ("Low-confidence AI decisions", "Slowest nodes", "Error groups",
                    "Default-branch hits", "Token usage per model", "Token usage per workflow"):
        assert heading in text
