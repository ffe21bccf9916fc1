"""``audit-fleet runs``: list runs, newest first."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ..errors import ConfigError
from ..queries import check_workspace, decode_cursor, list_runs_page, utcnow
from ..stores import RunQuery
from .common import add_store_flag, add_workspace_flag, opened_store
from .output import format_ms, parse_when, print_json, table


def runs_query(args: argparse.Namespace, now: datetime) -> RunQuery:
    limit = args.limit
    if limit < 1 or limit > 100_000:
        raise ConfigError(f"--limit must be 1..100000, got {limit}")
    return RunQuery(
        workflow_id=args.workflow,
        status=args.status,
        trigger_source=args.trigger_source,
        since=parse_when(args.since, now),
        until=parse_when(args.until, now),
        limit=limit,
        after=decode_cursor(args.after) if getattr(args, "after", None) else None,
    )


def render_runs(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "no runs match"
    body = []
    for row in rows:
        trigger = row.get("trigger") or {}
        summary = row.get("summary") or {}
        body.append([
            row["runId"], row["workflowId"], row["status"], row["startedAt"],
            format_ms(row.get("totalDuration")),
            trigger.get("source") if trigger else None,
            summary.get("nodesExecuted"), summary.get("totalTokens"),
        ])
    return table(["RUN", "WORKFLOW", "STATUS", "STARTED (UTC)", "DURATION", "SOURCE",
                  "NODES", "TOKENS"], body)


async def cmd_runs(args: argparse.Namespace) -> int:
    workspace = check_workspace(args.workspace)
    query = runs_query(args, utcnow())
    async with opened_store(args, read_only=True) as store:
        rows, cursor = await list_runs_page(store, workspace, query)
    if args.json:
        print_json({"workspace": workspace, "runs": rows, "nextCursor": cursor})
    else:
        print(render_runs(rows))
        if cursor is not None:
            print(f"(more: --after {cursor})")
    return 0


def register(subparsers: Any) -> None:
    """Add ``runs`` to the ``audit-fleet`` command."""
    p = subparsers.add_parser("runs", help="list runs, newest first",
                              description="List runs of a workspace, newest first. Filters "
                              "use the store's indexes (workflow, status, trigger source).")
    add_store_flag(p)
    add_workspace_flag(p, required=True)
    p.add_argument("--workflow", help="only this workflow ID")
    p.add_argument("--status", help="only this status (running, completed, failed, ...)")
    p.add_argument("--trigger-source", help="only runs triggered from this source (gmail, ...)")
    p.add_argument("--since", help="started at or after: a duration back (7d) or a time")
    p.add_argument("--until", help="started before: a duration back (1h) or a time")
    p.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    p.add_argument("--after", metavar="CURSOR",
                   help="the next page: the cursor a previous page ended with")
    p.add_argument("--json", action="store_true", help="stable JSON instead of a table")
    p.set_defaults(func=cmd_runs)
