"""The ``audit-fleet`` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from . import __version__
from .errors import AuditFleetError, ConfigError
from .logs import configure, get_logger
from .settings import Settings

Handler = Callable[[argparse.Namespace], Awaitable[int]]

#: Modules that add their own subcommands with ``register(subparsers)``.
COMMAND_MODULES = (
    "demo", "status", "dlq", "health", "trim", "explain", "queries", "insights", "retention",
    "archive",
)


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override ``AUDIT_*`` variables (see README's configuration table)."""
    p.add_argument("--redis-url", help="AUDIT_REDIS_URL")
    p.add_argument("--stream", help="AUDIT_STREAM (comma-separated for several shards)")
    p.add_argument("--group", help="AUDIT_GROUP")
    p.add_argument("--consumer", help="AUDIT_CONSUMER (default hostname-pid)")
    p.add_argument("--store-url", help="AUDIT_STORE_URL")


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    streams = None
    if getattr(args, "stream", None):
        streams = tuple(s.strip() for s in args.stream.split(",") if s.strip())
    return Settings.from_env(
        redis_url=getattr(args, "redis_url", None),
        streams=streams,
        group=getattr(args, "group", None),
        consumer=getattr(args, "consumer", None),
        store_url=getattr(args, "store_url", None),
        **extra,
    )


async def cmd_run(args: argparse.Namespace) -> int:
    from .service import run_worker

    settings = settings_from_args(
        args,
        batch_size=args.batch_size,
        block_ms=args.block_ms,
        claim_idle_ms=args.claim_idle_ms,
        max_deliveries=args.max_deliveries,
        metrics_port=args.metrics_port,
        burst=True if args.burst else None,
    )
    configure(settings.log_level, settings.log_format)
    await run_worker(settings)
    return 0


async def cmd_migrate(args: argparse.Namespace) -> int:
    from .stores import open_store

    settings = settings_from_args(args)
    store = open_store(settings.store_url)
    await store.open()
    try:
        await store.migrate()
    finally:
        await store.close()
    print(f"schema and indexes are up to date ({store.name})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audit-fleet",
        description="Audit trails for AI workflows: Redis Streams in, durable runs out.",
    )
    parser.add_argument("--version", action="version", version=f"audit-fleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a worker of the fleet")
    add_worker_flags(run)
    run.add_argument("--batch-size", type=int, help="AUDIT_BATCH_SIZE")
    run.add_argument("--block-ms", type=int, help="AUDIT_BLOCK_MS")
    run.add_argument("--claim-idle-ms", type=int, help="AUDIT_CLAIM_IDLE_MS")
    run.add_argument("--max-deliveries", type=int, help="AUDIT_MAX_DELIVERIES")
    run.add_argument("--metrics-port", type=int, help="AUDIT_METRICS_PORT (0 disables)")
    run.add_argument("--burst", action="store_true",
                     help="exit 0 once the group has no undelivered and no pending entries")
    run.set_defaults(func=cmd_run)

    migrate = sub.add_parser("migrate", help="create schema and indexes (idempotent)")
    add_worker_flags(migrate)
    migrate.set_defaults(func=cmd_migrate)

    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return anyio.run(func, args)
    except ConfigError as exc:
        print(f"audit-fleet: configuration error: {exc}", file=sys.stderr)
        return 2
    except AuditFleetError as exc:
        print(f"audit-fleet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception:
        get_logger().exception("command_failed", command=args.command)
        return 1


if __name__ == "__main__":
    sys.exit(main())
