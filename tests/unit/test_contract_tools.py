"""The published JSON Schema of the event contract, and `audit-fleet validate`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from worker import samples
from worker.cli import main
from worker.cli.validate import verdicts
from worker.redisio import Entry
from worker.schema import event_schema, schema_text
from worker.writer import prepare

ROOT = Path(__file__).resolve().parents[2]

LINES = [
    json.dumps(e).encode() for e in samples.run_events(
        samples.lead_triage_run(__import__("random").Random(2), "ws1", "run_1"))
] + [
    b"{not json",
    b'{"v": 99, "type": "run.started"}',
    b'{"v": 1, "type": "run.started", "eventId": "x", "workspaceId": "../admin"}',
    b'{"v": 1, "type": "node.completed", "eventId": "e", "workspaceId": "w", '
    b'"workflowId": "f", "runId": "r", "ts": "2026-01-01T00:00:00Z"}',
    b"\xff\xfe",
    b"[1, 2]",
]


def test_the_committed_schema_is_the_generated_one() -> None:
    """docs/event.schema.json cannot drift from the structs the worker validates with."""
    committed = (ROOT / "docs" / "event.schema.json").read_text()
    assert committed == schema_text(), (
        "regenerate: python -m worker.schema > docs/event.schema.json")
    schema = event_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    tags = {ref["$ref"].rsplit("/", 1)[1] for ref in schema["anyOf"]}
    assert tags == {"RunStarted", "NodeCompleted", "NodeFailed", "RunCompleted", "RunFailed",
                    "RunSnapshot"}
    started = schema["$defs"]["RunStarted"]
    assert started["properties"]["type"] == {"enum": ["run.started"]}
    assert {"v", "eventId", "workspaceId", "workflowId", "runId"} <= set(started["required"])


def test_validate_gives_the_verdicts_the_worker_gives() -> None:
    """Each line's verdict is the worker's: the same dead-letter reason and message."""
    got = verdicts(io.BytesIO(b"\n".join(LINES) + b"\n\n"), max_bytes=16 * 1024 * 1024)
    entries = [Entry("s", f"1-{i}", line) for i, line in enumerate(LINES)]
    valid, dead = prepare(entries, 16 * 1024 * 1024, 5)
    worker = {int(d.source_id.split("-")[1]) + 1: (d.reason, d.error) for d in dead}
    assert {r["line"]: (r["reason"], r["message"]) for r in got if not r["ok"]} == worker
    assert [r["line"] for r in got if r["ok"]] == [int(i) + 1 for i, _, _ in valid]
    assert len(worker) == 6
    assert {reason for reason, _ in worker.values()} >= {
        "invalid_json", "unsupported_version", "schema_violation"}


def test_validate_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 0 when every event would be stored, 1 when any would be dead-lettered."""
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(LINES[:3]) + b"\n")
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "3 events, 3 valid, 0 would be dead-lettered"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(LINES) + b"\n")
    assert main(["validate", "--json", str(bad)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["events"], doc["deadLettered"]) == (len(LINES), 6)
    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_sdk_event_ids_are_time_ordered_uuid7() -> None:
    """Event IDs sort by time (UUIDv7), so of two versions of one node execution the later
    one wins the greater-eventId rule; each is a valid UUID of version 7."""
    import time
    import uuid

    from worker.emitter import new_event_id, uuid7

    assert uuid7(1000, (1 << 74) - 1).hex < uuid7(1001, 0).hex  # time first, then random
    first = new_event_id()
    assert uuid.UUID(hex=first).version == 7
    assert uuid.UUID(hex=first).variant == uuid.RFC_4122
    assert len(first) == 32
    ms = int(first[:12], 16)
    assert abs(ms - time.time() * 1000) < 60_000
