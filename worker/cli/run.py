"""``audit-fleet run`` and ``audit-fleet migrate``: a worker of the fleet, the schema."""

from __future__ import annotations

import argparse
from typing import Any

from ..logs import configure, get_logger
from ..settings import describe_unknown, unknown_env
from .common import add_worker_flags, settings_from_args


async def cmd_run(args: argparse.Namespace) -> int:
    from ..service import run_worker

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
    log = get_logger()
    for name, suggestion in unknown_env():
        log.warning("unknown_setting", variable=name, suggestion=suggestion,
                    message=describe_unknown(name, suggestion))
    await run_worker(settings)
    return 0


async def cmd_migrate(args: argparse.Namespace) -> int:
    from ..stores import migrate, store_from

    settings = settings_from_args(args)
    store = store_from(settings)
    await store.open()
    try:
        await migrate(store)
    finally:
        await store.close()
    print(f"schema and indexes are up to date ({store.name})")
    return 0


def register(sub: Any) -> None:
    """Add ``run`` and ``migrate`` to the ``audit-fleet`` command."""
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

