"""Runs for the read API and viewer tests, beside the design's reference record.

``retry_failure_events``: a run whose AI node fails once (rate limited) and succeeds on
its second attempt, then whose action fails: retries and a failure to show.
``hostile_events``: a run whose prompt, output, IDs and trigger hold markup, script and
terminal escape sequences, which every page must show as text.
"""

from __future__ import annotations

from typing import Any, Final

from tests import reference as ref
from worker import events as ev

RETRY_RUN: Final = "run_retry_fail"
HOSTILE_RUN: Final = "run_<b>hostile</b>"
SCRIPT: Final = "<script>document.title='pwned'</script>"
ANSI: Final = "\x1b[31mRED\x1b[0m \x1b]0;title\x07"
HTML: Final = '<img src=x onerror="alert(1)"><a href="javascript:alert(2)">click</a>'


def _event(kind: str, event_id: str, ts: str, workspace: str, run_id: str,
           **fields: Any) -> dict[str, Any]:
    return {"v": 1, "eventId": event_id, "type": kind, "workspaceId": workspace,
            "workflowId": ref.WORKFLOW_ID, "runId": run_id, "ts": ts} | fields


def retry_failure_events(workspace: str, run_id: str = RETRY_RUN) -> list[dict[str, Any]]:
    """source -> classify (fails, retried) -> classify attempt 2 -> route -> notify (fails)."""
    def node(kind: str, n: int, ts: str, **node: Any) -> dict[str, Any]:
        return _event(kind, f"{run_id}:{n}", ts, workspace, run_id, node=node)

    return [
        _event(ev.RUN_STARTED, f"{run_id}:started", "2026-02-16T09:00:00Z", workspace, run_id,
               trigger={"type": "webhook", "source": "gmail"},
               startedAt="2026-02-16T09:00:00Z"),
        node(ev.NODE_COMPLETED, 1, "2026-02-16T09:00:00.4Z", nodeId="source", type="source",
             startedAt="2026-02-16T09:00:00.1Z", completedAt="2026-02-16T09:00:00.4Z",
             output={"messageId": "m-1"}),
        node(ev.NODE_FAILED, 2, "2026-02-16T09:00:01.5Z", nodeId="classify", type="ai",
             attempt=1, startedAt="2026-02-16T09:00:00.5Z",
             completedAt="2026-02-16T09:00:01.5Z", model="claude-sonnet-4-20250514",
             input={"prompt": "Classify: refund request"},
             error={"type": "RateLimitError", "message": "429 from the model API",
                    "retries": 1}),
        node(ev.NODE_COMPLETED, 3, "2026-02-16T09:00:03Z", nodeId="classify", type="ai",
             attempt=2, startedAt="2026-02-16T09:00:02Z", completedAt="2026-02-16T09:00:03Z",
             model="claude-sonnet-4-20250514", input={"prompt": "Classify: refund request"},
             output={"intent": "support", "confidence": 0.62},
             tokens_used={"input": 120, "output": 30}),
        node(ev.NODE_COMPLETED, 4, "2026-02-16T09:00:03.2Z", nodeId="route", type="conditional",
             startedAt="2026-02-16T09:00:03.1Z", completedAt="2026-02-16T09:00:03.2Z",
             evaluation="confidence >= 0.9", result="support-queue",
             skippedBranches=["fast-track"]),
        node(ev.NODE_FAILED, 5, "2026-02-16T09:00:05Z", nodeId="notify", type="action",
             startedAt="2026-02-16T09:00:03.3Z", completedAt="2026-02-16T09:00:05Z",
             actions=[{"type": "slack.post_message"}],
             error={"type": "TimeoutError", "message": "slack did not answer in 1.5 s"}),
        _event(ev.RUN_FAILED, f"{run_id}:failed", "2026-02-16T09:00:05.1Z", workspace, run_id,
               totalDuration=5100, completedAt="2026-02-16T09:00:05.1Z",
               error={"type": "TimeoutError", "message": "notify failed"}),
    ]


def hostile_events(workspace: str, run_id: str = HOSTILE_RUN) -> list[dict[str, Any]]:
    """Markup, script and terminal escapes in every text a page shows."""
    return [
        _event(ev.RUN_SNAPSHOT, f"{run_id}:snapshot", "2026-02-17T08:00:02Z", workspace, run_id,
               status="completed", startedAt="2026-02-17T08:00:00Z",
               completedAt="2026-02-17T08:00:02Z", totalDuration=2000,
               trigger={"type": SCRIPT, "source": HTML, "metadata": {"subject": ANSI}},
               nodes=[{"nodeId": "<i>n1</i>", "type": "ai", "startedAt": "2026-02-17T08:00:00Z",
                       "completedAt": "2026-02-17T08:00:01Z", "model": SCRIPT,
                       "input": {"prompt": f"{SCRIPT} {HTML} {ANSI}"},
                       "output": {"text": f"{SCRIPT} {ANSI}", "html": HTML}},
                      {"nodeId": "route", "type": "conditional",
                       "startedAt": "2026-02-17T08:00:01Z",
                       "completedAt": "2026-02-17T08:00:02Z", "evaluation": SCRIPT,
                       "result": HTML, "skippedBranches": [ANSI, SCRIPT]}]),
    ]
