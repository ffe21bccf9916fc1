"""``audit-fleet archive verify|list|restore``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import anyio

from ..archive import Archive, restore
from ..errors import ArchiveError, ConfigError
from ..queries import check_workspace
from ..shredding import Opener, ShredReport, load_opener, shred_report
from .common import add_store_flag, archive_dir, archive_master_key, opened_store
from .output import print_json, table


def _archive_dir(args: argparse.Namespace) -> str:
    location = archive_dir(args)
    if not location:
        raise ConfigError("--archive-dir (or AUDIT_ARCHIVE_DIR) is required")
    return str(location)


def _existing_archive(args: argparse.Namespace) -> tuple[Archive, str]:
    """The archive a read-only command names; a local directory that does not exist is an
    error (a typo must not read as "the archive is empty")."""
    location = _archive_dir(args)
    local = location[len("file://"):] if location.startswith("file://") else location
    if not location.startswith("s3://") and not Path(local).is_dir():
        raise ArchiveError(f"no archive at {location}: the directory does not exist "
                           "(check --archive-dir / AUDIT_ARCHIVE_DIR)")
    return Archive.at(location), location


def _selected(archive: Archive, args: argparse.Namespace, location: str) -> list[str]:
    """The workspaces to read: all of them, or ``--workspace``; none is an error."""
    present = archive.workspaces()
    if args.workspace:
        workspace = check_workspace(args.workspace)
        if workspace not in present:
            raise ArchiveError(f"the archive at {location} holds no workspace {workspace!r}")
        return [workspace]
    if not present:
        raise ArchiveError(f"the archive at {location} holds no workspace "
                           "(check --archive-dir / AUDIT_ARCHIVE_DIR)")
    return present


def _shred_report(archive: Archive, workspace: str, opener: Opener) -> ShredReport:
    return shred_report(archive.records(workspace), opener)


async def _shredding(args: argparse.Namespace, archive: Archive,
                     workspaces: list[str]) -> dict[str, ShredReport]:
    """With a store URL: per workspace, which encrypted records' data keys are shredded."""
    if not (getattr(args, "store_url", None) or os.environ.get("AUDIT_STORE_URL")):
        return {}
    out: dict[str, ShredReport] = {}
    async with opened_store(args, read_only=True) as store:
        for ws in workspaces:
            opener = await load_opener(store, None, ws)
            out[ws] = await anyio.to_thread.run_sync(_shred_report, archive, ws, opener)
    return out


async def cmd_verify(args: argparse.Namespace) -> int:
    archive, location = _existing_archive(args)
    selected = _selected(archive, args, location)
    reports = [await anyio.to_thread.run_sync(archive.verify, ws) for ws in selected]
    shredded = await _shredding(args, archive, [r.workspace for r in reports if r.ok])
    if args.json:
        print_json({"ok": all(r.ok for r in reports),
                     "workspaces": [r.to_json() | ({"erasure": shredded[r.workspace].to_json()}
                                                   if r.workspace in shredded else {})
                                    for r in reports]})
    else:
        for r in reports:
            state = "OK" if r.ok else "FAILED"
            print(f"{r.workspace}: {state}  {r.segments} segments, {r.records} records, "
                  f"head {r.head_seq} {r.head_hash[:16]}")
            for problem in r.problems:
                print(f"  ! {problem}")
            if r.workspace in shredded:
                for line in shredded[r.workspace].lines():
                    print(f"  erasure: {line}")
            for leftover in r.leftovers:
                print(f"  ~ uncommitted leftover (removed by the next retention run): {leftover}")
    return 0 if all(r.ok for r in reports) else 1


async def cmd_list(args: argparse.Namespace) -> int:
    archive, location = _existing_archive(args)
    out = []
    for ws in _selected(archive, args, location):
        for m in await anyio.to_thread.run_sync(archive.manifests, ws):
            out.append(m)
    if args.json:
        print_json({"segments": out})
    elif not out:
        print("no segments")
    else:
        print(table(["WORKSPACE", "SEQ", "PERIOD", "RUNS", "NODES", "ACCESS", "FROM", "TO",
                     "BYTES", "SHA-256"],
                    [[m["workspace"], m["seq"], m["period"], m["counts"]["runs"],
                      m["counts"]["nodes"], m["counts"].get("access", 0),
                      m["timeRange"]["from"], m["timeRange"]["to"], m["bytes"],
                      m["sha256"][:16]] for m in out]))
    return 0


async def cmd_restore(args: argparse.Namespace) -> int:
    archive = Archive.at(_archive_dir(args))
    workspace = check_workspace(args.workspace)
    if not args.segment and not args.run:
        raise ConfigError("archive restore needs --segment SEQ or --run RUN_ID")
    report = await anyio.to_thread.run_sync(archive.verify, workspace)
    if not report.ok and not args.force:
        raise ArchiveError("the archive does not verify (see archive verify); "
                           "--force restores anyway")
    async with opened_store(args) as store:
        opener = await load_opener(store, archive_master_key(), workspace)
        counts = await restore(store, archive, workspace, segments=args.segment or (),
                               run_ids=args.run or (), replace=args.replace,
                               opener=opener.open)
    if args.json:
        print_json({"workspace": workspace, "restored": counts})
    else:
        print(f"restored {counts['runs']} runs ({counts['nodes']} node traces) into the store")
    return 0


def register(subparsers: Any) -> None:
    """Add ``archive verify|list|restore`` to the ``audit-fleet`` command."""
    p = subparsers.add_parser("archive", help="verify, list and restore archive segments")
    sub = p.add_subparsers(dest="archive_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser, *, workspace_required: bool = False) -> None:
        q.add_argument("--archive-dir", metavar="DIR",
                       help="archive directory or s3://bucket/prefix (AUDIT_ARCHIVE_DIR)")
        q.add_argument("-w", "--workspace", required=workspace_required,
                       help="workspace ID" + ("" if workspace_required else " (default: all)"))
        q.add_argument("--json", action="store_true", help="stable JSON")

    verify = sub.add_parser("verify", help="check segments, manifests and the hash chain")
    common(verify)
    add_store_flag(verify)  # with a store: report crypto-shredded records
    verify.set_defaults(func=cmd_verify)
    listing = sub.add_parser("list", help="list committed segments")
    common(listing)
    listing.set_defaults(func=cmd_list)
    rest = sub.add_parser("restore", help="write archived runs back into the store")
    common(rest, workspace_required=True)
    add_store_flag(rest)
    rest.add_argument("--segment", type=int, action="append", metavar="SEQ",
                      help="restore every run of this segment (repeatable)")
    rest.add_argument("--run", action="append", metavar="RUN_ID",
                      help="restore this run (repeatable)")
    rest.add_argument("--replace", action="store_true",
                      help="delete the runs' hot copies first (exactly the archived version)")
    rest.add_argument("--force", action="store_true",
                      help="restore even if the archive does not verify")
    rest.set_defaults(func=cmd_restore)
