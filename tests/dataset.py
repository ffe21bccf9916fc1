"""A generated dataset of runs (live and snapshot events) with its own ground truth.

Shared by the insights, archive and query conformance tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

BASE = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
WORKFLOWS = ("wf_triage", "wf_billing", "wf_support")
MODELS = ("model-large", "model-small", None)
ERRORS = ("Timeout", "RateLimit", "ValidationError", None)


@dataclass(frozen=True)
class Spec:
    """What the generator put in one node execution (the test's own ground truth)."""

    workflow: str
    run: str
    node: str
    attempt: int
    type: str
    started: datetime
    duration_ms: int
    model: str | None = None
    tin: int = 0
    tout: int = 0
    has_tokens: bool = False
    confidence: float | None = None
    result: str | None = None
    default_branch: str | None = None
    failed: bool = False
    error_type: str | None = None
    retries: int = 0


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_dataset(workspace: str, runs: int = 60, seed: int = 11) -> tuple[
        list[dict[str, Any]], list[Spec]]:
    """Runs of three workflows with ai, conditional and action nodes, failures and retries.

    Half the runs arrive as live events, half as run.snapshot events. Durations are
    whole milliseconds and confidences two-decimal values (0.7 itself included).
    """
    rnd = random.Random(seed)
    events: list[dict[str, Any]] = []
    specs: list[Spec] = []
    for i in range(runs):
        workflow = WORKFLOWS[i % 3]
        run_id = f"run-{i:03d}"
        start = BASE + timedelta(minutes=7 * i, milliseconds=rnd.randrange(1000))
        clock = start
        nodes: list[dict[str, Any]] = []

        def node(node_id: str, kind: str, attempt: int = 1, *,
                 sink: list[dict[str, Any]] = nodes, **fields: Any) -> dict[str, Any]:
            nonlocal clock
            duration = rnd.randrange(5, 4000)
            began = clock + timedelta(milliseconds=rnd.randrange(1, 50))
            clock = began + timedelta(milliseconds=duration)
            doc = {"nodeId": node_id, "type": kind, "attempt": attempt,
                   "startedAt": _iso(began), "completedAt": _iso(clock)} | fields
            sink.append(doc)
            return doc | {"_duration": duration, "_began": began}

        fetch = node("fetch", "source", output={"items": rnd.randrange(10)})
        specs.append(Spec(workflow, run_id, "fetch", 1, "source", fetch["_began"],
                          fetch["_duration"]))
        model = MODELS[rnd.randrange(3)]
        confidence = rnd.choice([0.7, round(rnd.uniform(0.2, 0.99), 2)])
        tin, tout = rnd.randrange(100, 2000), rnd.randrange(10, 400)
        ai_fields: dict[str, Any] = {
            "input": {"prompt": f"Classify message {i}"},
            "output": {"intent": rnd.choice(["buy", "help", "spam"]),
                       "confidence": confidence},
            "tokens_used": {"input": tin, "output": tout},
        }
        if model is not None:
            ai_fields["model"] = model
        ai = node("classify", "ai", **ai_fields)
        specs.append(Spec(workflow, run_id, "classify", 1, "ai", ai["_began"], ai["_duration"],
                          model=model, tin=tin, tout=tout, has_tokens=True,
                          confidence=confidence))
        default_branch = "fallback" if workflow == "wf_support" else None
        choices = ["fast-track", "nurture", "default", "fallback"]
        result = rnd.choice(choices)
        cond_fields: dict[str, Any] = {"evaluation": "intent == 'buy'", "result": result,
                                       "skippedBranches": [c for c in choices if c != result]}
        if default_branch:
            cond_fields["defaultBranch"] = default_branch
        cond = node("route", "conditional", **cond_fields)
        specs.append(Spec(workflow, run_id, "route", 1, "conditional", cond["_began"],
                          cond["_duration"], result=result, default_branch=default_branch))
        error_type = ERRORS[rnd.randrange(4)] if rnd.random() < 0.45 else None
        failing = rnd.random() < 0.45
        attempt = 1
        if failing:
            retries = rnd.randrange(4)
            err: dict[str, Any] = {"message": "upstream said no", "retries": retries}
            if error_type:
                err["type"] = error_type
            bad = node("update", "action", attempt=1, error=err, status="failed")
            specs.append(Spec(workflow, run_id, "update", 1, "action", bad["_began"],
                              bad["_duration"], failed=True, error_type=error_type,
                              retries=retries))
            attempt = 2
        ok = node("update", "action", attempt=attempt, actions=[{"type": "crm.update"}])
        specs.append(Spec(workflow, run_id, "update", attempt, "action", ok["_began"],
                          ok["_duration"]))
        envelope = {"v": 1, "workspaceId": workspace, "workflowId": workflow, "runId": run_id}
        total = round((clock - start).total_seconds() * 1000)
        if i % 2:
            events.append(envelope | {
                "eventId": f"{run_id}:snap", "type": "run.snapshot", "ts": _iso(clock),
                "trigger": {"type": "webhook", "source": rnd.choice(["gmail", "slack"])},
                "status": "completed", "startedAt": _iso(start), "completedAt": _iso(clock),
                "totalDuration": total, "nodes": nodes})
        else:
            events.append(envelope | {
                "eventId": f"{run_id}:start", "type": "run.started", "ts": _iso(start),
                "startedAt": _iso(start),
                "trigger": {"type": "webhook", "source": rnd.choice(["gmail", "slack"])}})
            for n in nodes:
                kind = "node.failed" if n.get("status") == "failed" else "node.completed"
                events.append(envelope | {"eventId": f"{run_id}:{n['nodeId']}:{n['attempt']}",
                                          "type": kind, "ts": n["completedAt"], "node": n})
            events.append(envelope | {"eventId": f"{run_id}:done", "type": "run.completed",
                                      "ts": _iso(clock), "completedAt": _iso(clock),
                                      "totalDuration": total})
    return events, specs
