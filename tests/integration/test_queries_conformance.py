"""Query conformance: every store answers explain, runs, insights and retention the same.

:class:`QueryConformance` holds the checks; a subclass per store supplies ``store_url``.
The expected answers come from :func:`worker.documents.fold` (the store-neutral
specification of what a store holds) run through the same pure functions, so a store
that returns different documents, orders or filters fails here. MongoDB runs the same
class against a real server when ``AUDIT_TEST_MONGODB_URL`` is set, and always against
the wire emulator of ``tests/mongo_emulator.py``.

The limit of this module: the expected answers are built with the code under test
(``explain.build``, ``insights.Insights``, ``retention.decide``, ``queries.run_row``), so
these checks prove that the stores agree with each other and with the fold, not that the
answers are right. Each answer is also pinned by independent expected values, written
out by hand or computed another way:

- explain: ``tests/integration/test_explain.py`` (every field of the reference record,
  the terminal view, redaction, errors and retries);
- runs: :func:`test_listing_rows_are_pinned` below, and ``test_list_runs_filters`` of
  ``tests/store_conformance.py`` (run IDs per filter);
- insights: ``tests/integration/test_insights.py``, against a computation of its own
  from the dataset's specification (``tests/dataset.py``), and exact counts;
- retention: ``test_decide_per_data_class``, ``test_plan_changes_nothing_and_run_applies
  _every_tier`` and the late-event tests of ``tests/integration/test_retention.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import reference as ref
from tests.dataset import BASE, make_dataset
from tests.helpers import write_events
from tests.mongo_emulator import FakeMongo, url_of
from worker import archive as arc
from worker import events as ev
from worker import explain, insights, queries, retention
from worker.cli import explain as explain_cli
from worker.documents import fold
from worker.emitter import make_event
from worker.stores import RunQuery, Store, migrate, open_store

pytestmark = pytest.mark.anyio

MONGO_URL = os.environ.get("AUDIT_TEST_MONGODB_URL")


def folded(raw_events: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]],
                                                      dict[str, list[dict[str, Any]]]]:
    """Run docs by run ID and node docs by run ID: what every store must hold."""
    runs, nodes = fold(ev.decode(ev.encode(e), max_bytes=1 << 24) for e in raw_events)
    by_run: dict[str, list[dict[str, Any]]] = {}
    for (_, run_id, _), doc in nodes.items():
        by_run.setdefault(run_id, []).append(doc)
    return {k[1]: v for k, v in runs.items()}, by_run


def expected_runs(runs: dict[str, dict[str, Any]], q: RunQuery) -> list[dict[str, Any]]:
    """``list_runs`` semantics: filters, newest start first, ties by run ID, limit."""
    chosen = [d for d in runs.values()
              if (q.workflow_id is None or d["workflowId"] == q.workflow_id)
              and (q.status is None or d["status"] == q.status)
              and (q.trigger_source is None or (d.get("trigger") or {}).get("source")
                   == q.trigger_source)
              and (q.since is None or d["startedAt"] >= q.since)
              and (q.until is None or d["startedAt"] < q.until)]
    chosen.sort(key=lambda d: d["runId"])
    chosen.sort(key=lambda d: d["startedAt"], reverse=True)
    return [queries.run_row(d) for d in chosen[: q.limit]]


QUERIES = [
    RunQuery(),
    RunQuery(limit=7),
    RunQuery(workflow_id="wf_billing"),
    RunQuery(status="completed", limit=5),
    RunQuery(trigger_source="slack"),
    RunQuery(since=BASE + timedelta(minutes=60), until=BASE + timedelta(minutes=200)),
    RunQuery(workflow_id="wf_triage", trigger_source="gmail", since=BASE, limit=3),
    RunQuery(status="failed"),
]


class QueryConformance:
    """The query checks; subclasses provide the ``store_url`` fixture."""

    @pytest.fixture
    def store_url(self) -> str:
        raise NotImplementedError

    @pytest.fixture
    async def qstore(self, store_url: str) -> AsyncIterator[Store]:
        store = open_store(store_url)
        await store.open()
        await migrate(store)
        self.used: list[str] = []
        try:
            yield store
        finally:
            if store.name == "mongodb":  # a shared server: remove what this test wrote
                for ws in self.used:
                    ids = [d["runId"] for d in await store.list_runs(ws, RunQuery(limit=10**6))]
                    await store.delete_runs(ws, ids)
            await store.close()

    def workspace(self) -> str:
        ws = f"qc_{uuid.uuid4().hex[:10]}"
        self.used.append(ws)
        return ws

    async def test_reference_record_explains_as_specified(self, qstore: Store) -> None:
        """explain of the reference record equals the explanation of the folded documents."""
        ws = self.workspace()
        events = ref.reference_events(ws)
        await write_events(qstore, events)
        runs, nodes = folded(events)
        for show in (True, False):
            got = await explain.explain_run(qstore, ws, ref.RUN_ID, show_prompts=show)
            assert got is not None
            want = explain.build(ws, ref.RUN_ID, runs[ref.RUN_ID], nodes[ref.RUN_ID],
                                 show_prompts=show)
            assert queries.dumps(got.to_json()) == queries.dumps(want.to_json())
            assert explain_cli.render(got) == explain_cli.render(want)

    async def test_cursor_pages_walk_the_listing_exactly_once(self, qstore: Store) -> None:
        """Keyset pages of every size, with filters and runs sharing a start time, give
        the whole listing in order, each run once, and the last page has no cursor."""
        ws = self.workspace()
        events, _ = make_dataset(ws, runs=14, seed=5)
        for i in range(5):  # five runs with the very same startedAt: ties by run ID
            events += ref.reference_events(ws, run_id=f"run_tie_{i}")
        await write_events(qstore, events)
        runs, _ = folded(events)
        for q in [RunQuery(limit=1000), RunQuery(limit=1000, status="completed"),
                  RunQuery(limit=1000, workflow_id=ref.WORKFLOW_ID)]:
            want = expected_runs(runs, q)
            for size in (1, 3, len(want), len(want) + 1):
                got: list[dict[str, Any]] = []
                after = None
                pages = 0
                while True:
                    page, cursor = await queries.list_runs_page(
                        qstore, ws, replace(q, limit=size, after=after))
                    got.extend(page)
                    pages += 1
                    if cursor is None:
                        break
                    after = queries.decode_cursor(cursor)
                    assert pages <= len(want)
                assert queries.dumps(got) == queries.dumps(want), (q, size)
                assert pages == max(1, -(-len(want) // size)), (q, size)

    async def test_runs_listing_matches_the_specification(self, qstore: Store) -> None:
        """Every filter combination lists the same runs, in the same order."""
        ws = self.workspace()
        events, _ = make_dataset(ws, runs=30, seed=21)
        await write_events(qstore, events)
        runs, _ = folded(events)
        for q in QUERIES:
            got = await queries.list_runs(qstore, ws, q)
            assert queries.dumps(got) == queries.dumps(expected_runs(runs, q)), q

    async def test_insights_match_the_specification(self, qstore: Store) -> None:
        """insights over the store equal the fold over the specified node documents."""
        ws = self.workspace()
        events, _ = make_dataset(ws, runs=45, seed=4)
        await write_events(qstore, events)
        _, nodes = folded(events)
        since, until = BASE + timedelta(minutes=20), BASE + timedelta(minutes=250)
        got = await insights.compute(qstore, ws, since=since, until=until, threshold=0.6)
        want = insights.Insights(threshold=0.6, since=since, until=until).add_all(
            d for docs in nodes.values() for d in docs).result()
        assert got.pop("workspace") == ws
        assert queries.dumps(got) == queries.dumps(want)

    async def test_retention_leaves_the_specified_state(self, qstore: Store,
                                                        tmp_path: Path) -> None:
        """A retention pass archives the specified documents and leaves the specified hot data."""
        ws = self.workspace()
        events, _ = make_dataset(ws, runs=12, seed=9)
        await write_events(qstore, events)
        runs, nodes = folded(events)
        now = BASE + timedelta(days=90, minutes=40)
        archive = arc.Archive.at(tmp_path)
        await retention.run_retention(qstore, retention.Policy(period="day"), now=now,
                                      archive=archive, apply=True, workspaces=[ws])
        assert archive.verify(ws).ok
        for run_id, run in runs.items():
            found = await arc.read_run(archive, ws, run_id)
            assert found is not None
            archived = explain.build(ws, run_id, found[0], found[1], show_prompts=True)
            want = explain.build(ws, run_id, run, nodes[run_id], show_prompts=True)
            assert queries.dumps(archived.to_json()["nodes"]) == \
                queries.dumps(want.to_json()["nodes"])
            hot = await qstore.get_run(ws, run_id)
            action = retention.decide(run, sorted(nodes[run_id], key=lambda n: n["nodeKey"]),
                                      retention.HotDays(), now, "day", None)
            assert action is not None
            if action.delete_run:
                assert hot is None
                continue
            assert hot == run
            left = await qstore.get_nodes(ws, run_id)
            kept = [dict(n) for n in nodes[run_id] if n["nodeKey"] not in action.delete_nodes]
            for n in kept:
                if n["nodeKey"] in action.strip_prompts:
                    n.pop("input", None)
                    n.pop("output", None)
            assert sorted(left, key=lambda n: n["nodeKey"]) == \
                sorted(kept, key=lambda n: n["nodeKey"])


class TestSQLiteQueries(QueryConformance):
    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/conformance.db"


@pytest.mark.postgres
class TestPostgresQueries(QueryConformance):
    @pytest.fixture
    def store_url(self, pg_url: str) -> str:
        return pg_url


@pytest.mark.mongo
@pytest.mark.skipif(MONGO_URL is None, reason="set AUDIT_TEST_MONGODB_URL to a real MongoDB")
class TestMongoQueries(QueryConformance):
    @pytest.fixture
    def store_url(self) -> str:
        assert MONGO_URL is not None
        return MONGO_URL


@pytest.mark.postgres
async def test_sqlite_and_postgres_answer_identically(tmp_path: Path, pg_url: str) -> None:
    """The same dataset in SQLite and PostgreSQL gives byte-identical query answers."""
    ws = f"qc_{uuid.uuid4().hex[:10]}"
    events, _ = make_dataset(ws, runs=24, seed=13)
    events += ref.reference_events(ws)
    answers: list[list[str]] = []
    for name, url in (("sqlite", f"sqlite:///{tmp_path}/same.db"), ("postgresql", pg_url)):
        store = open_store(url)
        await store.open()
        await migrate(store)
        try:
            await write_events(store, events)
            out: list[str] = []
            ids = [d["runId"] for d in await store.list_runs(ws, RunQuery(limit=1000))]
            for run_id in ids:
                ex = await explain.explain_run(store, ws, run_id)
                assert ex is not None
                out.append(queries.dumps(ex.to_json()))
                out.append(explain_cli.render(ex))
            for q in QUERIES:
                out.append(queries.dumps(await queries.list_runs(store, ws, q)))
            out.append(queries.dumps(await insights.compute(store, ws)))
            archive = arc.Archive.at(tmp_path / name)
            report = await retention.run_retention(
                store, retention.Policy(), now=BASE + timedelta(days=90, minutes=90),
                archive=archive, apply=True, workspaces=[ws])
            out.append(queries.dumps({k: v for k, v in report[0].to_json().items()
                                      if k != "segments"}))
            out.append(queries.dumps([(k, d) for _, k, d in archive.records(ws)]))
            for run_id in ids:
                ex = await explain.explain_run(store, ws, run_id, show_prompts=True)
                out.append(queries.dumps(ex.to_json()) if ex else "gone")
        finally:
            await store.close()
        answers.append(out)
    assert answers[0] == answers[1]


@pytest.mark.mongo
class TestMongoWireQueries(QueryConformance):
    """Every query check through the real driver against the store tests' wire emulator."""

    @pytest.fixture
    def store_url(self, mongo_wire: FakeMongo) -> str:
        return url_of(mongo_wire)


async def test_listing_rows_are_pinned(store: Store) -> None:
    """The runs listing, written out by hand (not built with queries.run_row): the rows
    of the reference record and of a failed run, their order and each filter's answer."""
    ws = f"qc_{uuid.uuid4().hex[:10]}"
    ids = ("wf_billing", "run_b")
    failed = [
        make_event("run.started", ws, *ids, eventId="b-1", ts="2026-02-15T09:00:00Z",
                   trigger={"type": "cron", "source": "schedule"}),
        make_event("run.failed", ws, *ids, eventId="b-2", ts="2026-02-15T09:00:01.5Z",
                   status="failed", totalDuration=1500, error={"type": "Timeout"}),
    ]
    await write_events(store, ref.reference_events(ws) + failed)
    reference_row = {
        "runId": "run_a1b2c3d4", "workflowId": "wf_lead_triage", "status": "completed",
        "startedAt": datetime(2026, 2, 15, 10, 30, tzinfo=UTC),
        "completedAt": datetime(2026, 2, 15, 10, 30, 4, 800000, tzinfo=UTC),
        "totalDuration": 4800, "trigger": {"type": "webhook", "source": "gmail"},
        "summary": {"nodesExecuted": 4, "nodeExecutions": 4, "aiCallsMade": 1,
                    "actionsPerformed": ["salesforce.create_lead"], "totalTokens": 535,
                    "failedNodes": 0},
    }
    failed_row = {
        "runId": "run_b", "workflowId": "wf_billing", "status": "failed",
        "startedAt": datetime(2026, 2, 15, 9, 0, tzinfo=UTC),
        "completedAt": datetime(2026, 2, 15, 9, 0, 1, 500000, tzinfo=UTC),
        "totalDuration": 1500, "trigger": {"type": "cron", "source": "schedule"},
        "summary": {"nodesExecuted": 0, "nodeExecutions": 0, "aiCallsMade": 0,
                    "actionsPerformed": [], "totalTokens": 0, "failedNodes": 0},
    }
    ten = datetime(2026, 2, 15, 10, 0, tzinfo=UTC)
    answers = {
        "all": (RunQuery(), [reference_row, failed_row]),  # newest start first
        "limit": (RunQuery(limit=1), [reference_row]),
        "status": (RunQuery(status="failed"), [failed_row]),
        "workflow": (RunQuery(workflow_id="wf_lead_triage"), [reference_row]),
        "source": (RunQuery(trigger_source="schedule"), [failed_row]),
        "since": (RunQuery(since=ten), [reference_row]),  # inclusive
        "until": (RunQuery(until=ten), [failed_row]),  # exclusive
        "none": (RunQuery(status="running"), []),
    }
    for name, (query, want) in answers.items():
        assert await queries.list_runs(store, ws, query) == want, name
