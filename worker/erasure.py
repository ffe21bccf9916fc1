"""Erasure of a data subject's personal data (GDPR Art. 17) from hot storage.

Producers tag runs with data subjects: a run-level ``subjects`` list of strings on
``run.started`` and ``run.snapshot`` (``"email:lead@example.com"``). The worker never
stores them in clear: :func:`hash_subjects` replaces them by keyed hashes
(HMAC-SHA256 with ``AUDIT_SUBJECT_KEY_FILE``'s key) before anything is written, and the
run document keeps the set of hashes (``subjects``, indexed where the store can).

:func:`erase` finds every run of a subject in a workspace and removes its personal fields
from hot storage — node ``input`` (prompts), ``output`` (raw model responses) and
``error``, the run's ``error``, and the paths ``AUDIT_PERSONAL_FIELDS`` names
(``worker.personal``) — through the stores' compare-and-strip operations,
so a document a late event changed meanwhile is left for the next pass, never
overwritten. Each erasure leaves an **erasure record** in the audit trail itself: a run
of workflow ``audit-fleet.erasure`` (``erasure-<id>``) whose ``erasureRequest`` says
what was asked, when and by whom, and whose ``erasureResult`` the counts; each erased
run is marked with ``erasure`` (id, time, who, fields), which ``explain`` shows.

Archived copies (:mod:`worker.archive`) are immutable and hash-chained. Where retention
archived them with a master key (:mod:`worker.shredding`), their personal fields are
encrypted with per-run data keys held in the store, and erasure **crypto-shreds** them:
after hot storage, it deletes the data keys of every run of the subject (hot ones and
those found in the archive), so the archived fields read as erased while every segment
stays byte-for-byte the same. Runs archived without encryption cannot be erased in the
archive: they are listed as *not erased* in the report and the record.

Crash-safe like retention: the record is written first (status ``running``), then a
tombstone for each run (``worker.shredding.tombstone``: a retention pass running meanwhile
then seals the run only under a key it shreds), then each run is marked and stripped,
then each run's data keys are shredded, then the record is completed. A rerun after a
crash at any step finds the running record of the same subject and resumes it: stripping
is idempotent and guarded by versions, storing a tombstone or shredding a shredded key
again does nothing, so everything is erased once and nothing that was not asked for is
touched.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import anyio

from .documents import SUBJECTS, RunPatch, WriteBatch
from .personal import DEFAULTS, PersonalFields, holds
from .shredding import TOMBSTONE, holds_personal, sealed_kids, tombstone
from .stores.base import NodeVersion, RunQuery, RunVersion, Store

if TYPE_CHECKING:  # the worker imports this module; it never reads archives
    from .archive import Archive

#: The workflow id of erasure records.
ERASURE_WORKFLOW: Final = "audit-fleet.erasure"
#: The run field marking an erased run (the first erasure's; later ones are in records).
MARK: Final = "erasure"
REQUEST: Final = "erasureRequest"
RESULT: Final = "erasureResult"
#: Personal fields always removed from hot storage (``worker.personal`` adds configured ones).
NODE_FIELDS: Final = ("error", "input", "output")
RUN_FIELDS: Final = ("error",)
#: Passes over a subject's runs while late writes keep changing them.
MAX_PASSES: Final = 3


def subject_hash(key: bytes, subject: str) -> str:
    """The keyed hash a subject identifier is stored as."""
    return hmac.digest(key, subject.encode(), "sha256").hex()


def hash_subjects(doc: dict[str, Any], key: bytes | None) -> None:
    """Replace a decoded event's ``subjects`` by keyed hashes (in place); without a key
    they are removed, never stored in clear."""
    raw = doc.pop(SUBJECTS, None)
    if key is None or not isinstance(raw, list):
        return
    hashes = sorted({subject_hash(key, s) for s in raw if isinstance(s, str)})
    if hashes:
        doc[SUBJECTS] = hashes


@dataclass(slots=True)
class ErasureReport:
    """What an erasure did (or, with ``dry_run``, would do)."""

    workspace: str
    subject_hash: str
    erasure_id: str | None
    dry_run: bool
    by: str
    at: datetime
    runs: list[str] = field(default_factory=list)
    nodes_erased: int = 0
    run_fields_erased: int = 0
    remaining: list[str] = field(default_factory=list)
    resumed: bool = False
    #: Runs of the subject with personal fields in clear in archive segments (run ID ->
    #: segment files): NOT erased (archived without a master key).
    archived: dict[str, list[str]] = field(default_factory=dict)
    #: Runs of the subject with encrypted fields in archive segments (run ID -> segments).
    sealed: dict[str, list[str]] = field(default_factory=dict)
    #: Data keys shredded by this pass (dry run: that would be), and the subject's data
    #: keys shredded in all (this pass and earlier, interrupted ones).
    keys_shredded: int = 0
    keys_shredded_total: int = 0
    #: The personal field paths erased (the defaults and the configured ones).
    fields: PersonalFields = DEFAULTS

    def to_json(self) -> dict[str, Any]:
        return {"workspace": self.workspace, "subjectHash": self.subject_hash,
                "erasureId": self.erasure_id, "dryRun": self.dry_run, "by": self.by,
                "at": self.at, "runs": self.runs, "nodesErased": self.nodes_erased,
                "runFieldsErased": self.run_fields_erased, "remaining": self.remaining,
                "resumed": self.resumed, "archivedNotErased": self.archived,
                "archivedShredded": self.sealed, "keysShredded": self.keys_shredded,
                "keysShreddedTotal": self.keys_shredded_total,
                "fields": self.fields.to_json()}


async def _open_record(store: Store, workspace: str, digest: str, by: str,
                       at: datetime, fields: PersonalFields) -> tuple[str, bool]:
    """The running erasure record of this subject (a crashed erasure), or a new one."""
    running = await store.list_runs(workspace, RunQuery(workflow_id=ERASURE_WORKFLOW,
                                                        status="running", limit=1000))
    for doc in running:
        request = doc.get(REQUEST)
        if isinstance(request, Mapping) and request.get("subjectHash") == digest:
            return str(doc["runId"]), True
    record = f"erasure-{uuid.uuid4().hex[:16]}"
    batch = WriteBatch()
    batch.add(RunPatch(
        workspace, record, ERASURE_WORKFLOW, started_at=at, event_ids={f"{record}:request"},
        trigger={"type": "erasure", "source": "audit-fleet erase"},
        extra={REQUEST: {"subjectHash": digest, "requestedBy": by,
                         "requestedAt": at.isoformat(),
                         "fields": fields.to_json()}},
    ), [])
    await store.write(batch)
    return record, False


def archived_runs(archive: Archive, workspace: str, digest: str,
                  fields: PersonalFields = DEFAULTS) -> tuple[
        dict[str, list[str]], dict[str, list[str]]]:
    """Runs of a subject in the archive's committed segments: those whose records hold
    personal fields in clear, and those with encrypted ones (run ID -> segment files).

    Archive segments are immutable and hash-chained: erasure does not change them; it
    shreds the data keys of the encrypted ones and reports the ones in clear."""
    mine: set[str] = set()
    held: list[tuple[str, str, bool, bool]] = []
    for segment, kind, doc in archive.records(workspace):
        run_id = str(doc["runId"])
        subjects = doc.get(SUBJECTS)
        if kind == "run" and isinstance(subjects, list) and digest in subjects:
            mine.add(run_id)
        held.append((segment, run_id, holds_personal(kind, doc, fields),
                     bool(sealed_kids(kind, doc))))
    plain: dict[str, list[str]] = {}
    sealed: dict[str, list[str]] = {}
    for segment, run_id, clear, secret in held:
        if run_id not in mine:
            continue
        for flag, found in ((clear, plain), (secret, sealed)):
            segments = found.setdefault(run_id, []) if flag else []
            if flag and segment not in segments:
                segments.append(segment)
    return dict(sorted(plain.items())), dict(sorted(sealed.items()))


async def erase(store: Store, workspace: str, subject: str, key: bytes, *, by: str,
                dry_run: bool = False, now: datetime | None = None,
                archive: Archive | None = None,
                fault: Callable[[str], None] | None = None,
                fields: PersonalFields = DEFAULTS) -> ErasureReport:
    """Erase ``subject``'s personal fields from every run of it in ``workspace``.

    Then the data keys of the subject's runs are shredded (crypto-shredding of their
    archived copies); with ``archive``, runs found only there are included, and runs
    archived in clear are reported (``archived``), not erased. ``fields`` are the personal
    field paths (``Settings.personal()``). ``fault`` is a test hook
    called with each step's name (raising there simulates a crash at that step).
    """
    at = now or datetime.now(UTC)
    digest = subject_hash(key, subject)
    step = fault or (lambda name: None)
    report = ErasureReport(workspace, digest, None, dry_run, by, at, fields=fields)
    # Hot storage first, then the archive: retention commits a segment before it deletes
    # what it holds, so a run a concurrent pass moves is found in one or the other.
    runs = [r for r in await store.runs_with_subject(workspace, digest)
            if r.get("workflowId") != ERASURE_WORKFLOW]
    if archive is not None:
        report.archived, report.sealed = await anyio.to_thread.run_sync(
            archived_runs, archive, workspace, digest, fields)
    report.runs = sorted(str(r["runId"]) for r in runs)
    keyed = sorted(set(report.runs) | set(report.sealed))
    if dry_run:
        for run in runs:
            nodes = await store.get_nodes(workspace, str(run["runId"]))
            report.nodes_erased += sum(1 for n in nodes if holds(n, fields.node))
            report.run_fields_erased += int(holds(run, fields.run))
        keys = await store.data_keys(workspace, keyed) if keyed else []
        report.keys_shredded = sum(1 for k in keys if k.wrapped is not None)
        return report
    record, report.resumed = await _open_record(store, workspace, digest, by, at, fields)
    report.erasure_id = record
    step("record")
    if keyed:  # before anything is stripped or shredded: see shredding.Sealer
        await store.put_data_keys(workspace, [tombstone(r, at) for r in keyed])
        step("tombstones")
    mark = {"id": record, "at": at.isoformat(), "by": by, "fields": fields.to_json()}
    pending = report.runs
    for _ in range(MAX_PASSES):
        left: list[str] = []
        for run_id in pending:
            if not await _erase_run(store, workspace, run_id, mark, report, step, fields):
                left.append(run_id)
        pending = left
        if not pending:
            break
    report.remaining = pending
    for run_id in keyed:  # crypto-shredding, after hot storage; idempotent
        report.keys_shredded += await store.shred_data_keys(workspace, [run_id], at)
        step("keys")
    if keyed:
        keys = await store.data_keys(workspace, keyed)
        report.keys_shredded_total = sum(1 for k in keys
                                         if k.wrapped is None and k.key_id != TOMBSTONE)
    done = datetime.now(UTC) if now is None else at
    batch = WriteBatch()
    batch.add(RunPatch(
        workspace, record, ERASURE_WORKFLOW, status="failed" if pending else "completed",
        completed_at=done, event_ids={f"{record}:result"},
        extra={RESULT: {"runs": report.runs, "nodesErased": report.nodes_erased,
                        "runFieldsErased": report.run_fields_erased,
                        "remaining": report.remaining, "completedAt": done.isoformat(),
                        "resumed": report.resumed, "archivedNotErased": report.archived,
                        "archivedShredded": report.sealed,
                        "keysShredded": report.keys_shredded_total}},
    ), [])
    step("result")
    await store.write(batch)
    return report


async def _erase_run(store: Store, workspace: str, run_id: str, mark: Mapping[str, Any],
                     report: ErasureReport, step: Callable[[str], None],
                     fields: PersonalFields) -> bool:
    """Mark one run, then strip its personal fields; False if something changed meanwhile."""
    run = await store.get_run(workspace, run_id)
    if run is None:  # deleted meanwhile (retention): nothing left to erase in hot storage
        return True
    if MARK not in run:
        batch = WriteBatch()
        batch.add(RunPatch(workspace, run_id, str(run["workflowId"]),
                           extra={MARK: dict(mark)}), [])
        await store.write(batch)
        step("mark")
        run = await store.get_run(workspace, run_id)
        if run is None:
            return True
    nodes = await store.get_nodes(workspace, run_id)
    holding = [NodeVersion.of(n) for n in nodes if holds(n, fields.node)]
    if holding:
        report.nodes_erased += await store.strip_node_fields(workspace, holding,
                                                             fields.names("node"))
        step("nodes")
    if holds(run, fields.run):
        report.run_fields_erased += await store.strip_run_fields(
            workspace, [RunVersion.of(run, nodes)], fields.names("run"))
        step("run")
    after = await store.get_nodes(workspace, run_id)
    again = await store.get_run(workspace, run_id)
    return not any(holds(n, fields.node) for n in after) and not (
        again is not None and holds(again, fields.run))
