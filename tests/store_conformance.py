"""The conformance suite every store passes: it must return what ``documents.fold`` says.

Subclass :class:`StoreConformance` in a test module and override the ``store`` fixture
with one that yields an opened, migrated store. Tests never assume the store is empty:
each uses workspace IDs of its own, so the suite also runs against a shared server.

Semantics pinned here for every store:

- ``get_nodes`` orders by ``startedAt`` (missing last), then ``attempt``, then ``nodeId``;
- ``list_runs`` returns newest ``startedAt`` first; ``since`` is inclusive, ``until``
  exclusive (the same for ``scan_nodes`` on the node's ``startedAt``);
- ``scan_nodes`` with ``fields`` returns at least those fields of each document.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reference import (
    COMPLETED_AT,
    NODES,
    RUN_ID,
    SIGNED_WITH,
    STARTED_AT,
    SUMMARY,
    TOTAL_DURATION,
    TRIGGER,
    WORKFLOW_ID,
    decoded,
    reference_events,
    reference_snapshot,
)
from worker import events as ev
from worker.documents import coalesce, fold, node_key
from worker.erasure import erase, subject_hash
from worker.personal import PersonalFields
from worker.stores.base import (
    NodeQuery,
    NodeVersion,
    RunQuery,
    RunVersion,
    Store,
    StoredKey,
    WriteResult,
)

T0 = datetime(2026, 2, 15, 10, 30, tzinfo=UTC)
Raw = dict[str, Any]


def iso(when: datetime, offset_minutes: int = 0) -> str:
    """RFC 3339 text of ``when``, written with the given UTC offset."""
    local = when.astimezone(timezone(timedelta(minutes=offset_minutes)))
    text = local.isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def new_workspace(label: str = "ws") -> str:
    """A workspace ID no other test uses."""
    return f"{label}_{uuid.uuid4().hex[:12]}"


def event(kind: str, workspace: str, run_id: str, event_id: str, ts: datetime,
          workflow: str = WORKFLOW_ID, **fields: Any) -> Raw:
    return {"v": 1, "eventId": event_id, "type": kind, "workspaceId": workspace,
            "workflowId": workflow, "runId": run_id, "ts": iso(ts), **fields}


def node(node_id: str, kind: str, start: datetime | None, end: datetime | None,
         **fields: Any) -> Raw:
    out: Raw = {"nodeId": node_id, "type": kind, **fields}
    if start is not None:
        out["startedAt"] = iso(start)
    if end is not None:
        out["completedAt"] = iso(end)
    return out


async def write(store: Store, raw_events: Sequence[Raw], *,
                per_event: bool = False) -> WriteResult:
    """Write events as the worker does: decode, coalesce per batch, one store write
    (an event's source is its index in ``raw_events``)."""
    items = list(enumerate(decoded(list(raw_events))))
    if not per_event:
        return await store.write(coalesce(items))
    rejected: list[Any] = []
    for item in items:
        rejected.extend((await store.write(coalesce([item]))).rejected)
    return WriteResult(tuple(rejected))


def expected(raw_events: Iterable[Raw]) -> tuple[dict[tuple[str, str], dict[str, Any]],
                                                  dict[tuple[str, str, str], dict[str, Any]]]:
    return fold(decoded(list(raw_events)))


def order_key(doc: dict[str, Any]) -> tuple[bool, datetime, int, str]:
    started = doc.get("startedAt")
    if isinstance(started, datetime):
        return (False, started, int(doc["attempt"]), doc["nodeId"])
    return (True, T0, int(doc["attempt"]), doc["nodeId"])


async def assert_stored(store: Store, raw_events: Iterable[Raw]) -> None:
    """Every run and node document the store holds for these events equals ``fold``."""
    runs, nodes = expected(raw_events)
    for (workspace, run_id), want in runs.items():
        assert await store.get_run(workspace, run_id) == want
        want_nodes = sorted((doc for key, doc in nodes.items() if key[:2] == (workspace, run_id)),
                            key=order_key)
        assert await store.get_nodes(workspace, run_id) == want_nodes


def assert_utc(value: Any) -> None:
    assert isinstance(value, datetime)
    assert value.utcoffset() == timedelta(0)


ERASE_KEY = b"subject-key-for-the-conformance-suite"


def erasure_events(workspace: str, run_id: str, subjects: list[str]) -> list[Raw]:
    """A failed run tagged with (hashed) subjects: two nodes with prompts and outputs."""
    t = T0 + timedelta(minutes=len(run_id))
    return [
        event(ev.RUN_STARTED, workspace, run_id, f"{run_id}-s", t, subjects=subjects,
              trigger={"type": "webhook", "source": "gmail"}),
        event(ev.NODE_COMPLETED, workspace, run_id, f"{run_id}-n1", t,
              node=node("classify", "ai", t, t + timedelta(seconds=1), model="m-1",
                        input={"prompt": "Reply to lead@example.com"}, output="ok",
                        tokens_used={"input": 10, "output": 5})),
        event(ev.NODE_FAILED, workspace, run_id, f"{run_id}-n2", t,
              node=node("reply", "ai", t + timedelta(seconds=1), t + timedelta(seconds=2),
                        model="m-1", input={"prompt": "Dear Lead"}, output="…",
                        tokens_used={"input": 10, "output": 5},
                        error={"type": "Timeout", "message": "lead@example.com timed out"})),
        event(ev.RUN_FAILED, workspace, run_id, f"{run_id}-e", t + timedelta(seconds=3),
              error={"message": "reply to lead@example.com failed"}),
    ]


#: Configured personal paths (``AUDIT_PERSONAL_FIELDS``) of :func:`personal_events`.
PERSONAL = PersonalFields.parse(["node.metadata.contact", "run.trigger.metadata.email",
                                 "run.customer.name", "run.contact"])


def personal_events(workspace: str, run_id: str, subjects: list[str]) -> list[Raw]:
    """A run with personal data outside prompts and outputs: trigger metadata, run-level
    fields and node metadata (beside what is not personal)."""
    t = T0 + timedelta(minutes=len(run_id))
    return [
        event(ev.RUN_STARTED, workspace, run_id, f"{run_id}-s", t, subjects=subjects,
              trigger={"type": "webhook", "source": "gmail",
                       "metadata": {"email": "lead@example.com", "subject": "Hi"}},
              customer={"name": "Lead Person", "tier": "gold"}, contact="lead@example.com"),
        event(ev.NODE_COMPLETED, workspace, run_id, f"{run_id}-n1", t,
              node=node("classify", "ai", t, t + timedelta(seconds=1), model="m-1",
                        input={"prompt": "Reply to lead"}, output="ok",
                        metadata={"contact": "lead@example.com", "channel": "mail"})),
        event(ev.NODE_COMPLETED, workspace, run_id, f"{run_id}-n2", t,
              node=node("route", "condition", t + timedelta(seconds=1),
                        t + timedelta(seconds=2), result="sales")),
        event(ev.RUN_COMPLETED, workspace, run_id, f"{run_id}-e", t + timedelta(seconds=3)),
    ]


# -- generated runs ------------------------------------------------------------------------

HOSTILE_KEYS = ("$where", "$set", "a.b", "..", "", "ключ", "名前", "emoji 🎉", "$", "x.$y")
_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
json_keys = st.sampled_from(HOSTILE_KEYS) | _text
json_scalars = (st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text
                | st.floats(min_value=-1e15, max_value=1e15, allow_nan=False))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_keys, inner, max_size=3),
    max_leaves=6,
)
NODE_IDS = ("classify", "route", "update-crm", "enrich", "节点 1")
NODE_TYPES = ("ai", "conditional", "action", "transform")
ACTIONS = ("salesforce.create_lead", "slack.post", "hubspot.update")


@st.composite
def run_events(draw: st.DrawFn, label: str, run_id: str) -> list[Raw]:
    """The events of one consistent run: start, node attempts, end, maybe a snapshot.

    Events of one run never contradict each other (the contract's assumption): the
    snapshot carries the same nodes, trigger, status and error as the live events.
    """
    start = T0 + timedelta(milliseconds=draw(st.integers(0, 10_000_000)))
    workflow = draw(st.sampled_from(("wf_lead_triage", "wf_support")))
    offset = draw(st.sampled_from((0, 120, -330)))
    extras = draw(st.dictionaries(st.sampled_from(("region", "$engine", "build.sha", "ü")),
                                  json_values, max_size=2))
    trigger = {"type": "webhook", "source": draw(st.sampled_from(("gmail", "hubspot", "api"))),
               "metadata": draw(st.dictionaries(json_keys, json_values, max_size=2))}

    def env(kind: str, name: str, ts: datetime) -> Raw:
        out: Raw = {"v": 1, "eventId": f"{label}:{run_id}:{name}", "type": kind,
                    "workspaceId": label, "workflowId": workflow, "runId": run_id,
                    "ts": iso(ts, offset)}
        key_id = draw(st.sampled_from((None, "k1", "k-2026.2")))  # signed, or not
        if key_id is not None:
            out[SIGNED_WITH] = key_id
        return out

    def some_subjects() -> Raw:  # a set union over the run's events
        chosen = draw(st.lists(st.sampled_from(("h-1", "h-2", "h-3")), max_size=2))
        return {"subjects": chosen} if chosen else {}

    def some_extras() -> Raw:
        names = draw(st.sets(st.sampled_from(sorted(extras)))) if extras else set()
        return {k: extras[k] for k in names}

    nodes: list[Raw] = []
    clock = start
    for node_id in draw(st.lists(st.sampled_from(NODE_IDS), unique=True, max_size=3)):
        kind = draw(st.sampled_from(NODE_TYPES))
        attempts = draw(st.integers(1, 2))
        last_fails = draw(st.booleans())
        for attempt in range(1, attempts + 1):
            failed = attempt < attempts or last_fails
            began = clock + timedelta(milliseconds=draw(st.integers(0, 500)))
            clock = began + timedelta(microseconds=draw(st.integers(0, 3_000_000)))
            raw: Raw = {"nodeId": node_id, "type": kind, "attempt": attempt,
                        "completedAt": iso(clock, offset)}
            if draw(st.integers(0, 4)):
                raw["startedAt"] = iso(began, offset)
            raw["input"] = draw(json_values)
            raw["output"] = draw(json_values)
            if kind == "ai":
                raw["model"] = "claude-sonnet-4-20250514"
                raw["tokens_used"] = {"input": draw(st.integers(0, 5000)),
                                      "output": draw(st.integers(0, 5000))}
            if kind == "action" and not failed:
                raw["actions"] = [
                    {"type": name, "id": draw(_text)} if draw(st.booleans()) else name
                    for name in draw(st.lists(st.sampled_from(ACTIONS), max_size=2))
                ]
            if failed:
                raw["error"] = {"type": "Timeout", "message": "upstream timed out",
                                "retries": attempt}
            if draw(st.booleans()):
                raw["x-custom"] = draw(json_values)
            nodes.append(raw)

    out: list[Raw] = []
    if draw(st.integers(0, 4)):
        out.append(env(ev.RUN_STARTED, "started", start) | {"trigger": trigger}
                   | some_extras() | some_subjects())
    node_extra = draw(st.dictionaries(st.sampled_from(("engine", "$meta")), json_values,
                                      max_size=1))
    for raw in nodes:
        kind = ev.NODE_FAILED if "error" in raw else ev.NODE_COMPLETED
        name = f"{raw['nodeId']}:{raw['attempt']}"
        ts = datetime.fromisoformat(raw["completedAt"])
        out.append(env(kind, name, ts) | {"node": raw} | node_extra)
    end = clock + timedelta(milliseconds=draw(st.integers(1, 1000)))
    terminal: Raw = {}
    if draw(st.booleans()):
        status = draw(st.sampled_from(("completed", "failed", "cancelled")))
        terminal = {"status": status,
                    "totalDuration": round((end - start).total_seconds() * 1000, 3)}
        if status == "failed":
            terminal["error"] = {"type": "NodeFailed", "message": "a node failed"}
        kind = ev.RUN_FAILED if status == "failed" else ev.RUN_COMPLETED
        out.append(env(kind, "end", end) | terminal | some_extras())
    if draw(st.booleans()):
        shown = nodes[: draw(st.integers(0, len(nodes)))]
        snapshot = env(ev.RUN_SNAPSHOT, "snapshot", end if terminal else clock)
        snapshot |= {"trigger": trigger, "nodes": shown} | terminal | some_extras() \
            | some_subjects()
        out.append(snapshot)
    return out


@dataclass(frozen=True)
class Scenario:
    """Consistent runs' events, and two ways of writing a multiset of them in batches."""

    events: list[Raw]
    first: list[list[int]]
    second: list[list[int]]

    def written(self) -> list[int]:
        return sorted({i for batch in self.first for i in batch})


def _batches(draw: st.DrawFn, order: list[int]) -> list[list[int]]:
    if not order:
        return []
    cuts = sorted(draw(st.sets(st.integers(1, len(order)), max_size=5)) | {len(order)})
    out, begin = [], 0
    for cut in cuts:
        out.append(order[begin:cut])
        begin = cut
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    keys = draw(st.lists(st.tuples(st.sampled_from(("A", "B")),
                                   st.sampled_from(("run-1", "run-2", "run-ß"))),
                         min_size=1, max_size=3, unique=True))
    events = [e for label, run_id in keys for e in draw(run_events(label, run_id))]
    counts = draw(st.lists(st.integers(0, 3), min_size=len(events), max_size=len(events)))
    multiset = [i for i, count in enumerate(counts) for _ in range(count)]
    first = _batches(draw, draw(st.permutations(multiset)))
    second = _batches(draw, draw(st.permutations(multiset)))
    return Scenario(events, first, second)


def relabel(raw_events: Sequence[Raw], workspaces: dict[str, str]) -> list[Raw]:
    return [e | {"workspaceId": workspaces[e["workspaceId"]]} for e in raw_events]


def without_workspace(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if doc is None else {k: v for k, v in doc.items() if k != "workspaceId"}


# -- the suite -----------------------------------------------------------------------------

class StoreConformance:
    """The shared suite. Subclasses override ``store`` (an opened, migrated store)."""

    pytestmark: ClassVar = [pytest.mark.anyio]

    #: How this store answers a U+0000 in a document: None if it stores it exactly, else
    #: the rejection reason (``{ws}`` and ``{run}`` filled in).
    nul_rejection: ClassVar[str | None] = None

    @pytest.fixture
    async def store(self) -> Store:
        raise NotImplementedError("a conformance module overrides the store fixture")

    async def test_reference_events_round_trip(self, store: Store) -> None:
        """The design's reference record, written as live events, comes back whole."""
        ws = new_workspace()
        raw = reference_events(ws)
        assert (await write(store, raw, per_event=True)).rejected == ()
        await assert_stored(store, raw)
        run = await store.get_run(ws, RUN_ID)
        assert run is not None
        assert run["workflowId"] == WORKFLOW_ID
        assert run["status"] == "completed"
        assert run["trigger"] == TRIGGER
        assert run["summary"] == SUMMARY
        assert run["totalDuration"] == TOTAL_DURATION
        assert run["startedAt"] == ev.parse_time(STARTED_AT)
        assert run["completedAt"] == ev.parse_time(COMPLETED_AT)
        assert_utc(run["startedAt"])
        assert_utc(run["completedAt"])
        stored = await store.get_nodes(ws, RUN_ID)
        assert [n["nodeId"] for n in stored] == ["source", "classify", "route", "update-crm"]
        for got, sent in zip(stored, NODES, strict=True):
            for name, value in sent.items():
                if name in ("startedAt", "completedAt"):
                    assert got[name] == ev.parse_time(value)
                    assert_utc(got[name])
                else:
                    assert got[name] == value, name
        classify = stored[1]
        assert classify["output"]["confidence"] == 0.91
        assert classify["tokens_used"] == {"input": 450, "output": 85}
        assert stored[2]["skippedBranches"] == ["standard-nurture", "support-queue"]
        assert stored[3]["actions"] == [{"type": "salesforce.create_lead", "id": "00Q123"}]

    async def test_reference_snapshot_round_trip(self, store: Store) -> None:
        """The same record as one run.snapshot gives the same run and node fields."""
        ws_snap, ws_live = new_workspace("snap"), new_workspace("live")
        snapshot = reference_snapshot(ws_snap)
        assert (await write(store, [snapshot])).rejected == ()
        await assert_stored(store, [snapshot])
        await write(store, reference_events(ws_live))
        snap_run = await store.get_run(ws_snap, RUN_ID)
        live_run = await store.get_run(ws_live, RUN_ID)
        assert snap_run is not None
        assert live_run is not None
        for name in ("status", "startedAt", "completedAt", "trigger", "totalDuration",
                     "summary", "nodeIndex", "workflowId"):
            assert snap_run[name] == live_run[name], name
        snap_nodes = await store.get_nodes(ws_snap, RUN_ID)
        live_nodes = await store.get_nodes(ws_live, RUN_ID)
        skip = {"workspaceId", "eventId"}
        assert [{k: v for k, v in n.items() if k not in skip} for n in snap_nodes] == \
               [{k: v for k, v in n.items() if k not in skip} for n in live_nodes]

    async def test_snapshot_and_events_together(self, store: Store) -> None:
        """A snapshot and the live events of the same run merge into one record."""
        ws = new_workspace()
        raw = [*reference_events(ws), reference_snapshot(ws)]
        await write(store, raw[3:], per_event=True)
        await write(store, raw[:3])
        await assert_stored(store, raw)
        run = await store.get_run(ws, RUN_ID)
        assert run is not None
        assert run["summary"] == SUMMARY
        assert len(await store.get_nodes(ws, RUN_ID)) == 4

    async def test_replay_is_idempotent(self, store: Store) -> None:
        """Writing the same batch three times stores the same documents as once."""
        ws = new_workspace()
        raw = reference_events(ws)
        for _ in range(3):
            assert (await write(store, raw)).rejected == ()
        await assert_stored(store, raw)
        run = await store.get_run(ws, RUN_ID)
        assert run is not None
        assert run["summary"] == SUMMARY

    async def test_order_independent(self, store: Store) -> None:
        """Events written one by one in opposite orders end as the same documents."""
        ws1, ws2 = new_workspace("fwd"), new_workspace("rev")
        await write(store, reference_events(ws1), per_event=True)
        await write(store, list(reversed(reference_events(ws2))), per_event=True)
        run1, run2 = await store.get_run(ws1, RUN_ID), await store.get_run(ws2, RUN_ID)
        assert without_workspace(run1) == without_workspace(run2)
        nodes1, nodes2 = await store.get_nodes(ws1, RUN_ID), await store.get_nodes(ws2, RUN_ID)
        assert [without_workspace(n) for n in nodes1] == [without_workspace(n) for n in nodes2]
        await assert_stored(store, reference_events(ws2))

    async def test_terminal_status_never_reverts(self, store: Store) -> None:
        """A late run.started or node event does not move a finished run back to running."""
        ws = new_workspace()
        done = event(ev.RUN_COMPLETED, ws, "r1", "e-done", T0 + timedelta(seconds=5),
                     status="completed", totalDuration=5000)
        late = [event(ev.RUN_STARTED, ws, "r1", "e-start", T0, trigger=TRIGGER),
                event(ev.NODE_COMPLETED, ws, "r1", "e-node", T0 + timedelta(seconds=1),
                      node=node("classify", "ai", T0, T0 + timedelta(seconds=1)))]
        await write(store, [done])
        await write(store, late, per_event=True)
        run = await store.get_run(ws, "r1")
        assert run is not None
        assert run["status"] == "completed"
        failed = event(ev.RUN_FAILED, ws, "r1", "e-failed", T0 + timedelta(seconds=6),
                       error={"type": "Boom"})
        await write(store, [failed])
        await write(store, [done, *late])
        run = await store.get_run(ws, "r1")
        assert run is not None
        assert run["status"] == "failed"
        assert run["error"] == {"type": "Boom"}
        await assert_stored(store, [done, *late, failed])

    async def test_started_earliest_completed_latest(self, store: Store) -> None:
        """startedAt keeps the earliest time seen and completedAt the latest, in any order."""
        ws = new_workspace()
        times = [T0 + timedelta(seconds=s, microseconds=7) for s in (3, 1, 2)]
        starts = [event(ev.RUN_STARTED, ws, "r1", f"s{i}", t) for i, t in enumerate(times)]
        ends = [event(ev.RUN_COMPLETED, ws, "r1", f"c{i}", t + timedelta(seconds=10),
                      totalDuration=float(i)) for i, t in enumerate(times)]
        await write(store, [starts[0], ends[1]])
        await write(store, [ends[0], starts[1]])
        await write(store, [starts[2], ends[2]])
        run = await store.get_run(ws, "r1")
        assert run is not None
        assert run["startedAt"] == T0 + timedelta(seconds=1, microseconds=7)
        assert run["completedAt"] == T0 + timedelta(seconds=13, microseconds=7)
        assert run["totalDuration"] == 2.0
        assert_utc(run["startedAt"])
        await assert_stored(store, starts + ends)

    async def test_summary_after_duplicates(self, store: Store) -> None:
        """Redelivered node events never inflate the derived summary."""
        ws = new_workspace()
        raw = reference_events(ws)
        await write(store, raw, per_event=True)
        await write(store, raw[1:5] * 2)
        await write(store, list(reversed(raw[1:5])), per_event=True)
        run = await store.get_run(ws, RUN_ID)
        assert run is not None
        assert run["summary"]["nodesExecuted"] == 4
        assert run["summary"]["aiCallsMade"] == 1
        assert run["summary"]["actionsPerformed"] == ["salesforce.create_lead"]
        assert run["summary"]["totalTokens"] == 535
        assert run["summary"] == SUMMARY

    async def test_node_retries_stored_separately(self, store: Store) -> None:
        """Attempts 1 and 2 of a node are two documents; the summary counts one node."""
        ws = new_workspace()
        first = node("enrich", "action", T0, T0 + timedelta(seconds=3), attempt=1,
                     error={"type": "Timeout", "message": "enrichment API", "retries": 0})
        second = node("enrich", "action", T0 + timedelta(seconds=4), T0 + timedelta(seconds=5),
                      attempt=2, actions=["clearbit.enrich"])
        raw = [event(ev.NODE_FAILED, ws, "r1", "n1", T0 + timedelta(seconds=3), node=first),
               event(ev.NODE_COMPLETED, ws, "r1", "n2", T0 + timedelta(seconds=5), node=second)]
        await write(store, raw, per_event=True)
        await write(store, raw)
        stored = await store.get_nodes(ws, "r1")
        assert [(n["nodeId"], n["attempt"], n["status"]) for n in stored] == [
            ("enrich", 1, "failed"), ("enrich", 2, "completed")]
        assert stored[0]["error"]["type"] == "Timeout"
        assert stored[0]["nodeKey"] == node_key("r1", "enrich", 1)
        run = await store.get_run(ws, "r1")
        assert run is not None
        assert run["summary"]["nodesExecuted"] == 1
        assert run["summary"]["nodeExecutions"] == 2
        assert run["summary"]["failedNodes"] == 1
        assert run["summary"]["actionsPerformed"] == ["clearbit.enrich"]
        await assert_stored(store, raw)

    async def test_node_winner_rule(self, store: Store) -> None:
        """Failed beats completed for one execution; equal statuses keep the larger eventId.

        The run's node index keeps the entry stored first unless a later one ranks higher.
        """
        ws = new_workspace()
        done = node("classify", "ai", T0, T0 + timedelta(seconds=1), output={"v": "ok"},
                    tokens_used={"input": 5, "output": 1})
        fail = node("classify", "ai", T0, T0 + timedelta(seconds=1), output={"v": "bad"},
                    tokens_used={"input": 5, "output": 0})
        later = done | {"output": {"v": "later"}, "tokens_used": {"input": 9, "output": 9}}
        raw = [event(ev.NODE_FAILED, ws, "r1", "a-fail", T0, node=fail),
               event(ev.NODE_COMPLETED, ws, "r1", "z-done", T0, node=done),
               event(ev.NODE_COMPLETED, ws, "r2", "b-done", T0, node=done),
               event(ev.NODE_COMPLETED, ws, "r2", "c-done", T0, node=later),
               event(ev.NODE_FAILED, ws, "r3", "a-fail", T0, node=fail),
               event(ev.NODE_COMPLETED, ws, "r3", "z-done", T0, node=done)]
        first, second = [raw[1], raw[3], raw[4]], [raw[0], raw[2], raw[5]]
        await write(store, first)
        await write(store, second)
        (n1,), (n2,) = await store.get_nodes(ws, "r1"), await store.get_nodes(ws, "r2")
        assert (n1["status"], n1["output"], n1["eventId"]) == ("failed", {"v": "bad"}, "a-fail")
        assert (n2["eventId"], n2["output"]) == ("c-done", {"v": "later"})
        for run_id in ("r1", "r3"):
            run = await store.get_run(ws, run_id)
            assert run is not None
            assert run["summary"]["failedNodes"] == 1
            assert run["summary"]["totalTokens"] == 5
            assert [e["status"] for e in run["nodeIndex"].values()] == ["failed"]
        run2 = await store.get_run(ws, "r2")
        assert run2 is not None
        assert run2["summary"]["totalTokens"] == 18  # c-done's entry landed first
        await assert_stored(store, first + second)

    async def test_first_stored_value_wins(self, store: Store) -> None:
        """Contradicting trigger, error, workflowId or extra fields keep what landed first."""
        ws = new_workspace()
        first = [event(ev.RUN_STARTED, ws, "r1", "s1", T0, trigger={"source": "gmail"},
                       region="eu", note=None),
                 event(ev.RUN_FAILED, ws, "r1", "f1", T0, error={"type": "A"})]
        later = [event(ev.RUN_STARTED, ws, "r1", "s2", T0, "wf_renamed",
                       trigger={"source": "api"}, region="us", note="set", extra2=[1]),
                 event(ev.RUN_FAILED, ws, "r1", "f2", T0, error={"type": "B"})]
        await write(store, first)
        await write(store, later)
        run = await store.get_run(ws, "r1")
        assert run is not None
        assert run["trigger"] == {"source": "gmail"}
        assert run["error"] == {"type": "A"}
        assert run["workflowId"] == WORKFLOW_ID
        assert (run["region"], run["note"], run["extra2"]) == ("eu", None, [1])
        assert run["eventIds"] == ["f1", "f2", "s1", "s2"]
        assert [r["runId"] for r in await store.list_runs(ws, RunQuery(
            trigger_source="gmail", workflow_id=WORKFLOW_ID))] == ["r1"]
        assert await store.list_runs(ws, RunQuery(trigger_source="api")) == []

    async def test_status_ties_break_by_name(self, store: Store) -> None:
        """Two terminal statuses of equal rank settle on the greater name, in any order."""
        ws = new_workspace()
        for run_id, order in (("r1", ("cancelled", "timed_out")),
                              ("r2", ("timed_out", "cancelled"))):
            for i, status in enumerate(order):
                await write(store, [event(ev.RUN_COMPLETED, ws, run_id, f"{run_id}-{i}",
                                          T0 + timedelta(seconds=i), status=status)])
        for run_id in ("r1", "r2"):
            run = await store.get_run(ws, run_id)
            assert run is not None
            assert run["status"] == "timed_out"
        assert {r["runId"] for r in await store.list_runs(ws, RunQuery(status="timed_out"))} \
            == {"r1", "r2"}

    async def test_unknown_fields_kept(self, store: Store) -> None:
        """Fields the contract does not know are stored and come back unchanged."""
        ws = new_workspace()
        extra: dict[str, Any] = {"engineVersion": "4.2.0",
                                 "tags": ["a", {"b": [1, 2.5, None, True]}]}
        raw = [
            event(ev.RUN_STARTED, ws, "r1", "e1", T0, trigger=TRIGGER | {"campaign": "q3"},
                  **extra),
            event(ev.NODE_COMPLETED, ws, "r1", "e2", T0, traceId="t-77",
                  node=node("classify", "ai", T0, T0 + timedelta(seconds=1),
                            temperature=0.2, promptVersion={"id": "p9", "rev": 3})),
            event(ev.RUN_COMPLETED, ws, "r1", "e3", T0 + timedelta(seconds=2),
                  status="completed", costUsd=0.0042),
        ]
        await write(store, raw, per_event=True)
        await assert_stored(store, raw)
        run = await store.get_run(ws, "r1")
        assert run is not None
        assert run["engineVersion"] == "4.2.0"
        assert run["tags"] == extra["tags"]
        assert run["costUsd"] == 0.0042
        assert run["trigger"]["campaign"] == "q3"
        (stored,) = await store.get_nodes(ws, "r1")
        assert stored["temperature"] == 0.2
        assert stored["promptVersion"] == {"id": "p9", "rev": 3}
        assert stored["traceId"] == "t-77"

    async def test_signing_key_ids_kept(self, store: Store) -> None:
        """The key id that signed each event is stored: a set on the run, on each node
        document its event's key; an event's own ``signedBy`` is never taken for one."""
        ws = new_workspace()
        raw = [
            event(ev.RUN_STARTED, ws, "r1", "e1", T0, signedBy="forged") | {SIGNED_WITH: "k1"},
            event(ev.NODE_COMPLETED, ws, "r1", "e2", T0, signedBy="forged",
                  node=node("classify", "ai", T0, T0 + timedelta(seconds=1), signedBy="x"))
            | {SIGNED_WITH: "k2"},
            event(ev.NODE_COMPLETED, ws, "r1", "e3", T0,
                  node=node("route", "conditional", T0, T0 + timedelta(seconds=2),
                            signedBy="forged")),
            event(ev.RUN_COMPLETED, ws, "r1", "e4", T0 + timedelta(seconds=2),
                  status="completed") | {SIGNED_WITH: "k2"},
            event(ev.RUN_SNAPSHOT, ws, "r2", "e5", T0, status="completed",
                  nodes=[node("classify", "ai", T0, T0)]) | {SIGNED_WITH: "k1"},
            event(ev.RUN_STARTED, ws, "r3", "e6", T0, signedBy="forged"),
        ]
        await write(store, raw[:2])
        await write(store, raw[2:])
        await assert_stored(store, raw)
        run = await store.get_run(ws, "r1")
        assert run is not None
        assert run["signedBy"] == ["k1:e1", "k2:e4"]
        assert [(n["nodeId"], n.get("signedBy")) for n in await store.get_nodes(ws, "r1")] \
            == [("classify", "k2"), ("route", None)]
        r2 = await store.get_run(ws, "r2")
        assert r2 is not None
        assert r2["signedBy"] == ["k1:e5"]
        assert [n["signedBy"] for n in await store.get_nodes(ws, "r2")] == ["k1"]
        r3 = await store.get_run(ws, "r3")
        assert r3 is not None
        assert "signedBy" not in r3

    async def test_hostile_keys_round_trip(self, store: Store) -> None:
        """Keys starting with $, holding dots or any unicode are data, never operators."""
        ws = new_workspace()
        hostile: dict[str, Any] = {key: {"$gt": "", "a.b": [key]} for key in HOSTILE_KEYS}
        run_extra: dict[str, Any] = {"$where": "1 == 1", "x.y": {"$unset": ""}, "ключ": "значение"}
        hostile["deep"] = {"$set": {"status": "failed"}, "$inc": {"summary.totalTokens": 9}}
        raw = [
            event(ev.RUN_STARTED, ws, "r1", "e1", T0,
                  trigger={"type": "webhook", "source": "gmail", "metadata": hostile},
                  **run_extra),
            event(ev.NODE_COMPLETED, ws, "r1", "e2", T0,
                  node=node("classify", "ai", T0, T0 + timedelta(seconds=1), input=hostile,
                            output={"$regex": ".*", "名前": "🎉", "a.b.c": {"$": 1}})),
        ]
        await write(store, raw)
        await assert_stored(store, raw)
        run = await store.get_run(ws, "r1")
        assert run is not None
        assert run["trigger"]["metadata"] == hostile
        assert run["$where"] == "1 == 1"
        assert run["x.y"] == {"$unset": ""}
        assert run["status"] == "running"
        (stored,) = await store.get_nodes(ws, "r1")
        assert stored["input"] == hostile
        assert stored["output"]["a.b.c"] == {"$": 1}

    async def test_nul_is_stored_or_rejected_per_run(self, store: Store) -> None:
        """A U+0000 in a payload is stored exactly, or (where the store cannot hold it:
        ``nul_rejection``) rejects only its own run, with the store's reason."""
        ws = new_workspace()
        bad = event(ev.NODE_COMPLETED, ws, "bad", "e1", T0,
                    node=node("classify", "ai", T0, T0, output={"text": "a\x00b", "k\x00": 1}))
        good = reference_events(ws)
        items = [(0, decoded([bad])[0])] + [
            (1 + i, d) for i, d in enumerate(decoded(good))]
        result = await store.write(coalesce(items))
        await assert_stored(store, good)
        if self.nul_rejection is not None:
            (rejection,) = result.rejected
            assert rejection.sources == (0,)
            assert rejection.reason == self.nul_rejection.format(ws=ws, run="bad")
            assert await store.get_run(ws, "bad") is None
            assert await store.get_nodes(ws, "bad") == []
        else:
            assert result.rejected == ()
            await assert_stored(store, [bad])

    async def test_workspace_isolation(self, store: Store) -> None:
        """The same runId in two workspaces never mixes, in reads, lists or deletes."""
        ws1, ws2 = new_workspace("iso1"), new_workspace("iso2")
        raw1 = reference_events(ws1)
        raw2 = [event(ev.RUN_STARTED, ws2, RUN_ID, "other", T0 - timedelta(days=1),
                      workflow="wf_other", trigger={"type": "cron", "source": "schedule"}),
                event(ev.NODE_FAILED, ws2, RUN_ID, "other-n", T0,
                      workflow="wf_other",
                      node=node("classify", "ai", T0, T0, error={"type": "Boom"}))]
        await write(store, raw1 + raw2)
        await assert_stored(store, raw1)
        await assert_stored(store, raw2)
        run2 = await store.get_run(ws2, RUN_ID)
        assert run2 is not None
        assert run2["workflowId"] == "wf_other"
        assert run2["summary"]["nodesExecuted"] == 1
        assert [r["workspaceId"] for r in await store.list_runs(ws1, RunQuery())] == [ws1]
        assert [r["workflowId"] for r in await store.list_runs(ws2, RunQuery())] == ["wf_other"]
        assert await store.list_runs(ws1, RunQuery(workflow_id="wf_other")) == []
        scanned = [n async for n in store.scan_nodes(ws2, NodeQuery())]
        assert [n["workspaceId"] for n in scanned] == [ws2]
        assert {ws1, ws2} <= set(await store.workspaces())
        assert await store.delete_runs(ws2, [RUN_ID]) == 1
        assert await store.get_run(ws2, RUN_ID) is None
        await assert_stored(store, raw1)
        assert await store.get_run(new_workspace(), RUN_ID) is None

    async def test_list_runs_filters(self, store: Store) -> None:
        """list_runs filters by workflow, status, trigger source and time, newest first."""
        ws = new_workspace()
        specs = [  # run, workflow, source, start offset (minutes), terminal status
            ("r0", "wf_a", "gmail", 0, "completed"),
            ("r1", "wf_a", "hubspot", 10, "failed"),
            ("r2", "wf_b", "gmail", 20, None),
            ("r3", "wf_b", "api", 30, "failed"),
            ("r4", "wf_a", "gmail", 40, "completed"),
        ]
        raw: list[Raw] = []
        for run_id, workflow, source, minutes, status in specs:
            start = T0 + timedelta(minutes=minutes)
            raw.append(event(ev.RUN_STARTED, ws, run_id, f"{run_id}-s", start, workflow,
                             trigger={"type": "webhook", "source": source}))
            if status is not None:
                kind = ev.RUN_FAILED if status == "failed" else ev.RUN_COMPLETED
                raw.append(event(kind, ws, run_id, f"{run_id}-e", start + timedelta(minutes=1),
                                 workflow, status=status))
        await write(store, raw)

        async def ids(**query: Any) -> list[str]:
            return [r["runId"] for r in await store.list_runs(ws, RunQuery(**query))]

        assert await ids() == ["r4", "r3", "r2", "r1", "r0"]
        assert await ids(limit=2) == ["r4", "r3"]
        assert await ids(workflow_id="wf_a") == ["r4", "r1", "r0"]
        assert await ids(status="failed") == ["r3", "r1"]
        assert await ids(status="running") == ["r2"]
        assert await ids(trigger_source="gmail") == ["r4", "r2", "r0"]
        assert await ids(workflow_id="wf_a", status="completed", trigger_source="gmail") == \
            ["r4", "r0"]
        assert await ids(since=T0 + timedelta(minutes=10)) == ["r4", "r3", "r2", "r1"]
        assert await ids(until=T0 + timedelta(minutes=30)) == ["r2", "r1", "r0"]
        assert await ids(since=T0 + timedelta(minutes=10), until=T0 + timedelta(minutes=30),
                         workflow_id="wf_b") == ["r2"]
        assert await ids(workflow_id="wf_missing") == []
        runs = await store.list_runs(ws, RunQuery(status="failed", limit=1))
        assert runs == [(await store.get_run(ws, "r3"))]

    async def test_scan_nodes_filters(self, store: Store) -> None:
        """scan_nodes filters by node type, run and start time, and honours a projection."""
        ws = new_workspace()
        raw: list[Raw] = []
        for i, run_id in enumerate(("r1", "r2")):
            base = T0 + timedelta(hours=i)
            raw.append(event(ev.NODE_COMPLETED, ws, run_id, f"{run_id}-a", base,
                             node=node("classify", "ai", base, base + timedelta(seconds=1),
                                       output={"confidence": 0.5 + i / 10},
                                       tokens_used={"input": 10, "output": 1})))
            raw.append(event(ev.NODE_COMPLETED, ws, run_id, f"{run_id}-c", base,
                             node=node("route", "conditional", base + timedelta(seconds=2),
                                       base + timedelta(seconds=3), result="fast-track")))
        raw.append(event(ev.NODE_COMPLETED, ws, "r3", "r3-x", T0,
                         node=node("notes", "transform", None, None)))
        await write(store, raw)
        _, nodes = expected(raw)

        async def keys(**query: Any) -> set[tuple[str, str]]:
            return {(n["runId"], n["nodeId"])
                    async for n in store.scan_nodes(ws, NodeQuery(**query))}

        assert len([n async for n in store.scan_nodes(ws, NodeQuery())]) == len(nodes)
        assert {n["nodeKey"]: n async for n in store.scan_nodes(ws, NodeQuery())} == \
            {k[2]: doc for k, doc in nodes.items()}
        assert await keys(types=("ai",)) == {("r1", "classify"), ("r2", "classify")}
        assert await keys(types=("ai", "transform")) == \
            {("r1", "classify"), ("r2", "classify"), ("r3", "notes")}
        assert await keys(run_ids=("r2",)) == {("r2", "classify"), ("r2", "route")}
        assert await keys(since=T0 + timedelta(minutes=30)) == \
            {("r2", "classify"), ("r2", "route")}
        assert await keys(until=T0 + timedelta(seconds=2)) == {("r1", "classify")}
        assert await keys(types=("ai",), since=T0 + timedelta(minutes=30)) == \
            {("r2", "classify")}
        assert await keys(types=("action",)) == set()
        projected = [n async for n in store.scan_nodes(
            ws, NodeQuery(types=("ai",), fields=("runId", "nodeId", "output", "startedAt")))]
        assert len(projected) == 2
        for doc in projected:
            full = nodes[(ws, doc["runId"], node_key(doc["runId"], "classify", 1))]
            for name in ("runId", "nodeId", "output", "startedAt"):
                assert doc[name] == full[name]
            assert_utc(doc["startedAt"])

    async def test_scan_nodes_many(self, store: Store) -> None:
        """scan_nodes streams every node of a large run (more than one page)."""
        ws = new_workspace()
        nodes = [node(f"n{i:04d}", "ai" if i % 3 else "action",
                      T0 + timedelta(milliseconds=i), T0 + timedelta(milliseconds=i + 1))
                 for i in range(1203)]
        snapshot = event(ev.RUN_SNAPSHOT, ws, "big", "snap", T0, nodes=nodes,
                         status="completed")
        await write(store, [snapshot])
        seen = [n["nodeId"] async for n in store.scan_nodes(ws, NodeQuery())]
        assert sorted(seen) == [n["nodeId"] for n in nodes]
        ai = [n async for n in store.scan_nodes(ws, NodeQuery(types=("ai",)))]
        assert len(ai) == sum(1 for n in nodes if n["type"] == "ai")
        run = await store.get_run(ws, "big")
        assert run is not None
        assert run["summary"]["nodesExecuted"] == 1203
        assert run["summary"]["aiCallsMade"] == len(ai)

    async def test_delete_runs(self, store: Store) -> None:
        """delete_runs removes the runs named and their nodes, and nothing else."""
        ws = new_workspace()
        keep = reference_events(ws, "keep")
        gone = reference_events(ws, "gone") + reference_events(ws, "gone2")
        await write(store, keep + gone)
        assert await store.delete_runs(ws, ["gone", "gone2", "never-existed"]) == 2
        assert await store.get_run(ws, "gone") is None
        assert await store.get_nodes(ws, "gone") == []
        assert await store.get_nodes(ws, "gone2") == []
        assert [n["runId"] async for n in store.scan_nodes(ws, NodeQuery())] == ["keep"] * 4
        await assert_stored(store, keep)
        assert await store.delete_runs(ws, []) == 0
        assert await store.delete_runs(ws, ["gone"]) == 0

    async def test_erasure_of_a_subject(self, store: Store) -> None:
        """erase strips the subject's runs' prompts, outputs and errors, marks them, leaves
        an erasure record, and leaves every other run (other subjects, other workspaces)
        exactly as it was; a dry run changes nothing."""
        ws, other_ws = new_workspace("er"), new_workspace("eo")
        lead, other = subject_hash(ERASE_KEY, "email:lead@example.com"), \
            subject_hash(ERASE_KEY, "email:x@example.com")
        raw = erasure_events(ws, "r1", [lead]) + erasure_events(ws, "r2", [lead, other]) \
            + erasure_events(ws, "r3", [other]) + erasure_events(other_ws, "r1", [lead])
        await write(store, raw)
        assert [r["runId"] for r in await store.runs_with_subject(ws, lead)] == ["r1", "r2"]
        before = {(w, r): (await store.get_run(w, r), await store.get_nodes(w, r))
                  for w, r in ((ws, "r3"), (other_ws, "r1"))}
        at = datetime(2026, 3, 1, tzinfo=UTC)
        dry = await erase(store, ws, "email:lead@example.com", ERASE_KEY, by="dpo",
                          dry_run=True, now=at)
        assert (dry.runs, dry.nodes_erased, dry.run_fields_erased) == (["r1", "r2"], 4, 2)
        await assert_stored(store, raw)
        report = await erase(store, ws, "email:lead@example.com", ERASE_KEY, by="dpo", now=at)
        assert (report.runs, report.nodes_erased, report.run_fields_erased,
                report.remaining) == (["r1", "r2"], 4, 2, [])
        for run_id in ("r1", "r2"):
            run = await store.get_run(ws, run_id)
            assert run is not None
            assert run["error"] is None
            assert run["erasure"] == {"id": report.erasure_id, "at": at.isoformat(),
                                      "by": "dpo", "fields": {"node": ["error", "input",
                                                                       "output"],
                                                              "run": ["error"]}}
            assert run["summary"]["totalTokens"] == 30  # the rest of the run is kept
            for doc in await store.get_nodes(ws, run_id):
                assert not {"input", "output", "error"} & set(doc)
                assert doc["model"] == "m-1"
        for key, docs in before.items():
            assert (await store.get_run(*key), await store.get_nodes(*key)) == docs
        record = await store.get_run(ws, str(report.erasure_id))
        assert record is not None
        assert (record["workflowId"], record["status"]) == ("audit-fleet.erasure", "completed")
        assert record["erasureRequest"]["subjectHash"] == lead
        assert record["erasureRequest"]["requestedBy"] == "dpo"
        assert record["erasureResult"]["runs"] == ["r1", "r2"]
        assert record["erasureResult"]["nodesErased"] == 4
        again = await erase(store, ws, "email:lead@example.com", ERASE_KEY, by="dpo", now=at)
        assert (again.runs, again.nodes_erased, again.run_fields_erased) == (["r1", "r2"], 0, 0)

    async def test_erasure_of_configured_personal_paths(self, store: Store) -> None:
        """With AUDIT_PERSONAL_FIELDS, erase also removes those paths (nested trigger
        metadata, run-level fields, node metadata) and records them, leaving the rest of
        each document and every other run as it was; identity paths cannot be stripped."""
        ws = new_workspace("ep")
        lead, other = subject_hash(ERASE_KEY, "email:lead@example.com"), \
            subject_hash(ERASE_KEY, "email:x@example.com")
        await write(store, personal_events(ws, "r1", [lead])
                    + personal_events(ws, "r2", [other]))
        keep = (await store.get_run(ws, "r2"), await store.get_nodes(ws, "r2"))
        at = datetime(2026, 3, 1, tzinfo=UTC)
        dry = await erase(store, ws, "email:lead@example.com", ERASE_KEY, by="dpo",
                          dry_run=True, now=at, fields=PERSONAL)
        assert (dry.nodes_erased, dry.run_fields_erased) == (1, 1)
        report = await erase(store, ws, "email:lead@example.com", ERASE_KEY, by="dpo",
                             now=at, fields=PERSONAL)
        assert (report.runs, report.nodes_erased, report.run_fields_erased,
                report.remaining) == (["r1"], 1, 1, [])
        run = await store.get_run(ws, "r1")
        assert run is not None
        assert run["trigger"] == {"type": "webhook", "source": "gmail",
                                  "metadata": {"subject": "Hi"}}
        assert run["customer"] == {"tier": "gold"}
        assert run["contact"] is None
        assert run["erasure"]["fields"] == {
            "node": ["error", "input", "metadata.contact", "output"],
            "run": ["contact", "customer.name", "error", "trigger.metadata.email"]}
        classify, route = await store.get_nodes(ws, "r1")
        assert classify["metadata"] == {"channel": "mail"}
        assert not {"input", "output"} & set(classify)
        assert (classify["model"], route["result"]) == ("m-1", "sales")
        assert (await store.get_run(ws, "r2"), await store.get_nodes(ws, "r2")) == keep
        record = await store.get_run(ws, str(report.erasure_id))
        assert record is not None
        assert record["erasureRequest"]["fields"] == PERSONAL.to_json()
        again = await erase(store, ws, "email:lead@example.com", ERASE_KEY, by="dpo",
                            now=at, fields=PERSONAL)
        assert (again.nodes_erased, again.run_fields_erased) == (0, 0)
        r2 = await store.get_run(ws, "r2")
        assert r2 is not None
        for bad in (["trigger.source"], ["runId"], ["nodeIndex.x"], ["a..b"], ["0"]):
            with pytest.raises(ValueError, match="cannot strip"):
                await store.strip_run_fields(ws, [RunVersion.of(r2)], bad)
        with pytest.raises(ValueError, match="cannot strip"):
            await store.strip_node_fields(ws, [NodeVersion.of(keep[1][0])], ["status"])
        assert (await store.get_run(ws, "r2"), await store.get_nodes(ws, "r2")) == keep

    @pytest.mark.parametrize("crash_at", ["record", "tombstones", "mark", "nodes", "run", "keys",
                                      "result"])
    async def test_erasure_of_personal_paths_killed_and_rerun(self, store: Store,
                                                              crash_at: str) -> None:
        """Killed at any step of an erasure of configured paths, a rerun erases them all
        once and leaves the other subject's run as it was."""
        ws = new_workspace("pk")
        lead, other = subject_hash(ERASE_KEY, "email:lead@example.com"), \
            subject_hash(ERASE_KEY, "email:x@example.com")
        await write(store, personal_events(ws, "r1", [lead]) + personal_events(ws, "r2", [lead])
                    + personal_events(ws, "r3", [other]))
        keep = (await store.get_run(ws, "r3"), await store.get_nodes(ws, "r3"))

        def fault(step: str) -> None:
            if step == crash_at:
                raise RuntimeError(f"killed at {step}")

        with pytest.raises(RuntimeError, match="killed"):
            await erase(store, ws, "email:lead@example.com", ERASE_KEY, by="dpo",
                        fault=fault, fields=PERSONAL)
        report = await erase(store, ws, "email:lead@example.com", ERASE_KEY, by="dpo",
                             fields=PERSONAL)
        assert (report.resumed, report.remaining) == (True, [])
        for run_id in ("r1", "r2"):
            run = await store.get_run(ws, run_id)
            assert run is not None
            assert (run["contact"], run["customer"]) == (None, {"tier": "gold"})
            assert run["trigger"]["metadata"] == {"subject": "Hi"}
            assert [n.get("metadata") for n in await store.get_nodes(ws, run_id)] == [
                {"channel": "mail"}, None]
        assert (await store.get_run(ws, "r3"), await store.get_nodes(ws, "r3")) == keep

    async def test_archive_data_keys(self, store: Store) -> None:
        """Data keys (worker.shredding): stored durably, read per run, shredded once (the
        row keeps when), and per workspace."""
        ws, other = new_workspace("dk"), new_workspace("dk")
        made = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
        keys = [StoredKey("r1", "k1", b"\x00wrapped-1", made),
                StoredKey("r2", "k2", b"wrapped-2", made)]
        await store.put_data_keys(ws, keys)
        await store.put_data_keys(ws, [StoredKey("r1", "k1", b"other", made)])  # kept as is
        await store.put_data_keys(other, [StoredKey("r1", "k9", b"theirs", made)])
        assert await store.data_keys(ws) == keys
        assert await store.data_keys(ws, ["r2", "nope"]) == keys[1:]
        at = datetime(2026, 4, 1, 9, 30, tzinfo=UTC)
        assert await store.shred_data_keys(ws, ["r1", "nope"], at) == 1
        assert await store.shred_data_keys(ws, ["r1"], at) == 0  # idempotent
        assert await store.data_keys(ws, ["r1"]) == [StoredKey("r1", "k1", None, made, at)]
        assert await store.data_keys(other) == [StoredKey("r1", "k9", b"theirs", made)]

    @pytest.mark.parametrize("crash_at", ["record", "tombstones", "mark", "nodes", "run", "keys",
                                      "result"])
    async def test_erasure_killed_at_each_step_and_rerun(self, store: Store,
                                                         crash_at: str) -> None:
        """Killed at any step, a rerun resumes the same erasure record, erases everything
        once, and touches nothing that was not asked for."""
        ws = new_workspace("ek")
        lead, other = subject_hash(ERASE_KEY, "email:lead@example.com"), \
            subject_hash(ERASE_KEY, "email:x@example.com")
        raw = erasure_events(ws, "r1", [lead]) + erasure_events(ws, "r2", [lead]) \
            + erasure_events(ws, "r3", [other])
        await write(store, raw)
        keep = (await store.get_run(ws, "r3"), await store.get_nodes(ws, "r3"))

        def fault(step: str) -> None:
            if step == crash_at:
                raise RuntimeError(f"killed at {step}")

        with pytest.raises(RuntimeError, match="killed"):
            await erase(store, ws, "email:lead@example.com", ERASE_KEY, by="dpo", fault=fault)
        report = await erase(store, ws, "email:lead@example.com", ERASE_KEY, by="dpo")
        assert report.resumed
        assert report.remaining == []
        records = await store.list_runs(ws, RunQuery(workflow_id="audit-fleet.erasure"))
        assert [(r["runId"], r["status"]) for r in records] == [(report.erasure_id,
                                                                  "completed")]
        for run_id in ("r1", "r2"):
            run = await store.get_run(ws, run_id)
            assert run is not None
            assert run["erasure"]["id"] == report.erasure_id
            assert run["error"] is None
            assert all(not {"input", "output", "error"} & set(n)
                       for n in await store.get_nodes(ws, run_id))
        assert (await store.get_run(ws, "r3"), await store.get_nodes(ws, "r3")) == keep

    async def test_retention_operations(self, store: Store) -> None:
        """Retention's store operations find old runs and touch only the documents named."""
        ws = new_workspace()
        ops: Any = store  # scan_runs, delete_nodes, strip_*: used by worker.retention
        raw = [
            *reference_events(ws, "old"),
            event(ev.RUN_STARTED, ws, "open", "o1", T0 - timedelta(days=1)),
            event(ev.RUN_STARTED, ws, "new", "n1", T0 + timedelta(days=30)),
            event(ev.RUN_STARTED, ws, "failed", "f0", T0),
            event(ev.RUN_FAILED, ws, "failed", "f1", T0, error={"type": "Timeout"}),
        ]
        await write(store, raw)
        completed = ev.parse_time(COMPLETED_AT)
        found = {r["runId"]: r async for r in ops.scan_runs(ws, completed + timedelta(days=1))}
        assert set(found) == {"old", "open", "failed"}
        assert found["old"] == await store.get_run(ws, "old")
        assert {r["runId"] async for r in ops.scan_runs(ws, completed)} == {"open", "failed"}

        versions = {n["nodeId"]: NodeVersion.of(n) for n in await store.get_nodes(ws, "old")}
        missing = NodeVersion("old", "0" * 32, "e", "completed")
        assert await ops.delete_nodes(ws, [versions["route"], missing]) == 1
        assert [n["nodeId"] for n in await store.get_nodes(ws, "old")] == \
            ["source", "classify", "update-crm"]
        run = await store.get_run(ws, "old")
        assert run is not None
        assert run["summary"] == SUMMARY

        named = [versions[name] for name in ("source", "classify", "update-crm")]
        assert await ops.strip_node_fields(ws, named, ["input", "output"]) == 3
        assert await ops.strip_node_fields(ws, named, ["input", "output"]) == 0
        classify = (await store.get_nodes(ws, "old"))[1]
        assert "input" not in classify
        assert "output" not in classify
        assert classify["model"] == "claude-sonnet-4-20250514"
        assert classify["tokens_used"] == {"input": 450, "output": 85}
        with pytest.raises(ValueError, match="cannot strip"):
            await ops.strip_node_fields(ws, named, ["model"])

        failed = await store.get_run(ws, "failed")
        assert failed is not None
        assert await ops.strip_run_fields(ws, [RunVersion.of(failed), RunVersion.of(run)],
                                          ["error"]) == 1
        failed = await store.get_run(ws, "failed")
        assert failed is not None
        assert failed["error"] is None
        assert failed["status"] == "failed"

    async def test_retention_operations_skip_documents_changed_since_read(
            self, store: Store) -> None:
        """Deletes and strips given the versions read leave every document a late event
        changed since (a replaced node, a new node, a run event) and do the rest."""
        ws = new_workspace()
        raw = [*reference_events(ws, "r"),
               event(ev.RUN_STARTED, ws, "f", "f0", T0),
               event(ev.RUN_FAILED, ws, "f", "f1", T0 + timedelta(seconds=9),
                     error={"type": "Timeout"})]
        await write(store, raw)
        run, failed = await store.get_run(ws, "r"), await store.get_run(ws, "f")
        assert run is not None
        assert failed is not None
        read = {n["nodeId"]: n for n in await store.get_nodes(ws, "r")}
        old = {name: NodeVersion.of(n) for name, n in read.items()}
        stale_run = RunVersion.of(run, read.values())

        # the same node execution again, same status, later event: only its document changes
        classify = next(n for n in NODES if n["nodeId"] == "classify")
        late = event(ev.NODE_COMPLETED, ws, "r", "r:classify:2", T0,
                     node={**classify, "output": {"intent": "late"}})
        # a node of the failed run arrives late: its run document changes
        late_node = event(ev.NODE_COMPLETED, ws, "f", "f2", T0 + timedelta(seconds=5),
                          node=node("audit", "action", T0 + timedelta(seconds=4),
                                    T0 + timedelta(seconds=5)))
        await write(store, [late, late_node])
        assert await store.get_run(ws, "r") == run  # the run document itself is unchanged
        assert (await store.get_run(ws, "f") or {}).get("summary") != failed["summary"]

        assert await store.delete_runs(ws, ["r"], expected=[stale_run]) == 0
        assert await store.strip_run_fields(ws, [RunVersion.of(failed)], ["error"]) == 0
        assert await store.delete_nodes(ws, [old["classify"]]) == 0
        assert await store.strip_node_fields(ws, [old["classify"]], ["output"]) == 0
        now = {n["nodeId"]: n for n in await store.get_nodes(ws, "r")}
        assert now["classify"]["output"] == {"intent": "late"}
        assert now["classify"]["eventId"] == "r:classify:2"
        assert set(now) == set(read)
        assert (await store.get_run(ws, "f") or {}).get("error") == {"type": "Timeout"}

        # the unchanged documents beside them are changed as asked
        assert await store.strip_node_fields(ws, [old["source"], old["classify"]],
                                             ["output"]) == 1
        assert await store.delete_nodes(ws, [old["route"], old["classify"]]) == 1
        assert await store.get_run(ws, "r") == run

        # a late run event changes the run document; read again, everything goes
        await write(store, [event(ev.RUN_COMPLETED, ws, "r", "r:again", T0, status="completed")])
        fresh = await store.get_run(ws, "r")
        assert fresh is not None
        assert fresh["eventIds"] != run["eventIds"]
        left = await store.get_nodes(ws, "r")
        assert await store.delete_runs(ws, ["r"], expected=[RunVersion.of(run, left)]) == 0
        assert await store.delete_runs(ws, ["r"], expected=[]) == 0  # no version: kept
        assert await store.delete_runs(ws, ["r"], expected=[RunVersion.of(fresh, left)]) == 1
        assert await store.get_run(ws, "r") is None
        assert await store.get_nodes(ws, "r") == []
        failed = await store.get_run(ws, "f")
        assert failed is not None
        assert await store.strip_run_fields(ws, [RunVersion.of(failed)], ["error"]) == 1
        assert (await store.get_run(ws, "f") or {}).get("error") is None

    async def test_scan_runs_of_a_run_without_start(self, store: Store) -> None:
        """A run known only from its terminal event ages from its completedAt."""
        ws = new_workspace()
        ops: Any = store
        await write(store, [event(ev.RUN_COMPLETED, ws, "r1", "c1", T0)])
        run = await store.get_run(ws, "r1")
        assert run is not None
        assert run["startedAt"] is None
        assert [r["runId"] async for r in ops.scan_runs(ws, T0 + timedelta(seconds=1))] == ["r1"]
        assert [r["runId"] async for r in ops.scan_runs(ws, T0)] == []

    async def test_missing_run(self, store: Store) -> None:
        """Reads of a run that was never written return None and no nodes."""
        ws = new_workspace()
        assert await store.get_run(ws, "nope") is None
        assert await store.get_nodes(ws, "nope") == []
        assert await store.list_runs(ws, RunQuery()) == []
        assert [n async for n in store.scan_nodes(ws, NodeQuery())] == []

    async def test_migrate_twice_and_ping(self, store: Store) -> None:
        """migrate is idempotent and keeps data; ping succeeds on an open store."""
        ws = new_workspace()
        raw = reference_events(ws)
        await write(store, raw)
        await store.migrate()
        await store.migrate()
        await store.ping()
        await assert_stored(store, raw)
        assert (await store.write(coalesce([]))).rejected == ()

    async def test_ai_node_without_times_uses_event_time(self, store: Store) -> None:
        """A node without times keeps none; its run starts at the event's ts (UTC)."""
        ws = new_workspace()
        ts = "2026-02-15T12:30:00.123456+02:00"
        raw = [event(ev.NODE_COMPLETED, ws, "r1", "e1", T0, node=node("x", "ai", None, None))
               | {"ts": ts}]
        await write(store, raw)
        await assert_stored(store, raw)
        run = await store.get_run(ws, "r1")
        assert run is not None
        assert run["startedAt"] == datetime(2026, 2, 15, 10, 30, 0, 123456, tzinfo=UTC)
        assert_utc(run["startedAt"])
        assert run["completedAt"] is None
        (stored,) = await store.get_nodes(ws, "r1")
        assert "startedAt" not in stored
        assert stored["durationMs"] is None

    @settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(scenario=scenarios())
    async def test_merge_property(self, store: Store, scenario: Scenario) -> None:
        """Any multiset of events, in any order and batches, stores exactly fold(events)."""
        stored: list[dict[tuple[str, str], Any]] = []
        keys = sorted({(e["workspaceId"], e["runId"]) for e in scenario.events})
        for n, batches in enumerate((scenario.first, scenario.second)):
            labels = {"A": new_workspace(f"pa{n}"), "B": new_workspace(f"pb{n}")}
            raw = relabel(scenario.events, labels)
            for batch in batches:
                result = await write(store, [raw[i] for i in batch])
                assert result.rejected == ()
            written = [raw[i] for i in scenario.written()]
            await assert_stored(store, written)
            runs, _ = expected(written)
            docs: dict[tuple[str, str], Any] = {}
            for label, run_id in keys:
                ws = labels[label]
                if (ws, run_id) not in runs:
                    assert await store.get_run(ws, run_id) is None
                    assert await store.get_nodes(ws, run_id) == []
                docs[(label, run_id)] = (
                    without_workspace(await store.get_run(ws, run_id)),
                    [without_workspace(d) for d in await store.get_nodes(ws, run_id)],
                )
            for label, ws in labels.items():
                listed = await store.list_runs(ws, RunQuery(limit=100))
                assert sorted(r["runId"] for r in listed) == \
                    sorted(k[1] for k in runs if k[0] == ws), label
            stored.append(docs)
        assert stored[0] == stored[1]
