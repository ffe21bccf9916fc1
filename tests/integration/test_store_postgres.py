"""The PostgreSQL store: the conformance suite, plus schema, concurrency and failures."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import timedelta

import anyio
import asyncpg
import asyncpg.exceptions as pgx
import pytest

from tests.helpers import free_port, migrated, pg_database
from tests.reference import RUN_ID, decoded, reference_events, reference_snapshot
from tests.store_conformance import (
    T0,
    StoreConformance,
    assert_stored,
    event,
    new_workspace,
    node,
    write,
)
from worker import events as ev
from worker.documents import coalesce
from worker.errors import (
    ConfigError,
    StoreNotOpen,
    StoreRejected,
    StoreTimeout,
    StoreUnavailable,
)
from worker.stores import RunQuery, migrate, open_store
from worker.stores.base import Store
from worker.stores.postgres import PostgresStore, translate

pytestmark = [pytest.mark.postgres, pytest.mark.anyio]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """One event loop for the module, so the conformance store can outlive a test."""
    return "asyncio"


@pytest.fixture(scope="module")
async def shared_store() -> AsyncIterator[PostgresStore]:
    """One database for the conformance suite: its tests use workspaces of their own."""
    async with pg_database() as url:
        store = PostgresStore(url, max_size=4)
        try:
            await store.open()
            await migrate(store)
            yield store
        finally:
            await store.close()


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[PostgresStore]:
    """A store on a fresh database of this test's own."""
    async with migrated(PostgresStore(pg_url, max_size=4)) as store:
        yield store


class TestPostgresConformance(StoreConformance):
    nul_rejection = ("run {run!r} of workspace {ws!r} contains U+0000 (NUL), which PostgreSQL "
                     "cannot store in jsonb")

    @pytest.fixture
    async def store(self, shared_store: PostgresStore) -> Store:
        return shared_store


async def test_schema_matches_the_design(pg_store: PostgresStore, pg_url: str) -> None:
    """Tables, keys, column types and the design's indexes exist as the issue specifies."""
    conn = await asyncpg.connect(pg_url)
    try:
        columns = {
            (r["table_name"], r["column_name"]): r["data_type"]
            for r in await conn.fetch(
                "SELECT table_name, column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema()")
        }
        indexes = {r["indexname"]: r["indexdef"] for r in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()")}
    finally:
        await conn.close()
    for table in ("workflow_runs", "workflow_node_runs"):
        assert columns[(table, "started_at")] == "timestamp with time zone"
        assert columns[(table, "completed_at")] == "timestamp with time zone"
        assert columns[(table, "doc")] == "jsonb"
    for name in ("workspace_id", "run_id", "workflow_id", "status", "trigger_source"):
        assert columns[("workflow_runs", name)] == "text"
    assert columns[("workflow_node_runs", "attempt")] == "integer"
    for name in ("node_id", "type", "node_key", "status", "event_id"):
        assert columns[("workflow_node_runs", name)] == "text"
    assert indexes["workflow_runs_pkey"].endswith("(workspace_id, run_id)")
    assert indexes["workflow_node_runs_pkey"].endswith("(workspace_id, run_id, node_id, attempt)")
    expected = {
        "workflow_runs_workflow_idx": "(workspace_id, workflow_id, started_at DESC)",
        "workflow_runs_status_idx": "(workspace_id, status, started_at DESC)",
        "workflow_runs_trigger_idx": "(workspace_id, trigger_source, started_at DESC)",
        "workflow_node_runs_type_idx": "(workspace_id, type, started_at DESC)",
    }
    for name, columns_sql in expected.items():
        assert indexes[name].endswith(columns_sql), indexes[name]


DESIGN_QUERIES = [
    ("SELECT doc FROM workflow_runs WHERE workspace_id = 'w1' AND workflow_id = 'wf_3'"
     " ORDER BY started_at DESC LIMIT 20", "workflow_runs_workflow_idx"),
    ("SELECT doc FROM workflow_runs WHERE workspace_id = 'w1' AND status = 'failed'"
     " ORDER BY started_at DESC LIMIT 20", "workflow_runs_status_idx"),
    ("SELECT doc FROM workflow_runs WHERE workspace_id = 'w1' AND trigger_source = 'gmail'"
     " ORDER BY started_at DESC LIMIT 20", "workflow_runs_trigger_idx"),
    ("SELECT doc FROM workflow_node_runs WHERE workspace_id = 'w1' AND run_id = 'r-7'",
     "workflow_node_runs_pkey"),
    ("SELECT doc FROM workflow_node_runs WHERE workspace_id = 'w1' AND type = 'ai'"
     " AND started_at >= '2026-01-16' ORDER BY started_at DESC LIMIT 100",
     "workflow_node_runs_type_idx"),
]


async def test_design_queries_use_their_index(pg_store: PostgresStore, pg_url: str) -> None:
    """Each of the design's queries is answered from its own index."""
    sources = ("gmail", "hubspot", "api", "form", "cron", "slack")
    types = ("ai", "action", "conditional", "transform", "source")
    for ws in ("w1", "w2", "w3"):
        raw = []
        for i in range(300):
            run_id, start = f"r-{i}", T0 + timedelta(minutes=i)
            raw.append(event(ev.RUN_STARTED, ws, run_id, f"{run_id}-s", start, f"wf_{i % 10}",
                             trigger={"type": "webhook", "source": sources[i % 6]}))
            raw.append(event(ev.RUN_FAILED if i % 9 == 0 else ev.RUN_COMPLETED, ws, run_id,
                             f"{run_id}-e", start, f"wf_{i % 10}"))
            for j in range(3):
                raw.append(event(ev.NODE_COMPLETED, ws, run_id, f"{run_id}-{j}", start,
                                 f"wf_{i % 10}",
                                 node=node(f"n{j}", types[(i + j) % 5], start, start)))
        await write(pg_store, raw)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("ANALYZE")
        await conn.execute("SET enable_seqscan = off")
        for sql, index in DESIGN_QUERIES:
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql))
            assert index in plan, plan
    finally:
        await conn.close()


async def test_columns_mirror_the_documents(pg_store: PostgresStore, pg_url: str) -> None:
    """The typed columns hold what the documents say; run times live only in columns."""
    ws = new_workspace()
    await write(pg_store, reference_events(ws))
    conn = await asyncpg.connect(pg_url)
    try:
        run = await conn.fetchrow("SELECT * FROM workflow_runs WHERE workspace_id = $1", ws)
        nodes = await conn.fetch("SELECT * FROM workflow_node_runs WHERE workspace_id = $1", ws)
    finally:
        await conn.close()
    doc = await pg_store.get_run(ws, RUN_ID)
    assert doc is not None
    assert (run["workflow_id"], run["status"], run["trigger_source"]) == (
        doc["workflowId"], doc["status"], "gmail")
    assert (run["started_at"], run["completed_at"]) == (doc["startedAt"], doc["completedAt"])
    assert '"startedAt"' not in run["doc"]
    stored = {n["nodeKey"]: n for n in await pg_store.get_nodes(ws, RUN_ID)}
    assert len(nodes) == 4
    for row in nodes:
        want = stored[row["node_key"]]
        assert (row["node_id"], row["attempt"], row["type"], row["status"], row["event_id"]) == (
            want["nodeId"], want["attempt"], want["type"], want["status"], want["eventId"])
        assert (row["started_at"], row["completed_at"]) == (want["startedAt"],
                                                             want["completedAt"])


async def test_concurrent_migrations(pg_url: str) -> None:
    """Several workers starting at once on an empty database all migrate cleanly."""
    stores = [PostgresStore(pg_url, max_size=2) for _ in range(5)]

    async def start(store: PostgresStore) -> None:  # as a worker's start does
        await store.open()
        await migrate(store)

    try:
        async with anyio.create_task_group() as tg:
            for store in stores:
                tg.start_soon(start, store)
        ws = new_workspace()
        await write(stores[0], reference_events(ws))
        await assert_stored(stores[-1], reference_events(ws))
    finally:
        for store in stores:
            await store.close()


async def test_concurrent_writers_converge(pg_url: str) -> None:
    """Four workers writing overlapping runs in different orders never deadlock and agree."""
    ws = new_workspace()
    raw = [e for i in range(12) for e in reference_events(ws, f"run-{i:02d}")]
    raw += [reference_snapshot(ws, f"run-{i:02d}") for i in range(0, 12, 3)]
    stores = [PostgresStore(pg_url, max_size=2) for _ in range(4)]
    for store in stores:
        await store.open()
        await migrate(store)

    async def worker(n: int, store: PostgresStore) -> None:
        mine = list(raw)
        random.Random(n).shuffle(mine)
        for start in range(0, len(mine), 9):
            result = await write(store, mine[start:start + 9])
            assert result.rejected == ()

    try:
        for _ in range(3):
            async with anyio.create_task_group() as tg:
                for n, store in enumerate(stores):
                    tg.start_soon(worker, n, store)
        await assert_stored(stores[0], raw)
    finally:
        for store in stores:
            await store.close()


async def test_nul_rejects_only_its_run(pg_store: PostgresStore) -> None:
    """U+0000 in a node or a run field rejects that run's events; the rest is written."""
    ws = new_workspace()
    in_node = event(ev.NODE_COMPLETED, ws, "in-node", "e1", T0,
                    node=node("classify", "ai", T0, T0, output={"text": "a\x00b"}))
    in_key = event(ev.RUN_STARTED, ws, "in-key", "e2", T0,
                   trigger={"type": "webhook", "source": "gmail", "metadata": {"k\x00": 1}})
    same_run = event(ev.RUN_COMPLETED, ws, "in-key", "e3", T0, status="completed")
    literal = event(ev.NODE_COMPLETED, ws, "literal", "e4", T0,
                    node=node("x", "ai", T0, T0, output={"text": "\\u0000 \\\\u0000"}))
    good = reference_events(ws)
    raw = [in_node, in_key, same_run, literal, *good]
    items = list(enumerate(decoded(raw)))
    result = await pg_store.write(coalesce(items))
    reasons = {r.sources: r.reason for r in result.rejected}
    assert set(reasons) == {(0,), (1, 2)}
    assert all("U+0000" in reason for reason in reasons.values())
    assert await pg_store.get_run(ws, "in-node") is None
    assert await pg_store.get_run(ws, "in-key") is None
    await assert_stored(pg_store, [literal, *good])
    only_bad = await pg_store.write(coalesce(items[:1]))
    assert [r.sources for r in only_bad.rejected] == [(0,)]


@pytest.mark.parametrize(("exc", "kind"), [
    (pgx.DataError("invalid input syntax"), StoreRejected),
    (pgx.UntranslatableCharacterError("unsupported Unicode escape sequence"), StoreRejected),
    (pgx.ProgramLimitExceededError("index row size exceeds maximum"), StoreRejected),
    (pgx.NotNullViolationError("null value in column"), StoreRejected),
    (pgx.DeadlockDetectedError("deadlock detected"), StoreUnavailable),
    (pgx.SerializationError("could not serialize access"), StoreUnavailable),
    (pgx.CannotConnectNowError("the database system is starting up"), StoreUnavailable),
    (pgx.TooManyConnectionsError("too many clients already"), StoreUnavailable),
    (pgx.AdminShutdownError("terminating connection"), StoreUnavailable),
    (pgx.QueryCanceledError("canceling statement due to statement timeout"), StoreTimeout),
    (pgx.ConnectionDoesNotExistError("connection was closed"), StoreUnavailable),
    (pgx.UndefinedTableError('relation "workflow_runs" does not exist'), StoreUnavailable),
    (pgx.InterfaceError("pool is closing"), StoreUnavailable),
    (ConnectionRefusedError(111, "Connection refused"), StoreUnavailable),
    (TimeoutError(), StoreTimeout),
])
def test_translate_errors(exc: Exception, kind: type) -> None:
    """Server and network failures become StoreUnavailable; data errors StoreRejected."""
    mapped = translate(exc)
    assert type(mapped) is kind
    if kind is StoreRejected:
        assert str(exc) in str(mapped)


def test_translate_leaves_other_errors() -> None:
    """A programming error is not disguised as a store failure."""
    assert translate(KeyError("x")) is None


async def test_unreachable_server_is_unavailable() -> None:
    """Nothing listening on the port: open raises StoreUnavailable (retried); the store is
    then not open, and using it is a programming error (StoreNotOpen), never retried."""
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
                          "?connect_timeout=2")
    with pytest.raises(StoreUnavailable):
        await store.open()
    with pytest.raises(StoreNotOpen):
        await store.ping()
    await store.close()


async def test_statement_timeout_is_unavailable(pg_url: str) -> None:
    """A write stuck behind another session's lock times out as StoreUnavailable."""
    ws = new_workspace()
    store = PostgresStore(pg_url, command_timeout=0.5)
    await store.open()
    await migrate(store)
    await write(store, reference_events(ws)[:1])
    blocker = await asyncpg.connect(pg_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM workflow_runs WHERE workspace_id = $1 FOR UPDATE",
                              ws)
        with pytest.raises(StoreUnavailable):
            await write(store, reference_events(ws))
        await tx.rollback()
        await write(store, reference_events(ws))
        await assert_stored(store, reference_events(ws))
    finally:
        await blocker.close()
        await store.close()


async def test_recovers_after_connections_are_killed(pg_store: PostgresStore,
                                                     pg_url: str) -> None:
    """After the server drops the pool's connections, writes fail transiently, then work."""
    ws = new_workspace()
    raw = reference_events(ws)
    await write(pg_store, raw[:2])
    admin = await asyncpg.connect(pg_url)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'audit-fleet' AND datname = current_database()")
    finally:
        await admin.close()
    assert killed >= 1
    outcomes = []
    for _ in range(3):
        try:
            await write(pg_store, raw)
            outcomes.append("ok")
            break
        except StoreUnavailable:
            outcomes.append("unavailable")
    assert outcomes[-1] == "ok"
    await assert_stored(pg_store, raw)
    await pg_store.ping()


async def test_long_trigger_source(pg_store: PostgresStore) -> None:
    """A trigger source longer than the indexed prefix is stored and filtered exactly."""
    ws = new_workspace()
    long_source = "s" * 300 + "-a"
    near_miss = "s" * 300 + "-b"
    raw = [event(ev.RUN_STARTED, ws, "r1", "e1", T0,
                 trigger={"type": "webhook", "source": long_source})]
    await write(pg_store, raw)
    await assert_stored(pg_store, raw)
    found = await pg_store.list_runs(ws, RunQuery(trigger_source=long_source))
    assert [r["runId"] for r in found] == ["r1"]
    assert await pg_store.list_runs(ws, RunQuery(trigger_source=near_miss)) == []


def test_url_options() -> None:
    """Pool options come from the URL query (kwargs win); the rest stays in the DSN."""
    store = PostgresStore("postgresql://u:secret@db:5433/audit?min_size=2&max_size=3"
                          "&command_timeout=5&sslmode=disable")
    assert (store.min_size, store.max_size, store.command_timeout) == (2, 3, 5.0)
    assert store.dsn == "postgresql://u:secret@db:5433/audit?sslmode=disable"
    assert "secret" not in repr(store)
    assert PostgresStore("postgresql://db/a?max_size=3", max_size=7).max_size == 7
    assert isinstance(open_store("postgres://db/a"), PostgresStore)
    with pytest.raises(ConfigError, match="max_size"):
        PostgresStore("postgresql://db/a?max_size=many")
    with pytest.raises(ConfigError, match="min_size"):
        PostgresStore("postgresql://db/a?min_size=5&max_size=2")
    with pytest.raises(ConfigError, match="timeout"):
        PostgresStore("postgresql://db/a", command_timeout=0)


async def test_store_not_open_is_a_programming_error() -> None:
    """Regression: using a store before open() raised StoreUnavailable, which the worker
    retries forever. It is StoreNotOpen, a programming error."""
    store = PostgresStore("postgresql://postgres@127.0.0.1/postgres")
    with pytest.raises(StoreNotOpen):
        await store.get_run("w", "r")
    with pytest.raises(StoreNotOpen):
        await write(store, reference_events("w"))
