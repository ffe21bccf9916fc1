"""The MongoDB store on the wire, without a MongoDB server.

A mockupdb server stands in for a replica-set primary. It answers through a small
in-memory emulator (``FakeMongo``) that evaluates the update pipelines the store sends
with MongoDB's documented expression semantics, so writes can be read back; tests
inject failures (duplicate keys, write-concern errors, not-primary, hang-ups,
oversized documents) per command. The tests pin the exact commands the store sends
and what it makes of each reply.
"""

from __future__ import annotations

import itertools
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import ROOT
from tests.mongo_emulator import FakeMongo, _canon, apply_pipeline, url_of
from tests.store_conformance import StoreConformance
from worker import events as ev
from worker.documents import WriteBatch, coalesce, fold, node_key
from worker.errors import ConfigError, StoreNotOpen, StoreRejected, StoreUnavailable
from worker.settings import _ENV_NAMES, Settings
from worker.stores import _mongo_codec as mc
from worker.stores import migrate, store_from
from worker.stores._mongo_options import MongoOptions
from worker.stores.base import NodeQuery, RunQuery, Store
from worker.stores.mongo import MongoStore

pytestmark = pytest.mark.mongo

@pytest.fixture
def fake(mongo_wire: FakeMongo) -> FakeMongo:
    """The session's emulated primary, reset."""
    return mongo_wire


def env_options(**env: str) -> MongoOptions:
    """The store options these ``AUDIT_MONGO_*`` variables give (through Settings)."""
    return Settings.from_env(env).mongo_options()


@pytest.fixture
async def store(fake: FakeMongo) -> AsyncIterator[MongoStore]:
    s = MongoStore(url_of(fake))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# --------------------------------------------------------------------------- events

T0 = datetime(2026, 2, 15, 10, 30, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def event(kind: str, eid: str, run: str = "run-1", ws: str = "acme", **fields: Any
          ) -> ev.Decoded:
    raw = {"v": 1, "eventId": eid, "type": kind, "workspaceId": ws, "workflowId": "wf_lead",
           "runId": run, "ts": at(10), **fields}
    return ev.validate(raw)


def lead_triage(run: str = "run-1", ws: str = "acme", prompt: str = "Classify this email...",
                ) -> list[ev.Decoded]:
    """The design's reference record as individual events."""
    return [
        event("run.started", f"{run}-s", run, ws, ts=at(0),
              trigger={"type": "webhook", "source": "gmail",
                       "metadata": {"from": "lead@example.com", "subject": "Pricing"}}),
        event("node.completed", f"{run}-n1", run, ws, ts=at(2.2), node={
            "nodeId": "classify", "type": "ai", "startedAt": at(1), "completedAt": at(2.2),
            "input": {"prompt": prompt, "context_tokens": 450},
            "output": {"intent": "purchase_inquiry", "confidence": 0.91,
                       "reasoning": "Explicitly asks for enterprise pricing"},
            "model": "claude-sonnet-4-20250514", "tokens_used": {"input": 450, "output": 85}}),
        event("node.completed", f"{run}-n2", run, ws, ts=at(2.3), node={
            "nodeId": "route", "type": "conditional", "startedAt": at(2.25),
            "completedAt": at(2.3),
            "evaluation": "intent == 'purchase_inquiry' AND confidence >= 0.9",
            "result": "fast-track", "skippedBranches": ["standard-nurture", "support-queue"]}),
        event("node.completed", f"{run}-n3", run, ws, ts=at(4.5), node={
            "nodeId": "update-crm", "type": "action", "startedAt": at(2.4),
            "completedAt": at(4.5),
            "actions": [{"type": "salesforce.create_lead", "id": "00Q123"}]}),
        event("run.completed", f"{run}-c", run, ws, ts=at(4.8), totalDuration=4800),
    ]


def batch_of(decoded: list[ev.Decoded], first: int = 1) -> WriteBatch:
    return coalesce((first + i, d) for i, d in enumerate(decoded))


def expected(decoded: list[ev.Decoded]) -> tuple[dict[Any, Any], dict[Any, Any]]:
    return fold(decoded)


# --------------------------------------------------------------------------- pure parts

_keys = st.text(alphabet=st.sampled_from(list("ab$._%\x00 é5F")), max_size=6)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3),
    max_leaves=12,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _json, max_size=5))
def test_key_escaping_round_trips_and_leaves_no_operator_or_path(doc: dict[str, Any]) -> None:
    """Escaped keys hold no $, dot or NUL (no leading _ at the top) and unescape exactly."""
    stored = mc.escape_doc(doc)
    assert mc.unescape_doc(stored) == doc

    def check(value: Any, top: bool) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                assert key
                assert not any(ch in key for ch in "$.\x00")
                assert not (top and key.startswith("_"))
                check(inner, False)
        elif isinstance(value, list):
            for inner in value:
                check(inner, False)

    check(stored, True)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("audit_acme", None),
        ("audit_" + "a" * 57, None),
        ("audit_" + "a" * 58, "at most 63"),
        ("audit_a.b", "forbids"),
        ("audit_a b", "forbids"),
        ("audit_a$b", "forbids"),
        ("audit_a/b", "forbids"),
        ("audit_a\x00b", "forbids"),
        ("admin", "reserved"),
        ("Local", "reserved"),
        ("config", "reserved"),
        ("", "empty"),
    ],
)
def test_database_names_follow_mongodb_rules(name: str, problem: str | None) -> None:
    """Forbidden characters, the 64-byte limit and reserved names are refused."""
    found = mc.db_name_problem(name)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


def test_index_specs_are_the_designs_in_key_order() -> None:
    """Exactly the design's indexes (and the subjects index erasure looks runs up by); in
    a shared database each starts with workspaceId."""
    assert mc.run_indexes(False) == [[("workflowId", 1), ("startedAt", -1)],
                                     [("status", 1), ("startedAt", -1)],
                                     [("trigger.source", 1)], [("subjects", 1)]]
    assert mc.node_indexes(False) == [[("runId", 1)], [("type", 1), ("startedAt", -1)]]
    assert all(spec[0] == ("workspaceId", 1) for spec in mc.run_indexes(True)
               + mc.node_indexes(True))


_STATUS = st.sampled_from(["completed", "failed", "cancelled", "timed_out"])


#: What a node execution reports besides its status and times: the same for every event
#: of one execution, since fold() keeps the first of two contradicting reports.
NODE_FIELDS: dict[str, dict[str, Any]] = {
    "classify": {"type": "ai", "tokens_used": {"input": 450, "output": 85},
                 "output": {"k.v": 1, "$gt": "x"}},
    "route": {"type": "conditional", "actions": [], "result": "$fast"},
    "crm": {"type": "action", "actions": ["crm.update", {"type": "mail", "id": 1}]},
}
EXTRAS: dict[str, Any] = {"tag": "t", "$tag": {"a.b": 1}, "a.b": None}


@st.composite
def run_events(draw: st.DrawFn) -> list[ev.Decoded]:
    """Events of up to two runs: starts, nodes (retries, failures), ends and snapshots."""
    out: list[ev.Decoded] = []
    counter = itertools.count()
    for run in draw(st.sampled_from([["r1"], ["r1", "r2"]])):
        trigger = {"source": draw(st.sampled_from(["gmail", "$x"]))}
        for _ in range(draw(st.integers(0, 2))):
            extra = draw(st.sampled_from(sorted(EXTRAS)))
            out.append(event("run.started", f"e{next(counter)}", run,
                             ts=at(draw(st.integers(0, 5))), trigger=trigger,
                             **{extra: EXTRAS[extra]}))
        for _ in range(draw(st.integers(0, 4))):
            node_id = draw(st.sampled_from(sorted(NODE_FIELDS)))
            node = {"nodeId": node_id, "attempt": draw(st.integers(1, 2)),
                    "startedAt": at(draw(st.integers(0, 9))), **NODE_FIELDS[node_id]}
            # every status rank: running < completed < other ("skipped") < failed
            status = draw(st.sampled_from([None, None, "running", "skipped"]))
            if status is not None:
                node["status"] = status
            kind = draw(st.sampled_from(["node.completed", "node.failed"]))
            out.append(event(kind, f"e{next(counter)}", run, node=node))
        for _ in range(draw(st.integers(0, 2))):
            out.append(event("run.completed", f"e{next(counter)}", run,
                             ts=at(draw(st.integers(5, 20))), status=draw(_STATUS),
                             totalDuration=draw(st.integers(0, 9000))))
        if draw(st.booleans()):
            out.append(event("run.snapshot", f"e{next(counter)}", run, ts=at(30),
                             trigger=trigger,
                             status=draw(st.sampled_from(["running", "completed"])),
                             nodes=[{"nodeId": "classify", "startedAt": at(draw(
                                 st.integers(0, 9))), **NODE_FIELDS["classify"]}]))
    return out


def _apply(docs: dict[Any, dict[str, Any]], batch: Any) -> None:
    for run in batch.runs.values():
        old = docs.get(run.key, {"_id": run.run_id})
        docs[run.key] = apply_pipeline(old, _canon(mc.run_pipeline(run)))
    for node in batch.nodes.values():
        stored = {"_id": node.node_key, **mc.escape_doc(node.doc)}
        mc.add_exact_times(stored, node.doc)
        old = docs.get(node.key, {"_id": node.node_key})
        docs[node.key] = apply_pipeline(old, _canon(mc.node_pipeline(node, stored)))


def _revive(doc: dict[str, Any]) -> dict[str, Any]:
    out = mc.from_stored(doc)
    if isinstance(out.get("nodeIndex"), dict):
        out["nodeIndex"] = dict(sorted(out["nodeIndex"].items()))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run_events(), st.randoms(use_true_random=False), st.integers(1, 4))
def test_update_pipelines_merge_exactly_like_the_fold(
    decoded: list[ev.Decoded], rng: random.Random, batches: int
) -> None:
    """Pipelines applied per batch, in any order, with redelivery, end as fold() says."""
    replayed = decoded + rng.sample(decoded, k=len(decoded) // 2)
    rng.shuffle(replayed)
    docs: dict[Any, dict[str, Any]] = {}
    for i in range(batches):
        _apply(docs, batch_of(replayed[i::batches]))
    runs, nodes = fold(decoded)
    assert {k: _revive(v) for k, v in docs.items() if len(k) == 2} == runs
    assert {k: _revive(v) for k, v in docs.items() if len(k) == 3} == nodes


# --------------------------------------------------------------------------- wire: writes

def updates(fake: FakeMongo, coll: str) -> list[dict[str, Any]]:
    return [c for c in fake.sent("update") if c["update"] == coll]


def _keys_everywhere(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from _keys_everywhere(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _keys_everywhere(inner)


def _literal_keys(value: Any) -> Iterator[str]:
    """Keys inside $literal values and stored field names of a pipeline."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "$literal":
                yield from _keys_everywhere(inner)
            else:
                yield from _literal_keys(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _literal_keys(inner)


@pytest.mark.anyio
async def test_batch_is_one_unordered_majority_bulk_per_database_and_collection(
    fake: FakeMongo, store: MongoStore
) -> None:
    """Two workspaces: one update command per database and collection, ordered false,
    w majority with journal, upserts of update pipelines keyed by _id."""
    decoded = lead_triage("run-1", "acme") + lead_triage("run-2", "acme") \
        + lead_triage("run-9", "beta")
    result = await store.write(batch_of(decoded))
    assert result.rejected == ()
    sent = fake.sent("update")
    assert sorted((c["$db"], c["update"]) for c in sent) == [
        ("audit_acme", "workflow_node_runs"), ("audit_acme", "workflow_runs"),
        ("audit_beta", "workflow_node_runs"), ("audit_beta", "workflow_runs")]
    for command in sent:
        assert command["ordered"] is False
        assert command["writeConcern"] == {"w": "majority", "j": True}
        assert "txnNumber" in command  # retryable writes
        for op in command["updates"]:
            assert op["upsert"] is True
            assert op.get("multi", False) is False
            assert isinstance(op["u"], list)
            assert list(op["q"]) == ["_id"]
    runs = next(c for c in sent if c["update"] == "workflow_runs" and c["$db"] == "audit_acme")
    assert [op["q"]["_id"] for op in runs["updates"]] == ["run-1", "run-2"]
    stages = runs["updates"][0]["u"]
    assert [next(iter(s)) for s in stages] == ["$set", "$set"]
    assert list(stages[1]["$set"]) == ["summary"]
    merged = stages[0]["$set"]
    assert merged["startedAt"] == {"$min": ["$startedAt", {"$literal": _canon(
        datetime.fromisoformat(at(0)))}]}
    assert merged["completedAt"]["$max"][0] == "$completedAt"
    assert merged["trigger"]["$ifNull"][0] == "$trigger"
    assert "$sortArray" in merged["eventIds"]
    nodes = next(c for c in sent if c["update"] == "workflow_node_runs"
                 and c["$db"] == "audit_acme")
    key = node_key("run-1", "classify", 1)
    op = next(o for o in nodes["updates"] if o["q"] == {"_id": key})
    (stage,) = op["u"]
    cond = stage["$replaceWith"]["$cond"]
    assert cond[2] == "$$ROOT"
    assert cond[1]["$literal"]["_id"] == key
    assert "$inc" not in repr(sent)


@pytest.mark.anyio
async def test_round_trip_matches_the_fold(fake: FakeMongo, store: MongoStore) -> None:
    """What the store returns is exactly fold() of the events written, in two batches."""
    decoded = lead_triage()
    await store.write(batch_of(decoded[3:]))
    await store.write(batch_of(decoded[:3] + decoded[4:], first=10))
    runs, nodes = expected(decoded)
    assert await store.get_run("acme", "run-1") == runs[("acme", "run-1")]
    got = await store.get_nodes("acme", "run-1")
    assert [n["nodeId"] for n in got] == ["classify", "route", "update-crm"]
    assert got == [nodes[k] for k in sorted(nodes, key=lambda k: got_index(nodes[k]))]
    run = await store.get_run("acme", "run-1")
    assert run is not None
    assert run["summary"] == {"nodesExecuted": 3, "nodeExecutions": 3, "aiCallsMade": 1,
                              "actionsPerformed": ["salesforce.create_lead"],
                              "totalTokens": 535, "failedNodes": 0}
    assert run["startedAt"].tzinfo is not None
    assert "_id" not in run


def got_index(doc: dict[str, Any]) -> tuple[Any, ...]:
    return (doc["startedAt"], doc["attempt"], doc["nodeId"])


@pytest.mark.anyio
async def test_indexes_are_created_once_per_database_with_exact_specs(
    fake: FakeMongo, store: MongoStore
) -> None:
    """createIndexes carries the design's keys in order; a second batch does not resend."""
    await store.write(batch_of(lead_triage()))
    await store.write(batch_of(lead_triage("run-2"), first=20))
    sent = fake.sent("createIndexes")
    assert [(c["$db"], c["createIndexes"]) for c in sent] == [
        ("audit_acme", "workflow_runs"), ("audit_acme", "workflow_node_runs")]
    assert [list(i["key"].items()) for i in sent[0]["indexes"]] == mc.run_indexes(False)
    assert [list(i["key"].items()) for i in sent[1]["indexes"]] == mc.node_indexes(False)
    assert [i["name"] for i in sent[0]["indexes"]] == [
        "workflowId_1_startedAt_-1", "status_1_startedAt_-1", "trigger.source_1",
        "subjects_1"]
    assert not any("prompt" in repr(i) or "output" in repr(i) or "input" in repr(i)
                   for c in sent for i in c["indexes"])
    await store.migrate()
    assert len(fake.sent("createIndexes")) == 4  # migrate re-applies them (idempotent)


@pytest.mark.anyio
async def test_hostile_field_names_are_escaped_on_the_wire_and_read_back_unchanged(
    fake: FakeMongo, store: MongoStore
) -> None:
    """$-prefixed, dotted, NUL, %-holding, empty and _id keys never reach the server raw."""
    hostile = {"$where": "sleep(1000)", "a.b": {"$gt": ""}, "nul\x00key": 1, "50%": "$x",
               "": "empty", "_id": "mine", "nested": [{"$set": {"x.y": 1}}]}
    spoofed: dict[str, Any] = {"$inc": {"summary.totalTokens": 1}, "a.b": 2, "_id": "spoof",
                               "meta": hostile}
    decoded = [
        event("run.started", "e1", **spoofed),
        event("node.completed", "e2", node={"nodeId": "classify", "type": "ai",
                                            "output": hostile, "input": {"$regex": ".*"},
                                            "_payload": "user data"}),
    ]
    await store.write(batch_of(decoded))
    for command in fake.sent("update"):
        for op in command["updates"]:
            for key in _literal_keys(op["u"]):
                assert not key.startswith("$")
                assert "." not in key
                assert "\x00" not in key
            for stage in op["u"]:
                for field in stage.get("$set", {}):
                    assert not field.startswith("$")
                    assert "." not in field
    stored = fake.docs("audit_acme", "workflow_runs")[0]
    assert stored["%24inc"] == {"summary%2EtotalTokens": 1}
    assert stored["_id"] == "run-1"
    assert stored["%5Fid"] == "spoof"
    runs, nodes = expected(decoded)
    assert await store.get_run("acme", "run-1") == runs[("acme", "run-1")]
    assert await store.get_nodes("acme", "run-1") == list(nodes.values())


@pytest.mark.anyio
async def test_duplicate_key_on_upsert_is_retried(fake: FakeMongo, store: MongoStore) -> None:
    """An E11000 from a racing upsert re-sends only that operation; nothing is rejected."""
    decoded = lead_triage("run-1") + lead_triage("run-2")

    def race(request: Any) -> bool:
        if request.doc["update"] != "workflow_runs":
            return bool(request.ok(**fake.do_update(_canon(dict(request.doc)))))
        ops = request.doc["updates"]
        return bool(request.ok(n=0, writeErrors=[{
            "index": 1, "code": 11000,
            "errmsg": f"E11000 duplicate key error dup key: {{ _id: \"{ops[1]['q']['_id']}\" }}",
        }], **{k: v for k, v in fake.do_update(_canon({**request.doc, "updates": ops[:1]}))
               .items() if k != "n"}))

    fake.fail_next("update", race, times=2)
    result = await store.write(batch_of(decoded))
    assert result.rejected == ()
    runs_sent = updates(fake, "workflow_runs")
    assert [[op["q"]["_id"] for op in c["updates"]] for c in runs_sent] == [
        ["run-1", "run-2"], ["run-2"]]
    runs, _ = expected(decoded)
    assert await store.get_run("acme", "run-2") == runs[("acme", "run-2")]


@pytest.mark.anyio
async def test_write_concern_error_makes_the_batch_retry(
    fake: FakeMongo, store: MongoStore
) -> None:
    """A write-concern timeout is transient: StoreUnavailable, and the retry converges."""
    decoded = lead_triage()
    fake.fail_next("update", lambda r: bool(r.ok(
        n=len(r.doc["updates"]), nModified=0,
        writeConcernError={"code": 64, "codeName": "WriteConcernFailed",
                           "errmsg": "waiting for replication timed out",
                           "errInfo": {"wtimeout": True}})))
    with pytest.raises(StoreUnavailable, match="replication timed out"):
        await store.write(batch_of(decoded))
    assert (await store.write(batch_of(decoded))).rejected == ()
    runs, _ = expected(decoded)
    assert await store.get_run("acme", "run-1") == runs[("acme", "run-1")]


@pytest.mark.anyio
async def test_not_primary_is_transient(fake: FakeMongo, store: MongoStore) -> None:
    """NotWritablePrimary (after the driver's own retry) surfaces as StoreUnavailable."""
    def not_primary(request: Any) -> bool:
        return bool(request.command_err(code=10107, errmsg="not primary",
                                        errorLabels=["RetryableWriteError"]))

    fake.fail_next("update", not_primary, times=4)
    with pytest.raises(StoreUnavailable):
        await store.write(batch_of(lead_triage()))


@pytest.mark.anyio
async def test_network_error_is_transient(fake: FakeMongo, store: MongoStore) -> None:
    """A connection dropped mid-write (twice, beating the driver's retry) is retryable."""
    fake.fail_next("update", lambda r: bool(r.hangup()), times=4)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        await store.write(batch_of(lead_triage()))


@pytest.mark.anyio
async def test_oversized_document_rejects_only_its_events(
    fake: FakeMongo, store: MongoStore
) -> None:
    """A server 'too large' error on one run rejects that run's events with the server's
    message; the other run is written."""
    decoded = lead_triage("run-1") + lead_triage("run-2")
    message = "BSONObj size: 16793700 (0x1003F64) is invalid. Size must be between 0 and " \
              "16793600(16MB)"

    def too_large(request: Any) -> bool:
        doc = _canon(dict(request.doc))
        if doc["update"] != "workflow_runs":
            return bool(request.ok(**fake.do_update(doc)))
        reply = fake.do_update({**doc, "updates": doc["updates"][:1]})
        return bool(request.ok(n=reply["n"], nModified=reply["nModified"],
                               upserted=reply.get("upserted", []), writeErrors=[
            {"index": 1, "code": 10334, "codeName": "BSONObjectTooLarge", "errmsg": message}]))

    fake.fail_next("update", too_large, times=2)
    result = await store.write(batch_of(decoded))
    (rejection,) = result.rejected
    assert message in rejection.reason
    assert "run 'run-2'" in rejection.reason
    assert set(rejection.sources) == set(range(6, 11))
    assert await store.get_run("acme", "run-1") is not None


@pytest.mark.anyio
async def test_unencodable_value_is_rejected_before_sending(
    fake: FakeMongo, store: MongoStore
) -> None:
    """An integer beyond BSON's int64 rejects its own events; the rest is written."""
    decoded = [event("node.completed", "e1", node={"nodeId": "n", "type": "ai",
                                                   "output": {"big": 2**70}}),
               event("run.started", "e2", "run-2")]
    result = await store.write(batch_of(decoded))
    (rejection,) = result.rejected
    assert rejection.sources == (1,)
    assert "node 'n' attempt 1 of run 'run-1'" in rejection.reason
    assert "BSON" in rejection.reason
    assert not any("big" in repr(c) for c in fake.sent("update"))
    assert await store.get_run("acme", "run-2") is not None


@pytest.mark.anyio
async def test_command_level_failure_maps_to_rejected_or_unavailable(
    fake: FakeMongo, store: MongoStore
) -> None:
    """A whole-command data error is StoreRejected (the worker splits the batch);
    an authorization error keeps the events pending (StoreUnavailable)."""
    await store.write(batch_of(lead_triage()))
    fake.fail_next("update", lambda r: bool(r.command_err(code=2, errmsg="bad value")))
    with pytest.raises(StoreRejected, match="bad value"):
        await store.write(batch_of(lead_triage(), first=50))
    fake.fail_next("update", lambda r: bool(r.command_err(code=13, errmsg="not authorized")))
    with pytest.raises(StoreUnavailable, match="not authorized"):
        await store.write(batch_of(lead_triage(), first=60))


# --------------------------------------------------------------------------- tenancy


@pytest.mark.anyio
async def test_workspace_differing_only_by_case_is_refused(
    fake: FakeMongo, store: MongoStore
) -> None:
    """A database that exists as audit_Acme refuses workspace 'acme' with a reason; in one
    batch, the first spelling (sorted) wins and the other is refused."""
    fake.coll("audit_Acme", "workflow_runs")
    result = await store.write(batch_of(lead_triage("run-1", "acme")))
    assert {s for r in result.rejected for s in r.sources} == set(range(1, 6))
    assert "differs only by case from the existing database 'audit_Acme'" \
        in result.rejected[0].reason
    assert not any(c["$db"] == "audit_acme" for c in fake.sent("update"))
    assert (await store.write(batch_of(lead_triage("run-1", "Acme")))).rejected == ()

    mixed = lead_triage("r", "Beta") + lead_triage("r", "beta")
    result = await store.write(batch_of(mixed, first=100))
    assert {s for r in result.rejected for s in r.sources} == set(range(105, 110))
    assert await store.get_run("Beta", "r") is not None


@pytest.mark.anyio
async def test_case_clash_cache_is_refreshed_when_a_database_is_dropped(
    fake: FakeMongo, store: MongoStore
) -> None:
    """A clash seen in a stale name cache is checked again against the server."""
    fake.coll("audit_Old", "workflow_runs")
    assert (await store.write(batch_of(lead_triage("r", "old")))).rejected != ()
    fake.data.pop("audit_Old")
    assert (await store.write(batch_of(lead_triage("r", "old"), first=10))).rejected == ()


@pytest.mark.anyio
async def test_server_case_refusal_racing_another_worker_is_a_rejection(
    fake: FakeMongo, store: MongoStore
) -> None:
    """A 13297 from the server (another worker created the other spelling) rejects the
    workspace's events instead of failing the batch."""
    fake.fail_next("createIndexes", lambda r: bool(r.command_err(
        code=13297, errmsg="db already exists with different case already have: [audit_Zed]"
        " trying to create [audit_zed]")))
    result = await store.write(batch_of(lead_triage("r", "zed")))
    assert {s for r in result.rejected for s in r.sources} == set(range(1, 6))
    assert "different case" in result.rejected[0].reason


@pytest.mark.anyio
@pytest.mark.parametrize("workspace", ["admin", "local", "config", "Admin"])
async def test_reserved_database_names_are_refused(fake: FakeMongo, workspace: str) -> None:
    """With an empty prefix, a workspace named like a system database goes to the DLQ."""
    store = MongoStore(url_of(fake), env_options(AUDIT_MONGO_DB_PREFIX=""))
    await store.open()
    try:
        result = await store.write(batch_of(lead_triage("r", workspace)))
    finally:
        await store.close()
    assert {s for r in result.rejected for s in r.sources} == set(range(1, 6))
    assert "reserved by MongoDB" in result.rejected[0].reason
    assert fake.sent("update") == []
    assert fake.sent("createIndexes") == []


@pytest.mark.anyio
async def test_field_tenancy_prefixes_ids_indexes_and_queries_with_workspace(
    fake: FakeMongo
) -> None:
    """AUDIT_MONGO_TENANCY=field: one shared database (the URL's), compound _ids, and
    every index and query led by workspaceId."""
    store = MongoStore(url_of(fake, "auditshared"), env_options(AUDIT_MONGO_TENANCY="field"))
    await store.open()
    try:
        decoded = lead_triage("run-1", "acme") + lead_triage("run-1", "beta")
        assert (await store.write(batch_of(decoded))).rejected == ()
        created = fake.sent("createIndexes")
        assert {c["$db"] for c in created} == {"auditshared"}
        for command in created:
            for index in command["indexes"]:
                assert next(iter(index["key"])) == "workspaceId"
        assert [list(i["key"].items()) for i in created[0]["indexes"]] == mc.run_indexes(True)
        assert [list(i["key"].items()) for i in created[1]["indexes"]] == mc.node_indexes(True)
        sent = fake.sent("update")
        assert {c["$db"] for c in sent} == {"auditshared"}
        run_ids = [op["q"]["_id"] for c in sent if c["update"] == "workflow_runs"
                   for op in c["updates"]]
        assert sorted(map(repr, run_ids)) == sorted(map(repr, [
            {"workspaceId": "acme", "runId": "run-1"}, {"workspaceId": "beta", "runId": "run-1"}]))
        runs, nodes = expected(decoded)
        assert await store.get_run("beta", "run-1") == runs[("beta", "run-1")]
        got = await store.get_nodes("acme", "run-1")
        assert got == [n for k, n in nodes.items() if k[0] == "acme"]
        listed = await store.list_runs("acme", RunQuery(workflow_id="wf_lead"))
        assert [r["workspaceId"] for r in listed] == ["acme"]
        assert await store.workspaces() == ["acme", "beta"]
        finds = fake.sent("find")
        assert all(next(iter(f["filter"])) in ("_id", "workspaceId") for f in finds)
        assert list(finds[-1]["filter"]) == ["workspaceId", "workflowId"]
        assert await store.delete_runs("acme", ["run-1"]) == 1
        assert await store.get_run("acme", "run-1") is None
        assert await store.get_run("beta", "run-1") is not None
    finally:
        await store.close()


# --------------------------------------------------------------------------- payloads


@pytest.mark.anyio
async def test_large_payload_is_stored_in_gridfs_and_read_back(fake: FakeMongo) -> None:
    """A node payload above the threshold moves to GridFS under a deterministic id; the
    node document stays small; reads put it back; redelivery uploads nothing twice."""
    store = MongoStore(url_of(fake), env_options(AUDIT_MONGO_LARGE_PAYLOAD_BYTES="4096"))
    await store.open()
    try:
        prompt = "Classify this email... " + "x" * 20_000
        decoded = lead_triage(prompt=prompt)
        assert (await store.write(batch_of(decoded))).rejected == ()
        key = node_key("run-1", "classify", 1)
        file_id = mc.payload_file_id("acme", key, "run-1-n1")
        files = fake.docs("audit_acme", "node_payloads.files")
        assert [f["_id"] for f in files] == [file_id]
        assert files[0]["metadata"]["runId"] == "run-1"
        assert fake.docs("audit_acme", "node_payloads.chunks")
        node = next(d for d in fake.docs("audit_acme", "workflow_node_runs") if d["_id"] == key)
        assert "input" not in node
        assert "output" not in node
        assert node["_payload"]["fileId"] == file_id
        assert node["type"] == "ai"
        assert len(bson.encode(node)) < 4096
        run_doc = fake.docs("audit_acme", "workflow_runs")[0]
        assert len(bson.encode(run_doc)) < 4096

        runs, nodes = expected(decoded)
        got = await store.get_nodes("acme", "run-1")
        assert got[0] == nodes[("acme", "run-1", key)]
        assert got[0]["input"]["prompt"] == prompt
        scanned = [d async for d in store.scan_nodes("acme", NodeQuery(
            types=("ai",), fields=("nodeId", "input")))]
        assert scanned == [{"nodeId": "classify", "input": {"prompt": prompt,
                                                            "context_tokens": 450}}]

        inserts = len(fake.sent("insert"))
        assert (await store.write(batch_of(decoded, first=50))).rejected == ()
        assert len(fake.sent("insert")) == inserts  # the file already exists
        assert await store.get_run("acme", "run-1") == runs[("acme", "run-1")]

        assert await store.delete_runs("acme", ["run-1"]) == 1
        assert fake.docs("audit_acme", "node_payloads.files") == []
        assert fake.docs("audit_acme", "node_payloads.chunks") == []
        assert fake.docs("audit_acme", "workflow_node_runs") == []
    finally:
        await store.close()


@pytest.mark.anyio
async def test_leftover_chunks_of_a_crashed_upload_are_replaced(
    fake: FakeMongo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks without a files document (an upload cut short) do not block the retry."""
    store = MongoStore(url_of(fake), env_options(AUDIT_MONGO_LARGE_PAYLOAD_BYTES="4096"))
    await store.open()
    try:
        decoded = lead_triage(prompt="y" * 50_000)
        key = node_key("run-1", "classify", 1)
        file_id = mc.payload_file_id("acme", key, "run-1-n1")
        fake.coll("audit_acme", "node_payloads.chunks")[fake.key("stale")] = {
            "_id": "stale", "files_id": file_id, "n": 0, "data": b"partial"}
        real_insert = fake.do_insert

        def unique_chunks(doc: dict[str, Any]) -> dict[str, Any]:
            if doc["insert"].endswith(".chunks"):
                have = {(c["files_id"], c["n"]) for c in fake.docs(doc["$db"], doc["insert"])}
                if any((c["files_id"], c["n"]) in have for c in doc["documents"]):
                    return {"n": 0, "writeErrors": [{"index": 0, "code": 11000,
                                                     "errmsg": "E11000 files_id_1_n_1"}]}
            return real_insert(doc)

        monkeypatch.setattr(fake, "do_insert", unique_chunks)
        assert (await store.write(batch_of(decoded))).rejected == ()
        chunks = fake.docs("audit_acme", "node_payloads.chunks")
        assert all(c["_id"] != "stale" for c in chunks)
        got = await store.get_nodes("acme", "run-1")
        assert got[0]["input"]["prompt"] == "y" * 50_000
    finally:
        await store.close()


# --------------------------------------------------------------------------- reads


@pytest.mark.anyio
async def test_reads_send_queries_in_index_key_order(fake: FakeMongo, store: MongoStore) -> None:
    """get_run by _id, get_nodes by runId, list_runs by (workflowId|status, startedAt)
    sorted newest first, ties by runId."""
    decoded = lead_triage("run-1") + lead_triage("run-2")
    decoded += [event("run.started", "x1", "run-3", ts=at(-60)),
                event("node.completed", "x2", "run-4", node={"nodeId": "n", "type": "ai"})]
    await store.write(batch_of(decoded))
    fake.commands.clear()
    await store.get_run("acme", "run-1")
    (find,) = fake.sent("find")
    assert find["find"] == "workflow_runs"
    assert find["filter"] == {"_id": "run-1"}
    assert find["limit"] == 1
    await store.get_nodes("acme", "run-1")
    assert fake.sent("find")[-1]["filter"] == {"runId": "run-1"}

    since = T0 - timedelta(seconds=30)
    listed = await store.list_runs("acme", RunQuery(workflow_id="wf_lead", since=since,
                                                    until=T0 + timedelta(hours=1), limit=10))
    find = fake.sent("find")[-1]
    assert list(find["filter"]) == ["workflowId", "startedAt", "_startedAtUs"]
    assert find["filter"]["startedAt"] == {"$gte": _canon(since),
                                           "$lte": _canon(T0 + timedelta(hours=1))}
    assert find["filter"]["_startedAtUs"] == {"$gte": mc.micros(since),
                                              "$lt": mc.micros(T0 + timedelta(hours=1))}
    assert list(find["sort"].items()) == [("startedAt", -1), ("_startedAtUs", -1),
                                          ("runId", 1)]
    assert find["limit"] == 10
    assert [r["runId"] for r in listed] == ["run-4", "run-1", "run-2"]

    await store.list_runs("acme", RunQuery(status="completed", trigger_source="gmail"))
    assert list(fake.sent("find")[-1]["filter"]) == ["status", "trigger.source"]
    everything = await store.list_runs("acme", RunQuery())
    assert [r["runId"] for r in everything] == ["run-4", "run-1", "run-2", "run-3"]
    assert await store.list_runs("acme", RunQuery(limit=0)) == []


@pytest.mark.anyio
async def test_scan_nodes_streams_in_order_with_exact_projection(
    fake: FakeMongo, store: MongoStore
) -> None:
    """scan_nodes filters by type/run/time, orders by (startedAt, runId, nodeId, attempt)
    with undated nodes last, and keeps only the requested fields."""
    decoded = lead_triage("run-2") + lead_triage("run-1")
    decoded.append(event("node.completed", "u1", "run-1", node={"nodeId": "late", "type": "ai"}))
    await store.write(batch_of(decoded))
    everything = [d async for d in store.scan_nodes("acme", NodeQuery())]
    assert [(d["runId"], d["nodeId"]) for d in everything] == [
        ("run-1", "classify"), ("run-2", "classify"), ("run-1", "route"), ("run-2", "route"),
        ("run-1", "update-crm"), ("run-2", "update-crm"), ("run-1", "late")]
    ai = [d async for d in store.scan_nodes("acme", NodeQuery(
        types=("ai",), run_ids=("run-1",), since=T0, until=T0 + timedelta(seconds=2),
        fields=("nodeId", "tokens_used", "nope")))]
    assert ai == [{"nodeId": "classify", "tokens_used": {"input": 450, "output": 85}}]
    find = fake.sent("find")[-1]
    assert list(find["filter"]) == ["runId", "type", "startedAt", "_startedAtUs"]
    assert find["allowDiskUse"] is True


@pytest.mark.anyio
async def test_workspaces_and_delete_runs(fake: FakeMongo, store: MongoStore) -> None:
    """Workspaces are the prefixed databases that hold runs; delete_runs removes a run's
    node documents and the run, and counts runs."""
    await store.write(batch_of(lead_triage("run-1", "acme") + lead_triage("run-2", "acme")
                               + lead_triage("run-1", "beta")))
    fake.coll("other_db", "things")
    fake.coll("audit_empty", "workflow_runs")
    assert await store.workspaces() == ["acme", "beta"]
    assert await store.delete_runs("acme", ["run-1", "run-1", "missing"]) == 1
    assert await store.get_run("acme", "run-1") is None
    assert await store.get_nodes("acme", "run-1") == []
    assert len(await store.get_nodes("acme", "run-2")) == 3
    assert await store.get_run("beta", "run-1") is not None
    assert await store.delete_runs("acme", []) == 0
    assert await store.get_run("bad.name", "run-1") is None  # never a database name


@pytest.mark.anyio
async def test_update_reply_names_upserts_only_when_there_are_some(
    fake: FakeMongo, store: MongoStore
) -> None:
    """Like a server, the emulator leaves ``upserted`` out of an update reply that upserted
    nothing, so the driver's single-statement update_many/update_one work over it."""
    coll = store.client["audit_acme"]["things"]
    inserted = await coll.update_one({"_id": "a"}, {"$set": {"x": 1}}, upsert=True)
    assert inserted.upserted_id == "a"
    await coll.update_one({"_id": "b"}, {"$set": {"x": 2}}, upsert=True)
    changed = await coll.update_many({"x": {"$ne": None}}, {"$set": {"y": True}})
    assert (changed.matched_count, changed.modified_count, changed.upserted_id) == (2, 2, None)
    nothing = await coll.update_many({"x": 3}, {"$set": {"y": False}})
    assert (nothing.matched_count, nothing.upserted_id) == (0, None)
    replies = [fake.do_update({"$db": "audit_acme", "update": "things",
                               "updates": [{"q": {"_id": "c"}, "u": {"$set": {"x": 3}},
                                            "upsert": upsert}]}) for upsert in (False, True)]
    assert replies == [{"n": 0, "nModified": 0},
                       {"n": 1, "nModified": 0, "upserted": [{"index": 0, "_id": "c"}]}]
    assert sorted(d["_id"] for d in fake.docs("audit_acme", "things")) == ["a", "b", "c"]


@pytest.mark.anyio
async def test_scan_runs_ages_runs_exactly_like_the_sql_stores(
    fake: FakeMongo, store: MongoStore
) -> None:
    """scan_runs finds a run by completedAt, else startedAt, to the microsecond (what
    COALESCE(completed_at, started_at) < before finds in SQLite), runs never started too."""
    from worker.stores.sqlite import SQLiteStore

    decoded = [
        event("run.started", "d-s", "done", ts=at(0)),
        event("run.completed", "d-c", "done", ts=at(100.0005)),
        event("run.completed", "n-c", "no-start", ts=at(50.0004)),
        event("run.failed", "f-c", "failed-no-start", ts=at(60), error={"type": "Timeout"}),
        event("run.started", "o-s", "open", ts=at(20.0007)),
        event("run.started", "l-s", "late", ts=at(-1000)),
        event("run.completed", "l-c", "late", ts=at(500)),
        event("node.completed", "x-n", "node-only", ts=at(1), node={"nodeId": "n", "type": "ai"}),
    ]
    await store.write(batch_of(decoded))
    runs, _ = expected(decoded)
    assert runs[("acme", "no-start")]["startedAt"] is None
    sqlite = SQLiteStore("sqlite:///:memory:")
    await sqlite.open()
    await migrate(sqlite)
    try:
        await sqlite.write(batch_of(decoded))
        for seconds in (-2000, 0, 20.0007, 20.0008, 50.0004, 50.0005, 60, 60.000001,
                        100.0005, 100.0006, 500, 500.000001, 10**6):
            before = T0 + timedelta(seconds=seconds)
            want = sorted(run_id for (_, run_id), run in runs.items()
                          if (aged := run["completedAt"] or run["startedAt"]) is not None
                          and ev.parse_time(aged) < before)
            assert sorted([r["runId"] async for r in store.scan_runs("acme", before)]) == want
            assert sorted([r["runId"] async for r in sqlite.scan_runs("acme", before)]) == want
    finally:
        await sqlite.close()
    everything = [r async for r in store.scan_runs("acme", T0 + timedelta(days=1))]
    assert sorted(r["runId"] for r in everything) == ["done", "failed-no-start", "late",
                                                      "no-start", "node-only", "open"]
    assert [r async for r in store.scan_runs("nobody", T0 + timedelta(days=1))] == []


# --------------------------------------------------------------------------- setup


@pytest.mark.anyio
async def test_server_older_than_5_2_is_refused_at_open(fake: FakeMongo) -> None:
    """The pipelines need $sortArray: an older server is a configuration error."""
    fake.version = [5, 0, 14, 0]
    store = MongoStore(url_of(fake))
    with pytest.raises(ConfigError, match="too old"):
        await store.open()
    assert store._client is None


@pytest.mark.anyio
async def test_store_not_open_is_a_programming_error() -> None:
    """A store used before open() raises StoreNotOpen (as every store does), never a store
    failure the worker would retry."""
    store = MongoStore("mongodb://127.0.0.1:1")
    with pytest.raises(StoreNotOpen):
        await store.ping()
    with pytest.raises(StoreNotOpen):
        await store.get_run("acme", "r")


@pytest.mark.anyio
async def test_write_concern_and_retryable_writes_follow_the_url(fake: FakeMongo) -> None:
    """w and journal in the URL replace the majority/journal default."""
    store = MongoStore(url_of(fake, w=1, journal="false"))
    await store.open()
    try:
        await store.write(batch_of(lead_triage()))
    finally:
        await store.close()
    for command in fake.sent("update"):
        assert command["writeConcern"] == {"w": 1, "j": False}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AUDIT_MONGO_TENANCY": "collection"}, "database or field"),
        ({"AUDIT_MONGO_DB_PREFIX": "audit."}, "forbidden"),
        ({"AUDIT_MONGO_LARGE_PAYLOAD_BYTES": "lots"}, "must be a number"),
        ({"AUDIT_MONGO_LARGE_PAYLOAD_BYTES": "0"}, "must be positive"),
    ],
)
def test_bad_options_fail_at_construction(env: dict[str, str], message: str) -> None:
    """Store options from the environment are validated, with a clear message, when the
    settings are built."""
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({**env, "AUDIT_STORE_URL": "mongodb://localhost:27017"})


def test_field_tenancy_database_comes_from_the_url() -> None:
    """In field mode the shared database is the URL's path, or 'audit'."""
    field = env_options(AUDIT_MONGO_TENANCY="field")
    assert MongoStore("mongodb://h/tenants", field).shared_db == "tenants"
    assert MongoStore("mongodb://h", field).shared_db == "audit"
    with pytest.raises(ConfigError):
        MongoStore("mongodb://h/ad%2Emin", field)


@pytest.mark.anyio
async def test_unreachable_server_is_unavailable() -> None:
    """Nothing listening: open() and ping() raise StoreUnavailable, not a driver error."""
    from tests.helpers import free_port

    url = f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=300"
    store = MongoStore(url)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        await store.open()


# --------------------------------------------------------------------------- conformance


class TestMongoWireConformance(StoreConformance):
    """The shared conformance suite, through the real driver, against the emulator."""

    @pytest.fixture
    async def store(self, fake: FakeMongo) -> AsyncIterator[Store]:
        s = MongoStore(url_of(fake))
        await s.open()
        try:
            yield s
        finally:
            await s.close()


# --------------------------------------------------------------------------- deploy

DEPLOY = ROOT / "deploy"


def test_compose_matches_the_configuration_the_code_reads() -> None:
    """deploy/compose.yaml: two workers on the image from deploy/Dockerfile, configured
    only with variables the worker and the MongoDB store read, on a one-node replica set
    that an init step initiates; Prometheus scrapes exactly those workers."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "mongo", "mongo-init", "prometheus"} <= set(services)
    workers = {name: spec for name, spec in services.items() if name.startswith("worker-")}
    assert len(workers) == 2
    known = {_ENV_NAMES.get(f.name, "AUDIT_" + f.name.upper()) for f in fields(Settings)}
    consumers = set()
    for spec in workers.values():
        env = {k: str(v) for k, v in spec["environment"].items()}
        assert set(env) - known == set()
        settings = Settings.from_env(env)
        assert settings.store_url == "mongodb://mongo:27017/?replicaSet=rs0"
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.metrics_port == 9464
        store = store_from(settings)
        assert isinstance(store, MongoStore)
        assert (store.options.tenancy, store.prefix) == ("database", "audit_")
        consumers.add(settings.consumer)
        assert spec["command"] == ["run"]
        assert spec["build"]["dockerfile"] == "deploy/Dockerfile"
        assert spec["depends_on"]["mongo-init"]["condition"] == \
            "service_completed_successfully"
        assert int(spec["stop_grace_period"].rstrip("s")) > settings.shutdown_grace_s
    assert len(consumers) == 2
    assert services["mongo"]["command"] == ["mongod", "--replSet", "rs0", "--bind_ip_all"]
    assert "rs.initiate" in services["mongo-init"]["command"][-1]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "pip install" in dockerfile

    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for group in job["static_configs"]
               for t in group["targets"]}
    assert targets == {f"{name}:9464" for name in workers}
    for rules in prom.get("rule_files", []):
        assert (DEPLOY / rules).is_file()
        mounted = [v for v in services["prometheus"]["volumes"] if v.startswith(f"./{rules}:")]
        assert mounted
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "config", "prometheus.yml"],
                               cwd=DEPLOY, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
