"""The pure merge model (worker.documents): unit tests and hypothesis properties."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference import (
    COMPLETED_AT,
    NODES,
    RUN_ID,
    STARTED_AT,
    SUMMARY,
    TRIGGER,
    WORKSPACE,
    decoded,
    reference_events,
    reference_snapshot,
)
from tests.store_conformance import T0, Raw, Scenario, event, node, scenarios
from worker import events as ev
from worker.documents import (
    COMPLETED,
    FAILED,
    RUNNING,
    NodeDoc,
    RunPatch,
    WriteBatch,
    coalesce,
    fold,
    node_key,
    status_rank,
    summarize,
)

KEY = (WORKSPACE, RUN_ID)


def one(raw: Raw, source: int = 0) -> tuple[RunPatch, list[NodeDoc]]:
    """The run patch and node documents one event stands for."""
    batch = coalesce([(source, decoded([raw])[0])])
    (run,) = batch.runs.values()
    return run, list(batch.nodes.values())


def test_status_rank_order() -> None:
    """running < completed < any other terminal status < failed."""
    assert status_rank(RUNNING) < status_rank(COMPLETED) < status_rank("cancelled")
    assert status_rank("cancelled") == status_rank("timed_out") < status_rank(FAILED)


def test_node_key_is_deterministic_and_distinct() -> None:
    """The node key depends on run, node and attempt, and on nothing else."""
    assert node_key("r", "n", 1) == node_key("r", "n", 1)
    keys = {node_key("r", "n", 1), node_key("r", "n", 2), node_key("r", "m", 1),
            node_key("s", "n", 1), node_key("r\x1fn", "1", 1)}
    assert len(keys) == 5
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys)


def test_reference_record_folds_to_the_design_summary() -> None:
    """The reference record's run document carries the design's summary and fields."""
    runs, nodes = fold(decoded(reference_events()))
    run = runs[KEY]
    assert run["summary"] == SUMMARY
    assert run["status"] == COMPLETED
    assert run["trigger"] == TRIGGER
    assert run["startedAt"] == ev.parse_time(STARTED_AT)
    assert run["completedAt"] == ev.parse_time(COMPLETED_AT)
    assert run["totalDuration"] == 4800
    assert run["eventIds"] == [f"{RUN_ID}:completed", f"{RUN_ID}:started"]
    assert sorted(e["nodeId"] for e in run["nodeIndex"].values()) == \
        sorted(n["nodeId"] for n in NODES)
    assert len(nodes) == 4
    classify = nodes[(*KEY, node_key(RUN_ID, "classify", 1))]
    assert classify["durationMs"] == 1200.0
    assert classify["output"]["intent"] == "purchase_inquiry"
    assert classify["eventId"] == f"{RUN_ID}:classify:1"
    assert classify["workflowId"] == "wf_lead_triage"


def test_snapshot_folds_like_the_events() -> None:
    """A run.snapshot of the record gives the same run fields and node payloads."""
    live_runs, live_nodes = fold(decoded(reference_events()))
    snap_runs, snap_nodes = fold(decoded([reference_snapshot()]))
    for name in ("status", "startedAt", "completedAt", "trigger", "totalDuration", "summary",
                 "nodeIndex"):
        assert snap_runs[KEY][name] == live_runs[KEY][name], name
    assert snap_runs[KEY]["eventIds"] == [f"{RUN_ID}:snapshot"]
    assert snap_nodes.keys() == live_nodes.keys()
    for key, doc in snap_nodes.items():
        assert {k: v for k, v in doc.items() if k != "eventId"} == \
            {k: v for k, v in live_nodes[key].items() if k != "eventId"}


def test_node_status_from_event_type_and_payload() -> None:
    """node.failed is failed; an error marks a node failed; an explicit status is kept."""
    ws = "w"
    failed_says_completed = event(ev.NODE_FAILED, ws, "r", "e1", T0,
                                  node=node("a", "ai", T0, T0, status="completed"))
    completed_with_error = event(ev.NODE_COMPLETED, ws, "r", "e2", T0,
                                 node=node("b", "ai", T0, T0, error={"type": "X"}))
    skipped = event(ev.NODE_COMPLETED, ws, "r", "e3", T0,
                    node=node("c", "conditional", T0, T0, status="skipped"))
    assert one(failed_says_completed)[1][0].status == FAILED
    assert one(completed_with_error)[1][0].status == FAILED
    assert one(skipped)[1][0].status == "skipped"


def test_pipeline_keys_override_payload() -> None:
    """A node payload cannot spoof the keys the pipeline sets; event extras are kept."""
    raw = event(ev.NODE_COMPLETED, "w", "r", "real", T0, traceId="t1",
                node=node("a", "ai", T0, T0 + timedelta(seconds=2), eventId="spoof",
                          workspaceId="other", nodeKey="x", durationMs=1, custom=1))
    (doc,) = [n.doc for n in one(raw)[1]]
    assert (doc["eventId"], doc["workspaceId"], doc["nodeKey"]) == \
        ("real", "w", node_key("r", "a", 1))
    assert doc["durationMs"] == 2000.0
    assert (doc["custom"], doc["traceId"]) == (1, "t1")


def test_run_start_falls_back_to_node_times_and_ts() -> None:
    """A node event starts its run at the node's startedAt, else completedAt, else ts."""
    later = T0 + timedelta(seconds=9)
    cases = [(node("a", "ai", T0, later), T0), (node("a", "ai", None, later), later),
             (node("a", "ai", None, None), T0 + timedelta(hours=1))]
    for payload, start in cases:
        run, _ = one(event(ev.NODE_COMPLETED, "w", "r", "e", T0 + timedelta(hours=1),
                           node=payload))
        assert run.started_at == start
        assert run.completed_at is None
        assert run.event_ids == set()


def test_snapshot_with_a_repeated_node_keeps_the_worse_status() -> None:
    """The same execution twice in one snapshot indexes its higher-ranked status."""
    raw = event(ev.RUN_SNAPSHOT, "w", "r", "snap", T0, status="running",
                nodes=[node("a", "ai", T0, T0), node("a", "ai", T0, T0, error={"type": "X"})])
    run, nodes = one(raw)
    assert [e["status"] for e in run.node_index.values()] == [FAILED]
    batch = WriteBatch()
    batch.add(run, nodes)
    assert [n.status for n in batch.nodes.values()] == [FAILED]
    assert run.completed_at is None


def test_merge_rules() -> None:
    """Earliest start, latest end, highest status, largest duration, first values win."""
    a = RunPatch("w", "r", "wf", status=COMPLETED, started_at=T0 + timedelta(seconds=1),
                 completed_at=T0 + timedelta(seconds=5), trigger={"source": "a"},
                 total_duration=5.0, extra={"x": 1, "n": None}, event_ids={"e1"})
    b = RunPatch("w", "r", "wf-other", status=RUNNING, started_at=T0,
                 completed_at=T0 + timedelta(seconds=9), trigger={"source": "b"},
                 total_duration=9.0, error={"type": "E"}, extra={"x": 2, "n": 3, "y": 4},
                 event_ids={"e2"})
    a.merge(b)
    doc = a.to_doc()
    assert (doc["status"], doc["startedAt"], doc["completedAt"]) == \
        (COMPLETED, T0, T0 + timedelta(seconds=9))
    assert (doc["workflowId"], doc["trigger"], doc["error"]) == \
        ("wf", {"source": "a"}, {"type": "E"})
    assert (doc["totalDuration"], doc["x"], doc["n"], doc["y"]) == (9.0, 1, None, 4)
    assert doc["eventIds"] == ["e1", "e2"]


def test_node_index_merge_prefers_higher_status() -> None:
    """Per node key, the index entry with the higher status rank wins; ties keep the first."""
    entry = {"nodeId": "a", "attempt": 1, "type": "ai", "status": COMPLETED, "tokens": 3,
             "actions": []}
    failed = entry | {"status": FAILED, "tokens": 1}
    other = entry | {"tokens": 7}
    for first, second, want in ((entry, failed, failed), (failed, entry, failed),
                                (entry, other, entry)):
        run = RunPatch("w", "r", "wf", node_index={"k": first})
        run.merge(RunPatch("w", "r", "wf", node_index={"k": second}))
        assert run.node_index["k"] == want


def test_summary_is_derived_from_the_index() -> None:
    """The summary counts distinct nodes, executions, AI calls, actions and tokens."""
    index = {
        "1": {"nodeId": "a", "type": "ai", "status": FAILED, "tokens": 10, "actions": []},
        "2": {"nodeId": "a", "type": "ai", "status": COMPLETED, "tokens": 5, "actions": []},
        "3": {"nodeId": "b", "type": "action", "status": COMPLETED, "tokens": 0,
              "actions": ["z.do", "a.do"]},
        "4": {"nodeId": "c", "type": "action", "status": COMPLETED, "tokens": 0,
              "actions": ["a.do"]},
    }
    assert summarize(index) == {"nodesExecuted": 3, "nodeExecutions": 4, "aiCallsMade": 2,
                                "actionsPerformed": ["a.do", "z.do"], "totalTokens": 15,
                                "failedNodes": 1}
    assert summarize({}) == {"nodesExecuted": 0, "nodeExecutions": 0, "aiCallsMade": 0,
                             "actionsPerformed": [], "totalTokens": 0, "failedNodes": 0}


def test_run_doc_round_trips_through_from_doc() -> None:
    """Rebuilding a patch from its stored document and merging it again changes nothing."""
    runs, _ = fold(decoded([*reference_events(), reference_snapshot()]))
    doc = runs[KEY]
    again = RunPatch.from_doc(doc)
    assert again.to_doc() == doc
    again.merge(RunPatch.from_doc(doc))
    assert again.to_doc() == doc


def test_rebuilt_patch_keeps_identity_error_and_signers() -> None:
    """The run document names its own workspace and run, and a patch rebuilt from a stored
    document keeps the run's error and the key IDs that signed its events."""
    runs, _ = fold(decoded(reference_events()))
    doc = runs[KEY]
    assert (doc["workspaceId"], doc["runId"], doc["workflowId"]) == (WORKSPACE, RUN_ID,
                                                                     "wf_lead_triage")
    stored = {**doc, "error": {"type": "CRMTimeout"}, "signedBy": ["k1", "k2"]}
    again = RunPatch.from_doc(stored)
    assert (again.to_doc()["error"], again.to_doc()["signedBy"]) == ({"type": "CRMTimeout"},
                                                                     ["k1", "k2"])


def test_node_index_entries_are_pinned() -> None:
    """What the run document keeps per node execution, written out (a retry included)."""
    retry = {**NODES[1], "attempt": 2, "tokens_used": {"input": 10, "output": 5}}
    raw = [*reference_events(), {**reference_events()[2], "eventId": "evt-retry",
                                 "node": retry}]
    runs, _ = fold(decoded(raw))
    got = sorted(runs[KEY]["nodeIndex"].values(), key=lambda e: (e["nodeId"], e["attempt"]))
    base = {"status": "completed", "tokens": 0, "actions": []}
    assert got == [
        {**base, "nodeId": "classify", "attempt": 1, "type": "ai", "tokens": 535},
        {**base, "nodeId": "classify", "attempt": 2, "type": "ai", "tokens": 15},
        {**base, "nodeId": "route", "attempt": 1, "type": "conditional"},
        {**base, "nodeId": "source", "attempt": 1, "type": "source"},
        {**base, "nodeId": "update-crm", "attempt": 1, "type": "action",
         "actions": ["salesforce.create_lead"]},
    ]


def test_split_by_run_partitions_the_batch() -> None:
    """Each part holds one run and its nodes; together they hold every source."""
    raw = reference_events("w1") + reference_events("w2", "other")
    batch = coalesce(enumerate(decoded(raw)))
    parts = batch.split_by_run()
    assert len(parts) == 2
    assert all(len(p.runs) == 1 for p in parts)
    assert sum(len(p.nodes) for p in parts) == len(batch.nodes) == 8
    assert set().union(*(p.sources() for p in parts)) == batch.sources() == \
        set(range(len(raw)))
    assert batch.workspaces() == {"w1", "w2"}


# -- properties ----------------------------------------------------------------------------

def _decoded(scenario: Scenario, indices: list[int]) -> list[ev.Decoded]:
    return decoded([scenario.events[i] for i in indices])


def _stored_merge(scenario: Scenario, batches: list[list[int]]) -> tuple[dict[Any, Any],
                                                                        dict[Any, Any]]:
    """What a store that persists documents between batches ends with."""
    runs: dict[Any, dict[str, Any]] = {}
    nodes: dict[Any, dict[str, Any]] = {}
    for batch_ids in batches:
        batch = coalesce(enumerate(_decoded(scenario, batch_ids)))
        for key, patch in batch.runs.items():
            if key in runs:
                stored = RunPatch.from_doc(runs[key])
                stored.merge(patch)
                patch = stored
            runs[key] = patch.to_doc()
        for node_id, doc in batch.nodes.items():
            if node_id in nodes:
                stored_node = NodeDoc.from_doc(nodes[node_id])
                stored_node.merge(doc)
                doc = stored_node
            nodes[node_id] = doc.doc
    return runs, nodes


@settings(max_examples=60, deadline=None)
@given(scenario=scenarios())
def test_batched_merge_equals_fold(scenario: Scenario) -> None:
    """Any multiset of events, in any order and batches, merges to fold(distinct events)."""
    want = fold(_decoded(scenario, scenario.written()))
    assert _stored_merge(scenario, scenario.first) == want
    assert _stored_merge(scenario, scenario.second) == want


@settings(max_examples=60, deadline=None)
@given(scenario=scenarios(), data=st.data())
def test_fold_is_order_independent_and_idempotent(scenario: Scenario, data: st.DataObject) -> None:
    """fold ignores order and duplicates."""
    events = _decoded(scenario, list(range(len(scenario.events))))
    shuffled = data.draw(st.permutations(events))
    assert fold(shuffled) == fold(events) == fold(events + shuffled)


@settings(max_examples=60, deadline=None)
@given(scenario=scenarios())
def test_summary_counts_each_execution_once(scenario: Scenario) -> None:
    """The summary equals a count over the distinct node executions of each run."""
    runs, nodes = fold(_decoded(scenario, scenario.written()))
    for key, run in runs.items():
        mine = [doc for k, doc in nodes.items() if k[:2] == key]
        assert run["summary"]["nodeExecutions"] == len(mine)
        assert run["summary"]["nodesExecuted"] == len({d["nodeId"] for d in mine})
        assert run["summary"]["aiCallsMade"] == sum(d["type"] == "ai" for d in mine)
        assert run["summary"]["failedNodes"] == sum(d["status"] == FAILED for d in mine)
        assert run["summary"]["totalTokens"] == sum(
            sum((d.get("tokens_used") or {}).values()) for d in mine)
        assert run["status"] != RUNNING or run["completedAt"] is None


#: Action shapes real engines send, and the name the summary gives each.
ACTION_SHAPES: list[tuple[Any, str | None]] = [
    ("salesforce.create_lead", "salesforce.create_lead"),
    ({"type": "hubspot.update", "id": "1"}, "hubspot.update"),
    ({"system": "salesforce", "operation": "create_lead", "ref": "00Q123"},
     "salesforce.create_lead"),
    ({"system": "slack", "ref": "C1"}, "slack"),
    ({"operation": "send_email"}, "send_email"),
    ({"name": "notify-owner", "channel": "email"}, "notify-owner"),
    ({"type": 7, "name": "typed-by-number"}, "typed-by-number"),
    ({"ref": "anonymous"}, None),
    ("", None),
]


def test_actions_without_a_type_are_stored_as_sent_and_named_by_their_other_fields() -> None:
    """No action shape rejects a node: the summary names it by type, system/operation or name."""
    actions = [shape for shape, _ in ACTION_SHAPES]
    nodes = [node(f"n{i}", "action", T0, T0 + timedelta(seconds=1)) for i in range(20)]
    nodes[7]["actions"] = actions
    snapshot = event(ev.RUN_SNAPSHOT, "w", "r", "e1", T0, status="completed", nodes=nodes)
    runs, stored = fold(decoded([snapshot]))
    assert len(stored) == 20
    (seventh,) = [n for n in stored.values() if n["nodeId"] == "n7"]
    assert seventh["actions"] == actions
    assert runs[("w", "r")]["summary"]["actionsPerformed"] == sorted(
        {name for _, name in ACTION_SHAPES if name is not None})
