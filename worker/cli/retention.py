"""``audit-fleet retention plan|run``: the tiered retention policy."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..archive import Archive
from ..errors import ConfigError
from ..queries import check_workspace, utcnow
from ..retention import (
    Policy,
    WorkspaceReport,
    run_retention,
)
from ..settings import Settings
from ..stores.access import access_store
from .common import add_store_flag, archive_dir, archive_master_key, opened_store
from .output import format_time, parse_time, print_json, table


def render(reports: Sequence[WorkspaceReport], *, applied: bool, now: datetime) -> str:
    verb = "Done" if applied else "Plan"
    out = [f"{verb} at {format_time(now)} ({len(reports)} workspaces)"]
    rows = [[r.workspace, r.runs_examined, r.runs_affected, r.runs_archived, r.docs_archived,
             r.runs_deleted, r.nodes_deleted, r.prompts_stripped, r.errors_stripped,
             len(r.segments)] for r in reports]
    out.append(table(["WORKSPACE", "EXAMINED", "AFFECTED", "RUNS ARCHIVED", "DOCS ARCHIVED",
                      "RUNS DELETED", "NODES DELETED", "PROMPTS STRIPPED", "ERRORS STRIPPED",
                      "SEGMENTS"], rows))
    for r in reports:
        for m in r.segments:
            seq = f"#{m['seq']} " if m.get("seq") else ""
            access = m["counts"].get("access", 0)
            what = (f"{access} API access records" if access else
                    f"{m['counts']['runs']} runs, {m['counts']['nodes']} node docs")
            out.append(f"  {r.workspace}: segment {seq}{m['period']}: {what}"
                       + ("" if applied else " (to write)"))
        for key in r.recovered:
            out.append(f"  {r.workspace}: removed leftover of an interrupted run: {key}")
        if r.deferred:
            out.append(f"  {r.workspace}: {r.deferred} changes deferred to the next run "
                       "(documents changed after they were read)")
        if r.access_expired:
            archived = f", {r.access_archived} archived first" if r.access_archived else ""
            out.append(f"  {r.workspace}: {r.access_expired} API access records older than "
                       "the run summaries " + ("removed" if applied else "to remove")
                       + archived)
    return "\n".join(out)


async def _cmd(args: argparse.Namespace, apply: bool) -> int:
    policy = Policy.load(args.policy) if args.policy else Policy()
    now = parse_time(args.now) if args.now else utcnow()
    location = archive_dir(args)
    archive = Archive.at(location) if location else None
    if apply and archive is None and not args.no_archive:
        raise ConfigError("retention run needs --archive-dir (AUDIT_ARCHIVE_DIR), or "
                          "--no-archive to drop expired data without keeping it")
    workspaces = [check_workspace(args.workspace)] if args.workspace else []
    async with opened_store(args, read_only=not apply) as store:
        access = access_store(store)
        reports = await run_retention(store, policy, now=now, archive=archive, apply=apply,
                                      workspaces=workspaces, master=archive_master_key(),
                                      access=access,
                                      personal=Settings.from_env(metrics_port=0).personal())
    if args.json:
        print_json({"applied": apply, "now": now, "policy": policy.to_json(),
                     "workspaces": [r.to_json() for r in reports]})
    else:
        print(render(reports, applied=apply, now=now))
    return 0


async def cmd_plan(args: argparse.Namespace) -> int:
    return await _cmd(args, apply=False)


async def cmd_run(args: argparse.Namespace) -> int:
    return await _cmd(args, apply=True)


def register(subparsers: Any) -> None:
    """Add ``retention plan|run`` to the ``audit-fleet`` command."""
    p = subparsers.add_parser("retention", help="apply the tiered retention policy")
    sub = p.add_subparsers(dest="retention_command", metavar="ACTION", required=True)
    for name, func, text in (("plan", cmd_plan, "show what a retention run would do"),
                             ("run", cmd_run, "archive, then remove expired hot data")):
        q = sub.add_parser(name, help=text)
        add_store_flag(q)
        q.add_argument("-w", "--workspace", help="only this workspace (default: all)")
        q.add_argument("--policy", metavar="FILE", help="policy file, TOML or .json "
                       "(default: the design's 90/30/30/90 days)")
        q.add_argument("--archive-dir", metavar="DIR",
                       help="archive directory or s3://bucket/prefix (AUDIT_ARCHIVE_DIR)")
        q.add_argument("--now", metavar="ISO", help="evaluate ages at this time (default now)")
        q.add_argument("--json", action="store_true", help="stable JSON")
        if name == "run":
            q.add_argument("--no-archive", action="store_true",
                           help="drop expired data without archiving it")
        else:
            q.set_defaults(no_archive=False)
        q.set_defaults(func=func)
