"""``audit-fleet status``: the fleet at a glance, like ``kafka-consumer-groups --describe``.

Per stream: length, first and last IDs and the dead-letter length; per group: lag,
pending, the age of the oldest pending entry (since it was appended), the longest time a
pending entry has waited since its delivery (``MAX-IDLE``: a stuck consumer) and the last
delivered ID; per consumer:
pending and idle time. ``--json`` prints the stable form (``FleetStatus.to_dict``,
schema version 1) for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..fleet import FleetStatus, fleet_status


def human_duration(seconds: float | None) -> str:
    """``0.35`` → ``350ms``, ``75`` → ``1m15s``, ``93784`` → ``1d2h``; None → ``-``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; numbers are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str], numeric: Sequence[bool]) -> str:
        parts = [
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    numeric = [
        bool(rows) and all(_is_number(row[i]) for row in rows) for i in range(len(headers))
    ]
    out = [line(headers, numeric)]
    out.extend(line(row, numeric) for row in rows)
    return "\n".join(out)


def _is_number(cell: str) -> bool:
    return cell == "-" or cell.replace(".", "", 1).isdigit()


def render(status: FleetStatus) -> str:
    """The terminal view: streams, then groups, then consumers."""
    taken = status.taken_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    sections = [f"Fleet status at {taken}"]

    stream_rows = [
        [
            s.name,
            str(s.length) if s.exists else "missing",
            s.first_id or "-",
            s.last_id or "-",
            str(s.dlq_length),
        ]
        for s in status.streams
    ]
    sections.append(format_table(["STREAM", "LENGTH", "FIRST-ID", "LAST-ID", "DLQ"], stream_rows))

    group_rows: list[list[str]] = []
    consumer_rows: list[list[str]] = []
    for s in status.streams:
        for g in s.groups:
            if not g.exists:
                group_rows.append([s.name, g.name, "missing", "-", "-", "-", "-", "-"])
                continue
            group_rows.append([
                s.name,
                g.name,
                _num(g.lag),
                str(g.pending),
                human_duration(g.oldest_pending_age_s),
                human_duration(g.max_pending_idle_s),
                str(len(g.consumers)),
                g.last_delivered_id or "-",
            ])
            for x in g.consumers:
                consumer_rows.append(
                    [s.name, g.name, x.name, str(x.pending), human_duration(x.idle_ms / 1000)]
                )
    if group_rows:
        sections.append(format_table(
            ["STREAM", "GROUP", "LAG", "PENDING", "OLDEST-PENDING", "MAX-IDLE", "CONSUMERS",
             "LAST-DELIVERED-ID"],
            group_rows,
        ))
    else:
        sections.append("(no consumer groups)")
    if consumer_rows:
        sections.append(format_table(
            ["STREAM", "GROUP", "CONSUMER", "PENDING", "IDLE"], consumer_rows
        ))
    elif group_rows:
        sections.append("(no consumers)")
    return "\n\n".join(sections) + "\n"


def to_json(status: FleetStatus) -> str:
    return json.dumps(status.to_dict(), indent=2)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``audit-fleet status``; its handler is :func:`run_status`."""
    from .common import add_worker_flags

    p: argparse.ArgumentParser = subparsers.add_parser(
        "status", help="show streams, groups, lag, pending and consumers",
        description="Per stream and consumer group: length, lag, pending entries, age of "
        "the oldest pending entry, consumers (pending, idle) and the dead-letter length.",
    )
    add_worker_flags(p)
    p.add_argument("--all-groups", action="store_true",
                   help="describe every consumer group of each stream, not only AUDIT_GROUP")
    p.add_argument("--json", action="store_true", help="stable JSON for scripts")
    p.set_defaults(func=run_status)
    return p


async def run_status(args: argparse.Namespace) -> int:
    """Print the status; exit 0, or 1 when Redis cannot be reached."""
    from .common import settings_from_args

    settings = settings_from_args(args)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        status = await fleet_status(
            redis, settings.streams, None if args.all_groups else settings.group
        )
    except RedisError as exc:
        print(f"audit-fleet: cannot read the fleet status from Redis: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    print(to_json(status) if args.json else render(status).rstrip("\n"))
    return 0
