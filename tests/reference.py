"""The design's reference record (lead triage), as v1 events and as one run.snapshot.

``source`` -> ``classify`` (ai) -> ``route`` (conditional) -> ``update-crm`` (action), from
a gmail webhook trigger. Every store must give back every field of it. Tests that share
a database pass their own ``workspace`` so that runs never collide.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from worker import events as ev

WORKSPACE: Final = "workspace_abc"
RUN_ID: Final = "run_a1b2c3d4"
WORKFLOW_ID: Final = "wf_lead_triage"

STARTED_AT: Final = "2026-02-15T10:30:00Z"
COMPLETED_AT: Final = "2026-02-15T10:30:04.8Z"
TOTAL_DURATION: Final = 4800

PROMPT: Final = (
    "Classify this email by intent (purchase_inquiry, support, other) and give a "
    "confidence between 0 and 1 with your reasoning.\n\nFrom: buyer@example.com\n"
    "Subject: Pricing for enterprise plan\n\nHi, we are a team of 120 and would like "
    "pricing for the enterprise plan."
)

TRIGGER: Final[dict[str, Any]] = {
    "type": "webhook",
    "source": "gmail",
    "metadata": {"from": "buyer@example.com", "subject": "Pricing for enterprise plan"},
}

SOURCE_NODE: Final[dict[str, Any]] = {
    "nodeId": "source",
    "type": "source",
    "startedAt": "2026-02-15T10:30:00.1Z",
    "completedAt": "2026-02-15T10:30:00.9Z",
    "output": {"messageId": "<msg-7781@mail.example.com>", "from": "buyer@example.com"},
}

CLASSIFY_NODE: Final[dict[str, Any]] = {
    "nodeId": "classify",
    "type": "ai",
    "startedAt": "2026-02-15T10:30:01Z",
    "completedAt": "2026-02-15T10:30:02.2Z",
    "input": {"prompt": PROMPT, "context_tokens": 450},
    "output": {
        "intent": "purchase_inquiry",
        "confidence": 0.91,
        "reasoning": "Explicitly asks for enterprise pricing, mentions team size",
    },
    "model": "claude-sonnet-4-20250514",
    "tokens_used": {"input": 450, "output": 85},
}

ROUTE_NODE: Final[dict[str, Any]] = {
    "nodeId": "route",
    "type": "conditional",
    "startedAt": "2026-02-15T10:30:02.3Z",
    "completedAt": "2026-02-15T10:30:02.31Z",
    "evaluation": "intent == 'purchase_inquiry' AND confidence >= 0.9",
    "result": "fast-track",
    "skippedBranches": ["standard-nurture", "support-queue"],
}

UPDATE_CRM_NODE: Final[dict[str, Any]] = {
    "nodeId": "update-crm",
    "type": "action",
    "startedAt": "2026-02-15T10:30:02.4Z",
    "completedAt": "2026-02-15T10:30:04.7Z",
    "input": {"object": "Lead", "email": "buyer@example.com", "queue": "fast-track"},
    "output": {"success": True},
    "actions": [{"type": "salesforce.create_lead", "id": "00Q123"}],
}

NODES: Final = (SOURCE_NODE, CLASSIFY_NODE, ROUTE_NODE, UPDATE_CRM_NODE)

#: The run summary the design shows for this record.
SUMMARY: Final[dict[str, Any]] = {
    "nodesExecuted": 4,
    "nodeExecutions": 4,
    "aiCallsMade": 1,
    "actionsPerformed": ["salesforce.create_lead"],
    "totalTokens": 535,
    "failedNodes": 0,
}


def _envelope(kind: str, event_id: str, ts: str, workspace: str, run_id: str) -> dict[str, Any]:
    return {
        "v": 1,
        "eventId": event_id,
        "type": kind,
        "workspaceId": workspace,
        "workflowId": WORKFLOW_ID,
        "runId": run_id,
        "ts": ts,
    }


def reference_events(workspace: str = WORKSPACE, run_id: str = RUN_ID) -> list[dict[str, Any]]:
    """The record as the engine emits it live: run.started, one event per node, run.completed."""
    out = [_envelope(ev.RUN_STARTED, f"{run_id}:started", STARTED_AT, workspace, run_id)
           | {"trigger": copy.deepcopy(TRIGGER), "startedAt": STARTED_AT}]
    for node in NODES:
        event = _envelope(ev.NODE_COMPLETED, f"{run_id}:{node['nodeId']}:1",
                          node["completedAt"], workspace, run_id)
        out.append(event | {"node": copy.deepcopy(node)})
    out.append(_envelope(ev.RUN_COMPLETED, f"{run_id}:completed", COMPLETED_AT, workspace,
                         run_id)
               | {"status": "completed", "totalDuration": TOTAL_DURATION,
                  "completedAt": COMPLETED_AT})
    return out


def reference_snapshot(workspace: str = WORKSPACE, run_id: str = RUN_ID) -> dict[str, Any]:
    """The same record as one run.snapshot event (buffer the nodes, write the run once)."""
    return _envelope(ev.RUN_SNAPSHOT, f"{run_id}:snapshot", COMPLETED_AT, workspace, run_id) | {
        "trigger": copy.deepcopy(TRIGGER),
        "status": "completed",
        "startedAt": STARTED_AT,
        "completedAt": COMPLETED_AT,
        "totalDuration": TOTAL_DURATION,
        "nodes": [copy.deepcopy(node) for node in NODES],
    }


#: A test-only key of a raw event: the key id its entry was signed with (not sent).
SIGNED_WITH: Final = "__signedWith"


def decoded(raw_events: list[dict[str, Any]]) -> list[ev.Decoded]:
    """Events as the worker sees them: encoded to the wire, decoded and validated (and
    marked as verified with the key id under :data:`SIGNED_WITH`, if any)."""
    out = []
    for raw in raw_events:
        key_id = raw.get(SIGNED_WITH)
        if key_id is None:
            out.append(ev.decode(ev.encode(raw), max_bytes=1 << 24))
            continue
        body = {k: v for k, v in raw.items() if k != SIGNED_WITH}
        d = ev.decode(ev.encode(body), max_bytes=1 << 24)
        out.append(ev.Decoded(d.event, d.doc, key_id))
    return out
