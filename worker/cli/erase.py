"""``audit-fleet erase``: erase a data subject's personal data from hot storage."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from ..archive import Archive
from ..erasure import ErasureReport, erase
from ..errors import ConfigError
from ..queries import check_workspace
from ..settings import Settings
from .common import add_store_flag, archive_dir, opened_store
from .output import escape_text, print_json


def render(report: ErasureReport) -> str:
    verb = "would erase" if report.dry_run else "erased"
    fields = ", ".join([f"node {f}" for f in report.fields.names("node")]
                       + [f"run {f}" for f in report.fields.names("run")])
    lines = [
        f"{'Dry run: ' if report.dry_run else ''}subject {report.subject_hash[:16]}… in "
        f"workspace {report.workspace}: {len(report.runs)} run(s)",
        f"  {verb} {report.nodes_erased} node trace(s) and {report.run_fields_erased} run "
        f"document(s) ({fields})",
    ]
    for run_id in report.runs:
        lines.append(f"  - {escape_text(run_id)}")
    if report.erasure_id:
        lines.append(f"  erasure record: run {report.erasure_id} (workflow audit-fleet.erasure)"
                     + (", resumed" if report.resumed else ""))
    if report.sealed or report.keys_shredded:
        verb = "would shred" if report.dry_run else "crypto-shredded"
        lines.append(f"  {verb} {report.keys_shredded} data key(s) now"
                     + ("" if report.dry_run else f", {report.keys_shredded_total} in all")
                     + f": {len(report.sealed)} archived run(s) of the subject read as erased")
        for run_id, segments in report.sealed.items():
            lines.append(f"    - {escape_text(run_id)} in {', '.join(segments)}")
    if report.archived:
        lines.append(f"  ! NOT erased: {len(report.archived)} archived run(s) of the subject "
                     "hold personal fields in clear (archived without "
                     "AUDIT_ARCHIVE_MASTER_KEY_FILE; segments are immutable):")
        for run_id, segments in report.archived.items():
            lines.append(f"    - {escape_text(run_id)} in {', '.join(segments)}")
    if report.remaining:
        lines.append(f"  ! still changing, rerun to finish: {', '.join(report.remaining)}")
    return "\n".join(lines)


async def cmd_erase(args: argparse.Namespace) -> int:
    workspace = check_workspace(args.workspace)
    settings = Settings.from_env(metrics_port=0)
    if settings.subject_key is None:
        raise ConfigError("erase needs AUDIT_SUBJECT_KEY_FILE (the key subjects are hashed with)")
    by = args.by or getpass.getuser()
    location = archive_dir(args)
    archive = Archive.at(location) if location else None
    async with opened_store(args) as store:
        report = await erase(store, workspace, args.subject, settings.subject_key, by=by,
                             dry_run=args.dry_run, archive=archive,
                             fields=settings.personal())
    if args.json:
        print_json(report.to_json())
    else:
        print(render(report))
    return 1 if report.remaining else 0


def register(subparsers: Any) -> None:
    """Add ``erase`` to the ``audit-fleet`` command."""
    p = subparsers.add_parser(
        "erase", help="erase a data subject's personal data (GDPR Art. 17)",
        description="Remove prompts, raw outputs, errors and the personal fields "
        "AUDIT_PERSONAL_FIELDS names of every run tagged with the subject from hot "
        "storage, shred the data keys of its archived copies, and leave an erasure record "
        "in the audit trail.")
    add_store_flag(p)
    p.add_argument("-w", "--workspace", required=True, help="workspace ID")
    p.add_argument("--subject", required=True, help="the subject as producers tag it "
                   "(email:lead@example.com)")
    p.add_argument("--by", help="who asks (recorded; default: the OS user)")
    p.add_argument("--dry-run", action="store_true", help="show what would be erased")
    p.add_argument("--archive-dir", metavar="DIR", help="also find the subject's archived "
                   "runs: shred their data keys, list those archived in clear "
                   "(AUDIT_ARCHIVE_DIR)")
    p.add_argument("--json", action="store_true", help="stable JSON")
    p.set_defaults(func=cmd_erase)
