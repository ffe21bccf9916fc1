"""Pure parts of the MongoDB store: key escaping, database names and update pipelines.

Nothing here does I/O, so every rule is testable without a server.

Key escaping
    MongoDB interprets field names that start with ``$`` or contain ``.`` (operators
    and paths), and BSON cannot carry NUL in a field name. Every key of a stored
    document is escaped, at every depth, with ``%`` as the escape character:
    ``%`` -> ``%25``, ``$`` -> ``%24``, ``.`` -> ``%2E``, NUL -> ``%00``, the empty key
    -> ``%``, and at the top level of a document a leading ``_`` -> ``%5F`` (the store
    keeps ``_id`` and ``_payload`` there for itself). The mapping is injective, so
    :func:`unescape_doc` gives back exactly the keys that were written. Values are
    never escaped: inside update pipelines every value the store did not write itself
    is wrapped in ``$literal``, so a string such as ``"$where"`` stays a string.

Merge
    :func:`run_pipeline` and :func:`node_pipeline` are the update pipelines that
    implement :mod:`worker.documents` on the server: run fields merge by ``$min`` /
    ``$max`` / keep-existing, the status by ``(rank, name)``, ``nodeIndex`` per key,
    ``summary`` is recomputed from the merged ``nodeIndex``, ``eventIds`` is a sorted
    set union; a node document is replaced only by a greater ``(status rank, eventId)``.
    They use ``$sortArray`` (MongoDB 5.2 or newer).

Exact times
    BSON dates hold milliseconds; events carry microseconds. Beside each stored
    ``startedAt`` / ``completedAt`` date the store keeps ``_startedAtUs`` /
    ``_completedAtUs`` (int64 microseconds since the epoch), merged by the same
    ``$min`` / ``$max``. Flooring to milliseconds is monotonic, so the date always is
    the floor of its shadow; reads return the exact time, indexes use the date.
    :func:`time_range` and :func:`after` filter on both: the date narrows the index
    scan, the shadow decides exactly.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from ..documents import (
    COMPLETED,
    FAILED,
    RUNNING,
    SIGNED_BY,
    SUBJECTS,
    NodeDoc,
    RunPatch,
    status_rank,
)

#: Database names MongoDB keeps for itself.
RESERVED_DB_NAMES: Final = frozenset({"admin", "local", "config"})
#: Characters MongoDB refuses in a database name (any platform).
FORBIDDEN_DB_CHARS: Final = frozenset('/\\. "$*<>:|?\x00')
#: A database name must be shorter than 64 bytes.
MAX_DB_NAME_BYTES: Final = 63

RUNS: Final = "workflow_runs"
NODES: Final = "workflow_node_runs"
#: GridFS bucket for node payloads stored out of line.
PAYLOAD_BUCKET: Final = "node_payloads"
#: Field of a node document that points at its out-of-line payload.
PAYLOAD_FIELD: Final = "_payload"
#: Node fields kept inline when a payload moves out of line (queries and indexes use them).
PINNED_NODE_FIELDS: Final = frozenset({
    "workspaceId", "runId", "workflowId", "nodeKey", "nodeId", "attempt", "status", "eventId",
    "durationMs", "type", "startedAt", "completedAt", "model", "tokens_used",
})

#: Time fields and their exact (microsecond) shadows.
EXACT_TIMES: Final = (("startedAt", "_startedAtUs"), ("completedAt", "_completedAtUs"))
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)

_ESCAPES: Final = {"%": "%25", "$": "%24", ".": "%2E", "\x00": "%00"}
_NEEDS_ESCAPE: Final = re.compile(r"[%$.\x00]")
_ESCAPED: Final = re.compile(r"%([0-9A-Fa-f]{2})")


# --------------------------------------------------------------------------- names


def db_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a MongoDB database name, or None if it can."""
    if not name:
        return "the database name is empty"
    bad = sorted({ch for ch in name if ch in FORBIDDEN_DB_CHARS})
    if bad:
        shown = ", ".join(repr(ch) for ch in bad)
        return f"database name {name!r} contains characters MongoDB forbids ({shown})"
    size = len(name.encode())
    if size > MAX_DB_NAME_BYTES:
        return (f"database name {name!r} is {size} bytes; MongoDB allows at most "
                f"{MAX_DB_NAME_BYTES}")
    if name.lower() in RESERVED_DB_NAMES:
        return f"database name {name!r} is reserved by MongoDB"
    return None


def prefix_problem(prefix: str) -> str | None:
    """Why a database prefix cannot be used, or None."""
    bad = sorted({ch for ch in prefix if ch in FORBIDDEN_DB_CHARS})
    if bad:
        return f"AUDIT_MONGO_DB_PREFIX {prefix!r} contains forbidden characters {bad!r}"
    if len(prefix.encode()) > MAX_DB_NAME_BYTES - 1:
        return f"AUDIT_MONGO_DB_PREFIX {prefix!r} is too long"
    return None


# --------------------------------------------------------------------------- times


def micros(value: datetime | None) -> int | None:
    """Microseconds since the epoch of an aware datetime (naive ones are taken as UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def floor_ms(value: datetime) -> datetime:
    """The BSON date a datetime is stored as (milliseconds, rounded down)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def add_exact_times(stored: dict[str, Any], doc: Mapping[str, Any]) -> None:
    """Add the microsecond shadows of ``doc``'s time fields to a stored document."""
    for name, shadow in EXACT_TIMES:
        value = doc.get(name)
        if isinstance(value, datetime):
            stored[shadow] = micros(value)


def from_stored(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical document of a stored one: exact times, keys unescaped."""
    doc = unescape_doc(stored)
    for name, shadow in EXACT_TIMES:
        exact = stored.get(shadow)
        if isinstance(exact, int) and isinstance(doc.get(name), datetime):
            doc[name] = from_micros(exact)
    return doc


# --------------------------------------------------------------------------- escaping


def _escape_chars(key: str) -> str:
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group(0)], key)


def escape_key(key: str, *, top: bool = False) -> str:
    """The stored form of one field name (see the module docstring)."""
    if key == "":
        return "%"
    out = _escape_chars(key) if _NEEDS_ESCAPE.search(key) else key
    if top and out.startswith("_"):
        out = "%5F" + out[1:]
    return out


def unescape_key(key: str) -> str:
    """Inverse of :func:`escape_key`."""
    if "%" not in key:
        return key
    if key == "%":
        return ""
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), key)


def escape_value(value: Any) -> Any:
    """A value with every nested key escaped."""
    if isinstance(value, dict):
        return {escape_key(k): escape_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_value(v) for v in value]
    return value


def escape_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A top-level document with every key escaped (a leading ``_`` too)."""
    return {escape_key(k, top=True): escape_value(v) for k, v in doc.items()}


def unescape_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {unescape_key(k): unescape_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unescape_value(v) for v in value]
    return value


def unescape_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical document a stored one stands for: keys unescaped, store fields dropped."""
    return {unescape_key(k): unescape_value(v) for k, v in doc.items() if not _internal(k)}


def _internal(key: str) -> bool:
    return key.startswith("_")


# --------------------------------------------------------------------------- ids


def run_id_key(workspace: str, run_id: str, *, shared: bool) -> Any:
    """``_id`` of a run: the runId, or ``{workspaceId, runId}`` in a shared database."""
    return {"workspaceId": workspace, "runId": run_id} if shared else run_id


def node_id_key(workspace: str, node_key: str, *, shared: bool) -> Any:
    """``_id`` of a node execution: its deterministic key (runId, nodeId, attempt)."""
    return {"workspaceId": workspace, "nodeKey": node_key} if shared else node_key


def payload_file_id(workspace: str, node_key: str, event_id: str) -> str:
    """Deterministic GridFS file id of one node payload: redelivery finds the same file."""
    raw = f"{workspace}\x1f{node_key}\x1f{event_id}".encode()
    return "np-" + hashlib.blake2b(raw, digest_size=16).hexdigest()


# --------------------------------------------------------------------------- indexes


def run_indexes(shared: bool) -> list[list[tuple[str, int]]]:
    """The design's run indexes, in key order (prefixed by workspaceId when shared)."""
    specs = [[("workflowId", 1), ("startedAt", -1)], [("status", 1), ("startedAt", -1)],
             [("trigger.source", 1)], [("subjects", 1)]]
    return [([("workspaceId", 1)] if shared else []) + s for s in specs]


def node_indexes(shared: bool) -> list[list[tuple[str, int]]]:
    """The design's node-run indexes, in key order (prefixed by workspaceId when shared)."""
    specs = [[("runId", 1)], [("type", 1), ("startedAt", -1)]]
    return [([("workspaceId", 1)] if shared else []) + s for s in specs]


# --------------------------------------------------------------------------- pipelines


def lit(value: Any) -> dict[str, Any]:
    """A value the server must take as it is (never as an operator or a field path)."""
    return {"$literal": value}


def rank_expr(path: str, status: str) -> dict[str, Any]:
    """Rank of the status at ``status`` (an expression); -1 when ``path`` is missing."""
    return {"$switch": {
        "branches": [
            {"case": {"$eq": [{"$type": path}, "missing"]}, "then": -1},
            {"case": {"$eq": [status, RUNNING]}, "then": status_rank(RUNNING)},
            {"case": {"$eq": [status, COMPLETED]}, "then": status_rank(COMPLETED)},
            {"case": {"$eq": [status, FAILED]}, "then": status_rank(FAILED)},
        ],
        "default": status_rank("other"),
    }}


def _greater(rank: int, value: str, old_rank: Any, old_value: str) -> dict[str, Any]:
    """``(rank, value) > (old_rank, old_value)`` as an expression."""
    return {"$or": [
        {"$gt": [rank, old_rank]},
        {"$and": [{"$eq": [rank, old_rank]}, {"$gt": [lit(value), old_value]}]},
    ]}


def _index_entry_expr(key: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The merged entry: the new one if no entry is stored or the stored status ranks lower.

    Kept small (a snapshot may carry 10,000 nodes): with four ranks, "ranks lower" is
    membership in the lower ranks' statuses (failed: anything but failed).
    """
    path = f"$nodeIndex.{key}"
    status = str(entry["status"])
    rank = status_rank(status)
    new = lit(dict(entry))
    if rank == status_rank(RUNNING):
        return {"$ifNull": [path, new]}
    if rank == status_rank(FAILED):
        return {"$cond": [{"$ne": [path + ".status", FAILED]}, new, path]}
    lower = [RUNNING] if rank == status_rank(COMPLETED) else [RUNNING, COMPLETED]
    return {"$cond": [{"$in": [{"$ifNull": [path + ".status", RUNNING]}, lower]}, new, path]}


def _summary_expr() -> dict[str, Any]:
    entries = {"$map": {"input": {"$objectToArray": "$nodeIndex"}, "as": "kv", "in": "$$kv.v"}}

    def count(cond: dict[str, Any]) -> dict[str, Any]:
        return {"$size": {"$filter": {"input": "$$e", "as": "x", "cond": cond}}}

    return {"$let": {"vars": {"e": entries}, "in": {
        "nodesExecuted": {"$size": {"$setUnion": [
            {"$map": {"input": "$$e", "as": "x", "in": "$$x.nodeId"}}]}},
        "nodeExecutions": {"$size": "$$e"},
        "aiCallsMade": count({"$eq": ["$$x.type", "ai"]}),
        "actionsPerformed": {"$sortArray": {"input": {"$setUnion": [{"$reduce": {
            "input": "$$e", "initialValue": [],
            "in": {"$concatArrays": ["$$value", {"$ifNull": ["$$this.actions", []]}]},
        }}]}, "sortBy": 1}},
        "totalTokens": {"$sum": {"$map": {"input": "$$e", "as": "x", "in": "$$x.tokens"}}},
        "failedNodes": count({"$eq": ["$$x.status", FAILED]}),
    }}}


def run_pipeline(run: RunPatch) -> list[dict[str, Any]]:
    """The update pipeline that merges ``run`` into the stored run document."""
    status = run.status
    rank = status_rank(status)
    merged: dict[str, Any] = {
        "workspaceId": lit(run.workspace_id),
        "runId": lit(run.run_id),
        "workflowId": {"$ifNull": ["$workflowId", lit(run.workflow_id)]},
        "status": {"$let": {
            "vars": {"old": {"$ifNull": ["$status", lit(status)]}},
            "in": {"$cond": [_greater(rank, status, rank_expr("$$old", "$$old"), "$$old"),
                             lit(status), "$$old"]},
        }},
        "startedAt": {"$min": ["$startedAt", lit(run.started_at)]},
        "_startedAtUs": {"$min": ["$_startedAtUs", lit(micros(run.started_at))]},
        "completedAt": {"$max": ["$completedAt", lit(run.completed_at)]},
        "_completedAtUs": {"$max": ["$_completedAtUs", lit(micros(run.completed_at))]},
        "trigger": {"$ifNull": ["$trigger", lit(escape_value(run.trigger))]},
        "totalDuration": {"$max": ["$totalDuration", lit(run.total_duration)]},
        "error": {"$ifNull": ["$error", lit(escape_value(run.error))]},
    }
    for name, value in escape_doc(run.extra).items():
        # keep-existing, like dict.setdefault: a stored null is kept too
        merged[name] = {"$cond": [{"$eq": [{"$type": "$" + name}, "missing"]},
                                  lit(value), "$" + name]}
    index: Any = {"$ifNull": ["$nodeIndex", lit({})]}
    if run.node_index:
        index = {"$mergeObjects": [index, {
            key: _index_entry_expr(key, entry) for key, entry in sorted(run.node_index.items())
        }]}
    merged["nodeIndex"] = index
    merged["eventIds"] = {"$sortArray": {"input": {"$setUnion": [
        {"$ifNull": ["$eventIds", []]}, lit(sorted(run.event_ids))]}, "sortBy": 1}}
    for name, values in ((SIGNED_BY, run.signed_by), (SUBJECTS, run.subjects)):
        if values:  # absent until an event carrying one arrives
            merged[name] = {"$sortArray": {"input": {"$setUnion": [
                {"$ifNull": ["$" + name, []]}, lit(sorted(values))]}, "sortBy": 1}}
    return [{"$set": merged}, {"$set": {"summary": _summary_expr()}}]


def node_pipeline(node: NodeDoc, stored: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The update pipeline that replaces a node document only by a greater rank.

    ``stored`` is the escaped document to store, with its ``_id``.
    """
    rank, event_id = node.rank
    wins = _greater(rank, event_id, rank_expr("$status", "$status"), "$eventId")
    return [{"$replaceWith": {"$cond": [wins, lit(dict(stored)), "$$ROOT"]}}]


def split_payload(doc: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inline, out of line) parts of an escaped node document whose payload is too large."""
    inline = {k: v for k, v in doc.items() if k in PINNED_NODE_FIELDS or k.startswith("_")}
    rest = {k: v for k, v in doc.items() if k not in inline}
    return inline, rest


# -------------------------------------------------------------- query filters

def time_range(since: datetime | None,
               until: datetime | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Filters on a start time: (on the indexed date, on the exact microseconds).

    ``since`` is inclusive and ``until`` exclusive; the date bounds are widened to whole
    milliseconds so the index narrows the scan and the shadow decides exactly.
    """
    span: dict[str, Any] = {}
    exact: dict[str, Any] = {}
    if since is not None:
        span["$gte"] = floor_ms(since)
        exact["$gte"] = micros(since)
    if until is not None:
        span["$lte"] = floor_ms(until)
        exact["$lt"] = micros(until)
    return span or None, exact or None


def after(position: tuple[datetime | None, str]) -> dict[str, Any]:
    """Runs after ``(startedAt, runId)`` in the listing order (newest first, no start
    last, ties by runId): keyset pagination on the start index."""
    started, run_id = position
    if started is None:
        return {"startedAt": None, "runId": {"$gt": run_id}}
    us = micros(started)
    return {"$or": [{"startedAt": {"$lte": floor_ms(started)}, "_startedAtUs": {"$lt": us}},
                    {"_startedAtUs": us, "runId": {"$gt": run_id}},
                    {"startedAt": None}]}
