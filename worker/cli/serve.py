"""``audit-fleet serve``: the read API and web viewer (the logic is in :mod:`worker.api`)."""

from __future__ import annotations

import argparse
import signal
from typing import Any

import anyio

from ..queries import utcnow
from ..stores import Store
from ..stores.access import access_store
from .common import add_store_flag, archive_dir, archive_master_key, opened_store


async def cmd_serve(args: argparse.Namespace) -> int:
    from ..api.reads import Reader
    from ..api.server import Listen, serve
    from ..archive import Archive

    listen = Listen.make(args.bind, cert=args.tls_cert, key=args.tls_key,
                         insecure_localhost=args.insecure_localhost)
    location = archive_dir(args)
    async with opened_store(args, read_only=True) as store:
        access = access_store(store)
        reader = Reader(store, access, Archive.at(location) if location else None,
                        master=archive_master_key())  # opens sealed archive fields

        def ready(url: str) -> None:
            print(f"serving the read API and viewer on {url} (store: {store.name})",
                  flush=True)

        async with anyio.create_task_group() as tg:
            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(stop_on_signal)
            tg.start_soon(lambda: serve(reader, listen, ready=ready))
    return 0


async def viewer_token(store: Store, workspace: str, *, label: str) -> str:
    """A new token that reads one workspace, prompts included (for ``demo``)."""
    from ..api.tokens import PROMPTS_READ, RUNS_READ, new_token

    access = access_store(store)
    token, record = new_token((workspace,), (RUNS_READ, PROMPTS_READ), now=utcnow(),
                              label=label)
    await access.add_token(record)
    return token


def register(subparsers: Any) -> None:
    """Add ``serve`` to the ``audit-fleet`` command."""
    p = subparsers.add_parser(
        "serve", help="serve the read API and web viewer",
        description="A read-only HTTP server on the store: the JSON API under /v1 "
        "(OpenAPI at /v1/openapi.json) and the pages. Needs TLS, or plain HTTP on a "
        "loopback address with --insecure-localhost.")
    add_store_flag(p)
    p.add_argument("--bind", default="127.0.0.1:8700", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8700)")
    p.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    p.add_argument("--insecure-localhost", action="store_true",
                   help="plain HTTP, allowed only on a loopback address")
    p.add_argument("--archive-dir", metavar="DIR",
                   help="archive for /archive routes (AUDIT_ARCHIVE_DIR)")
    p.set_defaults(func=cmd_serve)
