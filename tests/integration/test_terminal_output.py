"""Event data never reaches a terminal raw: every human-readable output escapes it."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.helpers import as_text, run_cli, workspace_name, write_events
from worker.cli import dlq as dlq_cli
from worker.cli import explain as explain_cli
from worker.cli import insights as insights_cli
from worker.cli import runs as runs_cli
from worker.cli import status as status_cli
from worker.cli.output import escape_lines, escape_text, json_text
from worker.stores import Store

pytestmark = pytest.mark.anyio

#: Retitles the terminal, rings, clears the screen, overwrites a line, forges a row and a
#: log line, reverses text, and sends an 8-bit CSI.
HOSTILE = ("\x1b]0;owned\x07\x1b[2J\x1b[1;1H\rforged\n1-1  x  schema_violation"
           "\r\n{\"level\":\"info\"}\u202etxt.exe\x9b31m\u2028end")
#: Anything but a newline (and a tab) that a terminal or log viewer acts on.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
#: What the escaped text must show.
VISIBLE = "\\x1b]0;owned\\x07\\x1b[2J\\x1b[1;1H\\x0dforged"


def test_escape_makes_every_control_character_visible() -> None:
    """One line out, each unsafe character as its escape, everything else untouched."""
    assert escape_text("a\x1b[31mb\x07\r\n\t\x00\x7f\x85\u202e\u2028é東") == (
        "a\\x1b[31mb\\x07\\x0d\\x0a\\x09\\x00\\x7f\\x85\\u202e\\u2028é東")
    assert escape_text("plain text, ✓") == "plain text, ✓"
    assert escape_lines(["one", "two\nthree"]) == "one\ntwo\\x0athree"
    assert escape_text("tab\x1b\nnext", keep_newlines=True) == "tab\\x1b\nnext"
    text = json.dumps({"k": HOSTILE}, ensure_ascii=False, indent=2)
    assert json.loads(json_text(text)) == {"k": HOSTILE}
    assert not RAW.search(json_text(text))


def _node(node_id: str, **fields: Any) -> dict[str, Any]:
    return {"nodeId": node_id, "type": "ai", "startedAt": "2026-02-15T10:30:01Z",
            "completedAt": "2026-02-15T10:30:02Z", **fields}


def _events(ws: str) -> list[dict[str, Any]]:
    base = {"v": 1, "workspaceId": ws, "workflowId": "wf", "runId": "run-1",
            "ts": "2026-02-15T10:30:00Z"}
    return [
        {**base, "eventId": "e1", "type": "run.started",
         "trigger": {"type": "webhook", "source": HOSTILE, "metadata": {"subject": HOSTILE}}},
        {**base, "eventId": "e2", "type": "node.completed", "node": _node(
            "classify", model=HOSTILE, input={"prompt": HOSTILE}, output=HOSTILE,
            tokens_used={"input": 1, "output": 2}, actions=[HOSTILE, {"system": HOSTILE}])},
        {**base, "eventId": "e3", "type": "node.failed", "node": _node(
            "crm", error={"type": HOSTILE, "message": HOSTILE, "retries": 1})},
        {**base, "eventId": "e4", "type": "run.failed", "error": {"message": HOSTILE},
         "x-note": HOSTILE},
    ]


def _safe(out: str) -> None:
    assert out.strip()
    assert not RAW.search(out), repr(RAW.search(out))


@pytest.mark.parametrize("flags", [[], ["--show-prompts"], ["--json"]],
                         ids=["text", "show-prompts", "json"])
async def test_explain_escapes_event_data(store: Store, store_url: str, flags: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """explain, as text (redacted or not) and --json, prints no raw control character."""
    ws = workspace_name()
    await write_events(store, _events(ws))
    args = run_cli(explain_cli.register,
                   ["explain", "run-1", "--store-url", store_url, "-w", ws, *flags])
    assert await args.func(args) == 0
    out = capsys.readouterr().out
    _safe(out)
    if flags == ["--json"]:
        doc = json.loads(out)
        assert doc["run"]["error"] == {"message": HOSTILE}
    else:
        assert VISIBLE in out
        assert "forged\\x0a1-1" in out, "a newline inside a value never starts a line"


async def test_runs_and_insights_escape_event_data(store: Store, store_url: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The runs table (trigger source) and insights tables (model, error type) are escaped."""
    ws = workspace_name()
    await write_events(store, _events(ws))
    for register, argv in ((runs_cli.register, ["runs", "-w", ws, "--since", "36500d"]),
                           (insights_cli.register, ["insights", "-w", ws, "--since", "36500d"])):
        args = run_cli(register, [*argv, "--store-url", store_url])
        assert await args.func(args) == 0
        out = capsys.readouterr().out
        _safe(out)
        assert VISIBLE in out
        assert "forged\\x0a1-1" in out


def _dlq(redis_url: str, stream: str, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dlq_cli.register(parser.add_subparsers())
    action, *rest = argv
    return parser.parse_args(["dlq", action, "--redis-url", redis_url, "--stream", stream, *rest])


@pytest.mark.redis
async def test_dlq_list_and_show_escape_dead_letters(
    redis_client: aioredis.Redis, stream: str, redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A dead letter's workspaceId cannot forge a `dlq list` row; `dlq show` is escaped."""
    payload = json.dumps({"v": 1, "workspaceId": HOSTILE, "runId": HOSTILE}).encode()
    ids = []
    for event in (payload, HOSTILE.encode()):
        entry_id = await redis_client.xadd(stream + ":dlq", {
            "reason": "schema_violation", "error": HOSTILE, "stream": stream, "id": "1-1",
            "deliveries": 1, "consumer": "w", "ts": 0, "event": event})
        ids.append(as_text(entry_id))
    args = _dlq(redis_url, stream, "list")
    assert await args.func(args) == 0
    out = capsys.readouterr().out
    _safe(out)
    assert len(out.splitlines()) == 1 + len(ids), "one line per dead letter"
    assert "\\x1b]0;owned" in out
    args = _dlq(redis_url, stream, "show", *ids)
    assert await args.func(args) == 0
    out = capsys.readouterr().out
    _safe(out)
    assert VISIBLE in out


@pytest.mark.redis
async def test_status_escapes_what_redis_holds(
    redis_client: aioredis.Redis, stream: str, redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A consumer name holding control characters is shown escaped by `status`."""
    await redis_client.xgroup_create(stream, "audit-writers", id="0", mkstream=True)
    await redis_client.xadd(stream, {"event": b"{}"})
    await redis_client.xreadgroup("audit-writers", "host\x1b]0;owned\x07\r", {stream: ">"})
    parser = argparse.ArgumentParser()
    status_cli.register(parser.add_subparsers())
    for extra in ([], ["--json"]):
        args = parser.parse_args(["status", "--redis-url", redis_url, "--stream", stream, *extra])
        assert await args.func(args) == 0
        out = capsys.readouterr().out
        _safe(out)
        assert "host\\x1b]0;owned\\x07\\x0d" in out or "host\\u001b]0;owned\\u0007\\r" in out
