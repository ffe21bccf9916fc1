"""The store a URL names: the one place that knows every backend (``base`` knows none)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from ..errors import ConfigError
from .base import Store

if TYPE_CHECKING:
    from ._mongo_options import MongoOptions


class StoreSettings(Protocol):
    """What :func:`store_from` reads of :class:`worker.settings.Settings`."""

    @property
    def store_url(self) -> str: ...

    @property
    def store_scheme(self) -> str: ...

    def mongo_options(self) -> MongoOptions: ...


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


def store_from(settings: StoreSettings, *, read_only: bool = False) -> Store:
    """The store ``settings`` name, with their store options (not yet opened)."""
    options: dict[str, Any] = {}
    if settings.store_scheme in ("mongodb", "mongodb+srv"):
        options["options"] = settings.mongo_options()
    return open_store(settings.store_url, read_only=read_only, **options)


async def migrate(store: Store) -> None:
    """Every migration of an opened store, once each: its runs and nodes (tables, indexes),
    then its API tokens and access log. ``audit-fleet migrate`` and a worker's start run
    this; nothing else creates tables or indexes."""
    await store.migrate()
    if store.name != "null":
        from .access import access_store

        await access_store(store).migrate()
