"""Tiered retention: policy per data class and workspace, plan, run, and idempotence."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests import reference as ref
from tests.helpers import StoreProxy, migrated, run_cli, workspace_name, write_events
from tests.mongo_emulator import FakeMongo, _canon, url_of
from worker import archive as arc
from worker import events as ev
from worker import explain, retention
from worker.cli import retention as retention_cli
from worker.errors import ConfigError
from worker.stores import NodeVersion, RunVersion, Store, migrate, open_store

pytestmark = pytest.mark.anyio

DAY = timedelta(days=1)
NOW = datetime(2026, 9, 1, 12, 0, tzinfo=UTC)


def iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def run_events(ws: str, run_id: str, finished: datetime, *, failed: bool = True
               ) -> list[dict[str, Any]]:
    """A run that finished at ``finished``: an ai node, an action that failed once, retry."""
    start = finished - timedelta(seconds=10)
    env = {"v": 1, "workspaceId": ws, "workflowId": "wf", "runId": run_id}
    nodes: list[dict[str, Any]] = [
        {"nodeId": "classify", "type": "ai", "startedAt": iso(start + timedelta(seconds=1)),
         "completedAt": iso(start + timedelta(seconds=2)), "model": "m",
         "input": {"prompt": f"secret prompt of {run_id}"}, "output": {"confidence": 0.5},
         "tokens_used": {"input": 10, "output": 2}},
        {"nodeId": "act", "type": "action", "attempt": 1,
         "startedAt": iso(start + timedelta(seconds=3)),
         "completedAt": iso(start + timedelta(seconds=4)),
         "input": {"payload": "p"}, "error": {"type": "Timeout", "message": "slow", "retries": 1},
         "status": "failed"},
        {"nodeId": "act", "type": "action", "attempt": 2,
         "startedAt": iso(start + timedelta(seconds=5)),
         "completedAt": iso(start + timedelta(seconds=6)), "actions": ["crm.update"]},
    ]
    if not failed:
        nodes = [nodes[0], nodes[2]]
    return [env | {"eventId": f"{run_id}:snap", "type": "run.snapshot", "ts": iso(finished),
                   "status": "failed" if failed else "completed", "startedAt": iso(start),
                   "completedAt": iso(finished), "totalDuration": 10_000,
                   "error": {"type": "Gave up"} if failed else None,
                   "trigger": {"type": "cron", "source": "scheduler"}, "nodes": nodes}]


# -- policy ----------------------------------------------------------------------------------

def test_default_policy_is_the_designs() -> None:
    """Hot storage defaults: summaries 90, node traces 30, prompts 30, errors 90 days."""
    hot = retention.Policy().hot
    assert (hot.run_summaries, hot.node_traces, hot.prompts, hot.error_details) == (
        90, 30, 30, 90)


def test_policy_from_toml_with_workspace_overrides(tmp_path: Path) -> None:
    """A TOML policy sets defaults and per-workspace overrides on top of them."""
    path = tmp_path / "policy.toml"
    path.write_text('period = "day"\n[hot]\nrun_summaries = 365\nnode_traces = 60\n'
                    '[workspaces.acme.hot]\nprompts = 7\n'
                    '[workspaces.legal.hot]\nrun_summaries = "forever"\n'
                    'error_details = "forever"\n')
    policy = retention.Policy.load(path)
    assert policy.period == "day"
    assert policy.for_workspace("other") == retention.HotDays(365, 60, 30, 90)
    assert policy.for_workspace("acme") == retention.HotDays(365, 60, 7, 90)
    assert policy.for_workspace("legal") == retention.HotDays(None, 60, 30, None)
    as_json = tmp_path / "policy.json"
    as_json.write_text(json.dumps(policy.to_json()))
    assert retention.Policy.load(as_json) == policy


@pytest.mark.parametrize(("raw", "message"), [
    ({"hot": {"prompts": 60}}, "prompts cannot be kept longer than node_traces"),
    ({"hot": {"node_traces": 120}}, "node_traces cannot be kept longer than run_summaries"),
    ({"hot": {"errors": 5}}, "unknown data classes errors"),
    ({"hot": {"prompts": -1}}, "must be a number of days"),
    ({"period": "week"}, "period must be one of"),
    ({"workspaces": {"bad name": {"hot": {}}}}, "a workspace is"),
    ({"retain": 1}, "unknown retention policy keys"),
])
def test_bad_policies_are_refused(raw: dict[str, Any], message: str) -> None:
    """Inconsistent or unknown settings fail with a message naming the problem."""
    with pytest.raises(ConfigError, match=message):
        retention.Policy.from_mapping(raw)


def test_decide_per_data_class() -> None:
    """Each expired class maps to its own hot-storage action; failed nodes keep errors."""
    run = {"runId": "r", "completedAt": NOW - 40 * DAY, "error": {"type": "E"}}
    nodes: list[dict[str, Any]] = [{"nodeKey": "a", "input": {"p": 1}, "output": 1},
             {"nodeKey": "b", "input": {"p": 2}, "error": {"type": "E"}},
             {"nodeKey": "c"}]
    hot = retention.HotDays()
    act = retention.decide(run, nodes, hot, NOW, "month", None)
    assert act is not None
    assert act.expired == ("node_traces", "prompts")
    assert act.delete_nodes == ["a", "c"]
    assert act.strip_prompts == ["b"]
    assert act.strip_node_errors == []
    assert not act.strip_run_error
    assert not act.delete_run
    assert act.period == "2026-07"
    old = retention.decide(run | {"completedAt": NOW - 95 * DAY}, nodes, hot, NOW, "day",
                           None)
    assert old is not None
    assert old.delete_run
    assert old.period == "2026-05-29"
    young = retention.decide(run | {"completedAt": NOW - 10 * DAY}, nodes, hot, NOW, "day",
                             None)
    assert young is None
    prompts_only = retention.HotDays(prompts=7)
    act = retention.decide(run | {"completedAt": NOW - 10 * DAY}, nodes, prompts_only, NOW,
                           "day", None)
    assert act is not None
    assert act.strip_prompts == ["a", "b"]
    assert act.delete_nodes == []
    errors_short = retention.HotDays(node_traces=200, prompts=200, error_details=20,
                                     run_summaries=300)
    act = retention.decide(run, nodes, errors_short, NOW, "day", None)
    assert act is not None
    assert act.strip_node_errors == ["b"]
    assert act.strip_run_error


# -- plan and run against the stores --------------------------------------------------------

async def _state(store: Store, ws: str, run_id: str) -> tuple[dict[str, Any] | None,
                                                              list[dict[str, Any]]]:
    return await store.get_run(ws, run_id), await store.get_nodes(ws, run_id)


async def test_plan_changes_nothing_and_run_applies_every_tier(store: Store,
                                                                tmp_path: Path) -> None:
    """plan reports; run archives, then strips prompts, drops traces, keeps what it must."""
    ws = workspace_name()
    ages = {"young": 10, "traces": 40, "old": 100}
    for run_id, days in ages.items():
        await write_events(store, run_events(ws, run_id, NOW - days * DAY))
    before = {r: await _state(store, ws, r) for r in ages}
    archive = arc.Archive.at(tmp_path / "archive")
    plan = await retention.run_retention(store, retention.Policy(), now=NOW, archive=archive,
                                         apply=False, workspaces=[ws])
    assert {r: await _state(store, ws, r) for r in ages} == before
    assert not (tmp_path / "archive" / ws).exists()
    p = plan[0]
    assert (p.runs_examined, p.runs_affected, p.runs_archived) == (2, 2, 2)
    assert (p.runs_deleted, p.nodes_deleted, p.prompts_stripped) == (1, 2, 1)
    assert p.errors_stripped == 0
    assert [s["period"] for s in p.segments] == ["2026-05", "2026-07"]

    done = await retention.run_retention(store, retention.Policy(), now=NOW, archive=archive,
                                         apply=True, workspaces=[ws])
    d = done[0]
    assert (d.runs_affected, d.runs_deleted, d.nodes_deleted, d.prompts_stripped) == (
        p.runs_affected, p.runs_deleted, p.nodes_deleted, p.prompts_stripped)
    assert [(m["seq"], m["period"]) for m in d.segments] == [(1, "2026-05"), (2, "2026-07")]
    # young: untouched
    assert await _state(store, ws, "young") == before["young"]
    # old: gone from hot storage, whole in the archive
    assert await _state(store, ws, "old") == (None, [])
    found = await arc.read_run(archive, ws, "old")
    assert found is not None
    assert found[0] == before["old"][0]
    assert sorted(found[1], key=lambda n: n["nodeKey"]) == sorted(
        before["old"][1], key=lambda n: n["nodeKey"])
    # traces: summary and errors stay; the failed node stays without its prompt
    run, nodes = await _state(store, ws, "traces")
    assert run == before["traces"][0]
    assert [(n["nodeId"], n["attempt"]) for n in nodes] == [("act", 1)]
    assert "input" not in nodes[0]
    assert nodes[0]["error"] == {"type": "Timeout", "message": "slow", "retries": 1}
    ex = await explain.explain_run(store, ws, "traces")
    assert ex is not None
    assert [(m["nodeId"], m["attempt"]) for m in ex.missing_nodes] == [
        ("act", 2), ("classify", 1)]
    assert archive.verify(ws).ok
    # idempotent: nothing more to do, no new segment
    again = await retention.run_retention(store, retention.Policy(), now=NOW, archive=archive,
                                          apply=True, workspaces=[ws])
    assert (again[0].runs_affected, again[0].segments) == (0, [])
    assert len(archive.manifests(ws)) == 2


async def test_later_tiers_reuse_the_archived_copy(store: Store, tmp_path: Path) -> None:
    """When the stripped run later expires entirely, nothing is archived a second time."""
    ws = workspace_name()
    await write_events(store, run_events(ws, "r1", NOW - 40 * DAY))
    archive = arc.Archive.at(tmp_path / "a")
    await retention.run_retention(store, retention.Policy(), now=NOW, archive=archive,
                                  apply=True, workspaces=[ws])
    later = await retention.run_retention(store, retention.Policy(), now=NOW + 60 * DAY,
                                          archive=archive, apply=True, workspaces=[ws])
    assert later[0].runs_deleted == 1
    assert later[0].docs_archived == 0
    assert later[0].segments == []
    assert await store.get_run(ws, "r1") is None
    assert len(archive.manifests(ws)) == 1
    found = await arc.read_run(archive, ws, "r1")
    assert found is not None
    assert len(found[1]) == 3


async def test_a_late_node_is_archived_before_its_run_is_removed(store: Store,
                                                                 tmp_path: Path) -> None:
    """A node that arrived after the run was archived goes into a new segment."""
    ws = workspace_name()
    await write_events(store, run_events(ws, "r1", NOW - 40 * DAY, failed=False))
    archive = arc.Archive.at(tmp_path / "a")
    await retention.run_retention(store, retention.Policy(), now=NOW, archive=archive,
                                  apply=True, workspaces=[ws])
    late = {"v": 1, "workspaceId": ws, "workflowId": "wf", "runId": "r1", "eventId": "late",
            "type": "node.completed", "ts": "2026-07-23T12:00:00Z",
            "node": {"nodeId": "audit", "type": "action", "startedAt": "2026-07-23T11:59:59Z",
                     "completedAt": "2026-07-23T12:00:00Z", "actions": ["log.write"]}}
    await write_events(store, [late])
    again = await retention.run_retention(store, retention.Policy(), now=NOW, archive=archive,
                                          apply=True, workspaces=[ws])
    assert again[0].docs_archived == 2  # the new node and the run document it changed
    found = await arc.read_run(archive, ws, "r1")
    assert found is not None
    assert {n["nodeId"] for n in found[1]} == {"classify", "act", "audit"}
    assert found[0] is not None
    assert found[0]["summary"]["nodeExecutions"] == 3


async def test_workspace_overrides_and_no_archive(store: Store, store_url: str,
                                                  capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    """A workspace override strips prompts early; --no-archive drops without a segment."""
    ws_a, ws_b = workspace_name("a"), workspace_name("b")
    for ws in (ws_a, ws_b):
        await write_events(store, run_events(ws, "r1", NOW - 10 * DAY))
    policy = tmp_path / "p.toml"
    policy.write_text(f"[workspaces.{ws_a}.hot]\nprompts = 7\n")
    for ws in (ws_a, ws_b):
        args = run_cli(retention_cli.register, ["retention", "run", "--no-archive", "-w", ws,
                                            "--policy", str(policy), "--store-url", store_url,
                                            "--now", NOW.isoformat(), "--json"])
        assert await args.func(args) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["applied"] is True
        assert out["workspaces"][0]["segments"] == []
    a_nodes = await store.get_nodes(ws_a, "r1")
    b_nodes = await store.get_nodes(ws_b, "r1")
    assert len(a_nodes) == len(b_nodes) == 3
    assert all("input" not in n and "output" not in n for n in a_nodes)
    assert [n["error"]["type"] for n in a_nodes if n.get("error")] == ["Timeout"]
    assert any("input" in n for n in b_nodes)


async def test_cli_plan_table_and_run_needs_an_archive(store: Store, store_url: str,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """plan prints a table; run without --archive-dir or --no-archive is refused."""
    ws = workspace_name()
    await write_events(store, ref.reference_events(ws))
    args = run_cli(retention_cli.register, ["retention", "plan", "-w", ws, "--store-url",
                                        store_url, "--now", "2026-06-01"])
    assert await args.func(args) == 0
    text = capsys.readouterr().out
    assert "Plan at 2026-06-01T00:00:00.000000Z" in text
    assert f"{ws}: segment 2026-02: 1 runs, 4 node docs (to write)" in text
    args = run_cli(retention_cli.register, ["retention", "run", "-w", ws, "--store-url",
                                        store_url])
    with pytest.raises(ConfigError, match="--archive-dir"):
        await args.func(args)
    assert await store.get_run(ws, ref.RUN_ID) is not None


# -- late events racing retention -----------------------------------------------------------

@pytest.fixture(name="any_store_url", params=[
    "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("mongodb", marks=pytest.mark.mongo)])
def fixture_any_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh SQLite file, PostgreSQL database or MongoDB (wire emulator)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit.db"
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return url_of(request.getfixturevalue("mongo_wire"))


@pytest.fixture(name="any_store")
async def fixture_any_store(any_store_url: str) -> AsyncIterator[Store]:
    async with migrated(open_store(any_store_url)) as store:
        yield store


class LateEvents(StoreProxy):
    """A store whose first ``before`` call is preceded by a write of late events: what a
    worker merging a delayed or redelivered event does after retention read and archived
    the run and before it changes hot storage."""

    def __init__(self, inner: Store, before: str, events: list[dict[str, Any]]) -> None:
        super().__init__(inner)
        self.before, self.events = before, events
        self.fired = False

    async def _late(self, name: str) -> None:
        if name == self.before and not self.fired:
            self.fired = True
            await write_events(self.inner, self.events)

    async def delete_runs(self, workspace: str, run_ids: Sequence[str], *,
                          expected: Sequence[RunVersion] | None = None) -> int:
        await self._late("delete_runs")
        return await super().delete_runs(workspace, run_ids, expected=expected)

    async def delete_nodes(self, workspace: str, nodes: Sequence[NodeVersion]) -> int:
        await self._late("delete_nodes")
        return await super().delete_nodes(workspace, nodes)

    async def strip_node_fields(self, workspace: str, nodes: Sequence[NodeVersion],
                                fields: Sequence[str]) -> int:
        await self._late("strip_node_fields")
        return await super().strip_node_fields(workspace, nodes, fields)

    async def strip_run_fields(self, workspace: str, runs: Sequence[RunVersion],
                               fields: Sequence[str]) -> int:
        await self._late("strip_run_fields")
        return await super().strip_run_fields(workspace, runs, fields)


def late_event(ws: str, run_id: str, finished: datetime, kind: str) -> dict[str, Any]:
    """One late event for a run of :func:`run_events` (see :func:`holds_late`)."""
    env = {"v": 1, "workspaceId": ws, "workflowId": "wf", "runId": run_id,
           "ts": iso(finished)}
    start = finished - timedelta(seconds=10)
    node: dict[str, Any]
    if kind == "run event":  # a late run.completed: new eventId, a field not seen before
        return env | {"eventId": f"{run_id}:late", "type": "run.completed",
                      "status": "completed", "reviewedBy": "ops"}
    if kind == "new node":
        node = {"nodeId": "audit", "type": "action", "actions": ["log.write"],
                "startedAt": iso(start + timedelta(seconds=7)), "completedAt": iso(finished)}
    elif kind == "replaced node":  # same execution and status, a greater eventId
        node = {"nodeId": "classify", "type": "ai", "model": "m",
                "startedAt": iso(start + timedelta(seconds=1)),
                "completedAt": iso(start + timedelta(seconds=2)),
                "input": {"prompt": "late prompt"}, "output": {"confidence": 0.99}}
    else:  # "replaced failed node": the failed attempt again, a greater eventId
        node = {"nodeId": "act", "type": "action", "attempt": 1, "status": "failed",
                "startedAt": iso(start + timedelta(seconds=3)),
                "completedAt": iso(start + timedelta(seconds=4)),
                "input": {"payload": "late"},
                "error": {"type": "Timeout", "message": "slow", "retries": 1}}
    return env | {"eventId": f"{run_id}:snap:late", "type": "node.completed", "node": node}


def holds_late(run: dict[str, Any] | None, nodes: list[dict[str, Any]], kind: str) -> bool:
    """Whether these documents hold what :func:`late_event` of ``kind`` brought."""
    by_id = {(n["nodeId"], n["attempt"]): n for n in nodes}
    if kind == "run event":
        return run is not None and run.get("reviewedBy") == "ops"
    if kind == "new node":
        return ("audit", 1) in by_id
    if kind == "replaced node":
        return by_id.get(("classify", 1), {}).get("output") == {"confidence": 0.99}
    return by_id.get(("act", 1), {}).get("input") == {"payload": "late"}


@pytest.mark.parametrize("kind", ["new node", "replaced node", "run event"])
async def test_a_late_event_before_the_run_delete_keeps_the_run_until_archived(
        any_store: Store, tmp_path: Path, kind: str) -> None:
    """A late event merged after an expired run was read and archived, just before its
    delete, keeps the run in hot storage; the next pass archives it too, then deletes."""
    ws = workspace_name()
    finished = NOW - 100 * DAY
    await write_events(any_store, run_events(ws, "r1", finished))
    archive = arc.Archive.at(tmp_path / "a")
    racing = LateEvents(any_store, "delete_runs", [late_event(ws, "r1", finished, kind)])
    first = await retention.run_retention(racing, retention.Policy(), now=NOW,
                                          archive=archive, apply=True, workspaces=[ws])
    assert racing.fired
    assert (first[0].runs_deleted, first[0].deferred, len(first[0].segments)) == (0, 1, 1)
    assert first[0].to_json()["deferred"] == 1
    assert f"{ws}: 1 changes deferred to the next run" in retention_cli.render(
        first, applied=True, now=NOW)
    run, nodes = await _state(any_store, ws, "r1")
    assert run is not None
    assert holds_late(run, nodes, kind)
    found = await arc.read_run(archive, ws, "r1")
    assert found is not None
    assert not holds_late(found[0], found[1], kind)  # the archive has the version read

    second = await retention.run_retention(any_store, retention.Policy(), now=NOW,
                                           archive=archive, apply=True, workspaces=[ws])
    assert (second[0].runs_deleted, second[0].deferred) == (1, 0)
    # what changed since the first pass read it: the run (its node index) and a new node
    assert second[0].docs_archived == (2 if kind == "new node" else 1)
    assert await _state(any_store, ws, "r1") == (None, [])
    found = await arc.read_run(archive, ws, "r1")
    assert found is not None
    assert holds_late(found[0], found[1], kind)
    assert len(found[1]) == 3 + (kind == "new node")
    assert archive.verify(ws).ok


@pytest.mark.parametrize(("before", "kind"), [("delete_nodes", "replaced node"),
                                              ("strip_node_fields", "replaced failed node")])
async def test_a_late_node_version_before_its_delete_or_strip_survives(
        any_store: Store, tmp_path: Path, before: str, kind: str) -> None:
    """A node document replaced after it was read and archived is neither deleted nor
    stripped; the next pass archives the new version, then deletes or strips it."""
    ws = workspace_name()
    finished = NOW - 40 * DAY
    await write_events(any_store, run_events(ws, "r1", finished))
    archive = arc.Archive.at(tmp_path / "a")
    racing = LateEvents(any_store, before, [late_event(ws, "r1", finished, kind)])
    first = await retention.run_retention(racing, retention.Policy(), now=NOW,
                                          archive=archive, apply=True, workspaces=[ws])
    assert racing.fired
    assert first[0].deferred == 1
    run, nodes = await _state(any_store, ws, "r1")
    assert run is not None
    assert holds_late(run, nodes, kind)
    if before == "delete_nodes":  # the others went; act attempt 1 stays for its error
        assert first[0].nodes_deleted == 1
        assert sorted((n["nodeId"], n["attempt"]) for n in nodes) == [("act", 1),
                                                                       ("classify", 1)]
    else:
        assert first[0].prompts_stripped == 0

    second = await retention.run_retention(any_store, retention.Policy(), now=NOW,
                                           archive=archive, apply=True, workspaces=[ws])
    assert second[0].deferred == 0
    assert second[0].docs_archived == 1  # the node version that came late
    run, nodes = await _state(any_store, ws, "r1")
    assert [(n["nodeId"], n["attempt"]) for n in nodes] == [("act", 1)]
    assert "input" not in nodes[0]
    assert nodes[0]["error"]["type"] == "Timeout"
    found = await arc.read_run(archive, ws, "r1")
    assert found is not None
    assert holds_late(found[0], found[1], kind)
    assert archive.verify(ws).ok


async def test_a_late_run_event_before_the_error_strip_defers_it(any_store: Store,
                                                                 tmp_path: Path) -> None:
    """A run document changed after it was read keeps its error until the next pass has
    archived the new version."""
    ws = workspace_name()
    finished = NOW - 40 * DAY
    await write_events(any_store, run_events(ws, "r1", finished))
    policy = retention.Policy(hot=retention.HotDays(run_summaries=300, node_traces=200,
                                                    prompts=200, error_details=20))
    archive = arc.Archive.at(tmp_path / "a")
    racing = LateEvents(any_store, "strip_run_fields",
                        [late_event(ws, "r1", finished, "run event")])
    first = await retention.run_retention(racing, policy, now=NOW, archive=archive,
                                          apply=True, workspaces=[ws])
    assert racing.fired
    assert (first[0].errors_stripped, first[0].deferred) == (1, 1)  # the node's error went
    run = await any_store.get_run(ws, "r1")
    assert run is not None
    assert run["error"] == {"type": "Gave up"}
    assert run["reviewedBy"] == "ops"

    second = await retention.run_retention(any_store, policy, now=NOW, archive=archive,
                                           apply=True, workspaces=[ws])
    assert (second[0].errors_stripped, second[0].deferred, second[0].docs_archived) == (1, 0, 1)
    run = await any_store.get_run(ws, "r1")
    assert run is not None
    assert run["error"] is None
    found = await arc.read_run(archive, ws, "r1")
    assert found is not None
    assert found[0] is not None
    assert (found[0]["error"], found[0]["reviewedBy"]) == ({"type": "Gave up"}, "ops")


@pytest.mark.postgres
async def test_postgres_delete_waits_for_a_write_in_flight_then_keeps_the_run(
        pg_url: str) -> None:
    """A write that has merged a late node into the run but not committed yet holds the
    run's row: the compare-and-delete waits for it, then sees the change and keeps all."""
    import asyncpg

    from worker.documents import coalesce
    from worker.stores import _postgres_write as pg
    from worker.stores import _sql

    ws = workspace_name()
    finished = NOW - 100 * DAY
    store = open_store(pg_url)
    await store.open()
    await migrate(store)
    writer = await asyncpg.connect(pg_url)
    try:
        await write_events(store, run_events(ws, "r1", finished))
        run, nodes = await _state(store, ws, "r1")
        assert run is not None
        read = RunVersion.of(run, nodes)
        late = ev.decode(ev.encode(late_event(ws, "r1", finished, "new node")), max_bytes=1 << 20)
        batch = coalesce([(0, late)])
        in_flight = writer.transaction()
        await in_flight.start()
        await writer.execute(pg.UPSERT_RUNS, _sql.encode_json(
            [r.to_doc() for r in _sql.sorted_runs(batch)]).decode())
        await writer.execute(pg.UPSERT_NODES, _sql.encode_json(
            [n.doc for n in _sql.sorted_nodes(batch)]).decode())
        deleted: list[int] = []

        async def delete() -> None:
            deleted.append(await store.delete_runs(ws, ["r1"], expected=[read]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(delete)
            with anyio.fail_after(10):
                while not await writer.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()"):
                    await anyio.sleep(0.01)
            assert deleted == []  # blocked on the run's row
            await in_flight.commit()
        assert deleted == [0]
        run, nodes = await _state(store, ws, "r1")
        assert run is not None
        assert holds_late(run, nodes, "new node")
        assert len(nodes) == 4
    finally:
        await writer.close()
        await store.close()


# -- MongoDB: the exact commands of the retention operations (mockupdb) ----------------------

@pytest.mark.mongo
async def test_mongo_retention_operations_send_these_commands(mongo_wire: FakeMongo) -> None:
    """scan_runs, delete_nodes and the strip operations send exact, guarded commands."""
    wire = mongo_wire
    from worker.stores import _mongo_codec as mc
    from worker.stores.mongo import MongoStore

    store = MongoStore(url_of(wire))
    await store.open()
    await migrate(store)
    try:
        await write_events(store, run_events("acme", "r1", NOW - 40 * DAY))
        nodes = await store.get_nodes("acme", "r1")
        versions = sorted((NodeVersion.of(n) for n in nodes), key=lambda v: v.node_key)
        wire.commands.clear()
        bound = NOW - 30 * DAY
        assert [d["runId"] async for d in store.scan_runs("acme", bound)] == ["r1"]
        finds = wire.sent("find")
        assert [(f["$db"], f["find"]) for f in finds] == [("audit_acme", "workflow_runs")] * 2
        assert [f["filter"] for f in finds] == _canon([
            {"completedAt": {"$lte": bound}, "_completedAtUs": {"$lt": mc.micros(bound)}},
            {"startedAt": {"$lte": bound}, "_startedAtUs": {"$lt": mc.micros(bound)},
             "completedAt": None}])

        wire.commands.clear()
        assert await store.strip_node_fields("acme", versions[:2], ["output", "input"]) == 2
        (find,) = wire.sent("find")
        assert find["filter"] == {"$or": [
            {"_id": v.node_key, "eventId": v.event_id, "status": v.status}
            for v in versions[:2]]}
        (update,) = wire.sent("update")
        assert update["update"] == "workflow_node_runs"
        assert update["ordered"] is False
        assert len(update["updates"]) == 2
        for op in update["updates"]:
            assert set(op["q"]) == {"_id", "eventId", "status"}
            assert not op.get("upsert")
            (stage,) = op["u"]
            kept = stage["$replaceWith"]["$literal"]
            assert "input" not in kept
            assert "output" not in kept
            assert kept["nodeKey"] == op["q"]["_id"]
        stripped = [n for n in await store.get_nodes("acme", "r1")
                    if n["nodeKey"] in {v.node_key for v in versions[:2]}]
        assert all("input" not in n and "output" not in n for n in stripped)
        assert all(n["nodeId"] for n in stripped)
        assert await store.strip_node_fields("acme", versions[:2], ["output", "input"]) == 0

        run = await store.get_run("acme", "r1")
        assert run is not None
        wire.commands.clear()
        assert await store.strip_run_fields("acme", [RunVersion.of(run)], ["error"]) == 1
        (find,) = wire.sent("find")
        assert find["filter"] == {"_id": {"$in": ["r1"]}}
        (update,) = wire.sent("update")
        assert update["update"] == "workflow_runs"
        guard = update["updates"][0]["q"]
        assert set(guard) == {"_id", "eventIds", "nodeIndex", "_startedAtUs"}
        assert (guard["_id"], guard["eventIds"]) == ("r1", ["r1:snap"])
        assert update["updates"][0]["u"] == [{"$set": {"error": {"$literal": None}}}]
        run = await store.get_run("acme", "r1")
        assert run is not None
        assert run["error"] is None
        assert run["status"] == "failed"

        wire.commands.clear()
        assert await store.delete_nodes("acme", versions[:1]) == 1
        delete = wire.sent("delete")[0]
        assert delete["delete"] == "workflow_node_runs"
        assert delete["deletes"] == [{"q": {"_id": versions[0].node_key,
                                            "eventId": versions[0].event_id,
                                            "status": versions[0].status}, "limit": 1}]
        assert len(await store.get_nodes("acme", "r1")) == len(nodes) - 1
        with pytest.raises(ValueError, match="cannot strip"):
            await store.strip_node_fields("acme", versions, ["nodeId"])
    finally:
        await store.close()
