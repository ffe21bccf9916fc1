"""The v1 event contract: what is accepted, what is refused and why."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from worker.constants import Reason
from worker.errors import InvalidEvent
from worker.events import NodeCompleted, RunSnapshot, decode

BASE: dict[str, Any] = {
    "v": 1, "eventId": "evt-1", "type": "run.started", "workspaceId": "workspace_abc",
    "workflowId": "wf_lead_triage", "runId": "run_a1b2c3d4", "ts": "2026-02-15T10:30:00+02:00",
}


def _decode(event: dict[str, Any], max_bytes: int = 1 << 20) -> Any:
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
