"""The PostgreSQL store (asyncpg): the merge of ``worker.documents`` done natively in SQL.

The tables and their migration are in :mod:`._postgres_schema`, the merge statements in
:mod:`._postgres_write`; this module holds the connection pool, error translation, the
read side and retention. A batch is written in one transaction with one statement per
table, rows in key order so concurrent workers never deadlock on each other.

A run's ``startedAt``/``completedAt`` live in the typed columns only; its ``doc`` holds
every other field. Node documents are stored whole. jsonb cannot hold U+0000, so a run
whose documents contain one is returned as a :class:`~worker.stores.base.Rejection`
before anything is written. jsonb also keeps numbers as ``numeric``: a float comes back
with the same value, except that floats beyond 2**53 written in exponent form come back
as the exact integer their decimal form names.

URL options (also accepted as keyword arguments): ``min_size``, ``max_size`` (pool size),
``command_timeout`` (seconds per statement) and ``connect_timeout`` (seconds); any other
query parameter is passed on to asyncpg.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final, NoReturn, TypeVar

import anyio
import asyncpg
import asyncpg.exceptions as pgx

from ..documents import WriteBatch
from ..errors import (
    ConfigError,
    StoreMisconfigured,
    StoreNotOpen,
    StoreRejected,
    StoreTimeout,
    StoreUnavailable,
)
from . import _postgres_schema, _postgres_write, _sql
from ._postgres_schema import SOURCE_CHARS
from .base import (
    NodeQuery,
    NodeVersion,
    RunQuery,
    RunVersion,
    StoredKey,
    WriteResult,
    check_strippable,
)

_OPTIONS: Final[dict[str, type]] = {
    "min_size": int,
    "max_size": int,
    "command_timeout": float,
    "connect_timeout": float,
}

_RUN_COLUMNS: Final = "started_at, completed_at, doc::text"

#: Lock the named runs (in key order, as writers do) and read them, to compare with the
#: versions retention read: every write upserts a run's row before its node rows, in
#: one transaction, so while the lock is held no write can change the run or its nodes.
_LOCK_RUNS: Final = f"""
SELECT {_RUN_COLUMNS}, run_id FROM workflow_runs
WHERE workspace_id = $1 AND run_id = ANY($2::text[])
ORDER BY run_id FOR UPDATE
"""

#: Node versions (``$2..$5``: parallel columns) and the condition that a node row ``n``
#: is still at one of them.
_VERSIONS: Final = ("unnest($2::text[], $3::text[], $4::text[], $5::text[])"
                    " AS k(run_id, node_key, event_id, status)")
_AT_VERSION: Final = ("n.workspace_id = $1 AND n.run_id = k.run_id AND n.node_key = k.node_key"
                      " AND n.event_id = k.event_id AND n.status = k.status")

_WORKSPACES: Final = """
WITH RECURSIVE w(id) AS (
    (SELECT workspace_id FROM workflow_runs ORDER BY workspace_id LIMIT 1)
    UNION ALL
    SELECT (SELECT workspace_id FROM workflow_runs WHERE workspace_id > w.id
            ORDER BY workspace_id LIMIT 1)
    FROM w WHERE w.id IS NOT NULL
)
SELECT id FROM w WHERE id IS NOT NULL
"""

#: The longest a graceful pool close may take before the connections are dropped.
CLOSE_TIMEOUT_S: Final = 5.0

#: SQLSTATE classes that blame the data written: retrying cannot succeed.
_PERMANENT: Final = (
    pgx.DataError,                          # 22: bad value, U+0000, out of range
    pgx.IntegrityConstraintViolationError,  # 23
    pgx.ProgramLimitExceededError,          # 54: row or index entry too big, nesting
)


def translate(exc: BaseException) -> StoreUnavailable | StoreRejected | None:
    """The store error an asyncpg or network failure stands for (None: not ours)."""
    if isinstance(exc, _PERMANENT):
        return StoreRejected(f"PostgreSQL refused the write: {exc}")
    if isinstance(exc, pgx.QueryCanceledError):  # 57014: statement_timeout
        return StoreTimeout(f"PostgreSQL: {type(exc).__name__}: {exc}")
    if isinstance(exc, builtins.TimeoutError):  # command_timeout, or no answer at all
        return StoreTimeout(f"PostgreSQL did not answer in time: {exc or 'timeout'}")
    if isinstance(exc, pgx.PostgresError):
        # Connection failures (08), deadlocks and serialization failures (40), too many
        # connections (53), shutdowns, "cannot connect now" and statement timeouts (57);
        # and anything else the server reports (a dropped table, a missing privilege) is
        # not the data's fault either: keep the entries pending and retry rather than
        # dead-letter events that a fixed database would accept.
        hint = (" (run audit-fleet migrate)" if isinstance(exc, pgx.UndefinedTableError)
                else "")
        return StoreUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}{hint}")
    if isinstance(exc, OSError | builtins.TimeoutError | pgx.InterfaceError
                  | pgx.InternalClientError):
        return StoreUnavailable(f"PostgreSQL unreachable: {type(exc).__name__}: {exc}")
    return None


T = TypeVar("T")

#: Errors at connection time that no retry cures: wrong password or user, no such database.
_REFUSED: Final = (pgx.InvalidAuthorizationSpecificationError, pgx.InvalidCatalogNameError,
                   pgx.ClientConfigurationError)


async def _refused_for_good(connecting: Awaitable[T], dsn: str) -> T:
    """Await ``connecting``; a refusal no retry can cure becomes StoreMisconfigured."""
    try:
        return await connecting
    except _REFUSED as exc:
        raise StoreMisconfigured(
            f"PostgreSQL refused {_sql.redact(dsn)}: {exc} (check AUDIT_STORE_URL)"
        ) from None


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        mapped = translate(exc)
        if mapped is None:
            raise
        raise mapped from exc


def _raise(exc: StoreUnavailable | StoreRejected, cause: BaseException) -> NoReturn:
    raise exc from cause


class PostgresStore:
    """Audit store on PostgreSQL 13+ through an asyncpg connection pool."""

    name = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        command_timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        dsn, options = _sql.pop_options(url, _OPTIONS)
        self.dsn = dsn
        self.min_size = min_size if min_size is not None else options.get("min_size", 1)
        self.max_size = max_size if max_size is not None else options.get("max_size", 10)
        self.command_timeout = (command_timeout if command_timeout is not None
                                else options.get("command_timeout", 60.0))
        self.connect_timeout = (connect_timeout if connect_timeout is not None
                                else options.get("connect_timeout", 10.0))
        if not 0 <= self.min_size <= self.max_size or self.max_size < 1:
            raise ConfigError(
                f"PostgreSQL pool needs 0 <= min_size <= max_size and max_size >= 1, got "
                f"min_size={self.min_size} max_size={self.max_size}"
            )
        if self.command_timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("PostgreSQL command_timeout and connect_timeout must be > 0")
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({_sql.redact(self.dsn)!r})"

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreNotOpen("the PostgreSQL store is not open")
        return self._pool

    async def open(self) -> None:
        if self._pool is None:
            with _errors():
                self._pool = await _refused_for_good(asyncpg.create_pool(
                    self.dsn,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    command_timeout=self.command_timeout,
                    timeout=self.connect_timeout,
                    server_settings={"application_name": "audit-fleet", "jit": "off"},
                ), self.dsn)

    async def close(self) -> None:
        """Close the pool gracefully within :data:`CLOSE_TIMEOUT_S`, else terminate it
        (an unreachable server never answers a graceful close)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        closed = False
        try:
            with anyio.move_on_after(CLOSE_TIMEOUT_S):
                await pool.close()
                closed = True
        except Exception:
            pass
        finally:
            if not closed:
                pool.terminate()

    async def migrate(self) -> None:
        with _errors():
            async with self.pool.acquire() as conn:
                await _postgres_schema.apply(conn, _postgres_schema.SCHEMA)

    async def ping(self) -> None:
        with _errors():
            await self.pool.fetchval("SELECT 1", timeout=self.connect_timeout)

    async def write(self, batch: WriteBatch) -> WriteResult:
        runs_json, nodes_json, runs, nodes, rejected = _postgres_write.encode(batch)
        if not runs and not nodes:
            return WriteResult(rejected)
        with _errors():
            async with self.pool.acquire() as conn, conn.transaction():
                if runs:
                    await conn.execute(_postgres_write.UPSERT_RUNS, runs_json.decode())
                if nodes:
                    await conn.execute(_postgres_write.UPSERT_NODES, nodes_json.decode())
        return WriteResult(rejected)

    async def get_run(self, workspace: str, run_id: str) -> dict[str, Any] | None:
        with _errors():
            row = await self.pool.fetchrow(
                f"SELECT {_RUN_COLUMNS} FROM workflow_runs"
                " WHERE workspace_id = $1 AND run_id = $2",
                workspace, run_id,
            )
        return None if row is None else _run_doc(row)

    async def runs_with_subject(self, workspace: str, subject: str) -> list[dict[str, Any]]:
        with _errors():
            rows = await self.pool.fetch(
                f"SELECT {_RUN_COLUMNS} FROM workflow_runs WHERE workspace_id = $1"
                " AND doc ? 'subjects' AND doc->'subjects' ? $2 ORDER BY run_id",
                workspace, subject,
            )
        return [_run_doc(row) for row in rows]

    async def get_nodes(self, workspace: str, run_id: str) -> list[dict[str, Any]]:
        with _errors():
            rows = await self.pool.fetch(
                "SELECT doc::text FROM workflow_node_runs"
                " WHERE workspace_id = $1 AND run_id = $2"
                " ORDER BY started_at NULLS LAST, attempt, node_id",
                workspace, run_id,
            )
        return [_node_doc(row[0]) for row in rows]

    async def list_runs(self, workspace: str, query: RunQuery) -> list[dict[str, Any]]:
        where = ["workspace_id = $1"]
        args: list[Any] = [workspace]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.workflow_id is not None:
            where.append(f"workflow_id = {arg(query.workflow_id)}")
        if query.status is not None:
            where.append(f"status = {arg(query.status)}")
        if query.trigger_source is not None:
            source = arg(query.trigger_source)
            where.append(f"trigger_source = left({source}, {SOURCE_CHARS})"
                         f" AND doc->'trigger'->>'source' = {source}")
        if query.since is not None:
            where.append(f"started_at >= {arg(_sql.utc(query.since))}")
        if query.until is not None:
            where.append(f"started_at < {arg(_sql.utc(query.until))}")
        if query.after is not None:
            started, run_id = query.after
            if started is None:
                where.append(f"(started_at IS NULL AND run_id > {arg(run_id)})")
            else:
                at, after_id = arg(_sql.utc(started)), arg(run_id)
                where.append(f"(started_at < {at} OR (started_at = {at} AND run_id > {after_id})"
                             " OR started_at IS NULL)")
        limit = arg(max(0, query.limit))
        sql = (f"SELECT {_RUN_COLUMNS} FROM workflow_runs WHERE {' AND '.join(where)}"
               f" ORDER BY started_at DESC NULLS LAST, run_id LIMIT {limit}")
        with _errors():
            rows = await self.pool.fetch(sql, *args)
        return [_run_doc(row) for row in rows]

    async def scan_nodes(self, workspace: str, query: NodeQuery) -> AsyncIterator[dict[str, Any]]:
        where = ["workspace_id = $1"]
        args: list[Any] = [workspace]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.types:
            where.append(f"type = ANY({arg(list(query.types))}::text[])")
        if query.run_ids:
            where.append(f"run_id = ANY({arg(list(query.run_ids))}::text[])")
        if query.since is not None:
            where.append(f"started_at >= {arg(_sql.utc(query.since))}")
        if query.until is not None:
            where.append(f"started_at < {arg(_sql.utc(query.until))}")
        if query.fields:
            keys = arg(sorted(set(query.fields)))
            column = (f"(SELECT COALESCE(jsonb_object_agg(key, value), '{{}}') FROM"
                      f" jsonb_each(doc) WHERE key = ANY({keys}::text[]))::text")
        else:
            column = "doc::text"
        sql = (f"SELECT {column} FROM workflow_node_runs WHERE {' AND '.join(where)}"
               " ORDER BY started_at, run_id, node_id, attempt")
        async for row in self._stream(sql, args):
            yield _node_doc(row[0])

    async def _stream(self, sql: str, args: Sequence[Any]) -> AsyncIterator[asyncpg.Record]:
        """Rows of a query through a server-side cursor, a page at a time."""
        try:
            async with self.pool.acquire() as conn, conn.transaction(readonly=True):
                async for row in conn.cursor(sql, *args, prefetch=500):
                    yield row
        except Exception as exc:
            mapped = translate(exc)
            if mapped is None:
                raise
            _raise(mapped, exc)

    # -- archive data keys (worker.shredding) --------------------------------------------

    async def put_data_keys(self, workspace: str, keys: Sequence[StoredKey]) -> None:
        if not keys:
            return
        with _errors():
            await self.pool.executemany(
                "INSERT INTO audit_data_keys (workspace_id, run_id, key_id, wrapped_key,"
                " created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                [(workspace, k.run_id, k.key_id, k.wrapped, k.created_at) for k in keys])

    async def data_keys(self, workspace: str,
                        run_ids: Sequence[str] | None = None) -> list[StoredKey]:
        sql = ("SELECT run_id, key_id, wrapped_key, created_at, shredded_at"
               " FROM audit_data_keys WHERE workspace_id = $1")
        args: list[Any] = [workspace]
        if run_ids is not None:
            sql += " AND run_id = ANY($2::text[])"
            args.append(sorted(set(run_ids)))
        with _errors():
            rows = await self.pool.fetch(sql + " ORDER BY run_id, key_id", *args)
        return [StoredKey(r[0], r[1], None if r[2] is None else bytes(r[2]), r[3], r[4])
                for r in rows]

    async def shred_data_keys(self, workspace: str, run_ids: Sequence[str],
                              at: datetime) -> int:
        with _errors():
            done = await self.pool.fetchval(
                "WITH s AS (UPDATE audit_data_keys SET wrapped_key = NULL, shredded_at = $3"
                " WHERE workspace_id = $1 AND run_id = ANY($2::text[])"
                " AND wrapped_key IS NOT NULL RETURNING 1) SELECT count(*) FROM s",
                workspace, sorted(set(run_ids)), at)
        return int(done)

    async def workspaces(self) -> list[str]:
        with _errors():
            rows = await self.pool.fetch(_WORKSPACES)
        return [row[0] for row in rows]

    async def delete_runs(self, workspace: str, run_ids: Sequence[str], *,
                          expected: Sequence[RunVersion] | None = None) -> int:
        if expected is not None:
            return await self._delete_unchanged_runs(workspace, run_ids, expected)
        ids = sorted(set(run_ids))
        if not ids:
            return 0
        with _errors():
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "DELETE FROM workflow_node_runs"
                    " WHERE workspace_id = $1 AND run_id = ANY($2::text[])",
                    workspace, ids,
                )
                deleted = await conn.fetchval(
                    "WITH d AS (DELETE FROM workflow_runs"
                    " WHERE workspace_id = $1 AND run_id = ANY($2::text[]) RETURNING 1)"
                    " SELECT count(*) FROM d",
                    workspace, ids,
                )
        return int(deleted)

    async def _delete_unchanged_runs(self, workspace: str, run_ids: Sequence[str],
                                     expected: Sequence[RunVersion]) -> int:
        """Compare-and-delete in one transaction: lock the runs, keep those whose run
        document and node versions are still the ones expected, delete those."""
        want = _sql.wanted_runs(run_ids, expected)
        if not want:
            return 0
        with _errors():
            async with self.pool.acquire() as conn, conn.transaction():
                same = await _lock_unchanged(conn, workspace, want)
                if not same:
                    return 0
                rows = await conn.fetch(
                    "SELECT run_id, node_key, event_id, status FROM workflow_node_runs"
                    " WHERE workspace_id = $1 AND run_id = ANY($2::text[])",
                    workspace, same,
                )
                same = _sql.nodes_unchanged(want, same, rows)
                if not same:
                    return 0
                # Only the versions read go (a node written without its run's lock, which
                # no writer does, would survive), and a run only once no node is left.
                await conn.execute(
                    f"DELETE FROM workflow_node_runs AS n USING {_VERSIONS} WHERE {_AT_VERSION}",
                    workspace, *_sql.version_columns(v for r in same for v in want[r].nodes),
                )
                deleted = await conn.fetchval(
                    "WITH d AS (DELETE FROM workflow_runs AS r"
                    " WHERE r.workspace_id = $1 AND r.run_id = ANY($2::text[])"
                    " AND NOT EXISTS (SELECT 1 FROM workflow_node_runs AS n"
                    " WHERE n.workspace_id = r.workspace_id AND n.run_id = r.run_id)"
                    " RETURNING 1) SELECT count(*) FROM d",
                    workspace, same,
                )
        return int(deleted)

    # -- retention (worker.retention) ----------------------------------------------------

    def scan_runs(self, workspace: str, before: datetime) -> AsyncIterator[dict[str, Any]]:
        """Runs that completed (or, never completed, started) before ``before``."""
        sql = (f"SELECT {_RUN_COLUMNS} FROM workflow_runs WHERE workspace_id = $1"
               " AND COALESCE(completed_at, started_at) < $2"
               " ORDER BY started_at NULLS FIRST, run_id")
        return _map(_run_doc, self._stream(sql, [workspace, _sql.utc(before)]))

    async def delete_nodes(self, workspace: str, nodes: Sequence[NodeVersion]) -> int:
        """Delete node documents still at these versions; returns how many went.

        One statement: a row a concurrent write is replacing is re-checked against its
        new version after that write commits, so a newer version is never deleted.
        """
        columns = _sql.version_columns(nodes)
        if not columns[0]:
            return 0
        with _errors():
            deleted = await self.pool.fetchval(
                f"WITH d AS (DELETE FROM workflow_node_runs AS n USING {_VERSIONS}"
                f" WHERE {_AT_VERSION} RETURNING 1) SELECT count(*) FROM d",
                workspace, *columns,
            )
        return int(deleted)

    async def strip_node_fields(self, workspace: str, nodes: Sequence[NodeVersion],
                                fields: Sequence[str]) -> int:
        """Remove ``fields`` from node documents still at these versions that hold a value
        in any of them (one statement, re-checked like :meth:`delete_nodes`)."""
        top, nested = _split_paths(check_strippable(fields, "node"))
        columns = _sql.version_columns(nodes)
        if not columns[0]:
            return 0
        removed, held = _nested_sql("n.doc", 7, nested)
        with _errors():
            changed = await self.pool.fetchval(
                f"WITH d AS (UPDATE workflow_node_runs AS n SET doc = n.doc - $6::text[]{removed}"
                f" FROM {_VERSIONS} WHERE {_AT_VERSION}"
                " AND (EXISTS (SELECT 1 FROM unnest($6::text[]) AS f"
                f" WHERE NULLIF(n.doc->f, 'null') IS NOT NULL){held}) RETURNING 1)"
                " SELECT count(*) FROM d",
                workspace, *columns, top, *nested,
            )
        return int(changed)

    async def strip_run_fields(self, workspace: str, runs: Sequence[RunVersion],
                               fields: Sequence[str]) -> int:
        """Set ``fields`` of run documents to null where they hold a value, for the runs
        whose document is still exactly the one read (locked and compared, then updated)."""
        top, nested = _split_paths(check_strippable(fields, "run"))
        want = _sql.wanted_runs([v.run_id for v in runs], runs)
        if not want:
            return 0
        removed, held = _nested_sql("r.doc", 4, nested)
        with _errors():
            async with self.pool.acquire() as conn, conn.transaction():
                same = await _lock_unchanged(conn, workspace, want)
                if not same:
                    return 0
                changed = await conn.fetchval(
                    "WITH d AS (UPDATE workflow_runs AS r SET doc = (r.doc"
                    " || COALESCE((SELECT jsonb_object_agg(f, 'null'::jsonb)"
                    f" FROM unnest($3::text[]) AS f), '{{}}'::jsonb)){removed}"
                    " WHERE r.workspace_id = $1 AND r.run_id = ANY($2::text[])"
                    " AND (EXISTS (SELECT 1 FROM unnest($3::text[]) AS f"
                    f" WHERE NULLIF(r.doc->f, 'null') IS NOT NULL){held}) RETURNING 1)"
                    " SELECT count(*) FROM d",
                    workspace, same, top, *nested,
                )
        return int(changed)


def _split_paths(paths: Sequence[tuple[str, ...]]) -> tuple[list[str], list[list[str]]]:
    """Top-level field names, and the nested paths (each a text[] parameter)."""
    return [p[0] for p in paths if len(p) == 1], [list(p) for p in paths if len(p) > 1]


def _nested_sql(doc: str, first: int, nested: Sequence[Sequence[str]]) -> tuple[str, str]:
    """SQL removing the nested paths (``#-``, from parameter ``$first`` on) and testing
    whether one holds a value; the paths themselves are parameters, never SQL text."""
    params = [f"${first + i}::text[]" for i in range(len(nested))]
    removed = "".join(f" #- {p}" for p in params)
    held = "".join(f" OR NULLIF({doc} #> {p}, 'null') IS NOT NULL" for p in params)
    return removed, held


async def _lock_unchanged(conn: asyncpg.Connection, workspace: str,
                          want: dict[str, RunVersion]) -> list[str]:
    """Lock the runs wanted and return those whose document is still the one read."""
    rows = await conn.fetch(_LOCK_RUNS, workspace, list(want))
    return [row[3] for row in rows if _run_doc(row) == want[row[3]].doc]


async def _map(fn: Callable[[asyncpg.Record], dict[str, Any]],
               rows: AsyncIterator[asyncpg.Record]) -> AsyncIterator[dict[str, Any]]:
    async for row in rows:
        yield fn(row)


def _run_doc(row: asyncpg.Record) -> dict[str, Any]:
    doc: dict[str, Any] = _sql.decode_json(row[2])
    doc["startedAt"] = row[0]
    doc["completedAt"] = row[1]
    return doc


def _node_doc(text: str) -> dict[str, Any]:
    return _sql.revive_times(_sql.decode_json(text))
