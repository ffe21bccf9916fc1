"""API tokens and the access log, kept in the audit store beside the runs.

Two record kinds, one small protocol (:class:`AccessStore`) with an adapter per store
backend, each on the backend's own connection:

- **tokens** (``api_tokens``): the SHA-256 digest of each read-API token (never the
  token), the workspaces it is bound to, its scopes, when it was created and revoked;
- **the access log** (``api_access_log``): one append-only record per node whose prompt
  or raw output a request returned (token ID, workspace, run, node, attempt, the fields
  returned, when, and whether from hot storage or the archive).

Nothing here updates or deletes an access record except retention, at the run-summary
horizon: :meth:`AccessStore.delete_access` once the records are in a committed archive
segment, or :meth:`AccessStore.expire_access` without an archive (docs/api.md,
docs/retention.md).

Layouts: SQLite and PostgreSQL add two tables (``CREATE ... IF NOT EXISTS``, so
:meth:`AccessStore.migrate` is idempotent). MongoDB keeps the tokens in one database of
their own (``<prefix>~access``: ``~`` is outside the workspace alphabet, so no workspace
database can be named so) or, with field tenancy, in the shared database; the access log
lives with each workspace's runs (its database, or the shared one with ``workspaceId``).
Times are kept to the millisecond in every store (MongoDB's resolution).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, Protocol

from pymongo import ASCENDING, IndexModel

from ..errors import ConfigError
from .base import Store

TOKENS: Final = "api_tokens"
ACCESS_LOG: Final = "api_access_log"
#: The MongoDB database of the tokens (database tenancy), after the store's prefix.
MONGO_ACCESS_DB: Final = "~access"


def millis(value: datetime) -> datetime:
    """``value`` in UTC, cut to the millisecond (what every store keeps)."""
    value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A read-API token as stored: its digest, never the token itself."""

    token_id: str
    digest: str
    workspaces: tuple[str, ...]
    scopes: tuple[str, ...]
    created_at: datetime
    label: str | None = None
    revoked_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """The listing form (``tokens list --json``): no digest."""
        return {"tokenId": self.token_id, "workspaces": list(self.workspaces),
                "scopes": list(self.scopes), "label": self.label,
                "createdAt": self.created_at, "revokedAt": self.revoked_at}


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One node's prompt or raw output returned to one token."""

    record_id: str
    at: datetime
    token_id: str
    workspace: str
    run_id: str
    node_id: str | None
    attempt: int | None
    fields: tuple[str, ...]
    source: str  # "store" or "archive"

    def to_json(self) -> dict[str, Any]:
        """The export form (``access-log --format jsonl``), also the archived record."""
        return {"id": self.record_id, "at": self.at, "tokenId": self.token_id,
                "workspaceId": self.workspace, "runId": self.run_id, "nodeId": self.node_id,
                "attempt": self.attempt, "fields": list(self.fields), "source": self.source}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> AccessRecord:
        """A record read back from its :meth:`to_json` form (an archive segment)."""
        attempt = doc.get("attempt")
        return cls(str(doc["id"]), _utc(doc["at"]), str(doc["tokenId"]),
                   str(doc["workspaceId"]), str(doc["runId"]),
                   None if doc.get("nodeId") is None else str(doc["nodeId"]),
                   attempt if isinstance(attempt, int) else None,
                   tuple(str(f) for f in doc.get("fields") or ()),
                   str(doc.get("source", "store")))


class AccessStore(Protocol):
    """Tokens and the access log of one store."""

    async def migrate(self) -> None:
        """Create the tables/collections and indexes (idempotent)."""

    async def add_token(self, token: TokenRecord) -> None: ...

    async def get_token(self, token_id: str) -> TokenRecord | None: ...

    async def list_tokens(self) -> list[TokenRecord]:
        """Every token, oldest first."""

    async def revoke_token(self, token_id: str, when: datetime) -> bool:
        """Mark a token revoked; False if there is no such token or it was revoked."""

    async def record_access(self, records: Sequence[AccessRecord]) -> None:
        """Append access records (durably, before the response is sent)."""

    async def access_log(self, workspace: str, *, since: datetime | None = None,
                         until: datetime | None = None) -> list[AccessRecord]:
        """A workspace's access records in ``[since, until)``, oldest first."""

    async def expire_access(self, workspace: str, before: datetime) -> int:
        """Delete a workspace's access records older than ``before`` (retention without
        an archive)."""

    async def delete_access(self, workspace: str, record_ids: Sequence[str]) -> int:
        """Delete these access records of a workspace (retention, once they are archived);
        returns how many were still there."""


def access_store(store: Store) -> AccessStore:
    """The access adapter of an (opened) store."""
    if store.name == "sqlite":
        from .sqlite import SQLiteStore

        assert isinstance(store, SQLiteStore)
        return SQLiteAccess(store)
    if store.name == "postgresql":
        from .postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        return PostgresAccess(store)
    if store.name == "mongodb":
        from .mongo import MongoStore

        assert isinstance(store, MongoStore)
        return MongoAccess(store)
    raise ConfigError(f"the {store.name} store keeps no tokens or access log")


def _token(row: Sequence[Any]) -> TokenRecord:
    token_id, digest, workspaces, scopes, label, created, revoked = row
    return TokenRecord(token_id, digest, tuple(workspaces), tuple(scopes), _utc(created),
                       label, None if revoked is None else _utc(revoked))


def _record(row: Sequence[Any]) -> AccessRecord:
    record_id, at, token_id, workspace, run_id, node_id, attempt, fields, source = row
    return AccessRecord(record_id, _utc(at), token_id, workspace, run_id, node_id, attempt,
                        tuple(fields), source)


def _utc(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


# -- SQLite ----------------------------------------------------------------------------------

_SQLITE_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS {TOKENS} (
    token_id   TEXT PRIMARY KEY,
    digest     TEXT NOT NULL,
    workspaces TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    label      TEXT,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS {ACCESS_LOG} (
    id           TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    at           TEXT NOT NULL,
    token_id     TEXT NOT NULL,
    run_id       TEXT NOT NULL,
    node_id      TEXT,
    attempt      INTEGER,
    fields       TEXT NOT NULL,
    source       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS {ACCESS_LOG}_at_idx ON {ACCESS_LOG} (workspace_id, at);
"""

_TOKEN_COLUMNS: Final = "token_id, digest, workspaces, scopes, label, created_at, revoked_at"
_LOG_COLUMNS: Final = ("id, at, token_id, workspace_id, run_id, node_id, attempt, fields,"
                       " source")


def _text(value: datetime) -> str:
    return millis(value).isoformat(timespec="microseconds")


def _sqlite_token(row: Sequence[Any]) -> TokenRecord:
    return _token([row[0], row[1], json.loads(row[2]), json.loads(row[3]), *row[4:]])


class SQLiteAccess:
    """Tokens and access log in the SQLite store's database."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def _write(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        from .sqlite import _transaction

        def run(conn: sqlite3.Connection) -> int:
            return conn.executemany(sql, rows).rowcount

        count: int = await self.store._run(partial(_transaction, run))
        return count

    async def _fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        rows: list[Any] = await self.store._run(lambda conn: conn.execute(sql, args).fetchall())
        return rows

    async def migrate(self) -> None:
        from .sqlite import _transaction

        def run(conn: sqlite3.Connection) -> None:
            for statement in _SQLITE_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

        await self.store._run(partial(_transaction, run))

    async def add_token(self, token: TokenRecord) -> None:
        await self._write(f"INSERT INTO {TOKENS} ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                          [(token.token_id, token.digest, json.dumps(list(token.workspaces)),
                            json.dumps(list(token.scopes)), token.label,
                            _text(token.created_at), None)])

    async def get_token(self, token_id: str) -> TokenRecord | None:
        rows = await self._fetch(f"SELECT {_TOKEN_COLUMNS} FROM {TOKENS} WHERE token_id = ?",
                                 [token_id])
        return _sqlite_token(rows[0]) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self._fetch(
            f"SELECT {_TOKEN_COLUMNS} FROM {TOKENS} ORDER BY created_at, token_id", [])
        return [_sqlite_token(r) for r in rows]

    async def revoke_token(self, token_id: str, when: datetime) -> bool:
        return await self._write(
            f"UPDATE {TOKENS} SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
            [(_text(when), token_id)]) == 1

    async def record_access(self, records: Sequence[AccessRecord]) -> None:
        if records:
            await self._write(
                f"INSERT INTO {ACCESS_LOG} ({_LOG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.record_id, _text(r.at), r.token_id, r.workspace, r.run_id, r.node_id,
                  r.attempt, json.dumps(list(r.fields)), r.source) for r in records])

    async def access_log(self, workspace: str, *, since: datetime | None = None,
                         until: datetime | None = None) -> list[AccessRecord]:
        where, args = ["workspace_id = ?"], [workspace]
        if since is not None:
            where.append("at >= ?")
            args.append(_text(since))
        if until is not None:
            where.append("at < ?")
            args.append(_text(until))
        rows = await self._fetch(f"SELECT {_LOG_COLUMNS} FROM {ACCESS_LOG} WHERE "
                                 f"{' AND '.join(where)} ORDER BY at, id", args)
        return [_record([*r[:7], json.loads(r[7]), r[8]]) for r in rows]

    async def expire_access(self, workspace: str, before: datetime) -> int:
        return await self._write(f"DELETE FROM {ACCESS_LOG} WHERE workspace_id = ? AND at < ?",
                                 [(workspace, _text(before))])

    async def delete_access(self, workspace: str, record_ids: Sequence[str]) -> int:
        if not record_ids:
            return 0
        return await self._write(f"DELETE FROM {ACCESS_LOG} WHERE workspace_id = ? AND id = ?",
                                 [(workspace, rid) for rid in record_ids])


# -- PostgreSQL ------------------------------------------------------------------------------

_PG_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS {TOKENS} (
    token_id   text COLLATE "C" PRIMARY KEY,
    digest     text NOT NULL,
    workspaces text[] NOT NULL,
    scopes     text[] NOT NULL,
    label      text,
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE TABLE IF NOT EXISTS {ACCESS_LOG} (
    id           text COLLATE "C" PRIMARY KEY,
    workspace_id text COLLATE "C" NOT NULL,
    at           timestamptz NOT NULL,
    token_id     text NOT NULL,
    run_id       text NOT NULL,
    node_id      text,
    attempt      integer,
    fields       text[] NOT NULL,
    source       text NOT NULL
);
CREATE INDEX IF NOT EXISTS {ACCESS_LOG}_at_idx ON {ACCESS_LOG} (workspace_id, at);
"""


class PostgresAccess:
    """Tokens and access log in the PostgreSQL store's database."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def _execute(self, sql: str, *args: Any) -> str:
        from .postgres import _errors

        with _errors():
            status: str = await self.store.pool.execute(sql, *args)
        return status

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        from .postgres import _errors

        with _errors():
            rows: list[Any] = await self.store.pool.fetch(sql, *args)
        return rows

    async def migrate(self) -> None:
        from ._postgres_schema import apply
        from .postgres import _errors

        with _errors():
            async with self.store.pool.acquire() as conn:
                await apply(conn, _PG_SCHEMA)

    async def add_token(self, token: TokenRecord) -> None:
        await self._execute(
            f"INSERT INTO {TOKENS} ({_TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, NULL)",
            token.token_id, token.digest, list(token.workspaces), list(token.scopes),
            token.label, millis(token.created_at))

    async def get_token(self, token_id: str) -> TokenRecord | None:
        rows = await self._fetch(f"SELECT {_TOKEN_COLUMNS} FROM {TOKENS} WHERE token_id = $1",
                                 token_id)
        return _token(rows[0]) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self._fetch(
            f"SELECT {_TOKEN_COLUMNS} FROM {TOKENS} ORDER BY created_at, token_id")
        return [_token(r) for r in rows]

    async def revoke_token(self, token_id: str, when: datetime) -> bool:
        status = await self._execute(
            f"UPDATE {TOKENS} SET revoked_at = $1 WHERE token_id = $2 AND revoked_at IS NULL",
            millis(when), token_id)
        return status == "UPDATE 1"

    async def record_access(self, records: Sequence[AccessRecord]) -> None:
        if not records:
            return
        from .postgres import _errors

        with _errors():
            await self.store.pool.executemany(
                f"INSERT INTO {ACCESS_LOG} ({_LOG_COLUMNS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                [(r.record_id, millis(r.at), r.token_id, r.workspace, r.run_id, r.node_id,
                  r.attempt, list(r.fields), r.source) for r in records])

    async def access_log(self, workspace: str, *, since: datetime | None = None,
                         until: datetime | None = None) -> list[AccessRecord]:
        rows = await self._fetch(
            f"SELECT {_LOG_COLUMNS} FROM {ACCESS_LOG} WHERE workspace_id = $1"
            " AND ($2::timestamptz IS NULL OR at >= $2)"
            " AND ($3::timestamptz IS NULL OR at < $3) ORDER BY at, id",
            workspace, since and millis(since), until and millis(until))
        return [_record(r) for r in rows]

    async def expire_access(self, workspace: str, before: datetime) -> int:
        status = await self._execute(
            f"DELETE FROM {ACCESS_LOG} WHERE workspace_id = $1 AND at < $2", workspace,
            millis(before))
        return int(status.rsplit(" ", 1)[-1])

    async def delete_access(self, workspace: str, record_ids: Sequence[str]) -> int:
        if not record_ids:
            return 0
        status = await self._execute(
            f"DELETE FROM {ACCESS_LOG} WHERE workspace_id = $1 AND id = ANY($2::text[])",
            workspace, list(record_ids))
        return int(status.rsplit(" ", 1)[-1])


# -- MongoDB ---------------------------------------------------------------------------------

class MongoAccess:
    """Tokens in their own database (or the shared one), the access log per workspace."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._indexed: set[str] = set()

    def _tokens(self) -> Any:
        name = self.store.shared_db if self.store.shared else self.store.prefix + MONGO_ACCESS_DB
        return self.store._db(name)[TOKENS]

    def _log(self, workspace: str) -> Any | None:
        db = self.store._read_db(workspace)
        return None if db is None else db[ACCESS_LOG]

    def _in(self, workspace: str, **fields: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"workspaceId": workspace} if self.store.shared else {}
        out.update(fields)
        return out

    async def migrate(self) -> None:
        call = self.store._call
        await call(self._tokens().create_indexes([IndexModel([("createdAt", ASCENDING)])]))
        # Access-log indexes are made with the first record of each workspace.

    async def add_token(self, token: TokenRecord) -> None:
        await self.store._call(self._tokens().insert_one({
            "_id": token.token_id, "digest": token.digest,
            "workspaces": list(token.workspaces), "scopes": list(token.scopes),
            "label": token.label, "createdAt": millis(token.created_at), "revokedAt": None}))

    @staticmethod
    def _token(doc: dict[str, Any]) -> TokenRecord:
        return _token([doc["_id"], doc["digest"], doc["workspaces"], doc["scopes"],
                       doc.get("label"), doc["createdAt"], doc.get("revokedAt")])

    async def get_token(self, token_id: str) -> TokenRecord | None:
        doc = await self.store._call(self._tokens().find_one({"_id": token_id}))
        return None if doc is None else self._token(doc)

    async def list_tokens(self) -> list[TokenRecord]:
        cursor = self._tokens().find({}, sort=[("createdAt", 1), ("_id", 1)])
        return [self._token(d) for d in await self.store._call(cursor.to_list())]

    async def revoke_token(self, token_id: str, when: datetime) -> bool:
        result = await self.store._call(self._tokens().update_one(
            {"_id": token_id, "revokedAt": None}, {"$set": {"revokedAt": millis(when)}}))
        return bool(result.modified_count == 1)

    async def record_access(self, records: Sequence[AccessRecord]) -> None:
        by_workspace: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_workspace.setdefault(r.workspace, []).append(self._in(
                r.workspace, _id=r.record_id, at=millis(r.at), tokenId=r.token_id,
                runId=r.run_id, nodeId=r.node_id, attempt=r.attempt, fields=list(r.fields),
                source=r.source))
        for workspace, docs in sorted(by_workspace.items()):
            coll = self._log(workspace)
            if coll is None:
                raise ConfigError(f"workspace {workspace!r} has no MongoDB database")
            if workspace not in self._indexed:
                keys = [("workspaceId", ASCENDING)] if self.store.shared else []
                await self.store._call(coll.create_indexes(
                    [IndexModel([*keys, ("at", ASCENDING)])]))
                self._indexed.add(workspace)
            await self.store._call(coll.insert_many(docs, ordered=True))

    async def access_log(self, workspace: str, *, since: datetime | None = None,
                         until: datetime | None = None) -> list[AccessRecord]:
        coll = self._log(workspace)
        if coll is None:
            return []
        span: dict[str, Any] = {}
        if since is not None:
            span["$gte"] = millis(since)
        if until is not None:
            span["$lt"] = millis(until)
        cursor = coll.find(self._in(workspace, **({"at": span} if span else {})),
                           sort=[("at", 1), ("_id", 1)])
        return [_record([d["_id"], d["at"], d["tokenId"], workspace, d["runId"],
                         d.get("nodeId"), d.get("attempt"), d.get("fields") or [],
                         d.get("source", "store")])
                for d in await self.store._call(cursor.to_list())]

    async def expire_access(self, workspace: str, before: datetime) -> int:
        coll = self._log(workspace)
        if coll is None:
            return 0
        result = await self.store._call(coll.delete_many(
            self._in(workspace, at={"$lt": millis(before)})))
        return int(result.deleted_count)

    async def delete_access(self, workspace: str, record_ids: Sequence[str]) -> int:
        coll = self._log(workspace)
        if coll is None or not record_ids:
            return 0
        result = await self.store._call(coll.delete_many(
            self._in(workspace, _id={"$in": list(record_ids)})))
        return int(result.deleted_count)
