"""The store a URL names: the one place that knows every backend (``base`` knows none)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError
from .base import Store


def open_store(url: str, *, read_only: bool = False, **options: Any) -> Store:
    """The store a URL names (not yet opened; opening it creates no table either).

    ``read_only`` (SQLite): opening creates nothing (no file, no directory), and a file
    that does not exist is an error.
    """
    scheme = urlsplit(url).scheme
    store: Store
    if scheme == "null":
        from .null import NullStore

        store = NullStore()
        return store
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        store = SQLiteStore(url, read_only=read_only, **options)
        return store
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        store = PostgresStore(url, **options)
        return store
    if scheme in ("mongodb", "mongodb+srv"):
        from .mongo import MongoStore

        store = MongoStore(url, **options)
        return store
    raise ConfigError(f"no store for URL scheme {scheme!r}")


async def migrate(store: Store) -> None:
    """Every migration of an opened store, once each: its runs and nodes (tables, indexes),
    then its API tokens and access log. ``audit-fleet migrate`` and a worker's start run
    this; nothing else creates tables or indexes."""
    await store.migrate()
    if store.name != "null":
        from .access import access_store

        await access_store(store).migrate()
