"""Which MongoDB database holds each workspace, and the case check of database names.

One database per workspace (``<prefix><workspaceId>``) or one shared database
(``AUDIT_MONGO_TENANCY=field``). Names are validated against MongoDB's rules
(forbidden characters, under 64 bytes, not admin/local/config). MongoDB refuses two
databases whose names differ only by case; :class:`DatabaseNames` keeps a map of
existing names (lower case -> name) from ``listDatabases``, refreshed whenever a batch
names a database it does not know and once more before it refuses one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure, OperationFailure

from ..errors import StoreUnavailable
from . import _mongo_codec as mc
from . import _mongo_write as mw


class DatabaseNames:
    """The database of each workspace, checked before anything is written to it."""

    def __init__(self, *, shared: bool, prefix: str, shared_db: str) -> None:
        self.shared = shared
        self.prefix = prefix
        self.shared_db = shared_db
        #: lower-case database name -> its spelling on the server (case-collision check)
        self._db_names: dict[str, str] | None = None
        self._can_list_dbs = True

    def of(self, workspace: str) -> str:
        """The database name of ``workspace`` (not yet checked)."""
        return self.shared_db if self.shared else self.prefix + workspace

    def readable(self, workspace: str) -> str | None:
        """The database to read ``workspace`` from, or None if it cannot exist."""
        if self.shared:
            return self.shared_db
        name = self.of(workspace)
        return None if mc.db_name_problem(name) else name

    def workspace(self, name: str) -> str | None:
        """The workspace a database of this store holds, or None for another database."""
        ws = name[len(self.prefix):]
        return ws if name.startswith(self.prefix) and workspace_ok(ws) else None

    def forget(self) -> None:
        """Read the names from the server again before the next check (another worker
        may have created a database meanwhile)."""
        self._db_names = None

    async def _refresh_db_names(self, client: AsyncMongoClient[Any]) -> None:
        if not self._can_list_dbs:
            self._db_names = self._db_names or {}
            return
        try:
            names = await client.list_database_names()
        except ConnectionFailure as exc:
            raise StoreUnavailable(f"MongoDB is unreachable: {exc}") from exc
        except OperationFailure as exc:
            if mw.transient(exc):
                raise StoreUnavailable(f"MongoDB: {mw.message(exc)}") from exc
            # Not allowed to list databases: the server's own check (13297) remains.
            self._can_list_dbs = False
            names = []
        self._db_names = {n.lower(): n for n in names}

    def _claim(self, names: Iterable[str]) -> dict[str, str]:
        """Record new names; return name -> the existing name it collides with."""
        known = self._db_names if self._db_names is not None else {}
        self._db_names = known
        clashes: dict[str, str] = {}
        for name in sorted(names):
            existing = known.setdefault(name.lower(), name)
            if existing != name:
                clashes[name] = existing
        return clashes

    async def resolve(self, client: AsyncMongoClient[Any], workspaces: Iterable[str],
                      ) -> tuple[dict[str, str], dict[str, str]]:
        """(workspace -> database name, workspace -> why it is refused)."""
        names: dict[str, str] = {}
        refused: dict[str, str] = {}
        for ws in workspaces:
            name = self.of(ws)
            problem = mc.db_name_problem(name) if not self.shared else None
            if problem:
                refused[ws] = f"workspace {ws!r} cannot be stored in MongoDB: {problem}"
            else:
                names[ws] = name
        if self.shared or not names:
            return names, refused
        refreshed = False
        if self._db_names is None or any(n.lower() not in self._db_names
                                         for n in names.values()):
            await self._refresh_db_names(client)
            refreshed = True
        clashes = self._claim(names.values())
        if clashes and not refreshed:
            await self._refresh_db_names(client)
            clashes = self._claim(names.values())
        for ws, name in list(names.items()):
            if name in clashes:
                del names[ws]
                refused[ws] = (f"workspace {ws!r} cannot be stored in MongoDB: database name "
                               f"{name!r} differs only by case from the existing database "
                               f"{clashes[name]!r}")
        return names, refused


def workspace_ok(ws: str) -> bool:
    """Whether ``ws`` is a workspace name a database of this store can be named after."""
    return 1 <= len(ws) <= 48 and all(ch.isascii() and (ch.isalnum() or ch in "_-")
                                      for ch in ws)
