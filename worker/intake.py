"""The hot path's decode: one typed parse of a stream entry into the document to store.

:func:`worker.events.decode` parses every event twice (into plain JSON values, the stored
document with unknown fields kept, and into the contract's Structs, which validate it) and
checks identifiers with regular expressions. Almost every event carries only the fields
the contract knows, so :func:`decode_doc` first tries one parse into *strict* mirrors of
those Structs (unknown fields refused, absent fields ``UNSET``, any-JSON fields such as
``input``, ``output``, ``metadata`` and ``error`` typed ``Any``) and renders the stored
document from that one parse. Identifiers are checked in Python (``isprintable()`` and
length, the regular expression only for what ``isprintable()`` refuses), and fields with
few distinct values (workspace, workflow, node type, status) once per distinct value.

Whatever the lean parse does not accept at once — unknown fields, any rule broken, a
nesting deep enough to need the depth check — goes to :func:`worker.events.decode`, so an
event gets exactly the verdict (reason and message) and the document it gets there. The
lean path only ever accepts what the contract accepts and renders the same document
(``tests/unit/test_intake_equivalence.py`` holds both to that over a generated corpus and
the hostile-input catalogue).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from . import events as ev

_Time = Annotated[datetime, Meta(tz=True)]
_OptTime = _Time | None | UnsetType
_Attempt = Annotated[int, Meta(ge=1, le=1_000_000)]
_Subjects = Annotated[list[Annotated[str, Meta(min_length=1, max_length=320)]],
                      Meta(max_length=100)]

_PRINTABLE: Final = re.compile(ev.PRINTABLE)
_WORKSPACE: Final = re.compile(ev.WORKSPACE_PATTERN)
_STATUS: Final = re.compile(r"\A[A-Za-z0-9_.-]{1,32}\Z")
_COUNT_MAX: Final = 2**63 - 1
#: Distinct low-cardinality values remembered as valid before the memory starts over.
_SEEN_MAX: Final = 4096


class _Node(Struct, forbid_unknown_fields=True):
    nodeId: str
    type: str
    startedAt: _OptTime = UNSET
    completedAt: _OptTime = UNSET
    attempt: _Attempt | UnsetType = UNSET
    input: Any = UNSET
    output: Any = UNSET
    model: str | UnsetType | None = UNSET
    tokens_used: Any = UNSET
    evaluation: Any = UNSET
    result: Any = UNSET
    skippedBranches: list[str] | UnsetType | None = UNSET
    actions: list[str | dict[str, Any]] | UnsetType | None = UNSET
    error: Any = UNSET


class _Event(Struct, forbid_unknown_fields=True, tag_field="type"):
    v: int
    eventId: str
    workspaceId: str
    workflowId: str
    runId: str
    ts: _Time


class _RunStarted(_Event, tag=ev.RUN_STARTED):
    trigger: Any = UNSET
    startedAt: _OptTime = UNSET
    subjects: _Subjects | UnsetType | None = UNSET


class _NodeCompleted(_Event, tag=ev.NODE_COMPLETED):
    node: _Node


class _NodeFailed(_Event, tag=ev.NODE_FAILED):
    node: _Node


class _Terminal(_Event):
    status: str | UnsetType = UNSET
    totalDuration: Any = UNSET
    error: Any = UNSET
    startedAt: _OptTime = UNSET
    completedAt: _OptTime = UNSET


class _RunCompleted(_Terminal, tag=ev.RUN_COMPLETED):
    pass


class _RunFailed(_Terminal, tag=ev.RUN_FAILED):
    pass


class _RunSnapshot(_Event, tag=ev.RUN_SNAPSHOT):
    trigger: Any = UNSET
    subjects: _Subjects | UnsetType | None = UNSET
    status: str | UnsetType | None = UNSET
    startedAt: _OptTime = UNSET
    completedAt: _OptTime = UNSET
    totalDuration: Any = UNSET
    error: Any = UNSET
    nodes: Annotated[list[_Node], Meta(max_length=ev.MAX_SNAPSHOT_NODES)] | UnsetType = UNSET


_Lean = _RunStarted | _NodeCompleted | _NodeFailed | _RunCompleted | _RunFailed | _RunSnapshot
_decoder = msgspec.json.Decoder(_Lean)
_to_builtins = msgspec.to_builtins
_TIMES: Final = (datetime,)


class _Refused(Exception):
    """The lean path does not accept the event at once: the full decode decides."""


def decode_doc(data: bytes, *, max_bytes: int) -> dict[str, Any]:
    """The document to store for one stream entry payload, or :class:`InvalidEvent` with
    the verdict :func:`worker.events.decode` gives it."""
    if len(data) <= max_bytes:
        try:
            return _lean(data)
        except (msgspec.DecodeError, RecursionError, OverflowError, _Refused):
            pass
    return ev.decode(data, max_bytes=max_bytes).doc


#: Any-JSON fields of a node, and of a run-level event: the only ones that can nest deep.
_NODE_ANY: Final = ("input", "output", "evaluation", "result", "error", "tokens_used",
                    "actions")
_RUN_ANY: Final = ("trigger", "error")
_CONTAINERS: Final = (dict, list)
#: Every byte but ``[`` and ``{``: what is left of a payload without them is its openers.
_NOT_OPENERS: Final = bytes(b for b in range(256) if b not in b"[{")
#: Above this size the containers of the any-JSON values are walked instead (a large
#: event is mostly prompt text, which a walk skips and a byte count does not).
_WALK_ABOVE: Final = 16 * 1024


def _check_depth(event: Any) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` (the event object is level 1): only the
    any-JSON values are walked, and only their containers (the other fields are typed
    and shallow)."""
    for name in _RUN_ANY:
        value = getattr(event, name, None)
        if type(value) in _CONTAINERS:
            _walk(value, 2)
    node = getattr(event, "node", None)
    if node is not None:
        for name in _NODE_ANY:
            value = getattr(node, name)
            if type(value) in _CONTAINERS:
                _walk(value, 3)
    for node in getattr(event, "nodes", None) or ():
        for name in _NODE_ANY:
            value = getattr(node, name)
            if type(value) in _CONTAINERS:
                _walk(value, 4)


def _walk(value: Any, level: int) -> None:
    stack: list[tuple[Any, int]] = [(value, level)]
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        if depth > ev.MAX_DEPTH:
            raise _Refused
        for child in item.values() if type(item) is dict else item:
            if type(child) in _CONTAINERS:
                push((child, depth + 1))


def _lean(data: bytes) -> dict[str, Any]:
    event: _Lean = _decoder.decode(data)
    if event.v != 1:
        raise _Refused
    _id(event.eventId)
    _id(event.runId)
    _seen_id(event.workflowId)
    if event.workspaceId not in _workspaces:
        if _WORKSPACE.search(event.workspaceId) is None:
            raise _Refused
        _remember(_workspaces, event.workspaceId)
    if isinstance(event, _NodeCompleted | _NodeFailed):
        _check_node(event.node)
    elif isinstance(event, _RunStarted):
        _check_trigger(event.trigger)
    elif isinstance(event, _RunSnapshot):
        _check_trigger(event.trigger)
        if isinstance(event.status, str):
            _status(event.status)
        _check_duration(event.totalDuration)
        if not isinstance(event.nodes, UnsetType):
            for node in event.nodes:
                _check_node(node)
    else:  # run.completed, run.failed
        if isinstance(event.status, str):
            if event.status == "running":
                raise _Refused
            _status(event.status)
        _check_duration(event.totalDuration)
    size = len(data)
    if size > 2 * ev.MAX_DEPTH:  # a level takes two bytes: a short event is not deep
        if size > _WALK_ABOVE:
            _check_depth(event)
        elif len(data.translate(None, _NOT_OPENERS)) > ev.MAX_DEPTH:
            raise _Refused  # perhaps deep: the full decode measures it
    doc: dict[str, Any] = _to_builtins(event, builtin_types=_TIMES)
    _utc_fields(doc, ev.RUN_TIME_FIELDS)
    if isinstance(event, _RunSnapshot):
        nodes = doc.get("nodes")
        if nodes is None:
            doc["nodes"] = []  # as the full decode renders a snapshot without nodes
        else:
            for node_doc in nodes:
                _node_doc(node_doc)
    elif isinstance(event, _NodeCompleted | _NodeFailed):
        _node_doc(doc["node"])
    return doc


def _node_doc(node: dict[str, Any]) -> None:
    if "attempt" not in node:
        node["attempt"] = 1
    _utc_fields(node, ev.NODE_TIME_FIELDS)


def _utc_fields(doc: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        value = doc.get(name)
        if value is not None and value.tzinfo is not UTC:
            doc[name] = value.astimezone(UTC)  # OverflowError: the full decode says why


def _id(value: str) -> None:
    """An identifier: 1-200 printable characters (``events.PRINTABLE``)."""
    if not (0 < len(value) <= 200 and (value.isprintable() or _PRINTABLE.search(value))):
        raise _Refused


_workspaces: set[str] = set()
_ids: set[str] = set()
_labels: set[str] = set()
_statuses: set[str] = set()


def _remember(seen: set[str], value: str) -> None:
    if len(seen) >= _SEEN_MAX:
        seen.clear()
    seen.add(value)


def _seen_id(value: str) -> None:
    if value not in _ids:
        _id(value)
        _remember(_ids, value)


def _status(value: str) -> None:
    if value not in _statuses:
        if _STATUS.search(value) is None:
            raise _Refused
        _remember(_statuses, value)


def _check_node(node: _Node) -> None:
    _id(node.nodeId)
    label = node.type
    if label not in _labels:
        if not (0 < len(label) <= 64 and (label.isprintable() or _PRINTABLE.search(label))):
            raise _Refused
        _remember(_labels, label)
    tokens = node.tokens_used
    if tokens is not UNSET and tokens is not None:
        if type(tokens) is not dict:
            raise _Refused
        for part in ("input", "output"):
            count = tokens.get(part, 0)
            if type(count) is not int or not 0 <= count <= _COUNT_MAX:
                raise _Refused
    error = node.error
    if error is not UNSET and error is not None:
        _object(error, ("type", "message"))
        retries = error.get("retries", 0)
        if type(retries) is not int or not 0 <= retries <= _COUNT_MAX:
            raise _Refused


def _object(value: Any, texts: tuple[str, ...]) -> None:
    """An object (unknown members allowed) whose ``texts`` are strings or null."""
    if type(value) is not dict:
        raise _Refused
    for part in texts:
        text = value.get(part)
        if text is not None and type(text) is not str:
            raise _Refused


def _check_trigger(trigger: Any) -> None:
    if trigger is UNSET or trigger is None:
        return
    _object(trigger, ("type", "source"))
    metadata = trigger.get("metadata")
    if metadata is not None and type(metadata) is not dict:
        raise _Refused


def _check_duration(value: Any) -> None:
    """``totalDuration``: a non-negative number (the full decode turns it into a float;
    the stored document keeps it as sent, and so does this one)."""
    if value is UNSET or value is None:
        return
    kind = type(value)
    if kind is float:
        if not value >= 0:
            raise _Refused
    elif kind is not int or not 0 <= value <= _COUNT_MAX:
        raise _Refused
