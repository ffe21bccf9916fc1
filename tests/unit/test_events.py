"""The v1 event contract: what is accepted, what is refused and why."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from worker.constants import Reason
from worker.errors import InvalidEvent
from worker.events import Decoded, NodeCompleted, RunSnapshot, decode

BASE: dict[str, Any] = {
    "v": 1, "eventId": "evt-1", "type": "run.started", "workspaceId": "workspace_abc",
    "workflowId": "wf_lead_triage", "runId": "run_a1b2c3d4", "ts": "2026-02-15T10:30:00+02:00",
}


def _decode(event: dict[str, Any], max_bytes: int = 1 << 20) -> Decoded:
    return decode(json.dumps(event).encode(), max_bytes=max_bytes)


def _reason(payload: bytes | dict[str, Any], max_bytes: int = 1 << 20) -> str:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with pytest.raises(InvalidEvent) as info:
        decode(data, max_bytes=max_bytes)
    return info.value.reason


def test_times_are_normalised_to_utc_datetimes() -> None:
    """An RFC 3339 time with an offset is stored as the same instant in UTC."""
    doc = _decode(BASE).doc
    assert doc["ts"] == datetime(2026, 2, 15, 8, 30, tzinfo=UTC)


def test_unknown_fields_are_kept() -> None:
    """Fields this version does not know survive decoding, at every level."""
    event = {**BASE, "type": "node.completed", "engine": {"version": "3.1"},
             "node": {"nodeId": "classify", "type": "ai", "confidenceBand": "high"}}
    decoded = _decode(event)
    assert isinstance(decoded.event, NodeCompleted)
    assert decoded.doc["engine"] == {"version": "3.1"}
    assert decoded.doc["node"]["confidenceBand"] == "high"
    assert decoded.doc["node"]["attempt"] == 1


def test_snapshot_nodes_are_validated_and_normalised() -> None:
    """A run.snapshot carries whole nodes; each is checked and its times normalised."""
    event = {**BASE, "type": "run.snapshot", "status": "completed",
             "nodes": [{"nodeId": "a", "type": "ai", "startedAt": "2026-02-15T10:30:01Z"}]}
    decoded = _decode(event)
    assert isinstance(decoded.event, RunSnapshot)
    assert decoded.doc["nodes"][0]["startedAt"] == datetime(2026, 2, 15, 10, 30, 1, tzinfo=UTC)
    bad = {**event, "nodes": [{"nodeId": "", "type": "ai"}]}
    assert _reason(bad) == Reason.SCHEMA


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{nope", Reason.INVALID_JSON),
        (b"\xff\xfe{}", Reason.INVALID_JSON),
        (b"[" * 100_000 + b"]" * 100_000, Reason.INVALID_JSON),
        (b"[1, 2]", Reason.SCHEMA),
        ({**BASE, "v": 2}, Reason.UNSUPPORTED_VERSION),
        ({**BASE, "v": True}, Reason.UNSUPPORTED_VERSION),
        ({k: v for k, v in BASE.items() if k != "v"}, Reason.UNSUPPORTED_VERSION),
        ({**BASE, "type": "run.paused"}, Reason.SCHEMA),
        ({**BASE, "workspaceId": "../admin"}, Reason.SCHEMA),
        ({**BASE, "workspaceId": "a" * 49}, Reason.SCHEMA),
        ({**BASE, "workspaceId": "ws$x"}, Reason.SCHEMA),
        ({**BASE, "runId": "run\x00x"}, Reason.SCHEMA),
        ({**BASE, "runId": "r" * 201}, Reason.SCHEMA),
        ({**BASE, "eventId": ""}, Reason.SCHEMA),
        ({**BASE, "ts": "2026-02-15T10:30:00"}, Reason.SCHEMA),
        ({**BASE, "ts": "yesterday"}, Reason.SCHEMA),
        ({**BASE, "type": "run.completed", "status": "running"}, Reason.SCHEMA),
        ({**BASE, "type": "node.completed", "node": {"nodeId": "n", "type": "ai",
                                                       "attempt": 0}}, Reason.SCHEMA),
        ({**BASE, "type": "node.completed", "node": {"nodeId": "n", "type": "ai",
                                                       "tokens_used": {"input": -1}}},
         Reason.SCHEMA),
        ({**BASE, "type": "node.completed"}, Reason.SCHEMA),
    ],
)
def test_invalid_events_are_refused_with_a_reason(payload: Any, reason: str) -> None:
    """Every kind of bad input maps to one stable dead-letter reason."""
    assert _reason(payload) == reason


def test_oversized_events_are_refused_before_parsing() -> None:
    """An event above the byte limit is refused as too large."""
    event = {**BASE, "padding": "x" * 5000}
    assert _reason(event, max_bytes=1000) == Reason.TOO_LARGE


#: Valid RFC 3339 whose UTC value is in year 0 or year 10000 (DateTime.MinValue/MaxValue
#: written in local time).
OUT_OF_RANGE = ("0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00")
NODE = {"nodeId": "n", "type": "ai"}


@pytest.mark.parametrize("when", OUT_OF_RANGE)
@pytest.mark.parametrize(
    ("event", "path"),
    [
        (BASE, "$.ts"),
        ({**BASE, "startedAt": "@"}, "$.startedAt"),
        ({**BASE, "type": "run.completed", "completedAt": "@"}, "$.completedAt"),
        ({**BASE, "type": "node.completed", "node": {**NODE, "startedAt": "@"}},
         "$.node.startedAt"),
        ({**BASE, "type": "node.failed", "node": {**NODE, "completedAt": "@"}},
         "$.node.completedAt"),
        ({**BASE, "type": "run.snapshot", "nodes": [NODE, {**NODE, "startedAt": "@"}]},
         "$.nodes[1].startedAt"),
    ],
)
def test_times_outside_the_utc_range_are_a_schema_violation(
    event: dict[str, Any], path: str, when: str
) -> None:
    """A time valid as written but out of range in UTC is refused with its path, never raised."""
    text = json.dumps(event).replace('"@"', json.dumps(when))
    if path == "$.ts":
        text = text.replace(BASE["ts"], when)
    with pytest.raises(InvalidEvent) as info:
        decode(text.encode(), max_bytes=1 << 20)
    assert info.value.reason == Reason.SCHEMA
    assert info.value.detail == (f"time out of range: its UTC value is outside years "
                                 f"0001-9999 - at `{path}`")


@pytest.mark.parametrize(("when", "utc"), [
    ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
    ("0001-01-01T01:30:00+01:00", datetime(1, 1, 1, 0, 30, tzinfo=UTC)),
    ("9999-12-31T23:59:59.999999Z", datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ("9999-12-31T22:30:00-01:00", datetime(9999, 12, 31, 23, 30, tzinfo=UTC)),
])
def test_times_at_the_edges_of_the_utc_range_are_valid(when: str, utc: datetime) -> None:
    """Years 0001 and 9999 are accepted when their UTC value is still in range."""
    assert _decode({**BASE, "ts": when}).doc["ts"] == utc


#: Every identifier of the contract, as (where it lives, a valid value).
IDENTIFIERS = [
    ("eventId", "evt-1"), ("workspaceId", "acme"), ("workflowId", "wf"), ("runId", "run"),
    ("node.nodeId", "classify"), ("node.type", "ai"), ("status", "completed"),
]
SUFFIXES = ["\n", "\r\n", "\x00", "\u2028", "\u0085"]


def _with(field: str, value: str) -> dict[str, Any]:
    event: dict[str, Any] = {**BASE, "type": "node.completed", "node": dict(NODE)}
    if field == "status":
        event["type"] = "run.completed"
        del event["node"]
    if field.startswith("node."):
        event["node"][field[5:]] = value
    else:
        event[field] = value
    return event


def code_points(text: str) -> str:
    """A test ID of plain characters (U000A…): IDs holding escapes cannot be selected again
    by node ID, which the mutation run does."""
    return "+".join(f"U{ord(c):04X}" for c in text)


@pytest.mark.parametrize("suffix", SUFFIXES, ids=code_points)
@pytest.mark.parametrize(("field", "value"), IDENTIFIERS)
def test_identifier_rules_hold_to_the_true_end_of_the_string(
    field: str, value: str, suffix: str
) -> None:
    """A trailing newline (or CR LF, NUL, U+2028, U+0085) is refused in every identifier."""
    _decode(_with(field, value))  # the value itself is valid
    assert _reason(_with(field, value + suffix)) == Reason.SCHEMA
    assert _reason(_with(field, suffix + value)) == Reason.SCHEMA


@pytest.mark.parametrize("char", ["\u202e", "\u2066", "\u200f", "\u2029", "\x1b", "\x7f"],
                         ids=code_points)
def test_printable_identifiers_exclude_bidi_and_separator_characters(char: str) -> None:
    """Characters that reorder or break a line of a terminal or log are not printable."""
    assert _reason({**BASE, "runId": f"run{char}x"}) == Reason.SCHEMA
    assert _decode({**BASE, "runId": "run é 東京 ✓"}).doc["runId"] == "run é 東京 ✓"


@pytest.mark.parametrize("action", [
    {"system": "salesforce", "operation": "create_lead", "ref": "00Q123"},
    {"type": 7}, {"type": ""}, {"type": "x" * 500}, {},
], ids=repr)
def test_an_action_object_is_valid_whatever_its_fields(action: dict[str, Any]) -> None:
    """An action is a string or any object: a cosmetic field never rejects its node."""
    event = {**BASE, "type": "node.completed",
             "node": {**NODE, "type": "action", "actions": ["crm.sync", action]}}
    assert _decode(event).doc["node"]["actions"] == ["crm.sync", action]


@pytest.mark.parametrize("actions", [[7], [None], "crm.sync", {"type": "crm.sync"}], ids=repr)
def test_actions_are_a_list_of_strings_or_objects(actions: Any) -> None:
    """A non-list, or an element that is neither a string nor an object, is a schema violation."""
    event = {**BASE, "type": "node.completed",
             "node": {**NODE, "type": "action", "actions": actions}}
    assert _reason(event) == Reason.SCHEMA


def test_nesting_is_limited_to_a_fixed_depth() -> None:
    """500 levels are accepted and 501 refused, however deep the decoder's caller runs."""
    from worker.events import MAX_DEPTH

    def nested(levels: int) -> bytes:  # the event is level 1, its node level 2
        inner = b"[" * (levels - 2) + b"]" * (levels - 2)
        return json.dumps({**BASE, "type": "node.completed",
                           "node": {**NODE, "input": "@"}}).encode().replace(b'"@"', inner)

    assert MAX_DEPTH == 500
    assert decode(nested(500), max_bytes=1 << 20).doc["node"]["input"] is not None
    with pytest.raises(InvalidEvent) as info:
        decode(nested(501), max_bytes=1 << 20)
    assert (info.value.reason, info.value.detail) == (
        Reason.INVALID_JSON, "JSON is nested deeper than 500 levels")


def test_a_wide_event_within_the_depth_limit_is_accepted() -> None:
    """More than 500 brackets in all but at most 500 levels deep is valid (the exact depth
    walk decides, not the cheap bracket count); one level more is refused."""
    def nested(levels: int) -> bytes:
        inner = b"[" * (levels - 2) + b"]" * (levels - 2)
        wide = [{"k": [1]} for _ in range(300)]  # 600 brackets at depths 3 and 4
        return json.dumps({**BASE, "type": "node.completed",
                           "node": {**NODE, "input": "@", "output": wide}}).encode().replace(
                               b'"@"', inner)

    assert len(decode(nested(500), max_bytes=1 << 20).doc["node"]["output"]) == 300
    with pytest.raises(InvalidEvent) as info:
        decode(nested(501), max_bytes=1 << 20)
    assert (info.value.reason, info.value.detail) == (
        Reason.INVALID_JSON, "JSON is nested deeper than 500 levels")


def test_counts_stop_at_the_64_bit_range() -> None:
    """tokens_used and error.retries accept 2^63 - 1 and refuse 2^63."""
    def with_tokens(n: int) -> dict[str, Any]:
        return {**BASE, "type": "node.completed",
                "node": {**NODE, "tokens_used": {"input": n}, "error": {"retries": n}}}
    assert _decode(with_tokens(2**63 - 1)).doc["node"]["tokens_used"] == {"input": 2**63 - 1}
    assert _reason(with_tokens(2**63)) == Reason.SCHEMA
