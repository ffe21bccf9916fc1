"""``audit-fleet explain``: the full decision chain of one run.

A run's stored documents (the run and its node executions) are turned into an
:class:`Explanation`: the trigger, each node in execution order with its timing,
model, tokens, prompt and raw output, each conditional's evaluation, result and
skipped branches, the actions taken, the errors and retries, and the total
duration and status. It renders as text for a terminal and as stable JSON
(``explainVersion`` 1; keys never change meaning, new keys may be added).

Prompts (node ``input``) and trigger metadata can hold personal data. Unless
``show_prompts`` is set, their strings are redacted (emails, phone numbers, long
digit runs, API-key-like tokens) and shortened. Outputs are shown raw.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from .errors import AuditFleetError
from .queries import (
    jsonable,
)
from .stores import QueryStore

if TYPE_CHECKING:
    from .archive import Archive, OpenDoc

EXPLAIN_VERSION: Final = 1
#: Longest prompt string shown when prompts are not shown in full.
PROMPT_LIMIT: Final = 200
#: The recursion limit :func:`deep_documents` gives a command that reads documents.
DEEP_RECURSION_LIMIT: Final = 20_000

#: Node keys with a place of their own in a step; the rest is shown as ``extra``.
_NODE_KNOWN: Final = frozenset({
    "nodeId", "type", "attempt", "status", "startedAt", "completedAt", "durationMs", "model",
    "tokens_used", "input", "output", "evaluation", "result", "skippedBranches", "actions",
    "error", "nodeKey", "eventId", "workspaceId", "runId", "workflowId", "signedBy",
})
#: Run keys with a place of their own; ``nodeIndex`` and ``eventIds`` are bookkeeping.
_RUN_KNOWN: Final = frozenset({
    "workspaceId", "runId", "workflowId", "status", "startedAt", "completedAt", "trigger",
    "totalDuration", "error", "summary", "nodeIndex", "eventIds", "signedBy", "subjects",
    "erasure",
})

# -- redaction -------------------------------------------------------------------------------

_SECRET = re.compile(
    r"(?:\bBearer\s+[A-Za-z0-9._~+/=-]{8,})"
    r"|(?:\b(?:sk|pk|rk|ghp|gho|ghs|xox[abpr]|api|key|token)[-_][A-Za-z0-9_-]{12,})"
    r"|(?:\bAKIA[0-9A-Z]{16}\b)"
    r"|(?:\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}\b)",
    re.IGNORECASE,
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_CARD = re.compile(r"(?<![\w.])\d(?:[ -]?\d){12,18}(?![\w.])")
_DIGITS = re.compile(r"\d{9,}")
_PHONE = re.compile(
    r"(?<![\w.])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])"
    r"\d{3,4}[\s.-]?\d{3,4}(?![\w.])"
)


def redact_text(text: str, limit: int | None = PROMPT_LIMIT) -> str:
    """Mask emails, phone numbers, long digit runs and API-key-like tokens, then shorten."""
    out = _SECRET.sub("[secret]", text)
    out = _EMAIL.sub("[email]", out)
    out = _CARD.sub("[number]", out)
    out = _DIGITS.sub("[number]", out)
    out = _PHONE.sub("[phone]", out)
    if limit is not None and len(out) > limit:
        out = f"{out[:limit]}… [+{len(out) - limit} chars]"
    return out


def redact(value: Any, limit: int | None = PROMPT_LIMIT) -> Any:
    """:func:`redact_text` applied to every string (and mapping key) inside ``value``."""
    if isinstance(value, str):
        return redact_text(value, limit)
    if isinstance(value, Mapping):
        return {redact_text(str(k), None): redact(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, limit) for v in value]
    return value


@contextlib.contextmanager
def deep_documents(limit: int = DEEP_RECURSION_LIMIT) -> Iterator[None]:
    """Room to read, redact and print documents nested as deep as a store holds them.

    Reading (msgspec), redaction, :func:`worker.queries.jsonable` and ``json.dumps`` all
    recurse once per level of nesting; the worker accepts 500 levels, older stores may hold
    ~1,000, and each level costs a few frames. Python-to-Python calls do not grow the C
    stack (3.11+), so a higher limit for the length of one command is safe.
    """
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


# -- the model -------------------------------------------------------------------------------

@dataclass(slots=True)
class Step:
    """One node execution in the decision chain."""

    position: int
    node_id: str
    type: str | None
    attempt: int
    status: str | None
    started_at: datetime | None
    completed_at: datetime | None
    duration_ms: float | None
    model: str | None
    tokens: dict[str, int] | None
    input: Any
    output: Any
    evaluation: Any
    result: Any
    skipped_branches: list[Any]
    actions: list[Any]
    error: Any
    node_key: str | None
    event_id: str | None
    extra: dict[str, Any]
    #: The key id that signed the event this node execution came from (None: unsigned).
    signed_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "nodeId": self.node_id,
            "type": self.type,
            "attempt": self.attempt,
            "status": self.status,
            "startedAt": self.started_at,
            "completedAt": self.completed_at,
            "durationMs": self.duration_ms,
            "model": self.model,
            "tokens": self.tokens,
            "input": self.input,
            "output": self.output,
            "evaluation": self.evaluation,
            "result": self.result,
            "skippedBranches": self.skipped_branches,
            "actions": self.actions,
            "error": self.error,
            "nodeKey": self.node_key,
            "eventId": self.event_id,
            "signedBy": self.signed_by,
            "extra": self.extra,
        }


@dataclass(slots=True)
class Explanation:
    """Why a run did what it did: everything stored about it, in execution order."""

    workspace_id: str
    run_id: str
    workflow_id: str | None
    status: str | None
    started_at: datetime | None
    completed_at: datetime | None
    total_duration_ms: float | None
    trigger: Any
    error: Any
    summary: dict[str, Any]
    extra: dict[str, Any]
    steps: list[Step]
    redacted: bool
    source: str
    #: Node executions the run's index lists that have no stored trace (expired, archived).
    missing_nodes: list[dict[str, Any]] = field(default_factory=list)
    #: Run-level events that arrived signed: ``{"eventId", "keyId"}``, by key then event.
    signatures: list[dict[str, str]] = field(default_factory=list)
    #: Set when the run's personal fields were erased (``worker.erasure``): id, at, by, fields.
    erasure: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The stable machine form."""
        out: dict[str, Any] = jsonable({
            "explainVersion": EXPLAIN_VERSION,
            "source": self.source,
            "redacted": self.redacted,
            "run": {
                "workspaceId": self.workspace_id,
                "runId": self.run_id,
                "workflowId": self.workflow_id,
                "status": self.status,
                "startedAt": self.started_at,
                "completedAt": self.completed_at,
                "totalDurationMs": self.total_duration_ms,
                "trigger": self.trigger,
                "error": self.error,
                "summary": self.summary,
                "signedBy": self.signatures,
                "erasure": self.erasure,
                "extra": self.extra,
            },
            "nodes": [s.to_json() for s in self.steps],
            "decisions": [
                {"nodeId": s.node_id, "attempt": s.attempt, "evaluation": s.evaluation,
                 "result": s.result, "skippedBranches": s.skipped_branches}
                for s in self.steps if s.type == "conditional" or s.evaluation is not None
            ],
            "actions": [
                {"nodeId": s.node_id, "attempt": s.attempt, "action": a}
                for s in self.steps for a in s.actions
            ],
            "errors": self.errors(),
            "retries": self.retries(),
            "missingNodes": self.missing_nodes,
        })
        return out

    def errors(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for s in self.steps:
            if s.error is None and s.status != "failed":
                continue
            err = s.error if isinstance(s.error, Mapping) else {"message": s.error}
            out.append({"nodeId": s.node_id, "attempt": s.attempt, "type": err.get("type"),
                        "message": err.get("message"), "retries": err.get("retries")})
        if self.error is not None:
            err = self.error if isinstance(self.error, Mapping) else {"message": self.error}
            out.append({"nodeId": None, "attempt": None, "type": err.get("type"),
                        "message": err.get("message"), "retries": err.get("retries")})
        return out

    def retries(self) -> list[dict[str, Any]]:
        """Nodes that ran more than once, or that report retries in their error."""
        attempts: dict[str, list[int]] = {}
        reported: dict[str, int] = {}
        for s in self.steps:
            attempts.setdefault(s.node_id, []).append(s.attempt)
            if isinstance(s.error, Mapping) and isinstance(s.error.get("retries"), int):
                reported[s.node_id] = max(reported.get(s.node_id, 0), s.error["retries"])
        out = []
        for node_id, seen in attempts.items():
            if len(seen) > 1 or reported.get(node_id, 0) > 0:
                out.append({"nodeId": node_id, "attempts": sorted(seen),
                            "reportedRetries": reported.get(node_id, 0)})
        return out


def _time(value: Any) -> datetime | None:
    return value if isinstance(value, datetime) else None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def execution_order(nodes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Nodes by start time (completion time when unknown), attempt, node ID; untimed last."""
    far = datetime.max.replace(tzinfo=UTC)

    def key(doc: Mapping[str, Any]) -> tuple[bool, datetime, int, str]:
        when = _time(doc.get("startedAt")) or _time(doc.get("completedAt"))
        attempt = doc.get("attempt")
        return (when is None, when or far, attempt if isinstance(attempt, int) else 1,
                str(doc.get("nodeId")))

    return sorted(nodes, key=key)


def _tokens(doc: Mapping[str, Any]) -> dict[str, int] | None:
    raw = doc.get("tokens_used")
    if not isinstance(raw, Mapping):
        return None
    tokens = {k: v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}
    tokens["total"] = tokens.get("input", 0) + tokens.get("output", 0)
    return tokens


def _step(position: int, doc: Mapping[str, Any], show_prompts: bool) -> Step:
    attempt = doc.get("attempt")
    actions = doc.get("actions")
    branches = doc.get("skippedBranches")
    prompt = doc.get("input")
    return Step(
        position=position,
        node_id=str(doc.get("nodeId")),
        type=doc.get("type"),
        attempt=attempt if isinstance(attempt, int) else 1,
        status=doc.get("status"),
        started_at=_time(doc.get("startedAt")),
        completed_at=_time(doc.get("completedAt")),
        duration_ms=_number(doc.get("durationMs")),
        model=doc.get("model"),
        tokens=_tokens(doc),
        input=prompt if show_prompts else redact(prompt),
        output=doc.get("output"),
        evaluation=doc.get("evaluation"),
        result=doc.get("result"),
        skipped_branches=list(branches) if isinstance(branches, list) else [],
        actions=list(actions) if isinstance(actions, list) else [],
        error=doc.get("error"),
        node_key=doc.get("nodeKey"),
        event_id=doc.get("eventId"),
        extra={k: v for k, v in sorted(doc.items()) if k not in _NODE_KNOWN},
        signed_by=doc["signedBy"] if isinstance(doc.get("signedBy"), str) else None,
    )


def _signatures(run: Mapping[str, Any]) -> list[dict[str, str]]:
    """``signedBy`` of a run document (``keyId:eventId`` strings) as records."""
    raw = run.get("signedBy")
    out = []
    for item in raw if isinstance(raw, list) else ():
        key_id, sep, event_id = str(item).partition(":")
        if sep:
            out.append({"keyId": key_id, "eventId": event_id})
    return out


def build(workspace: str, run_id: str, run: Mapping[str, Any] | None,
          nodes: Sequence[Mapping[str, Any]], *, show_prompts: bool = False,
          source: str = "store") -> Explanation:
    """The explanation of one run from its stored documents (pure)."""
    run = run or {}
    ordered = execution_order(nodes)
    steps = [_step(i, doc, show_prompts) for i, doc in enumerate(ordered, start=1)]
    trigger = run.get("trigger")
    if not show_prompts and isinstance(trigger, Mapping) and "metadata" in trigger:
        trigger = dict(trigger, metadata=redact(trigger["metadata"]))
    workflow = run.get("workflowId") or next(
        (d.get("workflowId") for d in ordered if d.get("workflowId")), None)
    present = {d.get("nodeKey") for d in ordered}
    index = run.get("nodeIndex") if isinstance(run.get("nodeIndex"), Mapping) else {}
    missing = sorted((
        {"nodeKey": key, "nodeId": entry.get("nodeId"), "attempt": entry.get("attempt"),
         "type": entry.get("type"), "status": entry.get("status")}
        for key, entry in (index or {}).items()
        if key not in present and isinstance(entry, Mapping)
    ), key=lambda m: (str(m["nodeId"]), str(m["attempt"]), m["nodeKey"]))
    summary = run.get("summary")
    return Explanation(
        workspace_id=workspace,
        run_id=run_id,
        workflow_id=workflow,
        status=run.get("status"),
        started_at=_time(run.get("startedAt")),
        completed_at=_time(run.get("completedAt")),
        total_duration_ms=_number(run.get("totalDuration")),
        trigger=trigger,
        error=run.get("error"),
        summary=dict(summary) if isinstance(summary, Mapping) else {},
        extra={k: v for k, v in sorted(run.items()) if k not in _RUN_KNOWN},
        steps=steps,
        redacted=not show_prompts,
        source=source,
        missing_nodes=missing,
        signatures=_signatures(run),
        erasure=dict(run["erasure"]) if isinstance(run.get("erasure"), Mapping) else None,
    )


# -- terminal rendering ----------------------------------------------------------------------


# -- reading ---------------------------------------------------------------------------------

async def find_workspace(store: QueryStore, run_id: str) -> str | None:
    """The workspace holding ``run_id`` when none is given (an error if several do)."""
    found = [ws for ws in await store.workspaces() if await store.get_run(ws, run_id)]
    if len(found) > 1:
        raise AuditFleetError(f"run {run_id!r} exists in several workspaces "
                              f"({', '.join(sorted(found))}): pass --workspace")
    return found[0] if found else None


async def explain_run(store: QueryStore, workspace: str, run_id: str, *,
                      show_prompts: bool = False) -> Explanation | None:
    """The explanation of a run in hot storage, or None if nothing of it is stored."""
    run = await store.get_run(workspace, run_id)
    nodes = await store.get_nodes(workspace, run_id)
    if run is None and not nodes:
        return None
    return build(workspace, run_id, run, nodes, show_prompts=show_prompts)


#: Opens a run's sealed archive fields: called with the run ID, returns the record
#: opener (``worker.shredding.Opener.open``) built from the run's data keys.
KeysFor = Callable[[str], Awaitable["OpenDoc"]]


async def read_archived(archive: Archive, workspace: str, run_id: str,
                        keys: KeysFor | None = None) -> tuple[
        dict[str, Any] | None, list[dict[str, Any]], list[str]] | None:
    """A run read back from the archive (run doc, nodes, segments), or None.

    Personal fields sealed by retention (``worker.shredding``) are opened with the run's
    data keys, which ``keys`` loads only when the run holds sealed fields: they read as
    archived, or as ``{"erased": true, "at": ...}`` once erasure shredded their key.
    Without ``keys`` they stay sealed envelopes.
    """
    from .archive import read_run
    from .shredding import sealed_kids

    found = await read_run(archive, workspace, run_id)
    if found is None or keys is None:
        return found
    run, nodes, _ = found
    if not sealed_kids("run", run or {}) and not any(sealed_kids("node", n) for n in nodes):
        return found
    return await read_run(archive, workspace, run_id, await keys(run_id))


async def explain_archived(archive: Archive, workspace: str, run_id: str, *,
                           show_prompts: bool = False,
                           keys: KeysFor | None = None) -> Explanation | None:
    """The explanation of a run read back from the archive, or None if it holds none
    (sealed fields opened through ``keys``, as :func:`read_archived` says)."""
    found = await read_archived(archive, workspace, run_id, keys)
    if found is None:
        return None
    run, nodes, segments = found
    return build(workspace, run_id, run, nodes, show_prompts=show_prompts,
                 source="archive " + ", ".join(segments))
