"""``audit-fleet tokens create|list|revoke`` and ``audit-fleet access-log``: who may read
the API, and who read which prompts (the logic is in :mod:`worker.api.tokens` and
:mod:`worker.stores.access`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio

from ..errors import AuditFleetError
from ..queries import check_workspace, dumps, jsonable, utcnow
from ..stores.access import AccessRecord, access_store
from .common import add_store_flag, archive_dir, opened_store
from .output import parse_when, table


async def cmd_tokens_create(args: argparse.Namespace) -> int:
    from ..api.tokens import new_token, parse_scopes, parse_workspaces

    workspaces = parse_workspaces(args.workspace)
    scopes = parse_scopes(args.scope)
    token, record = new_token(workspaces, scopes, now=utcnow(), label=args.label)
    async with opened_store(args) as store:
        access = access_store(store)
        await access.add_token(record)
    print(f"token {record.token_id} for {', '.join(workspaces)} with {', '.join(scopes)}"
          " (shown once; only its SHA-256 digest is stored):")
    print(token)
    return 0


async def cmd_tokens_list(args: argparse.Namespace) -> int:
    async with opened_store(args, read_only=True) as store:
        access = access_store(store)
        tokens = await access.list_tokens()
    if args.json:
        print(dumps({"tokens": [t.to_json() for t in tokens]}))
        return 0
    if not tokens:
        print("no tokens")
        return 0
    print(table(["TOKEN", "WORKSPACES", "SCOPES", "LABEL", "CREATED (UTC)", "REVOKED (UTC)"],
                [[t.token_id, ",".join(t.workspaces), ",".join(t.scopes), t.label,
                  t.created_at, t.revoked_at] for t in tokens]))
    return 0


async def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    async with opened_store(args) as store:
        access = access_store(store)
        done = await access.revoke_token(args.token_id, utcnow())
    if not done:
        raise AuditFleetError(f"no active token {args.token_id!r}")
    print(f"token {args.token_id} revoked")
    return 0


async def cmd_access_log(args: argparse.Namespace) -> int:
    workspace = check_workspace(args.workspace)
    now = utcnow()
    since, until = parse_when(args.since, now), parse_when(args.until, now)
    async with opened_store(args, read_only=True) as store:
        access = access_store(store)
        records = await access.access_log(workspace, since=since, until=until)
    location = archive_dir(args)
    if location:  # with the records retention moved to the archive (verified segments)
        from ..archive import Archive, access_docs

        docs = await anyio.to_thread.run_sync(access_docs, Archive.at(location), workspace)
        archived = [AccessRecord.from_json(d) for d in docs]
        unique = {r.record_id: r for r in [*archived, *records]
                  if (since is None or r.at >= since) and (until is None or r.at < until)}
        records = sorted(unique.values(), key=lambda r: (r.at, r.record_id))
    if args.format == "jsonl":
        out = sys.stdout
        for r in records:
            out.write(dumps(jsonable(r.to_json()), indent=None) + "\n")
        return 0
    if not records:
        print("no access records")
        return 0
    print(table(["WHEN (UTC)", "TOKEN", "RUN", "NODE", "ATTEMPT", "FIELDS", "SOURCE"],
                [[r.at, r.token_id, r.run_id, r.node_id, r.attempt, ",".join(r.fields),
                  r.source] for r in records]))
    return 0


def register(subparsers: Any) -> None:
    """Add ``tokens`` and ``access-log`` to the ``audit-fleet`` command."""
    t = subparsers.add_parser("tokens", help="create, list and revoke read-API tokens")
    sub = t.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="make a token (printed once, as the last line)")
    add_store_flag(c)
    c.add_argument("-w", "--workspace", action="append", required=True,
                   help="workspace the token may read (repeat or comma-separate for several)")
    c.add_argument("--scope", default="runs:read",
                   help="runs:read (default) or runs:read,prompts:read")
    c.add_argument("--label", help="a note for tokens list (who or what holds it)")
    c.set_defaults(func=cmd_tokens_create)
    lst = sub.add_parser("list", help="list tokens (never the tokens themselves)")
    add_store_flag(lst)
    lst.add_argument("--json", action="store_true", help="stable JSON")
    lst.set_defaults(func=cmd_tokens_list)
    r = sub.add_parser("revoke", help="revoke a token at once")
    add_store_flag(r)
    r.add_argument("token_id", metavar="TOKEN_ID", help="the ID tokens list shows")
    r.set_defaults(func=cmd_tokens_revoke)

    a = subparsers.add_parser(
        "access-log", help="who read which prompts and outputs",
        description="The access records of a workspace: every read of a prompt or raw "
        "output through the read API or viewer, oldest first.")
    add_store_flag(a)
    a.add_argument("-w", "--workspace", required=True, help="workspace ID")
    a.add_argument("--since", help="at or after: a duration back (7d) or a time")
    a.add_argument("--until", help="before: a duration back or a time")
    a.add_argument("--format", choices=("table", "jsonl"), default="table",
                   help="table (default) or JSON lines")
    a.add_argument("--archive-dir", metavar="DIR", help="also the records retention moved to "
                   "this archive (AUDIT_ARCHIVE_DIR)")
    a.set_defaults(func=cmd_access_log)
