"""``audit_data_keys`` on SQLite (``worker.shredding``): run in the store's thread, in its
transactions. Times are fixed-width ISO 8601 UTC text, like the store's other columns."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from . import _sql
from .base import StoredKey

SCHEMA: Final = """
-- archive data keys (worker.shredding): wrapped_key NULL once shredded
CREATE TABLE IF NOT EXISTS audit_data_keys (
    workspace_id TEXT NOT NULL,
    run_id       TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    wrapped_key  BLOB,
    created_at   TEXT NOT NULL,
    shredded_at  TEXT,
    PRIMARY KEY (workspace_id, run_id, key_id)
);
"""


def _text(when: datetime) -> str:
    return _sql.utc(when).isoformat(timespec="microseconds")


def put(workspace: str, keys: Sequence[StoredKey], conn: sqlite3.Connection) -> None:
    conn.executemany(
        "INSERT INTO audit_data_keys (workspace_id, run_id, key_id, wrapped_key, created_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        [(workspace, k.run_id, k.key_id, k.wrapped, _text(k.created_at)) for k in keys])


def fetch(workspace: str, run_ids: Sequence[str] | None,
          conn: sqlite3.Connection) -> list[StoredKey]:
    sql = ("SELECT run_id, key_id, wrapped_key, created_at, shredded_at"
           " FROM audit_data_keys WHERE workspace_id = ?")
    args: list[Any] = [workspace]
    if run_ids is not None:
        sql += " AND run_id IN (SELECT value FROM json_each(?))"
        args.append(_sql.encode_json(sorted(set(run_ids))).decode())
    out = []
    for run_id, key_id, wrapped, created, shredded in conn.execute(
            sql + " ORDER BY run_id, key_id", args):
        out.append(StoredKey(run_id, key_id, None if wrapped is None else bytes(wrapped),
                             datetime.fromisoformat(created),
                             None if shredded is None else datetime.fromisoformat(shredded)))
    return out


def shred(workspace: str, run_ids: Sequence[str], at: str | None,
          conn: sqlite3.Connection) -> int:
    return conn.execute(
        "UPDATE audit_data_keys SET wrapped_key = NULL, shredded_at = ?"
        " WHERE workspace_id = ? AND wrapped_key IS NOT NULL"
        " AND run_id IN (SELECT value FROM json_each(?))",
        (at, workspace, _sql.encode_json(sorted(set(run_ids))).decode())).rowcount
