"""Read-side helpers shared by the query commands, and ``audit-fleet runs``.

Everything the read commands print as ``--json`` goes through :func:`jsonable` and
:func:`dumps`, so the machine form is stable: keys sorted, times as RFC 3339 UTC
strings with microseconds and a ``Z`` suffix, no NaN.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from .errors import ConfigError
from .stores import RunQuery, Store

_DURATION = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_WORKSPACE = re.compile(r"\A[A-Za-z0-9_-]{1,48}\Z")


# -- times ---------------------------------------------------------------------------------

def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds: ``2026-02-15T10:30:01.200000Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
            f"not a time: {text!r} (use ISO 8601, e.g. 2026-02-15T10:30:00Z)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``12h``, ``7d``, ``2w``."""
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"not a duration: {text!r} (use e.g. 30m, 12h, 7d, 2w)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def parse_when(text: str | None, now: datetime) -> datetime | None:
    """A ``--since``/``--until`` value: a duration back from ``now`` or an absolute time."""
    if text is None or text == "":
        return None
    if _DURATION.match(text):
        return now - parse_duration(text)
    return parse_time(text)


# -- stable JSON -----------------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """A JSON-ready copy: datetimes as RFC 3339 UTC strings, tuples and sets as lists."""
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def dumps(value: Any, *, indent: int | None = 2) -> str:
    """The stable machine form: sorted keys, no NaN, UTF-8 kept readable."""
    return json.dumps(jsonable(value), sort_keys=True, indent=indent, ensure_ascii=False,
                      allow_nan=False, separators=None if indent else (",", ":"))


# -- CLI plumbing --------------------------------------------------------------------------

def check_workspace(name: str) -> str:
    if not _WORKSPACE.match(name):
        raise ConfigError(f"a workspace is 1-48 of A-Z a-z 0-9 _ -, got {name!r}")
    return name


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table (numbers right-aligned)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    numeric = [all(isinstance(r[i], int | float) and not isinstance(r[i], bool)
                   for r in rows if r[i] is not None) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i])
                 for i, v in enumerate(values)]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def format_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 120_000:
        return f"{ms / 1000:.2f} s"
    return f"{ms / 60_000:.1f} min"


# -- audit-fleet runs ------------------------------------------------------------------------

def run_row(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The stable listing form of one run document."""
    trigger = doc.get("trigger") if isinstance(doc.get("trigger"), Mapping) else None
    summary = doc.get("summary") if isinstance(doc.get("summary"), Mapping) else {}
    return {
        "runId": doc.get("runId"),
        "workflowId": doc.get("workflowId"),
        "status": doc.get("status"),
        "startedAt": doc.get("startedAt"),
        "completedAt": doc.get("completedAt"),
        "totalDuration": doc.get("totalDuration"),
        "trigger": {"type": trigger.get("type"), "source": trigger.get("source")}
        if trigger else None,
        "summary": dict(summary or {}),
    }


async def list_runs(store: Store, workspace: str, query: RunQuery) -> list[dict[str, Any]]:
    """Runs matching ``query`` in the listing form, newest first (the store's index order)."""
    docs = await store.list_runs(workspace, query)
    return [run_row(doc) for doc in docs]


