"""What every command shares: the worker flags, the store flags, and Settings built from them."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ..constants import DEFAULT_STORE_URL
from ..settings import Settings, expand_streams
from ..shredding import MasterKey
from ..stores import Store, store_from


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override ``AUDIT_*`` variables (see README's configuration table)."""
    p.add_argument("--redis-url", help="AUDIT_REDIS_URL")
    p.add_argument("--redis-mode", choices=("auto", "standalone", "cluster", "sentinel"),
                   help="AUDIT_REDIS_MODE")
    p.add_argument("--stream", help="AUDIT_STREAM (audit:events:{0..7} or a comma list)")
    p.add_argument("--group", help="AUDIT_GROUP")
    p.add_argument("--consumer", help="AUDIT_CONSUMER (default hostname-pid)")
    p.add_argument("--store-url", help="AUDIT_STORE_URL")


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    streams = None
    if getattr(args, "stream", None):
        streams = expand_streams(args.stream)
    return Settings.from_env(
        redis_url=getattr(args, "redis_url", None),
        redis_mode=getattr(args, "redis_mode", None),
        streams=streams,
        group=getattr(args, "group", None),
        consumer=getattr(args, "consumer", None),
        store_url=getattr(args, "store_url", None),
        **extra,
    )


def add_store_flag(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a value the top-level parser may already have set.
    parser.add_argument("--store-url", default=argparse.SUPPRESS,
                        help=f"store URL (AUDIT_STORE_URL, default {DEFAULT_STORE_URL})")


def add_workspace_flag(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("-w", "--workspace", required=required,
                        help="workspace ID" + ("" if required else " (default: all)"))


def archive_dir(args: argparse.Namespace) -> str | None:
    """``--archive-dir``, else ``AUDIT_ARCHIVE_DIR`` (:attr:`Settings.archive_dir`)."""
    return Settings.from_env(archive_dir=getattr(args, "archive_dir", None) or None).archive_dir


@asynccontextmanager
async def opened_store(
    args: argparse.Namespace, *, read_only: bool = False
) -> AsyncIterator[Store]:
    """The store named by ``--store-url`` / ``AUDIT_STORE_URL`` (read and checked by
    :class:`Settings`, with its store options), opened and closed.

    No command but ``migrate`` (and a worker's start) creates tables or indexes;
    ``read_only`` for commands that only read: they create no file or directory either.
    """
    settings = Settings.from_env(store_url=getattr(args, "store_url", None))
    store = store_from(settings, read_only=read_only)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def archive_master_key() -> MasterKey | None:
    """The archive master key ``AUDIT_ARCHIVE_MASTER_KEY_FILE`` names, if any."""
    key = Settings.from_env(metrics_port=0).archive_master_key
    return None if key is None else MasterKey(key)
