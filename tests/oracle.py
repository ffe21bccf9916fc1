"""The decode and coalesce of the worker before its hot path was made lean: an oracle.

``tests/unit/test_hot_path_equivalence.py`` runs these and the worker's own
(:func:`worker.writer.prepare`, :func:`worker.documents.coalesce_records`) over the same
entries and requires identical documents and dead-letter verdicts. Kept here, as they were,
only for that comparison.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from worker import constants as c
from worker import events as ev
from worker.deadletter import DeadLetter
from worker.documents import (
    _NOT_EXTRA,
    COMPLETED,
    FAILED,
    NODE_KEYS,
    RUNNING,
    SIGNED_BY,
    SUBJECTS,
    NodeDoc,
    RunPatch,
    WriteBatch,
    _min,
    index_entry,
    node_key,
    status_rank,
)
from worker.errors import InvalidEvent
from worker.redisio import Entry, dead_letter

_NODE_EVENTS = (ev.NodeCompleted, ev.NodeFailed)
_TERMINAL_EVENTS = (ev.RunCompleted, ev.RunFailed)


def prepare(entries: Sequence[Entry], max_bytes: int,
            max_deliveries: int) -> tuple[list[tuple[int, ev.Decoded]], list[DeadLetter]]:
    """The worker's decode of a batch (unsigned), as it was."""
    valid: list[tuple[int, ev.Decoded]] = []
    dead: list[DeadLetter] = []
    for index, entry in enumerate(entries):
        if entry.deliveries > max_deliveries:
            dead.append(dead_letter(entry, c.Reason.MAX_DELIVERIES,
                                    f"delivered {entry.deliveries} times "
                                    f"(AUDIT_MAX_DELIVERIES={max_deliveries})"))
            continue
        if entry.payload is None:
            dead.append(dead_letter(entry, c.Reason.MISSING_FIELD,
                                    f"entry has no {c.EVENT_FIELD!r} field"))
            continue
        if entry.extra_payloads:
            dead.append(dead_letter(entry, c.Reason.DUPLICATE_FIELD,
                                    f"entry has {1 + len(entry.extra_payloads)} "
                                    f"{c.EVENT_FIELD!r} fields: ambiguous, none is stored"))
            continue
        try:
            decoded = ev.decode(entry.payload, max_bytes=max_bytes)
        except InvalidEvent as exc:
            dead.append(dead_letter(entry, exc.reason, exc.detail))
            continue
        valid.append((index, decoded))
    return valid, dead


def _node_status(node: Mapping[str, Any], default: str) -> str:
    status = node.get("status")
    if isinstance(status, str) and status:
        return status
    return FAILED if node.get("error") else default


def _node_doc(event_doc: Mapping[str, Any], node: Mapping[str, Any], status: str,
              extra: Mapping[str, Any], source: int, key_id: str | None) -> NodeDoc:
    attempt = int(node.get("attempt", 1))
    workspace_id = event_doc["workspaceId"]
    run_id = event_doc["runId"]
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
    doc["workspaceId"] = workspace_id
    doc["runId"] = run_id
    doc["workflowId"] = event_doc["workflowId"]
    doc["nodeKey"] = key
    doc["attempt"] = attempt
    doc["status"] = status
    doc["eventId"] = event_doc["eventId"]
    doc["durationMs"] = duration
    if key_id is not None:
        doc[SIGNED_BY] = key_id
    elif SIGNED_BY in doc:
        del doc[SIGNED_BY]
    return NodeDoc(workspace_id, run_id, key, doc, [source])


def patches(decoded: ev.Decoded, source: int) -> tuple[RunPatch, list[NodeDoc]]:
    """The run patch and node documents one event stands for."""
    event, doc = decoded.event, decoded.doc
    ts: datetime = doc["ts"]
    run = RunPatch(event.workspaceId, event.runId, event.workflowId, sources=[source])
    extra = ({} if doc.keys() <= _NOT_EXTRA
             else {k: v for k, v in doc.items() if k not in _NOT_EXTRA})
    nodes: list[NodeDoc] = []
    if isinstance(event, _NODE_EVENTS):
        status = _node_status(doc["node"], COMPLETED if isinstance(event, ev.NodeCompleted)
                              else FAILED)
        if isinstance(event, ev.NodeFailed):
            status = FAILED if status == COMPLETED else status
        node = _node_doc(doc, doc["node"], status, extra, source, decoded.key_id)
        nodes.append(node)
        run.node_index[node.node_key] = index_entry(node.doc, status)
        run.started_at = doc["node"].get("startedAt") or doc["node"].get("completedAt") or ts
        return run, nodes
    run.extra = extra
    run.event_ids.add(event.eventId)
    if decoded.key_id is not None:
        run.signed_by.add(f"{decoded.key_id}:{event.eventId}")
    run.started_at = doc.get("startedAt")
    if isinstance(event, ev.RunStarted | ev.RunSnapshot) and event.subjects:
        run.subjects = set(doc.get(SUBJECTS) or ())
    if isinstance(event, ev.RunStarted):
        run.trigger = doc.get("trigger")
        run.started_at = run.started_at or ts
    elif isinstance(event, _TERMINAL_EVENTS):
        run.status = event.status
        run.completed_at = doc.get("completedAt") or ts
        run.total_duration = event.totalDuration
        run.error = doc.get("error")
    else:  # run.snapshot
        run.trigger = doc.get("trigger")
        run.status = event.status or RUNNING
        run.total_duration = event.totalDuration
        run.error = doc.get("error")
        if run.status != RUNNING:
            run.completed_at = doc.get("completedAt") or ts
        for raw_node in doc.get("nodes") or ():
            node = _node_doc(doc, raw_node, _node_status(raw_node, COMPLETED), {}, source,
                             decoded.key_id)
            nodes.append(node)
            entry = index_entry(node.doc, node.status)
            mine = run.node_index.get(node.node_key)
            if mine is None or status_rank(entry["status"]) > status_rank(mine["status"]):
                run.node_index[node.node_key] = entry
            node_start = raw_node.get("startedAt") or raw_node.get("completedAt")
            run.started_at = _min(run.started_at, node_start)
        run.started_at = run.started_at or ts
    return run, nodes


def coalesce(items: Iterable[tuple[int, ev.Decoded]]) -> WriteBatch:
    """Per-event patches merged pairwise into one write batch, as it was."""
    batch = WriteBatch()
    for source, decoded in items:
        run, nodes = patches(decoded, source)
        batch.add(run, nodes)
    return batch
