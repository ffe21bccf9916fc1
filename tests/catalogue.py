"""The hostile-input catalogue: every bad entry the contract (docs/events.md) has a verdict
for, with that verdict (dead-lettered with its reason and message, or stored as the
contract says). Run through a real worker by ``integration/test_catalogue.py`` and through
the old and new hot path by ``unit/test_hot_path_equivalence.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from worker.constants import Reason
from worker.events import MAX_DEPTH

#: A small AUDIT_MAX_EVENT_BYTES, still above the 10,000-node snapshot.
MAX_BYTES = 512 * 1024
WS = "catalogue"
TS = "2026-02-15T10:30:00Z"
Raw = dict[str, Any]
Fields = list[tuple[str, bytes]]


def event(run: str, kind: str = "run.started", *, ws: str = WS, **fields: Any) -> Raw:
    eventId = hashlib.blake2b(f"{run}\x1f{kind}".encode(), digest_size=12).hexdigest()
    return {"v": 1, "eventId": eventId, "type": kind, "workspaceId": ws,
            "workflowId": "wf", "runId": run, "ts": TS, **fields}


def node_event(run: str, kind: str = "node.completed", **node: Any) -> Raw:
    return event(run, kind, node={"nodeId": "n1", "type": "ai", **node})


def enc(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode()


def entry(value: Raw | bytes) -> Fields:
    return [("event", value if isinstance(value, bytes) else enc(value))]


#: What a stored case is checked against: (workspace, runId) and the stored documents.
Check = Callable[["Result"], None]


@dataclass
class Case:
    name: str
    entries: list[Fields]
    #: The dead-letter reason (per store where they differ), or None: stored.
    reason: str | dict[str, str | None] | None
    #: Text the dead letter's error must contain.
    error: str = ""
    #: Where a stored case's run lives, and what must hold of its documents.
    run: tuple[str, str] | None = None
    check: Check | None = None

    def reason_for(self, store: str) -> str | None:
        return self.reason.get(store) if isinstance(self.reason, dict) else self.reason


@dataclass
class Result:
    run: dict[str, Any] | None
    nodes: list[dict[str, Any]]
    dead: list[dict[str, Any]] = field(default_factory=list)


def dead(name: str, payload: Raw | bytes | Fields, reason: str | dict[str, str | None],
         error: str = "") -> Case:
    entries = [payload] if isinstance(payload, list) else [entry(payload)]
    return Case(name, entries, reason, error)


def stored(name: str, *events: Raw | bytes | Fields, run: tuple[str, str] | None = None,
           check: Check | None = None, reason: dict[str, str | None] | None = None) -> Case:
    entries = [e if isinstance(e, list) else entry(e) for e in events]
    first = events[0]
    if run is None:
        raw = first if isinstance(first, dict) else msgspec.json.decode(dict(entries[0])["event"])
        run = (raw["workspaceId"], raw["runId"])
    return Case(name, entries, reason, run=run, check=check)


def _node(key: str, value: Any) -> Check:
    def check(r: Result) -> None:
        (node,) = r.nodes
        assert node[key] == value
    return check


def _run(key: str, value: Any) -> Check:
    def check(r: Result) -> None:
        assert r.run is not None
        assert r.run[key] == value
    return check


def _all(*checks: Check) -> Check:
    def check(r: Result) -> None:
        for c in checks:
            c(r)
    return check


def _brackets(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _nested(run: str, depth: int) -> bytes:
    """A node event whose input is ``depth`` nested lists (too deep for json.dumps)."""
    return enc(node_event(run, input="@")).replace(b'"@"', _brackets(depth))


def _sized(run: str, size: int) -> bytes:
    """A valid event of exactly ``size`` bytes."""
    base = enc(node_event(run, input=""))
    return enc(node_event(run, input="x" * (size - len(base))))


SCHEMA, JSON, VERSION = Reason.SCHEMA, Reason.INVALID_JSON, Reason.UNSUPPORTED_VERSION
TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"
NUL_TEXT = {"sqlite": None, "postgresql": Reason.STORE_REJECTED}
HOSTILE_TEXT = "\x1b]0;owned\x07\x1b[2J\x1b[1;1H forged\r\n{\"level\":\"info\",\"event\":\"ok\"}"
SNAPSHOT_NODES = [{"nodeId": f"n{i}", "type": "ai"} for i in range(10_001)]


def _cases() -> list[Case]:
    c: list[Case] = [
        # -- the entry ------------------------------------------------------------------
        dead("not_json", b"{nope", JSON, "malformed"),
        dead("json_array", b"[1, 2]", SCHEMA, "an event is a JSON object, got list"),
        dead("json_number", b"42", SCHEMA, "got int"),
        dead("json_null", b"null", SCHEMA, "got NoneType"),
        dead("json_string", b'"run.started"', SCHEMA, "got str"),
        dead("missing_event_field", [("payload", enc(event("c-missing")))],
             Reason.MISSING_FIELD, "no 'event' field"),
        dead("duplicate_event_field", [("event", enc(event("c-dup-a"))),
                                       ("event", enc(event("c-dup-b")))],
             Reason.DUPLICATE_FIELD, "2 'event' fields"),
        stored("extra_entry_fields", [("trace", b"t-1"), ("event", enc(event("c-extra"))),
                                      ("sig", b"k1:00ff")]),
        # -- encoding -------------------------------------------------------------------
        dead("invalid_utf8", enc(event("c-utf8", workflowId="@")).replace(b'"@"', b'"\xff\xfe"'),
             JSON, "UTF-8"),
        dead("utf8_encoded_surrogate",
             enc(event("c-cesu", workflowId="@")).replace(b'"@"', b'"\xed\xa0\x80"'), JSON,
             "UTF-8"),
        dead("lone_high_surrogate_escape",
             enc(node_event("c-lone-hi", input="@")).replace(b'"@"', b'"\\ud800"'), JSON),
        dead("lone_low_surrogate_escape",
             enc(node_event("c-lone-lo", input="@")).replace(b'"@"', b'"x\\udc00y"'), JSON),
        stored("surrogate_pair_escape",
               enc(node_event("c-pair", input="@")).replace(b'"@"', b'"\\ud83d\\ude00"'),
               check=_node("input", "\U0001f600")),
        stored("nul_in_input_string", node_event("c-nul-text", input="a\x00b"),
               reason=NUL_TEXT, check=_node("input", "a\x00b")),
        stored("nul_in_output_key", node_event("c-nul-key", output={"k\x00": 1}),
               reason=NUL_TEXT, check=_node("output", {"k\x00": 1})),
        dead("nul_in_run_id", event("c-nul\x00id"), SCHEMA, "$.runId"),
        # -- size and depth -------------------------------------------------------------
        dead("nesting_10000_deep", _nested("c-deep", 10_000), JSON, TOO_DEEP),
        # The event is level 1, its node level 2: MAX_DEPTH - 2 lists reach the limit.
        dead("nesting_501_deep", _nested("c-deep-501", MAX_DEPTH - 1), JSON, TOO_DEEP),
        stored("nesting_500_deep", _nested("c-deep-ok", MAX_DEPTH - 2), run=(WS, "c-deep-ok"),
               check=lambda r: _eq(msgspec.json.encode(r.nodes[0]["input"]),
                                   _brackets(MAX_DEPTH - 2))),
        stored("size_just_under_the_limit", _sized("c-size-under", MAX_BYTES),
               run=(WS, "c-size-under")),
        dead("size_just_over_the_limit", _sized("c-size-over", MAX_BYTES + 1),
             Reason.TOO_LARGE, f"event is {MAX_BYTES + 1} bytes, the limit is {MAX_BYTES}"),
        # -- numbers --------------------------------------------------------------------
        stored("integers_beyond_64_bits",
               node_event("c-bigint", output={"big": 2**63, "small": -(2**63) - 1,
                                              "huge": 10**30}),
               check=_node("output", {"big": 2**63, "small": -(2**63) - 1, "huge": 10**30})),
        dead("tokens_beyond_2_63", node_event("c-bigtok", tokens_used={"input": 2**63}), SCHEMA,
             "$.node.tokens_used.input"),
        stored("tokens_at_2_63_minus_1", node_event("c-maxtok", tokens_used={"output": 2**63 - 1}),
               check=lambda r: _summary(r, "totalTokens", 2**63 - 1)),
        dead("nan", enc(node_event("c-nan", output="@")).replace(b'"@"', b"NaN"), JSON,
             "malformed"),
        dead("infinity", enc(node_event("c-inf", output="@")).replace(b'"@"', b"-Infinity"),
             JSON, "malformed"),
        dead("1e400", enc(node_event("c-1e400", output="@")).replace(b'"@"', b"1e400"), JSON,
             "out of range"),
        # -- version --------------------------------------------------------------------
        dead("version_2", {**event("c-v2"), "v": 2}, VERSION, "event version 2"),
        dead("version_as_string", {**event("c-v-str"), "v": "1"}, VERSION, "event version '1'"),
        dead("version_missing", {k: v for k, v in event("c-v-none").items() if k != "v"},
             VERSION, "event version None"),
        dead("version_true", {**event("c-v-true"), "v": True}, VERSION, "True"),
        # -- workspaceId ----------------------------------------------------------------
        dead("workspace_path", event("c-ws-path", ws="../admin"), SCHEMA, "$.workspaceId"),
        stored("workspace_admin", event("c-ws-admin", ws="admin")),
        stored("workspace_local", event("c-ws-local", ws="local")),
        stored("workspace_config", event("c-ws-config", ws="config")),
        dead("workspace_dot", event("c-ws-dot", ws="a.b"), SCHEMA, "$.workspaceId"),
        dead("workspace_dollar", event("c-ws-dollar", ws="$where"), SCHEMA, "$.workspaceId"),
        dead("workspace_49_chars", event("c-ws-49", ws="w" * 49), SCHEMA, "$.workspaceId"),
        stored("workspace_48_chars", event("c-ws-48", ws="w" * 48)),
        dead("workspace_lookalike", event("c-ws-cyr", ws="c\u0430talogue"), SCHEMA,
             "$.workspaceId"),
        dead("workspace_fullwidth", event("c-ws-fw", ws="\uff43atalogue"), SCHEMA,
             "$.workspaceId"),
        stored("workspace_case_variant", event("c-ws-case", ws="Catalogue")),
        dead("workspace_empty", event("c-ws-empty", ws=""), SCHEMA, "$.workspaceId"),
        dead("workspace_trailing_newline", event("c-ws-nl", ws="catalogue\n"), SCHEMA,
             "$.workspaceId"),
        # -- other identifiers ----------------------------------------------------------
        dead("run_id_escape_sequence", event("c-id-\x1b[31mred"), SCHEMA, "$.runId"),
        dead("run_id_trailing_newline", event("c-id-nl\n"), SCHEMA, "$.runId"),
        dead("run_id_crlf_log_line", event('c-id\r\n{"level":"error","event":"forged"}'),
             SCHEMA, "$.runId"),
        dead("run_id_line_separator", event("c-id-\u2028x"), SCHEMA, "$.runId"),
        dead("run_id_bidi_override", event("c-id-\u202egnp.exe"), SCHEMA, "$.runId"),
        dead("run_id_201_chars", event("c" * 201), SCHEMA, "$.runId"),
        stored("run_id_200_chars", event("c" * 200)),
        stored("run_id_unicode", event("c-id-東京-é-✓")),
        dead("event_id_control", {**event("c-eid"), "eventId": "e\x07"}, SCHEMA, "$.eventId"),
        dead("event_id_201_chars", {**event("c-eid-long"), "eventId": "e" * 201}, SCHEMA,
             "$.eventId"),
        dead("event_id_missing", {k: v for k, v in event("c-eid-none").items()
                                  if k != "eventId"}, SCHEMA, "eventId"),
        dead("workflow_id_newline", {**event("c-wf"), "workflowId": "wf\n"}, SCHEMA,
             "$.workflowId"),
        dead("node_id_nel", node_event("c-nid", nodeId="n\u0085"), SCHEMA, "$.node.nodeId"),
        dead("node_id_201_chars", node_event("c-nid-long", nodeId="n" * 201), SCHEMA,
             "$.node.nodeId"),
        # -- keys inside input and output ---------------------------------------------
        stored("dollar_and_dot_keys",
               node_event("c-keys", input={"$where": "1", "a.b": {"$gt": ""}, "..": [{"$": 1}]},
                          output={"$set": {"x.y": None}}),
               check=_all(_node("input", {"$where": "1", "a.b": {"$gt": ""}, "..": [{"$": 1}]}),
                          _node("output", {"$set": {"x.y": None}}))),
        # -- idempotency ------------------------------------------------------------
        stored("same_event_id_different_content",
               node_event("c-same-eid", output="first"), node_event("c-same-eid", output="second"),
               check=_node("output", "first")),
        # -- times ----------------------------------------------------------------------
        dead("ts_without_offset", {**event("c-ts-naive"), "ts": "2026-02-15T10:30:00"}, SCHEMA,
             "$.ts"),
        dead("ts_year_0001_east_of_utc", {**event("c-ts-min"), "ts": "0001-01-01T00:30:00+01:00"},
             SCHEMA, "time out of range"),
        dead("ts_year_9999_west_of_utc", {**event("c-ts-max"), "ts": "9999-12-31T23:30:00-01:00"},
             SCHEMA, "time out of range"),
        dead("started_at_year_0001_east_of_utc",
             node_event("c-st-min", startedAt="0001-01-01T00:30:00+01:00"), SCHEMA,
             "$.node.startedAt"),
        dead("completed_at_year_9999_west_of_utc",
             {**event("c-ca-max", "run.completed"), "completedAt": "9999-12-31T23:30:00-01:00"},
             SCHEMA, "$.completedAt"),
        stored("ts_year_0001_utc", {**event("c-ts-0001"), "ts": "0001-01-01T00:00:00Z"},
               check=_run("startedAt", datetime(1, 1, 1, tzinfo=UTC))),
        stored("ts_year_9999_utc", {**event("c-ts-9999"), "ts": "9999-12-31T23:59:59Z"},
               check=_run("startedAt", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))),
        dead("ts_not_rfc3339", {**event("c-ts-text"), "ts": "15/02/2026 10:30"}, SCHEMA, "$.ts"),
        stored("ts_offset_without_colon", {**event("c-ts-0200"), "ts": "2026-02-15T10:30:00+0200"},
               check=_run("startedAt", datetime(2026, 2, 15, 8, 30, tzinfo=UTC))),
        stored("ts_space_and_lowercase", {**event("c-ts-space"), "ts": "2026-02-15 10:30:00z"},
               check=_run("startedAt", datetime(2026, 2, 15, 10, 30, tzinfo=UTC))),
        dead("ts_without_seconds", {**event("c-ts-hhmm"), "ts": "2026-02-15T10:30Z"}, SCHEMA,
             "$.ts"),
        dead("ts_epoch_number", {**event("c-ts-num"), "ts": 1771151400}, SCHEMA, "$.ts"),
        stored("completed_at_before_started_at",
               node_event("c-neg", startedAt="2026-02-15T10:30:05Z",
                          completedAt="2026-02-15T10:30:00Z"),
               check=_node("durationMs", -5000.0)),
        # -- order ----------------------------------------------------------------------
        stored("node_failed_after_run_completed",
               event("c-late-fail", "run.completed"),
               node_event("c-late-fail", "node.failed", error={"message": "late"}),
               check=_all(_run("status", "completed"), _node("status", "failed"),
                          lambda r: _summary(r, "failedNodes", 1))),
        stored("terminal_before_start",
               {**event("c-end-first", "run.completed"), "ts": "2026-02-15T10:31:00Z"},
               event("c-end-first"),
               check=_all(_run("status", "completed"),
                          _run("startedAt", datetime(2026, 2, 15, 10, 30, tzinfo=UTC)),
                          _run("completedAt", datetime(2026, 2, 15, 10, 31, tzinfo=UTC)))),
        dead("terminal_status_running", {**event("c-running", "run.completed"),
                                         "status": "running"}, SCHEMA, "'running'"),
        # -- snapshots, attempts, tokens ------------------------------------------------
        dead("snapshot_10001_nodes", event("c-snap-big", "run.snapshot", nodes=SNAPSHOT_NODES),
             SCHEMA, "length <= 10000"),
        stored("snapshot_10000_nodes",
               event("c-snap-max", "run.snapshot", nodes=SNAPSHOT_NODES[:10_000]),
               check=lambda r: _summary(r, "nodeExecutions", 10_000)),
        dead("attempt_0", node_event("c-att-0", attempt=0), SCHEMA, "$.node.attempt"),
        dead("attempt_negative", node_event("c-att-neg", attempt=-3), SCHEMA, "$.node.attempt"),
        dead("attempt_huge", node_event("c-att-huge", attempt=2**70), SCHEMA, "$.node.attempt"),
        stored("attempt_1000000", node_event("c-att-max", attempt=1_000_000),
               check=_node("attempt", 1_000_000)),
        dead("tokens_negative", node_event("c-tok-neg", tokens_used={"input": -1}), SCHEMA,
             "$.node.tokens_used.input"),
        # -- injection in messages --------------------------------------------------------
        stored("terminal_and_log_injection_in_messages",
               node_event("c-inject", "node.failed",
                          error={"type": "E\x1b[0m", "message": HOSTILE_TEXT}, output=HOSTILE_TEXT),
               check=_all(_node("output", HOSTILE_TEXT),
                          lambda r: _eq(r.nodes[0]["error"]["message"], HOSTILE_TEXT))),
    ]
    return c


def _eq(a: Any, b: Any) -> None:
    assert a == b


def _summary(r: Result, key: str, value: Any) -> None:
    assert r.run is not None
    assert r.run["summary"][key] == value


CASES = _cases()
