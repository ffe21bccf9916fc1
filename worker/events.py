"""The event contract (v1): msgspec Structs, decoding and validation at the edge.

An event is validated against its Struct, but what is stored is the event's own
JSON object (with times normalised to UTC datetimes), so fields this version does
not know are kept: the schema grows without migrations.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta, Struct

from .constants import SCHEMA_VERSION, Reason
from .errors import InvalidEvent

#: What "printable" excludes: C0/C1 control characters and DEL, the Unicode line and
#: paragraph separators, and the bidirectional formatting characters (which reorder what
#: a terminal or a log viewer shows). Every rule is anchored with ``\A`` and ``\Z``:
#: ``$`` alone also matches before a final newline (msgspec applies ``re.search``).
NOT_PRINTABLE: Final = r"\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
PRINTABLE: Final = rf"\A[^{NOT_PRINTABLE}]+\Z"
WORKSPACE_PATTERN: Final = r"\A[A-Za-z0-9_-]{1,48}\Z"

#: 1-200 printable characters.
Id = Annotated[str, Meta(min_length=1, max_length=200, pattern=PRINTABLE)]
WorkspaceId = Annotated[str, Meta(pattern=WORKSPACE_PATTERN)]
Label = Annotated[str, Meta(min_length=1, max_length=64, pattern=PRINTABLE)]
Status = Annotated[str, Meta(pattern=r"\A[A-Za-z0-9_.-]{1,32}\Z")]
Time = Annotated[datetime, Meta(tz=True)]
#: A count (tokens, retries): a non-negative 64-bit integer, which every store holds exactly.
Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Attempt = Annotated[int, Meta(ge=1, le=1_000_000)]
Duration = Annotated[float, Meta(ge=0)]
#: Data-subject identifiers of a run (``email:lead@example.com``): stored only as keyed
#: hashes (``worker.erasure``), so erasure can find the subject's runs.
Subjects = Annotated[list[Annotated[str, Meta(min_length=1, max_length=320)]],
                     Meta(max_length=100)]

MAX_SNAPSHOT_NODES: Final = 10_000
#: Deepest nesting of arrays and objects accepted (the event object itself is level 1).
#: A fixed limit, so acceptance never depends on how deep the decoder's caller runs.
MAX_DEPTH: Final = 500
_TOO_DEEP: Final = f"JSON is nested deeper than {MAX_DEPTH} levels"

RUN_STARTED: Final = "run.started"
NODE_COMPLETED: Final = "node.completed"
NODE_FAILED: Final = "node.failed"
RUN_COMPLETED: Final = "run.completed"
RUN_FAILED: Final = "run.failed"
RUN_SNAPSHOT: Final = "run.snapshot"

#: Node fields holding times, normalised to UTC datetimes when stored.
NODE_TIME_FIELDS: Final = ("startedAt", "completedAt")
#: Run-level fields holding times.
RUN_TIME_FIELDS: Final = ("ts", "startedAt", "completedAt")


class Tokens(Struct, frozen=True):
    input: Count = 0
    output: Count = 0


class ErrorInfo(Struct, frozen=True):
    type: str | None = None
    message: str | None = None
    retries: Count = 0


class Trigger(Struct, frozen=True):
    type: str | None = None
    source: str | None = None
    metadata: dict[str, Any] | None = None


class Node(Struct, frozen=True):
    """One node execution. ``(runId, nodeId, attempt)`` identifies it."""

    nodeId: Id
    type: Label
    startedAt: Time | None = None
    completedAt: Time | None = None
    attempt: Attempt = 1
    input: Any = None
    output: Any = None
    model: str | None = None
    tokens_used: Tokens | None = None
    evaluation: Any = None
    result: Any = None
    skippedBranches: list[str] | None = None
    #: External side effects, stored as sent: a name or any object (see
    #: :func:`worker.documents.action_name` for how the summary names them).
    actions: list[str | dict[str, Any]] | None = None
    error: ErrorInfo | None = None


class _Event(Struct, frozen=True, tag_field="type"):
    v: int
    eventId: Id
    workspaceId: WorkspaceId
    workflowId: Id
    runId: Id
    ts: Time


class RunStarted(_Event, frozen=True, tag=RUN_STARTED):
    trigger: Trigger | None = None
    startedAt: Time | None = None
    subjects: Subjects | None = None


class NodeCompleted(_Event, frozen=True, tag=NODE_COMPLETED):
    node: Node


class NodeFailed(_Event, frozen=True, tag=NODE_FAILED):
    node: Node


class RunCompleted(_Event, frozen=True, tag=RUN_COMPLETED):
    status: Status = "completed"
    totalDuration: Duration | None = None
    error: Any = None
    startedAt: Time | None = None
    completedAt: Time | None = None


class RunFailed(_Event, frozen=True, tag=RUN_FAILED):
    status: Status = "failed"
    totalDuration: Duration | None = None
    error: Any = None
    startedAt: Time | None = None
    completedAt: Time | None = None


class RunSnapshot(_Event, frozen=True, tag=RUN_SNAPSHOT):
    """A whole run in one event: buffer the nodes, write the run once."""

    trigger: Trigger | None = None
    subjects: Subjects | None = None
    status: Status | None = None
    startedAt: Time | None = None
    completedAt: Time | None = None
    totalDuration: Duration | None = None
    error: Any = None
    nodes: Annotated[list[Node], Meta(max_length=MAX_SNAPSHOT_NODES)] = []


Event = RunStarted | NodeCompleted | NodeFailed | RunCompleted | RunFailed | RunSnapshot
TerminalEvent = RunCompleted | RunFailed


@dataclass(frozen=True, slots=True)
class Decoded:
    """A valid event: ``event`` is the checked Struct, ``doc`` the JSON object to store,
    ``key_id`` the key that signed it (``worker.signing``; None when unsigned)."""

    event: Event
    doc: dict[str, Any]
    key_id: str | None = None


_json_decoder = msgspec.json.Decoder()
_event_decoder = msgspec.json.Decoder(Event)
_json_encoder = msgspec.json.Encoder()


def decode(data: bytes | str, *, max_bytes: int) -> Decoded:
    """Decode and validate one stream entry payload, or raise :class:`InvalidEvent`.

    The payload is parsed twice, both times in C: once into plain JSON values (the
    document that is stored, unknown fields included) and once straight into the
    typed Structs, which validates it. Validating from the bytes is several times
    cheaper than converting the parsed values (``msgspec.convert``) and gives the
    same verdicts and messages.
    """
    size = len(data)
    if size > max_bytes:
        raise InvalidEvent(Reason.TOO_LARGE, f"event is {size} bytes, the limit is {max_bytes}")
    try:
        raw = _json_decoder.decode(data)
    except UnicodeDecodeError as exc:
        raise InvalidEvent(Reason.INVALID_UTF8, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent(Reason.INVALID_JSON, str(exc)) from None
    except RecursionError:
        raise InvalidEvent(Reason.INVALID_JSON, _TOO_DEEP) from None
    if _openers(data) > MAX_DEPTH and _too_deep(raw):  # a cheap count rules out most events
        raise InvalidEvent(Reason.INVALID_JSON, _TOO_DEEP)
    _check_envelope(raw)
    try:
        event: Event = _event_decoder.decode(data)
    except msgspec.DecodeError as exc:  # the JSON is valid: only the schema can fail
        raise InvalidEvent(Reason.SCHEMA, str(exc)) from None
    except RecursionError:
        raise InvalidEvent(Reason.INVALID_JSON, _TOO_DEEP) from None
    _check_event(event)
    return Decoded(event, _normalise(event, raw, copy=False))


def _openers(data: bytes | str) -> int:
    if isinstance(data, str):
        return data.count("[") + data.count("{")
    return data.count(b"[") + data.count(b"{")


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests arrays/objects deeper than :data:`MAX_DEPTH` (iteratively)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False


def validate(raw: Any) -> Decoded:
    """Validate an already-parsed JSON value as a v1 event (``raw`` is not modified)."""
    _check_envelope(raw)
    try:
        event: Event = msgspec.convert(raw, Event)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(Reason.SCHEMA, str(exc)) from None
    _check_event(event)
    return Decoded(event, _normalise(event, raw, copy=True))


def _check_envelope(raw: Any) -> None:
    if not isinstance(raw, dict):
        raise InvalidEvent(Reason.SCHEMA, f"an event is a JSON object, got {type(raw).__name__}")
    version = raw.get("v")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise InvalidEvent(
            Reason.UNSUPPORTED_VERSION,
            f"event version {version!r} is not supported (this worker reads v{SCHEMA_VERSION})",
        )


def _check_event(event: Event) -> None:
    if isinstance(event, TerminalEvent) and event.status == "running":
        raise InvalidEvent(Reason.SCHEMA, "a terminal event cannot have status 'running'")


def _normalise(event: Event, raw: dict[str, Any], *, copy: bool) -> dict[str, Any]:
    """The stored form: times as UTC datetimes, node defaults filled in.

    With ``copy=False`` the freshly parsed ``raw`` (owned by the caller) is updated in
    place instead of copied.
    """
    doc = dict(raw) if copy else raw
    for name in RUN_TIME_FIELDS:
        value = getattr(event, name, None)
        if value is not None:
            doc[name] = _utc(value, f"$.{name}")
    if isinstance(event, NodeCompleted | NodeFailed):
        doc["node"] = _normalise_node(event.node, raw["node"], copy, "$.node")
    elif isinstance(event, RunSnapshot):
        doc["nodes"] = [_normalise_node(n, r, copy, f"$.nodes[{i}]") for i, (n, r)
                        in enumerate(zip(event.nodes, raw.get("nodes") or [], strict=True))]
    return doc


def _normalise_node(node: Node, raw: dict[str, Any], copy: bool, path: str) -> dict[str, Any]:
    doc = dict(raw) if copy else raw
    doc["attempt"] = node.attempt
    for name in NODE_TIME_FIELDS:
        value = getattr(node, name)
        if value is not None:
            doc[name] = _utc(value, f"{path}.{name}")
    return doc


def _utc(value: datetime, path: str) -> datetime:
    """``value`` in UTC; a time whose UTC value falls outside years 1-9999 is refused.

    ``0001-01-01T00:30:00+01:00`` is valid RFC 3339 (how ``DateTime.MinValue`` looks
    written in local time), but its UTC value is in year 0, which no store holds.
    """
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise InvalidEvent(Reason.SCHEMA, f"time out of range: its UTC value is outside "
                                          f"years 0001-9999 - at `{path}`") from None


def encode(event: dict[str, Any] | Struct) -> bytes:
    """Encode an event as the JSON a stream entry carries."""
    return _json_encoder.encode(event)


def parse_time(value: str) -> datetime:
    """Parse an RFC 3339 time with an offset into a UTC datetime."""
    parsed: datetime = msgspec.convert(value, Time)
    return _utc(parsed, "$")
