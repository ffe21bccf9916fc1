"""``audit-fleet validate FILE|-``: the worker's verdict on each event, before producing it."""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

import anyio

from ..errors import ConfigError, InvalidEvent
from ..events import decode
from ..settings import Settings
from .output import escape_text, print_json


def verdicts(lines: IO[bytes], max_bytes: int) -> list[dict[str, Any]]:
    """One verdict per non-empty line: what the worker would do with it as an entry."""
    out = []
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            decoded = decode(line, max_bytes=max_bytes)
        except InvalidEvent as exc:
            out.append({"line": number, "ok": False, "reason": exc.reason,
                        "message": exc.detail})
        else:
            event = decoded.event
            out.append({"line": number, "ok": True, "type": event.__struct_config__.tag,
                        "eventId": event.eventId, "runId": event.runId})
    return out


def _read(path: str, max_bytes: int) -> list[dict[str, Any]]:
    if path == "-":
        return verdicts(sys.stdin.buffer, max_bytes)
    try:
        with open(path, "rb") as fh:
            return verdicts(fh, max_bytes)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


async def cmd_validate(args: argparse.Namespace) -> int:
    settings = Settings.from_env(metrics_port=0)
    results = await anyio.to_thread.run_sync(_read, args.file, settings.max_event_bytes)
    dead = [r for r in results if not r["ok"]]
    if args.json:
        print_json({"events": len(results), "deadLettered": len(dead), "verdicts": results})
    else:
        for r in results:
            if r["ok"]:
                print(escape_text(f"line {r['line']}: ok ({r['type']} {r['eventId']})"))
            else:
                print(escape_text(f"line {r['line']}: {r['reason']}: {r['message']}"))
        print(f"{len(results)} events, {len(results) - len(dead)} valid, "
              f"{len(dead)} would be dead-lettered")
    return 1 if dead else 0


def register(sub: Any) -> None:
    """Add ``validate`` to the ``audit-fleet`` command."""
    p = sub.add_parser(
        "validate", help="check events (one JSON object per line) as the worker would",
        description="Prints each line's verdict: ok, or the dead-letter reason and message "
        "the worker would give it. Exit 1 if any line would be dead-lettered. The size limit "
        "is AUDIT_MAX_EVENT_BYTES. Signatures (AUDIT_REQUIRE_SIGNATURE) are checked on "
        "stream entries, not here.")
    p.add_argument("file", metavar="FILE", help="a file of JSON lines, or - for stdin")
    p.add_argument("--json", action="store_true", help="the verdicts as JSON")
    p.set_defaults(func=cmd_validate)
