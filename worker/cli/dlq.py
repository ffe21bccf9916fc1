"""``audit-fleet dlq list|show|replay|purge``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..deadletter import DeadLetter, _event_text
from ..dlq import (
    _SHOW_PREVIEW_CHARS,
    DLQ_SCHEMA_VERSION,
    DlqFilter,
    find,
    purge,
    replay_matching,
    scan_all,
)
from ..errors import RedisFailure
from ..fleet import redis_time_ms
from ..redisclient import connect_settings
from .output import JsonStream, escape_lines, format_time, print_json, table, when_ms


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``audit-fleet dlq list|show|replay|purge``; handlers set ``func``."""
    from .common import add_worker_flags

    p: argparse.ArgumentParser = subparsers.add_parser(
        "dlq", help="inspect, replay or purge dead letters",
        description="Dead letters live in <stream>:dlq, one per configured stream.",
    )
    sub = p.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)

    def filters(q: argparse.ArgumentParser, *, limit: int | None) -> None:
        add_worker_flags(q)
        q.add_argument("--reason", action="append", default=[],
                       help="only this reason (repeatable), e.g. schema_violation")
        q.add_argument("--workspace", action="append", default=[],
                       help="only events of this workspaceId (repeatable)")
        q.add_argument("--since", help="dead-lettered at or after: 2h, 7d, ISO 8601 or epoch ms")
        q.add_argument("--until", help="dead-lettered at or before (same forms as --since)")
        q.add_argument("--id", action="append", default=[], dest="ids",
                       help="only this dead-letter entry ID (repeatable)")
        q.add_argument("--limit", type=int, default=limit,
                       help=f"at most this many entries (default {limit or 'all'})")
        q.add_argument("--json", action="store_true", help="stable JSON for scripts")

    q = sub.add_parser("list", help="list dead letters (oldest first)")
    filters(q, limit=50)
    q.set_defaults(func=run_list)

    q = sub.add_parser("show", help="show dead letters in full, with their payload")
    add_worker_flags(q)
    q.add_argument("entry_ids", nargs="+", metavar="ID", help="dead-letter entry ID")
    q.add_argument("--full", action="store_true",
                   help=f"print the whole payload (default: first {_SHOW_PREVIEW_CHARS} chars)")
    q.add_argument("--json", action="store_true", help="stable JSON for scripts")
    q.set_defaults(func=run_show)

    q = sub.add_parser(
        "replay", help="re-enqueue dead letters to their stream, then remove them",
        description="XADD each payload to the source stream, then XDEL it from the "
        "dead-letter stream: a crash in between duplicates an event, never loses one.",
    )
    filters(q, limit=None)
    q.add_argument("--dry-run", action="store_true", help="show what would be replayed")
    q.set_defaults(func=run_replay)

    q = sub.add_parser("purge", help="delete dead letters for good (asks for --yes)")
    filters(q, limit=None)
    q.add_argument("--yes", action="store_true", help="really delete the matching entries")
    q.set_defaults(func=run_purge)
    return p


async def _open(args: argparse.Namespace) -> tuple[aioredis.Redis, Sequence[str]]:
    from .common import settings_from_args

    settings = settings_from_args(args)
    return await connect_settings(settings), settings.streams


def _filter(args: argparse.Namespace, now_ms: int) -> DlqFilter:
    from ..errors import ConfigError

    try:
        since = when_ms(args.since, now_ms) if args.since else None
        until = when_ms(args.until, now_ms) if args.until else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.limit is not None and args.limit < 0:
        raise ConfigError("--limit must be >= 0")
    return DlqFilter(
        reasons=tuple(args.reason), workspaces=tuple(args.workspace), since_ms=since,
        until_ms=until, ids=tuple(args.ids), limit=args.limit,
    )


def _rows(entries: Iterable[DeadLetter]) -> list[list[str]]:
    return [
        [
            e.dlq,
            e.id,
            format_time(datetime.fromtimestamp(e.dead_lettered_ms / 1000, tz=UTC)),
            e.reason or "-",
            e.source_id or "-",
            "-" if e.deliveries is None else str(e.deliveries),
            e.workspace or "-",
            _one_line(e.error, 60),
        ]
        for e in entries
    ]


def _one_line(value: str, limit: int) -> str:
    s = " ".join(value.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


_HEADERS = ["DLQ", "ID", "DEAD-LETTERED (UTC)", "REASON", "SOURCE-ID", "DELIVERIES", "WORKSPACE",
            "ERROR"]


def _print_json(kind: str, payload: dict[str, Any]) -> None:
    print_json({"version": DLQ_SCHEMA_VERSION, "command": kind, **payload})


async def _guarded(args: argparse.Namespace, action: Any) -> int:
    try:
        redis, streams = await _open(args)
    except RedisFailure as exc:
        print(f"audit-fleet: cannot connect to Redis: {exc}", file=sys.stderr)
        return 1
    try:
        result: int = await action(redis, streams)
        return result
    except (RedisError, RedisFailure) as exc:
        print(f"audit-fleet: Redis error: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()


async def run_list(args: argparse.Namespace) -> int:
    async def action(redis: aioredis.Redis, streams: Sequence[str]) -> int:
        flt = _filter(args, await redis_time_ms(redis))
        entries = await find(redis, streams, flt)
        if args.json:
            _print_json("list", {"count": len(entries),
                                 "entries": [e.to_dict() for e in entries]})
        elif entries:
            print(table(_HEADERS, _rows(entries)))
        else:
            print("no dead letters match")
        return 0

    return await _guarded(args, action)


async def run_show(args: argparse.Namespace) -> int:
    async def action(redis: aioredis.Redis, streams: Sequence[str]) -> int:
        entries = await find(redis, streams, DlqFilter(ids=tuple(args.entry_ids)))
        missing = sorted(set(args.entry_ids) - {e.id for e in entries})
        if args.json:
            _print_json("show", {"entries": [e.to_dict(with_event=True) for e in entries],
                                 "missing": missing})
        else:
            for e in entries:
                print(_show_text(e, full=args.full))
            for entry_id in missing:
                print(f"{entry_id}: no such dead letter", file=sys.stderr)
        return 1 if missing else 0

    return await _guarded(args, action)


def _show_text(e: DeadLetter, *, full: bool) -> str:
    d = e.to_dict()
    lines = [f"{k + ':':<18}{'-' if v is None else v}" for k, v in d.items()]
    payload, encoding = _event_text(e.event)
    if payload is not None and encoding == "utf-8":
        with contextlib.suppress(ValueError):
            payload = json.dumps(json.loads(payload), indent=2, ensure_ascii=False)
    if payload is not None and not full and len(payload) > _SHOW_PREVIEW_CHARS:
        payload = payload[:_SHOW_PREVIEW_CHARS] + f"\n… ({len(payload)} chars; --full shows all)"
    lines.append(f"{'event:':<18}({encoding or 'absent'})")
    if payload is not None:
        lines.extend(payload.split("\n"))
    return escape_lines(lines) + "\n"


async def run_replay(args: argparse.Namespace) -> int:
    async def action(redis: aioredis.Redis, streams: Sequence[str]) -> int:
        flt = _filter(args, await redis_time_ms(redis))
        if args.dry_run:
            await _dry_run(args, scan_all(redis, streams, flt, snapshot=True))
            return 0
        out = (JsonStream({"version": DLQ_SCHEMA_VERSION, "command": "replay",
                           "dry_run": False}, "replayed", "{") if args.json else None)
        replayed = 0
        skipped: list[str] = []
        failed: dict[str, str] = {}
        async for part in replay_matching(redis, streams, flt):
            replayed += len(part.replayed)
            skipped.extend(part.skipped)
            failed.update(part.failed)
            if out is not None:
                for entry_id, new_id in part.replayed.items():
                    out.add(new_id, entry_id)
            for entry_id, error in part.failed.items():
                print(f"{entry_id}: not replayed: {error}", file=sys.stderr)
        if out is not None:
            out.close({"skipped": skipped, "failed": failed})
        else:
            print(f"replayed {replayed} dead letters to their streams"
                  + (f"; skipped {len(skipped)} without a payload" if skipped else ""))
        return 1 if failed else 0

    return await _guarded(args, action)


async def _dry_run(args: argparse.Namespace, entries: AsyncIterator[DeadLetter]) -> None:
    """What a replay would take, printed while reading: JSON entry by entry, text as one
    table per ``_TABLE_ROWS`` rows, then the count."""
    count = 0
    if args.json:
        out = JsonStream({"version": DLQ_SCHEMA_VERSION, "command": "replay",
                          "dry_run": True}, "entries")
        async for entry in entries:
            out.add(entry.to_dict())
            count += 1
        out.close({"count": count})
        return
    rows: list[list[str]] = []  # the cells only, not the entries and their payloads
    async for entry in entries:
        rows.extend(_rows([entry]))
        count += 1
        if len(rows) >= _TABLE_ROWS:
            print(table(_HEADERS, rows))
            rows = []
    if rows:
        print(table(_HEADERS, rows))
    print(f"would replay {count} dead letters")


#: Rows of one dry-run table (a table is laid out whole, so long listings come in parts).
_TABLE_ROWS = 500


async def run_purge(args: argparse.Namespace) -> int:
    async def action(redis: aioredis.Redis, streams: Sequence[str]) -> int:
        matches = scan_all(redis, streams, _filter(args, await redis_time_ms(redis)),
                           snapshot=True)
        if not args.yes:
            matched = 0
            async for _ in matches:
                matched += 1
            message = f"{matched} dead letters match; pass --yes to delete them"
            if args.json:
                _print_json("purge", {"deleted": 0, "matched": matched, "confirmed": False})
            print(message, file=sys.stderr)
            return 1
        deleted = await purge(redis, matches)
        if args.json:
            _print_json("purge", {"deleted": deleted, "matched": deleted, "confirmed": True})
        else:
            print(f"deleted {deleted} dead letters")
        return 0

    return await _guarded(args, action)
