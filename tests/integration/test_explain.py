"""``explain``: the design's reference record shows every field, nodes in execution order."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tests import reference as ref
from tests.helpers import run_cli, workspace_name, write_events
from worker import events as ev
from worker import explain, queries
from worker.cli import explain as explain_cli
from worker.stores import Store

pytestmark = pytest.mark.anyio


def t(text: str) -> datetime:
    return ev.parse_time(text)


# -- the reference record ------------------------------------------------------------------

async def test_reference_record_explains_every_field_in_order(store: Store) -> None:
    """The reference record (live events) explains with every field, nodes in order."""
    ws = workspace_name()
    await write_events(store, ref.reference_events(ws))
    ex = await explain.explain_run(store, ws, ref.RUN_ID, show_prompts=True)
    assert ex is not None
    out = json.loads(queries.dumps(ex.to_json()))
    run = out["run"]
    assert run["runId"] == ref.RUN_ID
    assert run["workflowId"] == ref.WORKFLOW_ID
    assert run["workspaceId"] == ws
    assert run["status"] == "completed"
    assert run["totalDurationMs"] == ref.TOTAL_DURATION
    assert run["startedAt"] == "2026-02-15T10:30:00.000000Z"
    assert run["completedAt"] == "2026-02-15T10:30:04.800000Z"
    assert run["trigger"] == ref.TRIGGER
    assert run["summary"] == ref.SUMMARY
    assert [n["nodeId"] for n in out["nodes"]] == ["source", "classify", "route", "update-crm"]
    assert [n["position"] for n in out["nodes"]] == [1, 2, 3, 4]
    for got, node in zip(out["nodes"], ref.NODES, strict=True):
        assert got["type"] == node["type"]
        assert got["attempt"] == 1
        assert got["status"] == "completed"
        assert got["startedAt"] == queries.format_time(t(node["startedAt"]))
        assert got["completedAt"] == queries.format_time(t(node["completedAt"]))
        expected_ms = (t(node["completedAt"]) - t(node["startedAt"])).total_seconds() * 1000
        assert got["durationMs"] == pytest.approx(expected_ms)
        assert got["input"] == node.get("input")
        assert got["output"] == node.get("output")
        assert got["evaluation"] == node.get("evaluation")
        assert got["result"] == node.get("result")
        assert got["skippedBranches"] == node.get("skippedBranches", [])
        assert got["actions"] == node.get("actions", [])
        assert got["model"] == node.get("model")
        assert got["error"] is None
        assert got["extra"] == {}
        assert got["eventId"] == f"{ref.RUN_ID}:{node['nodeId']}:1"
    classify = out["nodes"][1]
    assert classify["tokens"] == {"input": 450, "output": 85, "total": 535}
    assert classify["input"]["prompt"] == ref.PROMPT
    assert out["decisions"] == [{
        "nodeId": "route", "attempt": 1, "evaluation": ref.ROUTE_NODE["evaluation"],
        "result": "fast-track", "skippedBranches": ["standard-nurture", "support-queue"]}]
    assert out["actions"] == [{"nodeId": "update-crm", "attempt": 1,
                               "action": {"type": "salesforce.create_lead", "id": "00Q123"}}]
    assert out["errors"] == []
    assert out["retries"] == []
    assert out["missingNodes"] == []
    assert out["redacted"] is False


async def test_snapshot_and_live_events_explain_identically(store: Store) -> None:
    """A run.snapshot and the same run as live events give the same explanation nodes."""
    ws_live, ws_snap = workspace_name(), workspace_name()
    await write_events(store, ref.reference_events(ws_live))
    await write_events(store, [ref.reference_snapshot(ws_snap)])
    live = await explain.explain_run(store, ws_live, ref.RUN_ID, show_prompts=True)
    snap = await explain.explain_run(store, ws_snap, ref.RUN_ID, show_prompts=True)
    assert live is not None
    assert snap is not None
    strip = ("eventId",)
    a = [{k: v for k, v in s.to_json().items() if k not in strip} for s in live.steps]
    b = [{k: v for k, v in s.to_json().items() if k not in strip} for s in snap.steps]
    assert a == b
    assert live.summary == snap.summary == ref.SUMMARY


async def test_terminal_view_shows_the_decision_chain(store: Store) -> None:
    """The human view names the trigger, each node with model/tokens, decision and outcome."""
    ws = workspace_name()
    await write_events(store, ref.reference_events(ws))
    ex = await explain.explain_run(store, ws, ref.RUN_ID, show_prompts=True)
    assert ex is not None
    text = explain_cli.render(ex)
    lines = text.splitlines()
    order = [next(i for i, ln in enumerate(lines) if f". {name}  [" in ln)
             for name in ("source", "classify", "route", "update-crm")]
    assert order == sorted(order)
    for needle in ("Trigger: webhook from gmail", "buyer@example.com",
                   "model: claude-sonnet-4-20250514", "tokens: 450 in / 85 out = 535",
                   "evaluation: intent == 'purchase_inquiry' AND confidence >= 0.9",
                   "result: fast-track", "skipped branches: standard-nurture, support-queue",
                   "actions: salesforce.create_lead", "purchase_inquiry", "0.91",
                   "Outcome: completed after 4.80 s", "Errors: none", "(1.20 s)"):
        assert needle in text, needle


async def test_prompts_are_redacted_and_shortened_by_default(store: Store) -> None:
    """Without --show-prompts, emails are masked and long prompts are cut, outputs stay raw."""
    ws = workspace_name()
    await write_events(store, ref.reference_events(ws))
    ex = await explain.explain_run(store, ws, ref.RUN_ID)
    assert ex is not None
    out = ex.to_json()
    prompt = out["nodes"][1]["input"]["prompt"]
    assert "buyer@example.com" not in prompt
    assert "[email]" in prompt
    assert len(prompt) < len(ref.PROMPT)
    assert "chars]" in prompt
    assert out["run"]["trigger"]["metadata"]["from"] == "[email]"
    assert out["nodes"][3]["input"]["email"] == "[email]"
    assert out["nodes"][1]["output"] == ref.CLASSIFY_NODE["output"]
    assert out["redacted"] is True
    assert "buyer@example.com" not in explain_cli.render(ex).split("output:")[0]


def test_redaction_masks_personal_data_and_keys() -> None:
    """Emails, phone numbers, long digit runs and API-key-like tokens are masked."""
    text = ("mail jane.doe+x@corp.example.org or call +1 415 555 0132 / (030) 1234-5678; "
            "card 4111 1111 1111 1111, account 123456789012, key sk-live_ABCDEF1234567890xyz, "
            "Authorization: Bearer abc.def-ghi_jkl012, AKIAABCDEFGHIJKLMNOP, on 2026-02-15 "
            "the team of 120 paid 4800")
    out = explain.redact_text(text, limit=None)
    for secret in ("jane.doe", "415 555", "1234-5678", "4111", "123456789012", "sk-live",
                   "abc.def", "AKIAABCD"):
        assert secret not in out, secret
    for kept in ("2026-02-15", "team of 120", "4800"):
        assert kept in out, kept
    assert out.count("[email]") == 1
    assert "[phone]" in out
    assert "[secret]" in out
    assert explain.redact_text("x" * 500, limit=200) == "x" * 200 + "… [+300 chars]"
    assert explain.redact({"a": ["me@x.io", 5, None]}) == {"a": ["[email]", 5, None]}


async def test_errors_retries_and_extra_fields_are_explained(store: Store) -> None:
    """A failed attempt, its retry, the run error and unknown node fields all show."""
    ws = workspace_name()
    base = {"v": 1, "workspaceId": ws, "workflowId": "wf", "runId": "r-err"}
    await write_events(store, [
        base | {"eventId": "e1", "type": "run.started", "ts": "2026-03-01T00:00:00Z",
                "trigger": {"type": "cron", "source": "scheduler"}},
        base | {"eventId": "e2", "type": "node.failed", "ts": "2026-03-01T00:00:02Z",
                "node": {"nodeId": "enrich", "type": "action", "attempt": 1,
                         "startedAt": "2026-03-01T00:00:01Z",
                         "completedAt": "2026-03-01T00:00:02Z",
                         "error": {"type": "Timeout", "message": "enrichment API timeout",
                                   "retries": 2},
                         "region": "eu-west-1"}},
        base | {"eventId": "e3", "type": "node.completed", "ts": "2026-03-01T00:00:04Z",
                "node": {"nodeId": "enrich", "type": "action", "attempt": 2,
                         "startedAt": "2026-03-01T00:00:03Z",
                         "completedAt": "2026-03-01T00:00:04Z",
                         "actions": ["clearbit.lookup"]}},
        base | {"eventId": "e4", "type": "run.failed", "ts": "2026-03-01T00:00:05Z",
                "totalDuration": 5000, "error": {"type": "Downstream", "message": "gave up"}},
    ])
    ex = await explain.explain_run(store, ws, "r-err")
    assert ex is not None
    out = ex.to_json()
    assert [(n["nodeId"], n["attempt"], n["status"]) for n in out["nodes"]] == [
        ("enrich", 1, "failed"), ("enrich", 2, "completed")]
    assert out["nodes"][0]["extra"] == {"region": "eu-west-1"}
    assert out["errors"] == [
        {"nodeId": "enrich", "attempt": 1, "type": "Timeout",
         "message": "enrichment API timeout", "retries": 2},
        {"nodeId": None, "attempt": None, "type": "Downstream", "message": "gave up",
         "retries": None}]
    assert out["retries"] == [{"nodeId": "enrich", "attempts": [1, 2], "reportedRetries": 2}]
    assert out["run"]["status"] == "failed"
    text = explain_cli.render(ex)
    assert "error: Timeout: enrichment API timeout (retried 2x)" in text
    assert "attempts [1, 2]" in text
    assert "region: eu-west-1" in text


async def test_explain_cli_json_is_stable(store: Store, store_url: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI prints the same JSON twice and finds the workspace when none is given."""
    ws = workspace_name()
    await write_events(store, ref.reference_events(ws))
    outputs = []
    for argv in (["explain", ref.RUN_ID, "--json", "--store-url", store_url, "-w", ws],
                 ["explain", ref.RUN_ID, "--json", "--store-url", store_url]):
        args = run_cli(explain_cli.register, argv)
        assert await args.func(args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    doc = json.loads(outputs[0])
    assert doc["explainVersion"] == 1
    assert list(doc) == sorted(doc)


def test_execution_order_puts_untimed_nodes_last() -> None:
    """Order is start time (completion when unknown), attempt, node ID; untimed last."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    nodes: list[dict[str, Any]] = [
        {"nodeId": "z"}, {"nodeId": "b", "startedAt": base, "attempt": 2},
        {"nodeId": "b", "startedAt": base, "attempt": 1},
        {"nodeId": "a", "completedAt": base.replace(minute=5)}]
    got = [(n["nodeId"], n.get("attempt")) for n in explain.execution_order(nodes)]
    assert got == [("b", 1), ("b", 2), ("a", None), ("z", None)]


@pytest.mark.parametrize("depth", [498, 960], ids=["deepest-accepted", "older-store-deeper"])
@pytest.mark.parametrize("flags", [[], ["--show-prompts"], ["--json"]],
                         ids=["text", "show-prompts", "json"])
async def test_explain_renders_deeply_nested_nodes(
    store: Store, store_url: str, capsys: pytest.CaptureFixture[str], depth: int,
    flags: list[str],
) -> None:
    """A node nested as deep as the worker accepts (or a store holds) explains, year 1 as 0001."""
    from worker.documents import coalesce

    ws = workspace_name()
    nested = b"[" * depth + b"]" * depth
    context = b"[" * (depth - 1) + b"]" * (depth - 1)  # one level down, inside input
    data = (b'{"v":1,"eventId":"e1","type":"node.completed","workspaceId":"' + ws.encode()
            + b'","workflowId":"wf","runId":"deep","ts":"0001-01-01T00:00:00Z","node":'
            b'{"nodeId":"n","type":"ai","startedAt":"0001-01-01T00:00:00Z",'
            b'"input":{"prompt":"p","context":' + context + b'},"output":' + nested + b"}}")
    if depth <= 498:  # through the worker's own decoder (500 levels with event and node)
        decoded = ev.decode(data, max_bytes=1 << 20)
    else:  # stored before the depth limit: bypass the decoder's check
        import msgspec

        with explain.deep_documents():
            decoded = ev.validate(msgspec.json.decode(data))
    with explain.deep_documents():  # the test's own write (the store encodes the document)
        await store.write(coalesce([(0, decoded)]))
    args = run_cli(explain_cli.register,
                   ["explain", "deep", "--store-url", store_url, "-w", ws, *flags])
    assert await args.func(args) == 0
    out = capsys.readouterr().out
    if flags == ["--json"]:
        assert '"startedAt": "0001-01-01T00:00:00.000000Z"' in out
        assert out.count("[") >= 2 * depth
    else:
        assert "started 0001-01-01T00:00:00.000000Z" in out
        assert ("[" * depth + "]" * depth) in out
