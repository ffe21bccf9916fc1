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
import sys
from typing import Any

from ..errors import RedisFailure
from ..fleet import FleetStatus, GroupStatus, fleet_status
from ..fleet_checks import rates, status_problems, threshold_breaches
from ..pending_idle import PendingScans
from ..redisclient import connect_settings
from .output import escape_text, format_time, human_duration, print_json, table

#: One ``status`` reads pending lists of up to 1 M entries whole (MAX-IDLE exact), in
#: pages of 1000 (each as cheap for Redis as one read of a worker).
ONE_SHOT_PENDING_PAGES = 1000


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def _lag(group: GroupStatus) -> str:
    """The lag, ``~`` in front when it is an estimate (too many entries to count)."""
    return ("~" if group.lag_source == "estimated" and group.lag is not None else "") + _num(
        group.lag)


def render(status: FleetStatus) -> str:
    """The terminal view: streams, then groups, then consumers."""
    taken = format_time(status.taken_at)
    sections = [f"Fleet status at {taken}"]

    clustered = any(x.node for x in status.streams)
    stream_rows = [
        [
            s.name,
            "unavailable" if s.error else str(s.length) if s.exists else "missing",
            s.first_id or "-",
            s.last_id or "-",
            "-" if s.error else str(s.dlq_length),
            *([s.node or "-"] if clustered else []),
        ]
        for s in status.streams
    ]
    sections.append(table(
        ["STREAM", "LENGTH", "FIRST-ID", "LAST-ID", "DLQ", *(["NODE"] if clustered else [])],
        stream_rows,
    ))
    sections.extend(f"{s.name}: cannot be read: {s.error}" for s in status.streams if s.error)

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
                _lag(g),
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
        sections.append(table(
            ["STREAM", "GROUP", "LAG", "PENDING", "OLDEST-PENDING", "MAX-IDLE", "CONSUMERS",
             "LAST-DELIVERED-ID"],
            group_rows,
        ))
    else:
        sections.append("(no consumer groups)")
    if consumer_rows:
        sections.append(table(
            ["STREAM", "GROUP", "CONSUMER", "PENDING", "IDLE"], consumer_rows
        ))
    elif group_rows:
        sections.append("(no consumers)")
    return "\n\n".join(sections) + "\n"


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
    p.add_argument("--watch", type=float, metavar="SECONDS",
                   help="refresh every SECONDS with rates (appended, delivered, dead-lettered "
                   "per second) until interrupted")
    p.add_argument("--max-lag", type=int, metavar="N",
                   help="exit 3 if a group's lag is above N entries (cron and CI checks)")
    p.add_argument("--max-oldest-pending", type=float, metavar="SECONDS",
                   help="exit 3 if a group's oldest pending entry was appended more than "
                   "SECONDS ago")
    p.set_defaults(func=run_status)
    return p


async def run_status(args: argparse.Namespace) -> int:
    """Print the status. Exit 0; 1 when Redis cannot be reached or a stream or group asked
    for does not exist; 3 when a ``--max-*`` threshold is exceeded."""
    from .common import settings_from_args

    settings = settings_from_args(args)
    if args.watch is not None:
        return await _watch(args, settings)
    try:
        redis = await connect_settings(settings)
    except RedisFailure as exc:
        print(f"audit-fleet: cannot read the fleet status from Redis: {exc}", file=sys.stderr)
        return 1
    try:
        status = await fleet_status(
            redis, settings.streams, None if args.all_groups else settings.group,
            PendingScans(pages_per_poll=ONE_SHOT_PENDING_PAGES),
        )
    except RedisFailure as exc:
        print(f"audit-fleet: cannot read the fleet status from Redis: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    if args.json:
        print_json(status.to_dict())
    else:
        print(escape_text(render(status).rstrip("\n"), keep_newlines=True))
    missing = status_problems(status)
    breaches = threshold_breaches(status, max_lag=args.max_lag,
                                  max_oldest_pending_s=args.max_oldest_pending)
    for line in [*missing, *breaches]:
        print(f"audit-fleet: {escape_text(line)}", file=sys.stderr)
    if missing:
        return 1
    return 3 if breaches else 0


def render_rates(rows: list[dict[str, Any]]) -> str:
    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    return table(["STREAM", "GROUP", "APPENDED/S", "DELIVERED/S", "LAG-CHANGE/S", "DLQ/S"],
                 [[r["stream"], r["group"], num(r["appended_per_s"]),
                   num(r["delivered_per_s"]), num(r["lag_change_per_s"]),
                   num(r["dead_lettered_per_s"])] for r in rows])


async def _watch(args: argparse.Namespace, settings: Any) -> int:
    """Redraw the status every ``--watch`` seconds, with rates since the previous one."""
    import anyio

    if args.watch <= 0:
        from ..errors import ConfigError

        raise ConfigError("--watch needs a positive number of seconds")
    redis = await connect_settings(settings)
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    previous = None
    scans = PendingScans()  # large pending lists are swept over the redraws, as the poller does
    try:
        while True:
            status = await fleet_status(
                redis, settings.streams, None if args.all_groups else settings.group, scans)
            text = escape_text(render(status).rstrip("\n"), keep_newlines=True)
            if previous is not None:
                text += "\n\n" + escape_text(render_rates(rates(previous, status)),
                                             keep_newlines=True)
            print(clear + text + "\n", flush=True)
            previous = status
            await anyio.sleep(args.watch)
    finally:
        await redis.aclose()
