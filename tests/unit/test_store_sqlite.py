"""The SQLite store: the conformance suite, plus what is particular to SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tests.helpers import migrated
from tests.reference import reference_events, reference_snapshot
from tests.store_conformance import StoreConformance, assert_stored, new_workspace, write
from worker.errors import ConfigError, StoreMisconfigured, StoreNotOpen, StoreUnavailable
from worker.stores import migrate, open_store
from worker.stores.base import Store
from worker.stores.sqlite import SQLiteStore, database_path


class TestSQLiteConformance(StoreConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[Store]:
        async with migrated(SQLiteStore(f"sqlite:///{tmp_path}/audit.db")) as store:
            yield store


class TestSQLiteMemoryConformance(StoreConformance):
    @pytest.fixture
    async def store(self) -> AsyncIterator[Store]:
        async with migrated(SQLiteStore("sqlite:///:memory:")) as store:
            yield store


pytestmark = [pytest.mark.anyio]


@pytest.fixture
async def file_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    async with migrated(SQLiteStore(f"sqlite:///{tmp_path}/audit.db")) as store:
        yield store


@pytest.mark.parametrize(("url", "path"), [
    ("sqlite:///./audit.db", "./audit.db"),
    ("sqlite:///audit.db", "audit.db"),
    ("sqlite:////var/lib/audit/audit.db", "/var/lib/audit/audit.db"),
    ("sqlite:///:memory:", ":memory:"),
])
def test_url_forms(url: str, path: str) -> None:
    """Relative, absolute and in-memory URLs name the expected database."""
    assert database_path(url) == path
    assert SQLiteStore(url + "?busy_timeout=250").path == path
    assert SQLiteStore(url + "?busy_timeout=250").busy_timeout_ms == 250


@pytest.mark.parametrize(("option", "level"), [("normal", 1), ("full", 2), ("EXTRA", 3)])
async def test_synchronous_option(option: str, level: int, tmp_path: Path) -> None:
    """?synchronous= picks the durability trade-off; the default is full."""
    store = SQLiteStore(f"sqlite:///{tmp_path}/audit.db?synchronous={option}")
    await store.open()
    await migrate(store)
    try:
        assert await store._run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == level
    finally:
        await store.close()


@pytest.mark.parametrize("url", ["sqlite://host/audit.db", "sqlite://", "sqlite:///",
                                 "sqlite:///a.db?busy_timeout=soon",
                                 "sqlite:///a.db?synchronous=off",
                                 "sqlite:///a.db?synchronous=full;DROP"])
def test_bad_urls(url: str) -> None:
    """A URL that names no file, names a host or has a bad option fails at start."""
    with pytest.raises(ConfigError):
        SQLiteStore(url)


def test_open_store_picks_sqlite() -> None:
    """open_store maps the sqlite scheme to this store."""
    store = open_store("sqlite:///:memory:")
    assert isinstance(store, SQLiteStore)
    assert store.name == "sqlite"


async def test_relative_path_resolves_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative URL resolves against the working directory; the file is created there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    store = SQLiteStore("sqlite:///./data/audit.db")
    await store.open()
    await migrate(store)
    await write(store, reference_events())
    await store.close()
    assert (tmp_path / "data" / "audit.db").is_file()


async def test_a_missing_directory_is_a_setting_to_fix(tmp_path: Path) -> None:
    """Regression: the store created any missing directory (a typo made a new database
    elsewhere); now it is a permanent, one-line StoreMisconfigured and nothing is created."""
    store = SQLiteStore(f"sqlite:///{tmp_path}/typo-dir/a.db")
    with pytest.raises(StoreMisconfigured, match=r"typo-dir/a\.db does not exist"):
        await store.open()
    assert [x async for x in anyio.Path(tmp_path).iterdir()] == []


async def test_read_only_opens_an_existing_database_and_creates_nothing(tmp_path: Path) -> None:
    """read_only: a missing file is an error (no file made); an existing one is read."""
    missing = SQLiteStore(f"sqlite:///{tmp_path}/none.db", read_only=True)
    with pytest.raises(StoreMisconfigured, match="no SQLite database at"):
        await missing.open()
    assert [x async for x in anyio.Path(tmp_path).iterdir()] == []
    writer = SQLiteStore(f"sqlite:///{tmp_path}/a.db")
    await writer.open()
    await migrate(writer)
    await write(writer, reference_events())
    await writer.close()
    reader = SQLiteStore(f"sqlite:///{tmp_path}/a.db", read_only=True)
    await reader.open()
    try:
        assert await reader.workspaces()
    finally:
        await reader.close()


async def test_wal_and_synchronous_full(file_store: SQLiteStore, tmp_path: Path) -> None:
    """The database runs in WAL mode with synchronous=FULL (2): durable at ACK time."""
    mode = await file_store._run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    sync = await file_store._run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
    assert (mode, sync) == ("wal", 2)
    with sqlite3.connect(tmp_path / "audit.db") as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_same_layout_as_postgres(file_store: SQLiteStore, tmp_path: Path) -> None:
    """Tables, keys and indexes follow the PostgreSQL layout; times sort as text."""
    ws = new_workspace()
    await write(file_store, reference_events(ws))
    with sqlite3.connect(tmp_path / "audit.db") as db:
        columns = {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")]
                   for t in ("workflow_runs", "workflow_node_runs")}
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        times = [r[0] for r in db.execute(
            "SELECT started_at FROM workflow_node_runs ORDER BY started_at")]
        run = db.execute("SELECT workflow_id, status, trigger_source, started_at, completed_at"
                         " FROM workflow_runs").fetchone()
    assert columns["workflow_runs"] == ["workspace_id", "run_id", "workflow_id", "status",
                                        "started_at", "completed_at", "trigger_source", "doc"]
    assert columns["workflow_node_runs"][:4] == ["workspace_id", "run_id", "node_id", "attempt"]
    assert {"workflow_runs_workflow_idx", "workflow_runs_status_idx",
            "workflow_runs_trigger_idx", "workflow_node_runs_type_idx"} <= indexes
    assert len({len(t) for t in times}) == 1
    assert times == sorted(times)
    assert run == ("wf_lead_triage", "completed", "gmail", "2026-02-15T10:30:00.000000+00:00",
                   "2026-02-15T10:30:04.800000+00:00")


async def test_reopen_keeps_data(tmp_path: Path) -> None:
    """Data written and committed is there after the store is closed and reopened."""
    url = f"sqlite:///{tmp_path}/audit.db"
    ws = new_workspace()
    store = SQLiteStore(url)
    await store.open()
    await migrate(store)
    await write(store, reference_events(ws))
    await store.close()
    again = SQLiteStore(url)
    await again.open()
    await migrate(again)
    try:
        await assert_stored(again, reference_events(ws))
    finally:
        await again.close()


async def test_locked_database_is_unavailable(tmp_path: Path) -> None:
    """A write blocked by another process's write lock fails as StoreUnavailable."""
    store = SQLiteStore(f"sqlite:///{tmp_path}/audit.db?busy_timeout=100")
    await store.open()
    await migrate(store)
    ws = new_workspace()
    other = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable):
            await write(store, reference_events(ws))
        other.execute("ROLLBACK")
        await write(store, reference_events(ws))
        await assert_stored(store, reference_events(ws))
    finally:
        other.close()
        await store.close()


async def test_two_stores_on_one_file_converge(tmp_path: Path) -> None:
    """Two workers sharing a database file, writing in different orders, agree."""
    url = f"sqlite:///{tmp_path}/audit.db"
    ws = new_workspace()
    raw = [e for i in range(6) for e in reference_events(ws, f"run-{i}")]
    raw += [reference_snapshot(ws, "run-1")]
    stores = [SQLiteStore(url), SQLiteStore(url)]
    for store in stores:
        await store.open()
        await migrate(store)

    async def worker(store: SQLiteStore, events: list[dict[str, object]]) -> None:
        for start in range(0, len(events), 5):
            await write(store, events[start:start + 5])

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, stores[0], raw)
            tg.start_soon(worker, stores[1], list(reversed(raw)))
        await assert_stored(stores[0], raw)
    finally:
        for store in stores:
            await store.close()


async def test_closed_store_is_a_programming_error() -> None:
    """Regression: using a store that is not open raised StoreUnavailable, which the worker
    retries forever. It is StoreNotOpen: a programming error, not a store failure."""
    store = SQLiteStore("sqlite:///:memory:")
    with pytest.raises(StoreNotOpen):
        await store.ping()
    await store.open()
    await store.ping()
    await store.close()
    with pytest.raises(StoreNotOpen):
        await write(store, reference_events())
    assert not issubclass(StoreNotOpen, StoreUnavailable)
