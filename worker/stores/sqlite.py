"""The SQLite store: the embedded default, same layout as the PostgreSQL store.

One ``sqlite3`` connection, driven from worker threads through ``anyio.to_thread`` and
guarded by a lock, in WAL mode with ``synchronous=FULL``: a transaction is on disk
(the WAL fsynced) before the worker acknowledges its entries. Every write is one
``BEGIN IMMEDIATE`` transaction: SQLite serialises writers (across processes too), so
the run merge reads the stored runs of the batch and joins them with
``RunPatch.merge`` in Python, then writes them back with one ``executemany``; node rows
are upserted natively with the same ``(status rank, event_id)`` rule as
``NodeDoc.merge``.

Times are stored in the columns as fixed-width ISO 8601 UTC text
(``2026-02-15T10:30:01.200000+00:00``), which sorts in time order; documents are stored
as JSON text.

URLs: ``sqlite:///./audit.db`` (relative to the working directory),
``sqlite:////var/lib/audit/audit.db`` (absolute) and ``sqlite:///:memory:``. Option:
``?busy_timeout=<ms>`` (default 5000), how long to wait for another writer's lock, and
``?synchronous=full|normal|extra`` (default ``full``). ``normal`` skips the fsync at each
commit and is faster, but trades away durability at ACK time: a commit the worker has
already acknowledged can roll back on power loss or an operating-system crash (not on a
process crash), and those events are then lost, since Redis no longer holds them as
pending. Choose it only where losing the last moments of audit events is acceptable.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlsplit

import anyio
import anyio.to_thread

from .. import personal
from ..documents import NodeDoc, RunPatch, WriteBatch
from ..errors import ConfigError, StoreMisconfigured, StoreNotOpen, StoreRejected, StoreUnavailable
from . import _sql, _sqlite_keys
from .base import (
    NodeQuery,
    NodeVersion,
    RunQuery,
    RunVersion,
    StoredKey,
    WriteResult,
    check_strippable,
)

T = TypeVar("T")

_PAGE: Final = 500
#: ``documents.status_rank`` in SQL.
_RANK: Final = ("CASE {0} WHEN 'running' THEN 0 WHEN 'completed' THEN 1"
                " WHEN 'failed' THEN 3 ELSE 2 END")

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS workflow_runs (
    workspace_id   TEXT NOT NULL,
    run_id         TEXT NOT NULL,
    workflow_id    TEXT NOT NULL,
    status         TEXT NOT NULL,
    started_at     TEXT,
    completed_at   TEXT,
    trigger_source TEXT,
    doc            TEXT NOT NULL,
    PRIMARY KEY (workspace_id, run_id)
);
CREATE TABLE IF NOT EXISTS workflow_node_runs (
    workspace_id TEXT NOT NULL,
    run_id       TEXT NOT NULL,
    node_id      TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    node_key     TEXT NOT NULL,
    type         TEXT,
    status       TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    started_at   TEXT,
    completed_at TEXT,
    doc          TEXT NOT NULL,
    PRIMARY KEY (workspace_id, run_id, node_id, attempt)
);
-- recent runs by workflow
CREATE INDEX IF NOT EXISTS workflow_runs_workflow_idx
    ON workflow_runs (workspace_id, workflow_id, started_at DESC);
-- failed runs (runs by status)
CREATE INDEX IF NOT EXISTS workflow_runs_status_idx
    ON workflow_runs (workspace_id, status, started_at DESC);
-- runs by trigger source
CREATE INDEX IF NOT EXISTS workflow_runs_trigger_idx
    ON workflow_runs (workspace_id, trigger_source, started_at DESC);
-- recent runs of a workspace (list_runs without filters, retention)
CREATE INDEX IF NOT EXISTS workflow_runs_started_idx
    ON workflow_runs (workspace_id, started_at DESC);
-- nodes by run: served by the primary key (workspace_id, run_id, node_id, attempt)
-- AI nodes over time (nodes by type)
CREATE INDEX IF NOT EXISTS workflow_node_runs_type_idx
    ON workflow_node_runs (workspace_id, type, started_at DESC);
-- node traces by time (insights, retention)
CREATE INDEX IF NOT EXISTS workflow_node_runs_started_idx
    ON workflow_node_runs (workspace_id, started_at);
""" + _sqlite_keys.SCHEMA

_STORED_RUNS: Final = """
SELECT workspace_id, run_id, doc FROM workflow_runs
WHERE (workspace_id, run_id) IN
      (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))
"""

_UPSERT_RUN: Final = """
INSERT INTO workflow_runs
    (workspace_id, run_id, workflow_id, status, started_at, completed_at, trigger_source, doc)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (workspace_id, run_id) DO UPDATE SET
    workflow_id = excluded.workflow_id,
    status = excluded.status,
    started_at = excluded.started_at,
    completed_at = excluded.completed_at,
    trigger_source = excluded.trigger_source,
    doc = excluded.doc
"""

_UPSERT_NODE: Final = f"""
INSERT INTO workflow_node_runs
    (workspace_id, run_id, node_id, attempt, node_key, type, status, event_id,
     started_at, completed_at, doc)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (workspace_id, run_id, node_id, attempt) DO UPDATE SET
    node_key = excluded.node_key,
    type = excluded.type,
    status = excluded.status,
    event_id = excluded.event_id,
    started_at = excluded.started_at,
    completed_at = excluded.completed_at,
    doc = excluded.doc
WHERE ({_RANK.format("excluded.status")}, excluded.event_id)
    > ({_RANK.format("workflow_node_runs.status")}, workflow_node_runs.event_id)
"""


def _time(value: Any) -> str | None:
    """A time column value: fixed-width ISO 8601 UTC text, so it sorts in time order."""
    if isinstance(value, datetime):
        return _sql.utc(value).isoformat(timespec="microseconds")
    return None


def _source(trigger: Any) -> str | None:
    if isinstance(trigger, dict):
        source = trigger.get("source")
        if isinstance(source, str):
            return source
    return None


def _translate(exc: sqlite3.Error) -> StoreUnavailable | StoreRejected:
    if isinstance(exc, sqlite3.DataError | sqlite3.IntegrityError):
        return StoreRejected(f"SQLite refused the write: {exc}")
    # Locked or busy database, I/O errors, a missing table: not the data's fault.
    hint = " (run audit-fleet migrate)" if "no such table" in str(exc) else ""
    return StoreUnavailable(f"SQLite: {type(exc).__name__}: {exc}{hint}")


def database_path(url: str) -> str:
    """The file (or ``:memory:``) a ``sqlite://`` URL names."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigError(f"not a SQLite URL: {url!r}")
    if parts.netloc:
        raise ConfigError(
            f"a SQLite URL has no host: use sqlite:///relative/path.db or "
            f"sqlite:////absolute/path.db, got {url!r}"
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path:
        raise ConfigError(f"the SQLite URL names no database file: {url!r}")
    return path


#: ``PRAGMA synchronous`` values offered (``off`` is not: it loses commits on any crash).
SYNCHRONOUS_MODES: Final = ("full", "extra", "normal")
#: Durable at ACK time: each commit's WAL frames are fsynced before the commit returns.
DEFAULT_SYNCHRONOUS: Final = "full"


class SQLiteStore:
    """Audit store in one SQLite database file."""

    name = "sqlite"

    def __init__(
        self, url: str, *, busy_timeout_ms: int | None = None, read_only: bool = False
    ) -> None:
        clean, options = _sql.pop_options(url, {"busy_timeout": int, "synchronous": str})
        self.path = database_path(clean)
        #: Open an existing database only: create no file, no directory, no table.
        self.read_only = read_only
        self.busy_timeout_ms = (busy_timeout_ms if busy_timeout_ms is not None
                                else options.get("busy_timeout", 5000))
        if self.busy_timeout_ms < 0:
            raise ConfigError("SQLite busy_timeout must be >= 0 (milliseconds)")
        self.synchronous = options.get("synchronous", DEFAULT_SYNCHRONOUS).lower()
        if self.synchronous not in SYNCHRONOUS_MODES:
            raise ConfigError("SQLite synchronous must be one of "
                              + ", ".join(SYNCHRONOUS_MODES) + f"; got {self.synchronous!r}")
        self._conn: sqlite3.Connection | None = None
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreNotOpen("the SQLite store is not open")
            try:
                return await anyio.to_thread.run_sync(fn, conn)
            except sqlite3.Error as exc:
                raise _translate(exc) from exc

    async def open(self) -> None:
        async with self._lock:
            if self._conn is None:
                self._check_path()
                try:
                    self._conn = await anyio.to_thread.run_sync(self._connect)
                except sqlite3.OperationalError as exc:
                    raise StoreMisconfigured(
                        f"SQLite cannot open {self.path}: {exc} (check AUDIT_STORE_URL)"
                    ) from None
                except sqlite3.Error as exc:
                    raise _translate(exc) from exc

    def _check_path(self) -> None:
        """A missing directory (or, read-only, a missing file) is a setting to fix: the
        store creates the database file, never directories."""
        if self.path == ":memory:":
            return
        path = Path(self.path)
        if self.read_only and not path.is_file():
            raise StoreMisconfigured(
                f"no SQLite database at {self.path} (check --store-url / AUDIT_STORE_URL)"
            )
        if not path.parent.is_dir():
            raise StoreMisconfigured(
                f"the directory of the SQLite database {self.path} does not exist "
                "(create it, or fix AUDIT_STORE_URL)"
            )

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            uri = "file:" + quote(str(Path(self.path).resolve())) + "?mode=rw"
            conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_ms / 1000,
                                   isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000,
                                   isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            if not self.read_only:
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")  # checked above
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await anyio.to_thread.run_sync(conn.close)

    async def migrate(self) -> None:
        await self._run(partial(_transaction, _migrate))

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def write(self, batch: WriteBatch) -> WriteResult:
        if not len(batch):
            return WriteResult()
        runs = _sql.sorted_runs(batch)
        nodes = _sql.sorted_nodes(batch)
        await self._run(partial(_transaction, partial(_write, runs, nodes)))
        return WriteResult()

    async def get_run(self, workspace: str, run_id: str) -> dict[str, Any] | None:
        row = await self._run(lambda conn: conn.execute(
            "SELECT doc FROM workflow_runs WHERE workspace_id = ? AND run_id = ?",
            (workspace, run_id),
        ).fetchone())
        return None if row is None else _doc(row[0])

    async def runs_with_subject(self, workspace: str, subject: str) -> list[dict[str, Any]]:
        """Runs tagged with a subject hash (a scan of the workspace's runs: no index)."""
        rows = await self._run(lambda conn: conn.execute(
            "SELECT doc FROM workflow_runs WHERE workspace_id = ? AND EXISTS ("
            "SELECT 1 FROM json_each(doc, '$.subjects') WHERE value = ?) ORDER BY run_id",
            (workspace, subject),
        ).fetchall())
        return [_doc(row[0]) for row in rows]

    async def get_nodes(self, workspace: str, run_id: str) -> list[dict[str, Any]]:
        rows = await self._run(lambda conn: conn.execute(
            "SELECT doc FROM workflow_node_runs WHERE workspace_id = ? AND run_id = ?"
            " ORDER BY started_at IS NULL, started_at, attempt, node_id",
            (workspace, run_id),
        ).fetchall())
        return [_doc(row[0]) for row in rows]

    async def list_runs(self, workspace: str, query: RunQuery) -> list[dict[str, Any]]:
        where = ["workspace_id = ?"]
        args: list[Any] = [workspace]
        if query.workflow_id is not None:
            where.append("workflow_id = ?")
            args.append(query.workflow_id)
        if query.status is not None:
            where.append("status = ?")
            args.append(query.status)
        if query.trigger_source is not None:
            where.append("trigger_source = ?")
            args.append(query.trigger_source)
        if query.since is not None:
            where.append("started_at >= ?")
            args.append(_time(query.since))
        if query.until is not None:
            where.append("started_at < ?")
            args.append(_time(query.until))
        if query.after is not None:
            started, run_id = query.after
            if started is None:
                where.append("(started_at IS NULL AND run_id > ?)")
                args.append(run_id)
            else:
                where.append("(started_at < ? OR (started_at = ? AND run_id > ?)"
                             " OR started_at IS NULL)")
                args.extend([_time(started), _time(started), run_id])
        args.append(max(0, query.limit))
        sql = (f"SELECT doc FROM workflow_runs WHERE {' AND '.join(where)}"
               " ORDER BY started_at DESC, run_id LIMIT ?")
        rows = await self._run(partial(_fetchall, sql, args))
        return [_doc(row[0]) for row in rows]

    async def scan_nodes(self, workspace: str, query: NodeQuery) -> AsyncIterator[dict[str, Any]]:
        where = ["workspace_id = ?", "rowid > ?"]
        args: list[Any] = [workspace, 0]
        if query.types:
            where.append(f"type IN ({', '.join('?' * len(query.types))})")
            args.extend(query.types)
        if query.run_ids:
            where.append("run_id IN (SELECT value FROM json_each(?))")
            args.append(_sql.encode_json(list(query.run_ids)).decode())
        if query.since is not None:
            where.append("started_at >= ?")
            args.append(_time(query.since))
        if query.until is not None:
            where.append("started_at < ?")
            args.append(_time(query.until))
        sql = (f"SELECT rowid, doc FROM workflow_node_runs WHERE {' AND '.join(where)}"
               f" ORDER BY rowid LIMIT {_PAGE}")
        fields = set(query.fields)
        while True:
            rows = await self._run(partial(_fetchall, sql, list(args)))
            for _, text in rows:
                doc = _doc(text)
                yield {k: v for k, v in doc.items() if k in fields} if fields else doc
            if len(rows) < _PAGE:
                return
            args[1] = rows[-1][0]

    async def workspaces(self) -> list[str]:
        rows = await self._run(lambda conn: conn.execute(
            "SELECT DISTINCT workspace_id FROM workflow_runs ORDER BY workspace_id"
        ).fetchall())
        return [row[0] for row in rows]

    async def delete_runs(self, workspace: str, run_ids: Sequence[str], *,
                          expected: Sequence[RunVersion] | None = None) -> int:
        if expected is not None:
            want = _sql.wanted_runs(run_ids, expected)
            if not want:
                return 0
            return await self._run(partial(_transaction, partial(_delete_unchanged,
                                                                 workspace, want)))
        ids = _sql.encode_json(sorted(set(run_ids))).decode()

        def delete(conn: sqlite3.Connection) -> int:
            conn.execute(
                "DELETE FROM workflow_node_runs WHERE workspace_id = ?"
                " AND run_id IN (SELECT value FROM json_each(?))", (workspace, ids))
            cursor = conn.execute(
                "DELETE FROM workflow_runs WHERE workspace_id = ?"
                " AND run_id IN (SELECT value FROM json_each(?))", (workspace, ids))
            return cursor.rowcount

        return await self._run(partial(_transaction, delete))

    # -- archive data keys (worker.shredding) --------------------------------------------

    async def put_data_keys(self, workspace: str, keys: Sequence[StoredKey]) -> None:
        await self._run(partial(_transaction, partial(_sqlite_keys.put, workspace, keys)))

    async def data_keys(self, workspace: str,
                        run_ids: Sequence[str] | None = None) -> list[StoredKey]:
        return await self._run(partial(_sqlite_keys.fetch, workspace, run_ids))

    async def shred_data_keys(self, workspace: str, run_ids: Sequence[str],
                              at: datetime) -> int:
        return await self._run(partial(_transaction, partial(
            _sqlite_keys.shred, workspace, run_ids, _time(at))))

    # -- retention (worker.retention) ----------------------------------------------------

    async def scan_runs(self, workspace: str, before: datetime) -> AsyncIterator[dict[str, Any]]:
        """Runs that completed (or, never completed, started) before ``before``."""
        bound = _time(before)
        sql = ("SELECT rowid, doc FROM workflow_runs WHERE workspace_id = ? AND rowid > ?"
               " AND COALESCE(completed_at, started_at) < ?"
               f" ORDER BY rowid LIMIT {_PAGE}")
        last = 0
        while True:
            rows = await self._run(partial(_fetchall, sql, [workspace, last, bound]))
            for _, text in rows:
                yield _doc(text)
            if len(rows) < _PAGE:
                return
            last = rows[-1][0]

    async def delete_nodes(self, workspace: str, nodes: Sequence[NodeVersion]) -> int:
        """Delete node documents still at these versions; returns how many went."""
        rows = _version_rows(workspace, nodes)
        if not rows:
            return 0

        def delete(conn: sqlite3.Connection) -> int:
            cursor = conn.executemany(f"DELETE FROM workflow_node_runs WHERE {_AT_VERSION}",
                                      rows)
            return cursor.rowcount

        return await self._run(partial(_transaction, delete))

    async def strip_node_fields(self, workspace: str, nodes: Sequence[NodeVersion],
                                fields: Sequence[str]) -> int:
        """Remove ``fields`` from node documents still at these versions that hold a value
        in any of them."""
        paths = check_strippable(fields, "node")
        rows = _version_rows(workspace, nodes)
        if not rows:
            return 0

        def strip(conn: sqlite3.Connection) -> int:
            changed = []
            for key in rows:
                for rowid, text in conn.execute(
                        f"SELECT rowid, doc FROM workflow_node_runs WHERE {_AT_VERSION}", key):
                    doc = _sql.decode_json(text)
                    if personal.holds(doc, paths):
                        kept = personal.without(doc, paths)
                        changed.append((_sql.encode_json(kept).decode(), rowid))
            conn.executemany("UPDATE workflow_node_runs SET doc = ? WHERE rowid = ?", changed)
            return len(changed)

        return await self._run(partial(_transaction, strip))

    async def strip_run_fields(self, workspace: str, runs: Sequence[RunVersion],
                               fields: Sequence[str]) -> int:
        """Set ``fields`` of run documents to null where they hold a value, for the runs
        whose document is still exactly the one read."""
        paths = check_strippable(fields, "run")
        want = _sql.wanted_runs([v.run_id for v in runs], runs)
        if not want:
            return 0

        def strip(conn: sqlite3.Connection) -> int:
            changed = []
            for rowid, run_id, text in _stored_runs(conn, workspace, want):
                doc = _doc(text)
                if doc != want[run_id].doc or not personal.holds(doc, paths):
                    continue
                doc = personal.without(_sql.decode_json(text), paths, null_top=True)
                changed.append((_sql.encode_json(doc).decode(), rowid))
            conn.executemany("UPDATE workflow_runs SET doc = ? WHERE rowid = ?", changed)
            return len(changed)

        return await self._run(partial(_transaction, strip))


#: A node row still at the version given: (workspace, run ID, node key, event ID, status).
_AT_VERSION: Final = ("workspace_id = ? AND run_id = ? AND node_key = ? AND event_id = ?"
                      " AND status = ?")


def _version_rows(workspace: str, nodes: Sequence[NodeVersion]) -> list[tuple[str, ...]]:
    return [(workspace, *key) for key in zip(*_sql.version_columns(nodes), strict=True)]


def _stored_runs(conn: sqlite3.Connection, workspace: str,
                 want: dict[str, RunVersion]) -> list[tuple[int, str, str]]:
    return conn.execute(
        "SELECT rowid, run_id, doc FROM workflow_runs WHERE workspace_id = ?"
        " AND run_id IN (SELECT value FROM json_each(?)) ORDER BY run_id",
        (workspace, _sql.encode_json(list(want)).decode())).fetchall()


def _delete_unchanged(workspace: str, want: dict[str, RunVersion],
                      conn: sqlite3.Connection) -> int:
    """Compare-and-delete (inside one write transaction, so nothing changes meanwhile):
    runs whose document and node versions are still the ones read, with their nodes."""
    same = [run_id for _, run_id, text in _stored_runs(conn, workspace, want)
            if _doc(text) == want[run_id].doc]
    if not same:
        return 0
    ids = _sql.encode_json(same).decode()
    rows = conn.execute(
        "SELECT run_id, node_key, event_id, status FROM workflow_node_runs"
        " WHERE workspace_id = ? AND run_id IN (SELECT value FROM json_each(?))",
        (workspace, ids)).fetchall()
    same = _sql.nodes_unchanged(want, same, rows)
    if not same:
        return 0
    conn.executemany(f"DELETE FROM workflow_node_runs WHERE {_AT_VERSION}",
                     _version_rows(workspace, [v for r in same for v in want[r].nodes]))
    cursor = conn.execute(
        "DELETE FROM workflow_runs AS r WHERE workspace_id = ?"
        " AND run_id IN (SELECT value FROM json_each(?)) AND NOT EXISTS"
        " (SELECT 1 FROM workflow_node_runs AS n"
        "  WHERE n.workspace_id = r.workspace_id AND n.run_id = r.run_id)",
        (workspace, _sql.encode_json(same).decode()))
    return cursor.rowcount


def _fetchall(sql: str, args: list[Any], conn: sqlite3.Connection) -> list[Any]:
    return conn.execute(sql, args).fetchall()


def _doc(text: str) -> dict[str, Any]:
    return _sql.revive_times(_sql.decode_json(text))


def _transaction(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction (it takes the write lock first)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _migrate(conn: sqlite3.Connection) -> None:
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def _write(runs: list[RunPatch], nodes: list[NodeDoc], conn: sqlite3.Connection) -> None:
    if runs:
        keys = _sql.encode_json([[run.workspace_id, run.run_id] for run in runs]).decode()
        stored = {(ws, run_id): doc for ws, run_id, doc in conn.execute(_STORED_RUNS, (keys,))}
        rows = []
        for run in runs:
            old = stored.get(run.key)
            if old is None:
                merged = run
            else:
                merged = RunPatch.from_doc(_doc(old))
                merged.merge(run)
            doc = merged.to_doc()
            rows.append((
                merged.workspace_id, merged.run_id, merged.workflow_id, merged.status,
                _time(merged.started_at), _time(merged.completed_at), _source(merged.trigger),
                _sql.encode_json(doc).decode(),
            ))
        conn.executemany(_UPSERT_RUN, rows)
    if nodes:
        conn.executemany(_UPSERT_NODE, [
            (node.workspace_id, node.run_id, node.doc["nodeId"], node.doc["attempt"],
             node.node_key, node.doc.get("type"), node.doc["status"], node.doc["eventId"],
             _time(node.doc.get("startedAt")), _time(node.doc.get("completedAt")),
             _sql.encode_json(node.doc).decode())
            for node in nodes
        ])


__all__ = ["SQLiteStore", "database_path"]
