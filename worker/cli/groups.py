"""``audit-fleet groups`` (every stream's consumer groups) and ``audit-fleet rewind``."""

from __future__ import annotations

import argparse
from typing import Any

from ..groups import id_before_ms, list_groups, plan_rewind, rewind
from ..queries import utcnow
from ..redisclient import connect_settings
from .common import add_worker_flags, settings_from_args
from .output import escape_text, parse_when, print_json, table


async def cmd_groups(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    redis = await connect_settings(settings)
    try:
        rows = await list_groups(redis, args.match)
    finally:
        await redis.aclose()
    if args.json:
        print_json({"groups": [{"stream": r.stream, "group": r.group, "consumers": r.consumers,
                                "pending": r.pending, "lag": r.lag,
                                "lastDeliveredId": r.last_delivered_id} for r in rows]})
    else:
        print(table(["STREAM", "GROUP", "CONSUMERS", "PENDING", "LAG", "LAST-DELIVERED-ID"],
                    [[r.stream, r.group, r.consumers, r.pending, r.lag, r.last_delivered_id]
                     for r in rows]) if rows else "(no consumer groups)")
    return 0


async def cmd_rewind(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if (args.to_time is None) == (args.to_id is None):
        from ..errors import ConfigError

        raise ConfigError("rewind needs exactly one of --to-time and --to-id")
    if args.to_id is not None:
        new_id = args.to_id
    else:
        when = parse_when(args.to_time, utcnow())
        assert when is not None
        new_id = id_before_ms(int(when.timestamp() * 1000))
    stream = settings.streams[0] if args.stream_name is None else args.stream_name
    redis = await connect_settings(settings)
    try:
        plan = await plan_rewind(redis, stream, settings.group, new_id)
        more = "+" if plan.redelivered >= 100_000 else ""
        print(escape_text(
            f"{'would move' if args.dry_run else 'moving'} group {plan.group} on {plan.stream} "
            f"from {plan.current_id} back to {plan.new_id}: {plan.redelivered}{more} entries "
            f"delivered again; {plan.pending} pending"))
        if not args.dry_run:
            await rewind(redis, plan, force=args.force)
            print("done: the fleet writes those entries again (idempotent merge)")
    finally:
        await redis.aclose()
    return 0


def register(sub: Any) -> None:
    """Add ``groups`` and ``rewind`` to the ``audit-fleet`` command."""
    p = sub.add_parser("groups", help="list every stream's consumer groups",
                       description="Like kafka-consumer-groups --list: streams found with "
                       "SCAN (dead-letter streams left out), each group's consumers, pending "
                       "entries, lag and position.")
    add_worker_flags(p)
    p.add_argument("--match", default="*", help="stream name pattern (SCAN MATCH; default *)")
    p.add_argument("--json", action="store_true", help="stable JSON")
    p.set_defaults(func=cmd_groups)

    r = sub.add_parser(
        "rewind", help="move a group back to a time or ID: its entries are delivered again",
        description="XGROUP SETID: re-ingest after restoring the store from a backup (rewind "
        "to the backup's time). Refuses while consumers hold pending entries unless --force.")
    add_worker_flags(r)
    r.add_argument("--stream-name", help="the stream (default: the first of AUDIT_STREAM)")
    r.add_argument("--to-time", help="deliver again every entry appended at or after this "
                   "time (RFC 3339, or a duration back such as 2h)")
    r.add_argument("--to-id", help="deliver again every entry after this stream ID")
    r.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    r.add_argument("--force", action="store_true",
                   help="rewind even though consumers hold pending entries")
    r.set_defaults(func=cmd_rewind)
