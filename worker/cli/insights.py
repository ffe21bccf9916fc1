"""``audit-fleet insights``: the improvement queries as tables or JSON."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..insights import (
    DEFAULT_LIMIT,
    DEFAULT_THRESHOLD,
    compute,
)
from ..queries import check_workspace, utcnow
from .common import add_store_flag, opened_store
from .output import escape_text, parse_when, print_json, table


def render(result: Mapping[str, Any]) -> str:
    """Readable tables of an insights result."""
    window = result["window"]
    out = [f"Insights for workspace {result.get('workspace', '?')}: "
           f"{result['nodesScanned']} node executions, started "
           f"{window['since'] or 'any time'} .. {window['until'] or 'now'}", ""]
    low = result["lowConfidence"]
    out.append(f"Low-confidence AI decisions (confidence < {low['threshold']}): {low['count']}")
    if low["items"]:
        out.append(table(["CONFIDENCE", "RUN", "WORKFLOW", "NODE", "MODEL", "STARTED"],
                         [[i["confidence"], i["runId"], i["workflowId"], i["nodeId"],
                           i["model"], i["startedAt"]] for i in low["items"]]))
    out.append("")
    out.append("Slowest nodes (nearest-rank percentiles, ms):")
    out.append(table(["WORKFLOW", "NODE", "COUNT", "P50", "P95", "MAX"],
                     [[s["workflowId"], s["nodeId"], s["count"], s["p50Ms"], s["p95Ms"],
                       s["maxMs"]] for s in result["slowestNodes"]])
               if result["slowestNodes"] else "  none")
    out.append("")
    errors = result["errorGroups"]
    out.append(f"Error groups ({errors['total']} errors):")
    out.append(table(["TYPE", "COUNT", "SHARE", "RETRIES"],
                     [[g["type"], g["count"], f"{g['share'] * 100:.1f}%", g["retries"]]
                      for g in errors["groups"]]) if errors["groups"] else "  none")
    out.append("")
    out.append("Default-branch hits per conditional:")
    out.append(table(["WORKFLOW", "NODE", "EVALUATIONS", "DEFAULT HITS", "SHARE"],
                     [[b["workflowId"], b["nodeId"], b["evaluations"], b["defaultHits"],
                       f"{b['share'] * 100:.1f}%"] for b in result["defaultBranches"]])
               if result["defaultBranches"] else "  none")
    out.append("")
    usage = result["tokenUsage"]
    out.append("Token usage per model:")
    out.append(table(["MODEL", "CALLS", "INPUT", "OUTPUT", "TOTAL"],
                     [[u["model"], u["calls"], u["input"], u["output"], u["total"]]
                      for u in usage["byModel"]]) if usage["byModel"] else "  none")
    out.append("")
    out.append("Token usage per workflow:")
    out.append(table(["WORKFLOW", "CALLS", "INPUT", "OUTPUT", "TOTAL"],
                     [[u["workflowId"], u["calls"], u["input"], u["output"], u["total"]]
                      for u in usage["byWorkflow"]]) if usage["byWorkflow"] else "  none")
    return "\n".join(out)


async def cmd_insights(args: argparse.Namespace) -> int:
    workspace = check_workspace(args.workspace)
    now = utcnow()
    if not 0 < args.limit <= 100_000:
        from ..errors import ConfigError

        raise ConfigError(f"--limit must be 1..100000, got {args.limit}")
    async with opened_store(args, read_only=True) as store:
        result = await compute(store, workspace, since=parse_when(args.since, now),
                               until=parse_when(args.until, now),
                               threshold=args.confidence_threshold, limit=args.limit)
    if args.json:
        print_json(result)
    else:
        print(escape_text(render(result), keep_newlines=True))
    return 0


def register(subparsers: Any) -> None:
    """Add ``insights`` to the ``audit-fleet`` command."""
    p = subparsers.add_parser(
        "insights", help="improvement queries: low confidence, slow nodes, errors, tokens",
        description="The design's improvement queries over a workspace's node executions "
        "(see docs/queries.md for the exact definitions).")
    add_store_flag(p)
    p.add_argument("-w", "--workspace", required=True, help="workspace ID")
    p.add_argument("--since", default="30d",
                   help="nodes started at or after: a duration back or a time (default 30d)")
    p.add_argument("--until", help="nodes started before: a duration back or a time")
    p.add_argument("--confidence-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="AI decisions below this confidence are listed (default 0.7)")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help="at most this many low-confidence decisions listed (default 100)")
    p.add_argument("--json", action="store_true", help="stable JSON (insightsVersion 1)")
    p.set_defaults(func=cmd_insights)
