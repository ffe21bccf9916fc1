"""The store a URL names: the one place that knows every backend (``base`` knows none)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError
from .base import Store


def open_store(url: str, *, read_only: bool = False, **options: Any) -> Store:
    """The store a URL names (not yet opened).

    ``read_only`` (SQLite, PostgreSQL): opening creates nothing (no file, directory or
    table), and a SQLite file that does not exist is an error.
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

        store = PostgresStore(url, read_only=read_only, **options)
        return store
    if scheme in ("mongodb", "mongodb+srv"):
        from .mongo import MongoStore

        store = MongoStore(url, **options)
        return store
    raise ConfigError(f"no store for URL scheme {scheme!r}")
