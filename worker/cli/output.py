"""How every command prints: tables, times, durations, ``--json``, progress, escaping.

- Tables: :func:`table` (rich, plain text: columns two spaces apart, numbers right-aligned).
- Times: :func:`format_time`, RFC 3339 in UTC with a four-digit year, microseconds and a
  ``Z`` (``2026-02-15T10:30:01.200000Z``), in tables, text and JSON alike.
- Time arguments: :func:`parse_when` takes a duration back from now (:func:`parse_duration`:
  ``90s``, ``15m``, ``12h``, ``7d``, ``2w``), an RFC 3339 / ISO 8601 time (no offset means
  UTC; a bare date is UTC midnight) or milliseconds since the epoch.
- ``--json``: :func:`print_json` prints :func:`worker.queries.dumps` (sorted keys, indented,
  times as above, no NaN).
- Progress: :func:`progress_bar`.
- Event data in human-readable output goes through :func:`escape_text`: table cells here,
  line renderers (``explain``, ``dlq show``) through :func:`escape_lines`, whole texts
  (``insights``, ``status``) through :func:`escape_text` with ``keep_newlines``, and
  ``--json`` through :func:`print_json`, which writes what JSON leaves raw as ``\\uXXXX``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from ..queries import dumps, format_time

__all__ = [
    "JsonStream",
    "escape_lines",
    "escape_text",
    "format_ms",
    "format_time",
    "human_duration",
    "parse_duration",
    "parse_time",
    "parse_when",
    "print_json",
    "progress_bar",
    "table",
    "when_ms",
]

_DURATION = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBER = re.compile(r"\A-?\d+(?:\.\d+)?\Z")


# -- tables ----------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return escape_text(str(value))


def _numeric(column: Sequence[Any]) -> bool:
    """Numbers (or dashes for none) only, at least one number."""
    seen = False
    for value in column:
        if value is None or value == "-":
            continue
        if isinstance(value, bool):
            return False
        if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.match(value)):
            seen = True
            continue
        return False
    return seen or any(v == "-" for v in column)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: a header line, columns two spaces apart, numeric columns
    right-aligned, ``None`` as ``-``; cells are escaped (:func:`escape_text`)."""
    grid = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 1), header_style="",
                 show_header=True, expand=False)
    for i, header in enumerate(headers):
        column = [row[i] for row in rows]
        grid.add_column(header, justify="right" if rows and _numeric(column) else "left",
                        no_wrap=True)
    for row in rows:
        grid.add_row(*(_cell(v) for v in row))
    buffer = io.StringIO()
    console = Console(file=buffer, width=100_000, color_system=None, force_terminal=False,
                      highlight=False, markup=False, emoji=False, soft_wrap=False)
    console.print(grid)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())


# -- text --------------------------------------------------------------------------------------

#: C0 and C1 controls (ANSI escapes start with one) but tab and newline, the line and
#: paragraph separators, zero-width and bidirectional controls, the byte-order mark.
_UNSAFE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
_UNSAFE_LINE = re.compile(f"[\t\n{_UNSAFE}]")
_UNSAFE_BLOCK = re.compile(f"[{_UNSAFE}]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_text(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` safe for a terminal: every character that could move the cursor, recolour
    or reorder the screen is shown as ``\\xNN`` or ``\\uNNNN``; tabs and newlines too,
    unless ``keep_newlines``."""
    return (_UNSAFE_BLOCK if keep_newlines else _UNSAFE_LINE).sub(_escape, text)


def escape_lines(lines: Iterable[str]) -> str:
    """Rendered lines as terminal text, each escaped: a newline inside a value shows as
    ``\\x0a`` instead of starting a line of its own."""
    return "\n".join(escape_text(line) for line in lines)


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group(0)):04x}"


def json_text(text: str) -> str:
    """JSON text with what JSON may carry raw (C1 controls, separators, bidi and
    zero-width characters) written as ``\\uXXXX`` escapes: the same value, terminal-safe.
    (Inside strings json.dumps already escapes C0; outside them there is only layout.)"""
    return _UNSAFE_BLOCK.sub(_json_escape, text)


def progress_bar(done: int, total: int, width: int = 32) -> str:
    """``[#####-----]``: ``done`` of ``total``."""
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def print_json(doc: Any) -> None:
    """The one ``--json`` form of every command (see :func:`worker.queries.dumps`)."""
    print(json_text(dumps(doc)))


class JsonStream:
    """One ``--json`` document printed as it is produced, laid out as :func:`print_json`
    would: the ``head`` members, then the member ``key`` (a list, or an object when
    ``kind`` is ``"{"``) item by item, then the ``tail`` members given to :meth:`close`.
    So a command over any number of entries holds one item at a time, not the document.
    """

    def __init__(self, head: dict[str, Any], key: str, kind: str = "[") -> None:
        self.kind, self.count = kind, 0
        lines = ["{", *(f"  {dumps(k)}: {_nested(v)}," for k, v in sorted(head.items()))]
        self._write("\n".join(lines) + f"\n  {dumps(key)}: {kind}")

    def _write(self, text: str) -> None:
        print(json_text(text), end="")

    def add(self, item: Any, name: str | None = None) -> None:
        """Append ``item`` (to an object: as member ``name``)."""
        label = f"{dumps(name)}: " if self.kind == "{" else ""
        self._write(("," if self.count else "") + "\n    " + label
                    + dumps(item).replace("\n", "\n    "))
        self.count += 1

    def close(self, tail: dict[str, Any]) -> None:
        end = ("\n  " if self.count else "") + ("}" if self.kind == "{" else "]")
        members = "".join(f",\n  {dumps(k)}: {_nested(v)}" for k, v in sorted(tail.items()))
        self._write(end + members + "\n}\n")


def _nested(value: Any) -> str:
    return dumps(value).replace("\n", "\n  ")


def format_ms(ms: float | None) -> str:
    """A duration in milliseconds for people: ``350 ms``, ``4.25 s``, ``3.5 min``."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 120_000:
        return f"{ms / 1000:.2f} s"
    return f"{ms / 60_000:.1f} min"


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


# -- time arguments ----------------------------------------------------------------------------

def parse_duration(text: str) -> timedelta:
    """``90s``, ``1.5m``, ``12h``, ``7d``, ``2w``."""
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"not a duration: {text!r} (use e.g. 30m, 12h, 7d, 2w)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def parse_time(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time (a bare date is UTC midnight; no offset means UTC)."""
    raw = text.strip()
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"not a time: {text!r} (use 15m, 2h, 7d, an ISO 8601 time such as "
            "2026-02-15T10:30:00Z, or epoch milliseconds)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_when(text: str | None, now: datetime) -> datetime | None:
    """A ``--since``/``--until`` value: a duration back from ``now``, a time, or epoch ms."""
    if text is None or text.strip() == "":
        return None
    raw = text.strip()
    if _DURATION.match(raw):
        return now - parse_duration(raw)
    if raw.isdigit() and len(raw) > 8:  # epoch milliseconds (not a year or a date)
        return datetime.fromtimestamp(int(raw) / 1000, tz=UTC)
    return parse_time(raw)


def when_ms(text: str, now_ms: int) -> int:
    """:func:`parse_when` in milliseconds since the epoch (the unit of Redis stream IDs)."""
    raw = text.strip()
    if _DURATION.match(raw):
        return now_ms - int(parse_duration(raw).total_seconds() * 1000)
    if raw.isdigit() and len(raw) > 8:
        return int(raw)
    return int(parse_time(raw).timestamp() * 1000)
