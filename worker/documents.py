"""The stored documents and their merge: the pure, store-neutral specification.

A run is stored as one ``workflow_runs`` document and one ``workflow_node_runs``
document per node execution. Every event is turned into a *patch* of those
documents, and patches are combined with a join that is commutative, associative
and idempotent (a semilattice), so replaying any subset of events, any number of
times, in any order, in any batches, on any worker yields the same documents.
Each store implements exactly this merge natively (SQL or update pipelines); the
conformance suite checks every store against :func:`fold`.

Run merge rules:

- ``startedAt`` is the earliest time seen, ``completedAt`` the latest terminal time;
- ``status`` is the highest-ranked: ``running`` < ``completed`` < other terminal
  statuses < ``failed``, ties broken by name, so a terminal status never reverts;
- ``totalDuration`` is the largest reported;
- ``trigger``, ``error``, ``workflowId`` and unknown fields keep the first value
  stored (events of one run do not contradict each other; if they do, the stored
  value is the one that landed first);
- ``nodeIndex`` maps each node execution's key to what the summary needs and is
  merged per key (the higher node status wins); ``summary`` is derived from it,
  never incremented, so redelivery cannot double-count;
- ``eventIds`` is the set of run-level event IDs that contributed;
- ``subjects`` (only on runs tagged with data subjects) is the set union of the keyed
  subject hashes of its ``run.started`` and ``run.snapshot`` events (``worker.erasure``);
- ``signedBy`` (only on runs with signed events) is the set of ``<keyId>:<eventId>`` of
  the run-level events that arrived signed (``worker.signing``), a set union like
  ``eventIds``.

Node documents of signed events carry ``signedBy``, the key id (set by the pipeline:
an event cannot claim it).

A node document is replaced only by one with a greater ``(status rank, eventId)``,
so the same node execution delivered twice, or from a snapshot and an event, ends
as the same document whatever the order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from . import events as ev

RUNNING: Final = "running"
COMPLETED: Final = "completed"
FAILED: Final = "failed"

#: Run-level keys with their own merge rule; every other top-level key is "extra".
RUN_FIELDS: Final = frozenset({
    "workspaceId", "runId", "workflowId", "status", "startedAt", "completedAt", "trigger",
    "totalDuration", "error", "summary", "nodeIndex", "eventIds", "signedBy", "subjects",
})
#: Envelope keys of an event that are not stored as extra fields.
ENVELOPE: Final = frozenset({"v", "eventId", "type", "ts", "node", "nodes"})
#: Keys of an event document that are not extra run fields.
_NOT_EXTRA: Final = RUN_FIELDS | ENVELOPE
#: Keys the pipeline sets on a node document (they override the payload's own).
NODE_KEYS: Final = frozenset({
    "workspaceId", "runId", "workflowId", "nodeKey", "nodeId", "attempt", "status", "eventId",
    "durationMs", "signedBy", "subjects",
})
#: The field naming the key that signed an event (run: a set of ``keyId:eventId``).
SIGNED_BY: Final = "signedBy"
#: The run field holding the keyed hashes of its data subjects (``worker.erasure``).
SUBJECTS: Final = "subjects"


_NODE_EVENTS: Final = (ev.NodeCompleted, ev.NodeFailed)
_TERMINAL_EVENTS: Final = (ev.RunCompleted, ev.RunFailed)


def status_rank(status: str) -> int:
    """Order of statuses for the merge: running < completed < other < failed."""
    if status == RUNNING:
        return 0
    if status == COMPLETED:
        return 1
    if status == FAILED:
        return 3
    return 2


def node_key(run_id: str, node_id: str, attempt: int) -> str:
    """Deterministic key of one node execution (hex, safe as a field name and an _id)."""
    raw = f"{run_id}\x1f{node_id}\x1f{attempt}".encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def action_name(action: Any) -> str | None:
    """How the summary names an action: a string as is; an object by its ``type``, else
    ``system.operation`` (or whichever of the two it has), else its ``name``; else None.
    """
    if isinstance(action, str):
        return action or None
    if type(action) is not dict and not isinstance(action, Mapping):
        return None
    kind = action.get("type")
    if isinstance(kind, str) and kind:
        return kind
    parts = [p for p in (action.get("system"), action.get("operation"))
             if isinstance(p, str) and p]
    if parts:
        return ".".join(parts)
    name = action.get("name")
    return name if isinstance(name, str) and name else None


def node_tokens(node: Mapping[str, Any]) -> int:
    tokens = node.get("tokens_used")
    if tokens is None or (type(tokens) is not dict and not isinstance(tokens, Mapping)):
        return 0
    total = 0
    for part in ("input", "output"):
        value = tokens.get(part)
        if isinstance(value, int) and not isinstance(value, bool):
            total += value
    return total


def summarize(node_index: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The run summary, derived from the node index (never incremented)."""
    entries = list(node_index.values())
    actions: set[str] = set()
    for entry in entries:
        actions.update(entry.get("actions") or ())
    return {
        "nodesExecuted": len({e["nodeId"] for e in entries}),
        "nodeExecutions": len(entries),
        "aiCallsMade": sum(1 for e in entries if e.get("type") == "ai"),
        "actionsPerformed": sorted(actions),
        "totalTokens": sum(int(e.get("tokens") or 0) for e in entries),
        "failedNodes": sum(1 for e in entries if e.get("status") == FAILED),
    }


def _min(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _max(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _pick_status(a: str, b: str) -> str:
    if a == b:
        return a
    return max((status_rank(a), a), (status_rank(b), b))[1]


@dataclass(slots=True)
class RunPatch:
    """What some events say about one run. ``sources`` are the indices of its events'
    entries in their batch."""

    workspace_id: str
    run_id: str
    workflow_id: str
    status: str = RUNNING
    started_at: datetime | None = None
    completed_at: datetime | None = None
    trigger: Any = None
    total_duration: float | None = None
    error: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    node_index: dict[str, dict[str, Any]] = field(default_factory=dict)
    event_ids: set[str] = field(default_factory=set)
    sources: list[int] = field(default_factory=list)
    signed_by: set[str] = field(default_factory=set)
    subjects: set[str] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, str]:
        return (self.workspace_id, self.run_id)

    def merge(self, other: RunPatch) -> None:
        """Join ``other`` into this patch (self is the value already stored)."""
        self.status = _pick_status(self.status, other.status)
        self.started_at = _min(self.started_at, other.started_at)
        self.completed_at = _max(self.completed_at, other.completed_at)
        if self.trigger is None:
            self.trigger = other.trigger
        self.total_duration = _max(self.total_duration, other.total_duration)
        if self.error is None:
            self.error = other.error
        for name, value in other.extra.items():
            self.extra.setdefault(name, value)
        for key, entry in other.node_index.items():
            mine = self.node_index.get(key)
            if mine is None or status_rank(entry["status"]) > status_rank(mine["status"]):
                self.node_index[key] = entry
        self.event_ids |= other.event_ids
        if other.signed_by:
            self.signed_by |= other.signed_by
        if other.subjects:
            self.subjects |= other.subjects
        self.sources.extend(other.sources)

    def to_doc(self) -> dict[str, Any]:
        """The canonical ``workflow_runs`` document (what every store returns)."""
        doc = dict(self.extra)
        doc.update(
            workspaceId=self.workspace_id,
            runId=self.run_id,
            workflowId=self.workflow_id,
            status=self.status,
            startedAt=self.started_at,
            completedAt=self.completed_at,
            trigger=self.trigger,
            totalDuration=self.total_duration,
            error=self.error,
            summary=summarize(self.node_index),
            nodeIndex={k: dict(v) for k, v in sorted(self.node_index.items())},
            eventIds=sorted(self.event_ids),
        )
        if self.signed_by:
            doc[SIGNED_BY] = sorted(self.signed_by)
        if self.subjects:
            doc[SUBJECTS] = sorted(self.subjects)
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> RunPatch:
        """Rebuild the patch a stored run document stands for (restore, tests)."""
        return cls(
            workspace_id=doc["workspaceId"],
            run_id=doc["runId"],
            workflow_id=doc["workflowId"],
            status=doc.get("status") or RUNNING,
            started_at=doc.get("startedAt"),
            completed_at=doc.get("completedAt"),
            trigger=doc.get("trigger"),
            total_duration=doc.get("totalDuration"),
            error=doc.get("error"),
            extra={k: v for k, v in doc.items() if k not in RUN_FIELDS},
            node_index={k: dict(v) for k, v in (doc.get("nodeIndex") or {}).items()},
            event_ids=set(doc.get("eventIds") or ()),
            signed_by=set(doc.get(SIGNED_BY) or ()),
            subjects=set(doc.get(SUBJECTS) or ()),
        )


@dataclass(slots=True)
class NodeDoc:
    """One node execution's ``workflow_node_runs`` document."""

    workspace_id: str
    run_id: str
    node_key: str
    doc: dict[str, Any]
    sources: list[int] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.workspace_id, self.run_id, self.node_key)

    @property
    def node_id(self) -> str:
        return str(self.doc["nodeId"])

    @property
    def attempt(self) -> int:
        return int(self.doc["attempt"])

    @property
    def status(self) -> str:
        return str(self.doc["status"])

    @property
    def event_id(self) -> str:
        return str(self.doc["eventId"])

    @property
    def rank(self) -> tuple[int, str]:
        """Replacement order: a stored document is replaced only by a greater rank."""
        return (status_rank(self.status), self.event_id)

    def merge(self, other: NodeDoc) -> None:
        if other.rank > self.rank:
            self.doc = other.doc
        self.sources.extend(other.sources)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> NodeDoc:
        return cls(doc["workspaceId"], doc["runId"], doc["nodeKey"], dict(doc))


def index_entry(node: Mapping[str, Any], status: str) -> dict[str, Any]:
    """What the run document keeps about one node execution."""
    actions = node.get("actions")
    return {
        "nodeId": node["nodeId"],
        "attempt": node.get("attempt", 1),
        "type": node.get("type"),
        "status": status,
        "tokens": node_tokens(node),
        "actions": sorted({n for n in map(action_name, actions) if n}) if actions else [],
    }


#: One valid event on the hot path: its source (the index of its entry in the batch), the
#: document to store (:func:`worker.intake.decode_doc`) and the id of the key that signed
#: it (or None).
Record = tuple[int, dict[str, Any], str | None]


def _node_status(node: Mapping[str, Any], default: str) -> str:
    status = node.get("status")
    if isinstance(status, str) and status:
        return status
    return FAILED if node.get("error") else default


#: One node execution of an event: (key, document, status, replacement rank).
_NodePart = tuple[str, dict[str, Any], str, tuple[int, str]]


def _node_part(event_doc: Mapping[str, Any], node: Mapping[str, Any], status: str,
               extra: Mapping[str, Any], key_id: str | None) -> _NodePart:
    attempt = int(node.get("attempt", 1))
    run_id = event_doc["runId"]
    event_id = event_doc["eventId"]
    key = node_key(run_id, node["nodeId"], attempt)
    if extra:
        doc = {k: v for k, v in extra.items() if k not in NODE_KEYS}
        doc.update(node)
    else:
        doc = dict(node)
    started, completed = node.get("startedAt"), node.get("completedAt")
    duration = None
    if isinstance(started, datetime) and isinstance(completed, datetime):
        duration = round((completed - started).total_seconds() * 1000, 3)
    # Item by item, in this order (the stored key order): cheaper than update(**fields).
    doc["workspaceId"] = event_doc["workspaceId"]
    doc["runId"] = run_id
    doc["workflowId"] = event_doc["workflowId"]
    doc["nodeKey"] = key
    doc["attempt"] = attempt
    doc["status"] = status
    doc["eventId"] = event_id
    doc["durationMs"] = duration
    if key_id is not None:
        doc[SIGNED_BY] = key_id
    elif SIGNED_BY in doc:
        del doc[SIGNED_BY]  # only the pipeline says who signed
    return key, doc, status, (status_rank(status), event_id)


#: What one run-level event says about its run: status, started, completed, trigger,
#: total duration, error, extra fields, event id, signed-by entry, subjects.
_RunPart = tuple[str, Any, Any, Any, Any, Any, dict[str, Any], str, str | None, Any]


def _parts(record: Record) -> tuple[_RunPart | None, Any, list[_NodePart]]:
    """What one event contributes (pure; raises on a document it cannot read): the run
    part (None for a node event), the start time a node event gives its run, and the
    node executions."""
    _, doc, key_id = record
    kind = doc["type"]
    ts: datetime = doc["ts"]
    # Most events carry no unknown top-level field: a C-level subset test skips the scan.
    extra = ({} if doc.keys() <= _NOT_EXTRA
             else {k: v for k, v in doc.items() if k not in _NOT_EXTRA})
    if kind == ev.NODE_COMPLETED or kind == ev.NODE_FAILED:
        node = doc["node"]
        if kind == ev.NODE_COMPLETED:
            status = _node_status(node, COMPLETED)
        else:
            status = _node_status(node, FAILED)
            status = FAILED if status == COMPLETED else status
        started = node.get("startedAt") or node.get("completedAt") or ts
        return None, started, [_node_part(doc, node, status, extra, key_id)]
    event_id = doc["eventId"]
    signed = None if key_id is None else f"{key_id}:{event_id}"
    started = doc.get("startedAt")
    subjects = doc.get(SUBJECTS) if kind != ev.RUN_COMPLETED and kind != ev.RUN_FAILED else None
    nodes: list[_NodePart] = []
    completed = trigger = duration = error = None
    if kind == ev.RUN_STARTED:
        status = RUNNING
        trigger = doc.get("trigger")
        started = started or ts
    elif kind == ev.RUN_COMPLETED or kind == ev.RUN_FAILED:
        status = doc.get("status", COMPLETED if kind == ev.RUN_COMPLETED else FAILED)
        completed = doc.get("completedAt") or ts
        duration = _duration(doc)
        error = doc.get("error")
    elif kind == ev.RUN_SNAPSHOT:
        trigger = doc.get("trigger")
        status = doc.get("status") or RUNNING
        duration = _duration(doc)
        error = doc.get("error")
        if status != RUNNING:
            completed = doc.get("completedAt") or ts
        for raw_node in doc.get("nodes") or ():
            nodes.append(_node_part(doc, raw_node, _node_status(raw_node, COMPLETED), {},
                                    key_id))
            started = _min(started, raw_node.get("startedAt") or raw_node.get("completedAt"))
        started = started or ts
    else:
        raise ValueError(f"not an event type: {kind!r}")
    return ((status, started, completed, trigger, duration, error, extra, event_id, signed,
             subjects), None, nodes)


def _duration(doc: Mapping[str, Any]) -> float | None:
    """``totalDuration`` as the contract reads it: a float (the document keeps it as sent)."""
    value = doc.get("totalDuration")
    return None if value is None else float(value)


class Coalescer:
    """Events of one batch folded into one accumulator per run and one per node execution
    (what :meth:`RunPatch.merge` and :meth:`NodeDoc.merge` would give, without a patch
    object per event); :meth:`batch` builds the write batch."""

    __slots__ = ("index", "nodes", "runs")

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], RunPatch] = {}
        #: Node execution key -> [rank, document, sources].
        self.nodes: dict[tuple[str, str, str], list[Any]] = {}
        #: Run key -> node key -> (status rank, node document, status) of the index entry.
        self.index: dict[tuple[str, str], dict[str, tuple[int, dict[str, Any], str]]] = {}

    def add(self, record: Record) -> None:
        """Coalesce one event (:meth:`merge` of its :func:`_parts`)."""
        self.merge(record, _parts(record))

    def merge(self, record: Record,
              parts: tuple[_RunPart | None, Any, list[_NodePart]]) -> None:
        source, doc, _ = record
        part, node_started, nodes = parts
        workspace_id = doc["workspaceId"]
        run_id = doc["runId"]
        key = (workspace_id, run_id)
        run = self.runs.get(key)
        if run is None:
            run = self.runs[key] = RunPatch(workspace_id, run_id, doc["workflowId"])
            index = self.index[key] = {}
        else:
            index = self.index[key]
        run.sources.append(source)
        if part is None:
            run.started_at = _min(run.started_at, node_started)
        else:
            (status, started, completed, trigger, duration, error, extra, event_id, signed,
             subjects) = part
            if status != run.status:
                run.status = _pick_status(run.status, status)
            run.started_at = _min(run.started_at, started)
            run.completed_at = _max(run.completed_at, completed)
            if run.trigger is None:
                run.trigger = trigger
            run.total_duration = _max(run.total_duration, duration)
            if run.error is None:
                run.error = error
            if extra:
                mine = run.extra
                for name, value in extra.items():
                    mine.setdefault(name, value)
            run.event_ids.add(event_id)
            if signed is not None:
                run.signed_by.add(signed)
            if subjects:
                run.subjects.update(subjects)
        all_nodes = self.nodes
        for nkey, ndoc, nstatus, rank in nodes:
            have = index.get(nkey)
            if have is None or rank[0] > have[0]:
                index[nkey] = (rank[0], ndoc, nstatus)
            full = (workspace_id, run_id, nkey)
            held = all_nodes.get(full)
            if held is None:
                all_nodes[full] = [rank, ndoc, [source]]
            else:
                if rank > held[0]:
                    held[0] = rank
                    held[1] = ndoc
                held[2].append(source)

    def batch(self) -> WriteBatch:
        out = WriteBatch()
        for key, run in self.runs.items():
            run.node_index = {nkey: index_entry(ndoc, status)
                              for nkey, (_, ndoc, status) in self.index[key].items()}
            out.runs[key] = run
        out.nodes = {key: NodeDoc(key[0], key[1], key[2], ndoc, sources)
                     for key, (_, ndoc, sources) in self.nodes.items()}
        return out


@dataclass(slots=True)
class WriteBatch:
    """Per-run write sets of one batch: one upsert per run and one per node execution."""

    runs: dict[tuple[str, str], RunPatch] = field(default_factory=dict)
    nodes: dict[tuple[str, str, str], NodeDoc] = field(default_factory=dict)

    def add(self, run: RunPatch, nodes: Iterable[NodeDoc]) -> None:
        mine = self.runs.get(run.key)
        if mine is None:
            self.runs[run.key] = run
        else:
            mine.merge(run)
        for node in nodes:
            have = self.nodes.get(node.key)
            if have is None:
                self.nodes[node.key] = node
            else:
                have.merge(node)

    def __len__(self) -> int:
        return len(self.runs) + len(self.nodes)

    def sources(self) -> set[int]:
        out: set[int] = set()
        for run in self.runs.values():
            out.update(run.sources)
        for node in self.nodes.values():
            out.update(node.sources)
        return out

    def split_by_run(self) -> list[WriteBatch]:
        """One batch per run, to isolate a write the store rejects."""
        parts: dict[tuple[str, str], WriteBatch] = {}
        for key, run in self.runs.items():
            parts.setdefault(key, WriteBatch()).runs[key] = run
        for nkey, node in self.nodes.items():
            parts.setdefault((nkey[0], nkey[1]), WriteBatch()).nodes[nkey] = node
        return list(parts.values())

    def workspaces(self) -> set[str]:
        return {k[0] for k in self.runs}


def coalesce_records(records: Iterable[Record]) -> WriteBatch:
    """Coalesce valid events into one write batch."""
    acc = Coalescer()
    for record in records:
        acc.add(record)
    return acc.batch()


def coalesce(items: Iterable[tuple[int, ev.Decoded]]) -> WriteBatch:
    """Coalesce decoded events (with their sources) into one write batch."""
    return coalesce_records((source, d.doc, d.key_id) for source, d in items)


def coalesce_each(records: Sequence[Record]) -> tuple[WriteBatch, dict[int, Exception]]:
    """:func:`coalesce_records`, with each event's failure its own: the batch of every
    event that coalesced, and the exception of each (by source) that did not.

    An exception while merging an event into the accumulators may have changed them, so
    the batch is then built again without that event.
    """
    failed: dict[int, Exception] = {}
    while True:
        acc = Coalescer()
        culprit: int | None = None
        for record in records:
            source = record[0]
            if source in failed:
                continue
            try:
                parts = _parts(record)
            except Exception as exc:
                failed[source] = exc
                continue
            try:
                acc.merge(record, parts)
            except Exception as exc:
                failed[source] = exc
                culprit = source
                break
        if culprit is None:
            return acc.batch(), failed


def fold(items: Iterable[ev.Decoded]) -> tuple[dict[tuple[str, str], dict[str, Any]],
                                               dict[tuple[str, str, str], dict[str, Any]]]:
    """The documents a set of events must end as: the reference for every store."""
    batch = coalesce((0, d) for d in items)
    runs = {k: r.to_doc() for k, r in batch.runs.items()}
    nodes = {k: n.doc for k, n in batch.nodes.items()}
    return runs, nodes
