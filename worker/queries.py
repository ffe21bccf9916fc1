"""The read side shared by the query commands: stable JSON, workspace names, run listings.

Everything the read commands print as ``--json`` goes through :func:`jsonable` and
:func:`dumps`, so the machine form is stable: keys sorted, times as RFC 3339 UTC
strings with microseconds and a ``Z`` suffix, no NaN.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from .errors import ConfigError
from .stores import QueryStore, RunQuery

_WORKSPACE = re.compile(r"\A[A-Za-z0-9_-]{1,48}\Z")


# -- times ---------------------------------------------------------------------------------

def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds: ``2026-02-15T10:30:01.200000Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # isoformat, not strftime: %Y drops leading zeros of years before 1000 on glibc
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


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


# -- workspace names -----------------------------------------------------------------------

def check_workspace(name: str) -> str:
    if not _WORKSPACE.match(name):
        raise ConfigError(f"a workspace is 1-48 of A-Z a-z 0-9 _ -, got {name!r}")
    return name


# -- run listings ---------------------------------------------------------------------------

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


async def list_runs(store: QueryStore, workspace: str, query: RunQuery) -> list[dict[str, Any]]:
    """Runs matching ``query`` in the listing form, newest first (the store's index order)."""
    docs = await store.list_runs(workspace, query)
    return [run_row(doc) for doc in docs]


def encode_cursor(row: Mapping[str, Any]) -> str:
    """The opaque cursor naming the position after ``row`` (a run in the listing form)."""
    started = row.get("startedAt")
    position = [format_time(started) if isinstance(started, datetime) else None,
                str(row["runId"])]
    raw = json.dumps(position, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime | None, str]:
    """The ``(startedAt, runId)`` position of a cursor from :func:`encode_cursor`."""
    try:
        if len(text) > 1000:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        started, run_id = json.loads(raw)
        if not isinstance(run_id, str) or not (started is None or isinstance(started, str)):
            raise ValueError("bad position")
        if started is None:
            return None, run_id
        when = datetime.fromisoformat(started.replace("Z", "+00:00"))
        if when.tzinfo is None:
            raise ValueError("no offset")
        return when.astimezone(UTC), run_id
    except (ValueError, TypeError):
        raise ConfigError(f"not a cursor: {text[:60]!r}") from None


async def list_runs_page(store: QueryStore, workspace: str,
                         query: RunQuery) -> tuple[list[dict[str, Any]], str | None]:
    """One page of :func:`list_runs` and the cursor of the next (None on the last page).

    Keyset pagination on the listing order, so every page is one index range scan.
    """
    rows = await list_runs(store, workspace, replace(query, limit=query.limit + 1))
    if len(rows) <= query.limit:
        return rows, None
    rows = rows[: query.limit]
    return rows, encode_cursor(rows[-1])


