"""``audit-fleet trim``: one hygiene round by hand, or a dry run."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from ..redisclient import connect_settings
from ..trim import trim_stream
from .output import print_json


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``audit-fleet trim`` (one hygiene round by hand, or a dry run)."""
    from .common import add_worker_flags

    p: argparse.ArgumentParser = subparsers.add_parser(
        "trim", help="trim acknowledged entries now (what the fleet does every interval)",
        description="Trim each stream below what every consumer group has delivered and "
        "acknowledged, keeping at least the retention floor. Never removes pending or "
        "undelivered entries.",
    )
    add_worker_flags(p)
    p.add_argument("--retention", type=float, metavar="SECONDS",
                   help="keep at least this many seconds (AUDIT_TRIM_RETENTION_S)")
    p.add_argument("--exact", action="store_true",
                   help="trim exactly at the floor instead of whole radix-tree nodes")
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_trim)
    return p


async def run_trim(args: argparse.Namespace) -> int:
    from .common import settings_from_args

    settings = settings_from_args(args)
    retention = settings.trim_retention_s if args.retention is None else args.retention
    redis = await connect_settings(settings)
    try:
        results = [
            await trim_stream(redis, stream, retention, approximate=not args.exact,
                              dry_run=args.dry_run)
            for stream in settings.streams
        ]
    finally:
        await redis.aclose()
    if args.json:
        print_json([{**r.plan.to_dict(), "trimmed": r.trimmed,
                    "dry_run": bool(args.dry_run)} for r in results])
        return 0
    for r in results:
        verb = "would trim below" if args.dry_run else "trimmed below"
        if r.plan.minid is None:
            print(f"{r.plan.stream}: nothing to trim ({r.plan.reason})")
        else:
            count = "" if args.dry_run else f": {r.trimmed} entries"
            print(f"{r.plan.stream}: {verb} {r.plan.minid}{count}")
    return 0
