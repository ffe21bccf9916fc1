"""``audit-fleet insights``: the design's improvement queries over node documents.

Every insight is a pure function of the node documents in the window, folded in one
pass by :class:`Insights`, so the answer is the same whichever store streamed them
(and in whatever order). Definitions (docs/queries.md repeats them):

- **Low-confidence AI decisions**: nodes of type ``ai`` whose ``output`` is an object
  with a numeric ``confidence`` strictly below the threshold. Listed by confidence
  ascending, then ``startedAt`` newest first, then run, node and attempt; at most
  ``limit`` items, with the total count.
- **Slowest nodes**: per ``(workflowId, nodeId)``, over node executions with a
  ``durationMs``: count, p50, p95 and max. Percentiles use the *nearest-rank* method:
  with the n durations sorted ascending, the p-th percentile is the value at 1-based
  rank ``ceil(p / 100 * n)``; it is always one of the observed durations. Ordered by
  p95 descending, then p50 descending, then workflow and node.
- **Error groups**: a node execution is an error when its ``status`` is ``failed`` or
  it carries an ``error``; it is grouped by ``error.type`` (``"unknown"`` when absent).
  Each group has its count, its share of all errors (count / total, rounded to 6
  decimals), and the sum of ``error.retries``. Ordered by count descending, then type.
- **Default-branch hits**: per conditional node (type ``conditional``) per workflow,
  the evaluations and how many hit the default branch. A node hit its default branch
  when its ``result`` equals its own ``defaultBranch`` field, or, when the node names
  no ``defaultBranch``, when ``result`` is the string ``"default"``. Share is hits /
  evaluations (6 decimals). Ordered by hits descending, then workflow and node.
- **Token usage**: over nodes with ``tokens_used``, input, output and total tokens and
  calls, per ``model`` (``"unknown"`` when absent) and per ``workflowId``. Ordered by
  total descending, then name.

The window filters node ``startedAt``: ``since`` inclusive, ``until`` exclusive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from .queries import (
    jsonable,
)
from .stores import NodeQuery, QueryStore

INSIGHTS_VERSION: Final = 1
DEFAULT_THRESHOLD: Final = 0.7
DEFAULT_LIMIT: Final = 100
#: The node fields insights read (a projection hint for the store).
FIELDS: Final = ("workflowId", "runId", "nodeId", "attempt", "type", "status", "startedAt",
                 "durationMs", "model", "tokens_used", "output", "result", "defaultBranch",
                 "error")


def nearest_rank(sorted_values: list[float], p: int) -> float:
    """The p-th percentile (0 < p <= 100) of ascending values by the nearest-rank method."""
    if not sorted_values:
        raise ValueError("no values")
    if not 0 < p <= 100:
        raise ValueError("p must be in (0, 100]")
    rank = max(1, math.ceil(p * len(sorted_values) / 100))
    return sorted_values[rank - 1]


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(slots=True)
class Insights:
    """A one-pass fold of node documents into the improvement queries."""

    threshold: float = DEFAULT_THRESHOLD
    limit: int = DEFAULT_LIMIT
    since: datetime | None = None
    until: datetime | None = None
    scanned: int = 0
    _low: list[dict[str, Any]] = field(default_factory=list)
    _durations: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    _errors: dict[str, list[int]] = field(default_factory=dict)
    _branches: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    _by_model: dict[str, list[int]] = field(default_factory=dict)
    _by_workflow: dict[str, list[int]] = field(default_factory=dict)

    def in_window(self, doc: Mapping[str, Any]) -> bool:
        started = doc.get("startedAt")
        if self.since is None and self.until is None:
            return True
        if not isinstance(started, datetime):
            return False
        if self.since is not None and started < self.since:
            return False
        return not (self.until is not None and started >= self.until)

    def add(self, doc: Mapping[str, Any]) -> None:
        if not self.in_window(doc):
            return
        self.scanned += 1
        workflow = str(doc.get("workflowId"))
        node = str(doc.get("nodeId"))
        kind = doc.get("type")
        output = doc.get("output")
        if kind == "ai" and isinstance(output, Mapping):
            confidence = _num(output.get("confidence"))
            if confidence is not None and confidence < self.threshold:
                self._low.append({
                    "runId": doc.get("runId"), "workflowId": doc.get("workflowId"),
                    "nodeId": doc.get("nodeId"), "attempt": doc.get("attempt"),
                    "startedAt": doc.get("startedAt"), "model": doc.get("model"),
                    "confidence": confidence,
                })
        duration = _num(doc.get("durationMs"))
        if duration is not None:
            self._durations.setdefault((workflow, node), []).append(duration)
        error = doc.get("error")
        if doc.get("status") == "failed" or error is not None:
            etype = error.get("type") if isinstance(error, Mapping) else None
            name = etype if isinstance(etype, str) and etype else "unknown"
            group = self._errors.setdefault(name, [0, 0])
            group[0] += 1
            group[1] += _int(error.get("retries")) if isinstance(error, Mapping) else 0
        if kind == "conditional":
            hits = self._branches.setdefault((workflow, node), [0, 0])
            hits[0] += 1
            hits[1] += 1 if is_default_branch(doc) else 0
        tokens = doc.get("tokens_used")
        if isinstance(tokens, Mapping):
            tin, tout = _int(tokens.get("input")), _int(tokens.get("output"))
            model = doc.get("model")
            for bucket, name in ((self._by_model, model if isinstance(model, str) and model
                                  else "unknown"), (self._by_workflow, workflow)):
                acc = bucket.setdefault(name, [0, 0, 0])
                acc[0] += 1
                acc[1] += tin
                acc[2] += tout

    def add_all(self, docs: Iterable[Mapping[str, Any]]) -> Insights:
        for doc in docs:
            self.add(doc)
        return self

    def result(self) -> dict[str, Any]:
        """The stable result (``insightsVersion`` 1)."""
        low = sorted(self._low, key=lambda d: (
            d["confidence"],
            -(d["startedAt"].timestamp() if isinstance(d["startedAt"], datetime) else -math.inf),
            str(d["runId"]), str(d["nodeId"]), _int(d["attempt"])))
        slow: list[dict[str, Any]] = []
        for (workflow, node), values in self._durations.items():
            ordered = sorted(values)
            slow.append({"workflowId": workflow, "nodeId": node, "count": len(ordered),
                         "p50Ms": nearest_rank(ordered, 50), "p95Ms": nearest_rank(ordered, 95),
                         "maxMs": ordered[-1]})
        slow.sort(key=lambda d: (-d["p95Ms"], -d["p50Ms"], d["workflowId"], d["nodeId"]))
        total_errors = sum(g[0] for g in self._errors.values())
        groups: list[dict[str, Any]] = [
            {"type": name, "count": g[0], "share": round(g[0] / total_errors, 6),
             "retries": g[1]} for name, g in self._errors.items()]
        groups.sort(key=lambda d: (-d["count"], d["type"]))
        branches: list[dict[str, Any]] = [
            {"workflowId": w, "nodeId": n, "evaluations": h[0], "defaultHits": h[1],
             "share": round(h[1] / h[0], 6)} for (w, n), h in self._branches.items()]
        branches.sort(key=lambda d: (-d["defaultHits"], d["workflowId"], d["nodeId"]))
        out: dict[str, Any] = jsonable({
            "insightsVersion": INSIGHTS_VERSION,
            "window": {"since": self.since, "until": self.until},
            "nodesScanned": self.scanned,
            "lowConfidence": {"threshold": self.threshold, "count": len(low),
                              "items": low[: self.limit]},
            "slowestNodes": slow,
            "errorGroups": {"total": total_errors, "groups": groups},
            "defaultBranches": branches,
            "tokenUsage": {"byModel": _usage(self._by_model, "model"),
                           "byWorkflow": _usage(self._by_workflow, "workflowId")},
        })
        return out


def is_default_branch(doc: Mapping[str, Any]) -> bool:
    """Whether a conditional node took its default branch (see the module docstring)."""
    result = doc.get("result")
    named = doc.get("defaultBranch")
    if isinstance(named, str) and named:
        return result == named
    return result == "default"


def _usage(bucket: Mapping[str, list[int]], label: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {label: name, "calls": v[0], "input": v[1], "output": v[2], "total": v[1] + v[2]}
        for name, v in bucket.items()]
    rows.sort(key=lambda d: (-d["total"], d[label]))
    return rows


@dataclass(slots=True)
class Distributions:
    """A one-pass fold for charts: AI confidences in ten bins of 0.1 (1.0 in the last),
    and errors per UTC day and error type (grouped as in the error groups)."""

    since: datetime | None = None
    until: datetime | None = None
    confidence: list[int] = field(default_factory=lambda: [0] * 10)
    _errors: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, doc: Mapping[str, Any]) -> None:
        if not Insights(since=self.since, until=self.until).in_window(doc):
            return
        output = doc.get("output")
        if doc.get("type") == "ai" and isinstance(output, Mapping):
            value = _num(output.get("confidence"))
            if value is not None and 0 <= value <= 1:
                self.confidence[min(9, int(value * 10))] += 1
        error = doc.get("error")
        started = doc.get("startedAt")
        if (doc.get("status") == "failed" or error is not None) \
                and isinstance(started, datetime):
            etype = error.get("type") if isinstance(error, Mapping) else None
            name = etype if isinstance(etype, str) and etype else "unknown"
            day = started.astimezone(UTC).strftime("%Y-%m-%d")
            self._errors[(day, name)] = self._errors.get((day, name), 0) + 1

    def result(self) -> dict[str, Any]:
        return {"confidenceBins": [{"from": i / 10, "to": (i + 1) / 10, "count": c}
                                   for i, c in enumerate(self.confidence)],
                "errorsByDay": [{"day": d, "type": t, "count": c}
                                for (d, t), c in sorted(self._errors.items())]}


async def compute(store: QueryStore, workspace: str, *, since: datetime | None = None,
                  until: datetime | None = None, threshold: float = DEFAULT_THRESHOLD,
                  limit: int = DEFAULT_LIMIT,
                  distributions: Distributions | None = None) -> dict[str, Any]:
    """Insights of a workspace's nodes started in ``[since, until)``, streamed from a store
    (and, in the same pass, ``distributions`` when given)."""
    acc = Insights(threshold=threshold, limit=limit, since=since, until=until)
    query = NodeQuery(since=since, until=until, fields=FIELDS)
    async for doc in store.scan_nodes(workspace, query):
        acc.add(doc)
        if distributions is not None:
            distributions.add(doc)
    out = acc.result()
    out["workspace"] = workspace
    return out


