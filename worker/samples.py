"""Realistic lead-triage audit events (source → classify → route → update-crm).

Used by the demo, the tests and the load generator. Deterministic for a given
``random.Random`` so runs can be regenerated and compared.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from .emitter import make_event

INTENTS = (
    ("purchase_inquiry", "fast-track"),
    ("support_request", "support-queue"),
    ("newsletter_reply", "standard-nurture"),
    ("partnership", "standard-nurture"),
)
BRANCHES = ("fast-track", "standard-nurture", "support-queue", "default")
MODELS = ("claude-sonnet-4-20250514", "claude-haiku-4-20250514")
SOURCES = ("gmail", "hubspot-form", "intercom")
SUBJECTS = (
    "Pricing for enterprise plan", "Cannot log in since yesterday", "Re: monthly update",
    "Partnership proposal", "Quote for 40 seats", "Invoice question",
)
_WORDS = ("team", "pricing", "seats", "renewal", "integration", "deadline", "budget", "trial",
          "security", "review", "support", "migration", "contract", "onboarding", "API")


def prompt_text(rng: random.Random, size: int) -> str:
    """A prompt of about ``size`` characters."""
    head = "Classify this email into one of: purchase_inquiry, support_request, " \
           "newsletter_reply, partnership. Answer as JSON with intent, confidence, reasoning.\n\n"
    words: list[str] = []
    length = len(head)
    while length < size:
        w = rng.choice(_WORDS)
        words.append(w)
        length += len(w) + 1
    return head + " ".join(words)


def default_prompt_size(rng: random.Random) -> int:
    """Mostly 1-4 KiB prompts with a long tail up to 256 KiB (log-normal, capped)."""
    return int(min(256 * 1024, max(200, rng.lognormvariate(7.6, 1.0))))


def lead_triage_run(
    rng: random.Random,
    workspace_id: str,
    run_id: str,
    *,
    start: datetime | None = None,
    prompt_size: Callable[[random.Random], int] = default_prompt_size,
) -> dict[str, Any]:
    """One run as a ground-truth dict: trigger, nodes (with retries), status, times."""
    t = start or datetime(2026, 2, 15, 10, 30, tzinfo=UTC) + timedelta(
        seconds=rng.randrange(0, 86400 * 30))
    sender = f"lead{rng.randrange(10_000)}@example.com"
    subject = rng.choice(SUBJECTS)
    trigger = {"type": "webhook", "source": rng.choice(SOURCES),
               "metadata": {"from": sender, "subject": subject}}
    nodes: list[dict[str, Any]] = []

    def node(node_id: str, kind: str, seconds: float, **fields: Any) -> dict[str, Any]:
        nonlocal t
        started = t
        t = t + timedelta(seconds=seconds)
        doc = {"nodeId": node_id, "type": kind, "startedAt": started, "completedAt": t, **fields}
        nodes.append(doc)
        return doc

    node("source", "source", rng.uniform(0.01, 0.08),
         output={"from": sender, "subject": subject, "bytes": rng.randrange(500, 20_000)})
    intent, branch = rng.choice(INTENTS)
    confidence = round(rng.betavariate(8, 2), 3)
    model = rng.choice(MODELS)
    size = prompt_size(rng)
    tokens_in = max(50, size // 4)
    if rng.random() < 0.08:  # a timed-out model call, retried
        node("classify", "ai", rng.uniform(5, 10), attempt=1, model=model,
             input={"prompt": prompt_text(rng, size), "context_tokens": tokens_in},
             error={"type": "ModelTimeout", "message": "model call timed out after 5s",
                    "retries": 0})
    node("classify", "ai", rng.uniform(0.6, 2.5), attempt=2 if nodes[-1].get("error") else 1,
         model=model, input={"prompt": prompt_text(rng, size), "context_tokens": tokens_in},
         output={"intent": intent, "confidence": confidence,
                 "reasoning": f"Mentions {rng.choice(_WORDS)} and {rng.choice(_WORDS)}"},
         tokens_used={"input": tokens_in, "output": rng.randrange(40, 160)})
    chosen = branch if confidence >= 0.7 else "default"
    node("route", "conditional", rng.uniform(0.001, 0.01),
         evaluation=f"intent == '{intent}' AND confidence >= 0.7", result=chosen,
         skippedBranches=[b for b in BRANCHES if b != chosen])
    status, error = "completed", None
    if rng.random() < 0.1:  # CRM outage: retried, then failed
        node("update-crm", "action", rng.uniform(3, 6),
             error={"type": "CRMTimeout", "message": "Salesforce API timeout", "retries": 2},
             actions=[])
        status = "failed"
        error = {"type": "CRMTimeout", "message": "update-crm failed after 2 retries"}
    else:
        node("update-crm", "action", rng.uniform(0.2, 1.2),
             actions=[{"type": "salesforce.create_lead", "id": f"00Q{rng.randrange(10**6)}"}],
             output={"queue": chosen})
    started = nodes[0]["startedAt"]
    return {
        "workspaceId": workspace_id, "workflowId": "wf_lead_triage", "runId": run_id,
        "trigger": trigger, "nodes": nodes, "status": status, "error": error,
        "startedAt": started, "completedAt": t,
        "totalDuration": round((t - started).total_seconds() * 1000, 3),
    }


def run_events(run: dict[str, Any], *, snapshot: bool = False) -> list[dict[str, Any]]:
    """The v1 events a workflow engine emits for ``run``."""
    ids = (run["workspaceId"], run["workflowId"], run["runId"])
    if snapshot:
        return [make_event("run.snapshot", *ids, ts=run["completedAt"], trigger=run["trigger"],
                           status=run["status"], startedAt=run["startedAt"],
                           completedAt=run["completedAt"], totalDuration=run["totalDuration"],
                           error=run["error"], nodes=[_iso_node(n) for n in run["nodes"]])]
    out = [make_event("run.started", *ids, ts=run["startedAt"], trigger=run["trigger"])]
    for n in run["nodes"]:
        kind = "node.failed" if n.get("error") else "node.completed"
        out.append(make_event(kind, *ids, ts=n["completedAt"], node=_iso_node(n)))
    kind = "run.completed" if run["status"] == "completed" else "run.failed"
    out.append(make_event(kind, *ids, ts=run["completedAt"], status=run["status"],
                          totalDuration=run["totalDuration"], error=run["error"]))
    return out


def _iso_node(node: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in node.items()}
