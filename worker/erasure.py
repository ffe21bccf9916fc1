"""Erasure of a data subject's personal data (GDPR Art. 17) from hot storage.

Producers tag runs with data subjects: a run-level ``subjects`` list of strings on
``run.started`` and ``run.snapshot`` (``"email:lead@example.com"``). The worker never
stores them in clear: :func:`hash_subjects` replaces them by keyed hashes
(HMAC-SHA256 with ``AUDIT_SUBJECT_KEY_FILE``'s key) before anything is written, and the
run document keeps the set of hashes (``subjects``, indexed where the store can).

:func:`erase` finds every run of a subject in a workspace and removes its personal fields
from hot storage — node ``input`` (prompts), ``output`` (raw model responses) and
``error``, and the run's ``error`` — through the stores' compare-and-strip operations,
so a document a late event changed meanwhile is left for the next pass, never
overwritten. Each erasure leaves an **erasure record** in the audit trail itself: a run
of workflow ``audit-fleet.erasure`` (``erasure-<id>``) whose ``erasureRequest`` says
what was asked, when and by whom, and whose ``erasureResult`` the counts; each erased
run is marked with ``erasure`` (id, time, who, fields), which ``explain`` shows.

Crash-safe like retention: the record is written first (status ``running``), then each
run is marked and stripped, then the record is completed. A rerun after a crash at any
step finds the running record of the same subject and resumes it: stripping is
idempotent and guarded by versions, so everything is erased once and nothing that was
not asked for is touched.
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
from .stores.base import NodeVersion, RunQuery, RunVersion, Store

if TYPE_CHECKING:  # the worker imports this module; it never reads archives
    from .archive import Archive

#: The workflow id of erasure records.
ERASURE_WORKFLOW: Final = "audit-fleet.erasure"
#: The run field marking an erased run (the first erasure's; later ones are in records).
MARK: Final = "erasure"
REQUEST: Final = "erasureRequest"
RESULT: Final = "erasureResult"
#: Personal fields removed from hot storage.
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
    #: Runs of the subject in archive segments (run ID -> segment files): NOT erased.
    archived: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"workspace": self.workspace, "subjectHash": self.subject_hash,
                "erasureId": self.erasure_id, "dryRun": self.dry_run, "by": self.by,
                "at": self.at, "runs": self.runs, "nodesErased": self.nodes_erased,
                "runFieldsErased": self.run_fields_erased, "remaining": self.remaining,
                "resumed": self.resumed, "archivedNotErased": self.archived,
                "fields": {"node": list(NODE_FIELDS), "run": list(RUN_FIELDS)}}


def _holds(doc: Mapping[str, Any], names: tuple[str, ...]) -> bool:
    return any(doc.get(name) is not None for name in names)


async def _open_record(store: Store, workspace: str, digest: str, by: str,
                       at: datetime) -> tuple[str, bool]:
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
                         "fields": {"node": list(NODE_FIELDS), "run": list(RUN_FIELDS)}}},
    ), [])
    await store.write(batch)
    return record, False


def archived_runs(archive: Archive, workspace: str, digest: str) -> dict[str, list[str]]:
    """Runs of a subject in the archive's committed segments (run ID -> segment files).

    Archive segments are immutable and hash-chained: erasure does not change them, it
    reports what they still hold."""
    found: dict[str, list[str]] = {}
    for segment, kind, doc in archive.records(workspace):
        subjects = doc.get(SUBJECTS)
        if kind == "run" and isinstance(subjects, list) and digest in subjects:
            segments = found.setdefault(str(doc["runId"]), [])
            if segment not in segments:
                segments.append(segment)
    return dict(sorted(found.items()))


async def erase(store: Store, workspace: str, subject: str, key: bytes, *, by: str,
                dry_run: bool = False, now: datetime | None = None,
                archive: Archive | None = None,
                fault: Callable[[str], None] | None = None) -> ErasureReport:
    """Erase ``subject``'s personal fields from every run of it in ``workspace``.

    With ``archive``, the subject's archived runs are reported (``archived``), not
    erased. ``fault`` is a test hook called with each step's name (raising there
    simulates a crash at that step).
    """
    at = now or datetime.now(UTC)
    digest = subject_hash(key, subject)
    step = fault or (lambda name: None)
    report = ErasureReport(workspace, digest, None, dry_run, by, at)
    if archive is not None:
        report.archived = await anyio.to_thread.run_sync(archived_runs, archive, workspace,
                                                         digest)
    runs = [r for r in await store.runs_with_subject(workspace, digest)
            if r.get("workflowId") != ERASURE_WORKFLOW]
    report.runs = sorted(str(r["runId"]) for r in runs)
    if dry_run:
        for run in runs:
            nodes = await store.get_nodes(workspace, str(run["runId"]))
            report.nodes_erased += sum(1 for n in nodes if _holds(n, NODE_FIELDS))
            report.run_fields_erased += int(_holds(run, RUN_FIELDS))
        return report
    record, report.resumed = await _open_record(store, workspace, digest, by, at)
    report.erasure_id = record
    step("record")
    mark = {"id": record, "at": at.isoformat(), "by": by,
            "fields": {"node": list(NODE_FIELDS), "run": list(RUN_FIELDS)}}
    pending = report.runs
    for _ in range(MAX_PASSES):
        left: list[str] = []
        for run_id in pending:
            if not await _erase_run(store, workspace, run_id, mark, report, step):
                left.append(run_id)
        pending = left
        if not pending:
            break
    report.remaining = pending
    done = datetime.now(UTC) if now is None else at
    batch = WriteBatch()
    batch.add(RunPatch(
        workspace, record, ERASURE_WORKFLOW, status="failed" if pending else "completed",
        completed_at=done, event_ids={f"{record}:result"},
        extra={RESULT: {"runs": report.runs, "nodesErased": report.nodes_erased,
                        "runFieldsErased": report.run_fields_erased,
                        "remaining": report.remaining, "completedAt": done.isoformat(),
                        "resumed": report.resumed, "archivedNotErased": report.archived}},
    ), [])
    step("result")
    await store.write(batch)
    return report


async def _erase_run(store: Store, workspace: str, run_id: str, mark: Mapping[str, Any],
                     report: ErasureReport, step: Callable[[str], None]) -> bool:
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
    holding = [NodeVersion.of(n) for n in nodes if _holds(n, NODE_FIELDS)]
    if holding:
        report.nodes_erased += await store.strip_node_fields(workspace, holding, NODE_FIELDS)
        step("nodes")
    if _holds(run, RUN_FIELDS):
        report.run_fields_erased += await store.strip_run_fields(
            workspace, [RunVersion.of(run, nodes)], RUN_FIELDS)
        step("run")
    after = await store.get_nodes(workspace, run_id)
    again = await store.get_run(workspace, run_id)
    return not any(_holds(n, NODE_FIELDS) for n in after) and not (
        again is not None and _holds(again, RUN_FIELDS))
