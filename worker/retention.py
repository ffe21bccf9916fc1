"""``audit-fleet retention plan|run``: tiered retention of hot audit data, with archival.

Four data classes, each with its own time in hot storage (days; the design's defaults):

==================  =======  =========================================================
class               default  what expiry does in hot storage
==================  =======  =========================================================
``run_summaries``   90       the run document and everything left of the run go
``node_traces``     30       node documents go (a node holding error details stays
                             while ``error_details`` are kept); the run summary stays
``prompts``         30       ``input`` and ``output`` are stripped from node documents;
                             the rest of the trace stays
``error_details``   90       ``error`` is stripped from node and run documents
==================  =======  =========================================================

A run's age is measured from its ``completedAt`` (its ``startedAt`` if it never
completed), the same for all its classes, so a run moves through the tiers as one
unit. Before anything of a run is removed or stripped, the whole run as it is in hot
storage (run document and node documents) is written to an archive segment of its
workspace and period (:mod:`worker.archive`), committed and read back verified.

Crash safety and idempotence: a document is archived only if no committed segment
already holds it (up to the fields retention strips), and hot data is changed only
after the segment holding it is committed. A crash at any step leaves the hot copy
or a verified segment; the next run finishes the job without writing anything twice.

Concurrent writes: the workers keep merging events while retention runs. Hot data is
changed by compare-and-delete / compare-and-strip against the versions retention read
and archived (:class:`~worker.stores.RunVersion`, :class:`~worker.stores.NodeVersion`):
a document a late event changed after it was read is left as it is, counted as
deferred, and archived and changed by the next run.

The policy is a TOML or JSON file (see docs/retention.md)::

    period = "month"            # one segment per workspace and day|month
    [hot]
    run_summaries = 90
    node_traces = 30
    prompts = 30
    error_details = 90
    [workspaces.acme.hot]       # per-workspace overrides
    prompts = 7
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import anyio

from .archive import Archive, Catalog, Spool
from .errors import ConfigError
from .personal import DEFAULTS, PersonalFields
from .queries import (
    check_workspace,
)
from .shredding import MasterKey, Sealer, holds_personal, load_opener
from .stores import NodeQuery, NodeVersion, RetentionStore, RunVersion
from .stores.access import AccessStore

CLASSES: Final = ("run_summaries", "node_traces", "prompts", "error_details")
PROMPT_FIELDS: Final = ("input", "output")
ERROR_FIELDS: Final = ("error",)
PERIODS: Final = ("day", "month")
CHUNK: Final = 200


@dataclass(frozen=True, slots=True)
class HotDays:
    """Days each data class stays in hot storage; None keeps it forever."""

    run_summaries: int | None = 90
    node_traces: int | None = 30
    prompts: int | None = 30
    error_details: int | None = 90

    def validate(self, where: str) -> None:
        def days(name: str) -> float:
            value = getattr(self, name)
            return float("inf") if value is None else float(value)

        for name in CLASSES:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0):
                raise ConfigError(f"{where}.{name} must be a number of days >= 0 or "
                                  f"\"forever\", got {value!r}")
        if days("prompts") > days("node_traces"):
            raise ConfigError(f"{where}: prompts live in node traces, so prompts cannot be "
                              "kept longer than node_traces")
        for name in ("node_traces", "error_details"):
            if days(name) > days("run_summaries"):
                raise ConfigError(f"{where}: {name} cannot be kept longer than run_summaries")

    def shortest(self) -> int | None:
        values = [v for v in (getattr(self, n) for n in CLASSES) if v is not None]
        return min(values) if values else None


@dataclass(frozen=True, slots=True)
class Policy:
    """The retention policy: defaults, per-workspace overrides, archive period."""

    hot: HotDays = field(default_factory=HotDays)
    workspaces: Mapping[str, HotDays] = field(default_factory=dict)
    period: str = "month"

    def for_workspace(self, workspace: str) -> HotDays:
        return self.workspaces.get(workspace, self.hot)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> Policy:
        unknown = set(raw) - {"period", "hot", "workspaces"}
        if unknown:
            raise ConfigError(f"unknown retention policy keys: {', '.join(sorted(unknown))}")
        period = raw.get("period", "month")
        if period not in PERIODS:
            raise ConfigError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
        hot = _hot(HotDays(), raw.get("hot") or {}, "hot")
        overrides: dict[str, HotDays] = {}
        spaces = raw.get("workspaces") or {}
        if not isinstance(spaces, Mapping):
            raise ConfigError("workspaces must be a table of workspace IDs")
        for name, section in spaces.items():
            check_workspace(name)
            if not isinstance(section, Mapping) or set(section) - {"hot"}:
                raise ConfigError(f"workspaces.{name} may only hold a [hot] table")
            overrides[name] = _hot(hot, section.get("hot") or {}, f"workspaces.{name}.hot")
        return cls(hot, overrides, period)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        text = Path(path).read_bytes()
        try:
            is_json = str(path).endswith(".json")
            raw = json.loads(text) if is_json else tomllib.loads(text.decode())
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read retention policy {path}: {exc}") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"retention policy {path} must be a table/object")
        return cls.from_mapping(raw)

    def to_json(self) -> dict[str, Any]:
        def days(h: HotDays) -> dict[str, Any]:
            return {n: getattr(h, n) if getattr(h, n) is not None else "forever"
                    for n in CLASSES}

        return {"period": self.period, "hot": days(self.hot),
                "workspaces": {k: {"hot": days(v)} for k, v in sorted(self.workspaces.items())}}


def _hot(base: HotDays, raw: Any, where: str) -> HotDays:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = set(raw) - set(CLASSES)
    if unknown:
        raise ConfigError(f"{where}: unknown data classes {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(CLASSES)})")
    values = {k: (None if v in ("forever", None) else v) for k, v in raw.items()}
    hot = replace(base, **values)
    hot.validate(where)
    return hot


# -- planning --------------------------------------------------------------------------------

def run_age_time(run: Mapping[str, Any]) -> datetime | None:
    """The time a run's age is measured from: completedAt, else startedAt."""
    for name in ("completedAt", "startedAt"):
        value = run.get(name)
        if isinstance(value, datetime):
            return value
    return None


def period_of(when: datetime, period: str) -> str:
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%d") if period == "day" else when.strftime("%Y-%m")


@dataclass(slots=True)
class RunAction:
    """What retention does to one run in hot storage."""

    run_id: str
    period: str
    expired: tuple[str, ...]
    delete_run: bool = False
    delete_nodes: list[str] = field(default_factory=list)
    strip_prompts: list[str] = field(default_factory=list)
    strip_node_errors: list[str] = field(default_factory=list)
    strip_run_error: bool = False
    archive: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: The run and node documents as read (and archived): hot changes apply only to
    #: documents still at these versions.
    version: RunVersion | None = None

    def run_version(self) -> RunVersion:
        if self.version is None:
            raise ValueError(f"run {self.run_id!r}: no version read, so nothing to change")
        return self.version

    def node_versions(self, keys: Sequence[str]) -> list[NodeVersion]:
        nodes = {v.node_key: v for v in self.run_version().nodes}
        return [nodes[key] for key in keys]

    @property
    def changes_hot(self) -> bool:
        return bool(self.delete_run or self.delete_nodes or self.strip_prompts
                    or self.strip_node_errors or self.strip_run_error)


def decide(run: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], hot: HotDays,
           now: datetime, period: str, catalog: Catalog | None) -> RunAction | None:
    """The action for one run (pure). ``catalog`` None means "archive nothing"."""
    when = run_age_time(run)
    if when is None:
        return None
    age = now - when
    expired = tuple(n for n in CLASSES if getattr(hot, n) is not None
                    and age >= timedelta(days=getattr(hot, n)))
    if not expired:
        return None
    action = RunAction(str(run["runId"]), period_of(when, period), expired)
    if "run_summaries" in expired:
        action.delete_run = True
    else:
        nodes_gone = "node_traces" in expired
        errors_gone = "error_details" in expired
        prompts_gone = "prompts" in expired
        for node in nodes:
            key = str(node["nodeKey"])
            has_error = node.get("error") is not None
            if nodes_gone and (errors_gone or not has_error):
                action.delete_nodes.append(key)
                continue
            if prompts_gone and any(node.get(f) is not None for f in PROMPT_FIELDS):
                action.strip_prompts.append(key)
            if errors_gone and has_error:
                action.strip_node_errors.append(key)
        action.strip_run_error = errors_gone and run.get("error") is not None
    if action.changes_hot and catalog is not None:
        docs = [("run", dict(run))] + [("node", dict(n)) for n in nodes]
        action.archive = [(k, d) for k, d in docs if not catalog.covers(k, d)]
    return action if action.changes_hot else None


@dataclass(slots=True)
class WorkspaceReport:
    """What a retention pass did (or would do) in one workspace."""

    workspace: str
    hot: HotDays
    runs_examined: int = 0
    runs_affected: int = 0
    docs_archived: int = 0
    runs_archived: int = 0
    runs_deleted: int = 0
    nodes_deleted: int = 0
    prompts_stripped: int = 0
    errors_stripped: int = 0
    #: Hot changes skipped because the document changed after it was read (late events):
    #: the next run archives the new version and makes them.
    deferred: int = 0
    #: API access records older than the run-summary horizon, removed (or to remove)...
    access_expired: int = 0
    #: ...of which written to archive segments now (or to write; the others already were).
    access_archived: int = 0
    segments: list[dict[str, Any]] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "workspace": self.workspace,
            "hotDays": {n: getattr(self.hot, n) for n in CLASSES},
            "runsExamined": self.runs_examined,
            "runsAffected": self.runs_affected,
            "runsArchived": self.runs_archived,
            "docsArchived": self.docs_archived,
            "runsDeleted": self.runs_deleted,
            "nodesDeleted": self.nodes_deleted,
            "promptsStripped": self.prompts_stripped,
            "errorsStripped": self.errors_stripped,
            "deferred": self.deferred,
            "accessRecordsExpired": self.access_expired,
            "accessRecordsArchived": self.access_archived,
            "segments": [{"seq": m.get("seq"), "period": m["period"],
                          "runs": m["counts"]["runs"], "nodes": m["counts"]["nodes"],
                          "access": m["counts"].get("access", 0),
                          "sha256": m.get("sha256")} for m in self.segments],
            "recovered": self.recovered,
        }


@dataclass(slots=True)
class Retention:
    """One retention pass over a store (``apply=False`` only plans)."""

    store: RetentionStore
    policy: Policy
    now: datetime
    archive: Archive | None
    apply: bool = False
    #: Test hook: called with a step name; raising there simulates a crash.
    fault: Callable[[str], None] | None = None
    #: With a master key, archived personal fields are encrypted (``worker.shredding``).
    master: MasterKey | None = None
    _sealer: Sealer | None = None
    #: The store's API access log, retained like run summaries (None: untouched).
    access: AccessStore | None = None
    #: The personal field paths sealed in archived records (``worker.personal``).
    personal: PersonalFields = DEFAULTS

    def _step(self, name: str) -> None:
        if self.fault is not None:
            self.fault(name)

    async def workspace(self, workspace: str) -> WorkspaceReport:
        hot = self.policy.for_workspace(workspace)
        report = WorkspaceReport(workspace, hot)
        shortest = hot.shortest()
        if shortest is None:
            return report
        if self.archive is None:  # a plan shows what a run with an empty archive would write
            catalog = None if self.apply else Catalog()
            await self._pass(workspace, hot, shortest, report, catalog)
            await self._access(workspace, report, catalog)
            return report
        archive = self.archive
        self._sealer = None if self.master is None else Sealer(self.store, self.master,
                                                               workspace, self.personal)
        if not self.apply:
            catalog = await self._catalog(archive, workspace)
            await self._pass(workspace, hot, shortest, report, catalog)
            await self._access(workspace, report, catalog)
            return report
        with archive.blobs.lock(workspace):
            report.recovered = await anyio.to_thread.run_sync(archive.recover, workspace)
            catalog = await self._catalog(archive, workspace)
            await self._pass(workspace, hot, shortest, report, catalog)
            await self._access(workspace, report, catalog)
            return report

    async def _access(self, workspace: str, report: WorkspaceReport,
                      catalog: Catalog | None) -> None:
        """Access records are kept as long as run summaries (the same horizon): those older
        are written to archive segments (one per period of their time), committed and
        verified, and only then deleted from the store; without an archive, deleted."""
        days = report.hot.run_summaries
        if self.access is None or days is None:
            return
        before = self.now - timedelta(days=days)
        records = await self.access.access_log(workspace, until=before)
        if catalog is None:  # retention run --no-archive
            report.access_expired = await self.access.expire_access(workspace, before)
            return
        report.access_expired = len(records)
        periods: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            doc = record.to_json()
            if not catalog.covers("access", doc):  # not in a committed segment yet
                periods.setdefault(period_of(record.at, self.policy.period), []).append(doc)
        report.access_archived = sum(len(docs) for docs in periods.values())
        for period, docs in sorted(periods.items()):
            if not self.apply or self.archive is None:
                report.segments.append({"period": period, "counts": {
                    "runs": 0, "nodes": 0, "access": len(docs)}})
                continue
            spool = self.archive.spool(workspace)
            try:
                for doc in docs:
                    spool.add("access", doc)
                manifest = await anyio.to_thread.run_sync(self.archive.append, workspace,
                                                          period, spool)
            except BaseException:
                spool.discard()
                raise
            report.segments.append(manifest)
            for doc in docs:
                catalog.add("access", doc)
        if self.apply and records:
            report.access_expired = await self.access.delete_access(
                workspace, [r.record_id for r in records])
            self._step("access")

    async def _catalog(self, archive: Archive, workspace: str) -> Catalog:
        """What the archive holds, decrypted where it can be (to compare with hot data)."""
        if self.master is None:
            return await anyio.to_thread.run_sync(archive.catalog, workspace)
        opener = await load_opener(self.store, self.master, workspace)
        return await anyio.to_thread.run_sync(archive.catalog, workspace, opener.open)

    async def _pass(self, workspace: str, hot: HotDays, shortest: int,
                    report: WorkspaceReport, catalog: Catalog | None) -> None:
        before = self.now - timedelta(days=shortest)
        periods: dict[str, list[dict[str, Any]]] = {}
        async for run in self.store.scan_runs(workspace, before):
            when = run_age_time(run)
            if when is None:
                continue
            report.runs_examined += 1
            periods.setdefault(period_of(when, self.policy.period), []).append(run)
        for period in sorted(periods):
            runs = sorted(periods[period], key=lambda r: (run_age_time(r), str(r["runId"])))
            await self._period(workspace, hot, period, runs, report, catalog)

    async def _period(self, workspace: str, hot: HotDays, period: str,
                      runs: list[dict[str, Any]], report: WorkspaceReport,
                      catalog: Catalog | None) -> None:
        actions: list[RunAction] = []
        spool: Spool | None = None
        if self.apply and self.archive is not None:
            spool = self.archive.spool(workspace)
        try:
            for start in range(0, len(runs), CHUNK):
                chunk = runs[start:start + CHUNK]
                nodes: dict[str, list[dict[str, Any]]] = {str(r["runId"]): [] for r in chunk}
                query = NodeQuery(run_ids=tuple(nodes))
                async for node in self.store.scan_nodes(workspace, query):
                    nodes.setdefault(str(node["runId"]), []).append(node)
                fresh: list[RunAction] = []
                for run in chunk:
                    mine = sorted(nodes[str(run["runId"])], key=lambda n: str(n["nodeKey"]))
                    action = decide(run, mine, hot, self.now,
                                    self.policy.period, catalog)
                    if action is None:
                        continue
                    action.version = RunVersion.of(run, mine)
                    fresh.append(action)
                    self._count(action, report)
                actions.extend(fresh)
                if spool is not None:
                    await self._spool(fresh, spool)
            if spool is not None and len(spool):
                assert self.archive is not None
                assert catalog is not None
                manifest = await anyio.to_thread.run_sync(self.archive.append, workspace,
                                                          period, spool)
                report.segments.append(manifest)
                for action in actions:
                    for kind, doc in action.archive:
                        catalog.add(kind, doc)
            elif spool is not None:
                spool.discard()
            elif not self.apply and any(a.archive for a in actions):
                runs_in = sum(1 for a in actions if a.archive)
                docs = sum(len(a.archive) for a in actions)
                report.segments.append({"period": period, "counts": {
                    "runs": runs_in, "nodes": docs - sum(
                        1 for a in actions for k, _ in a.archive if k == "run")}})
        except BaseException:
            if spool is not None:
                spool.discard()
            raise
        if self.apply:
            await self._apply(workspace, actions, report)

    async def _spool(self, actions: list[RunAction], spool: Spool) -> None:
        """Add the actions' documents to the segment, personal fields sealed with their
        runs' data keys (stored first) when a master key is configured."""
        sealer = self._sealer
        if sealer is not None:
            await sealer.prepare(a.run_id for a in actions
                                 if any(holds_personal(k, d, self.personal)
                                        for k, d in a.archive))
            self._step("keys")
        for action in actions:
            for kind, doc in action.archive:
                spool.add(kind, doc if sealer is None else sealer.seal(kind, doc))

    def _count(self, action: RunAction, report: WorkspaceReport) -> None:
        report.runs_affected += 1
        report.docs_archived += len(action.archive)
        report.runs_archived += 1 if action.archive else 0
        report.runs_deleted += 1 if action.delete_run else 0
        report.nodes_deleted += len(action.delete_nodes)
        report.prompts_stripped += len(action.strip_prompts)
        report.errors_stripped += len(action.strip_node_errors) + int(action.strip_run_error)

    async def _apply(self, workspace: str, actions: list[RunAction],
                     report: WorkspaceReport) -> None:
        """Change hot storage (only after the period's segment is committed and verified),
        each document only while it is still the version read and archived."""
        store = self.store

        def deferred(wanted: int, done: int) -> int:
            report.deferred += wanted - done
            return wanted - done

        for start in range(0, len(actions), CHUNK):
            part = actions[start:start + CHUNK]
            runs = [a.run_version() for a in part if a.delete_run]
            if runs:
                done = await store.delete_runs(workspace, [v.run_id for v in runs],
                                               expected=runs)
                report.runs_deleted -= deferred(len(runs), done)
            nodes = [v for a in part for v in a.node_versions(a.delete_nodes)]
            if nodes:
                done = await store.delete_nodes(workspace, nodes)
                report.nodes_deleted -= deferred(len(nodes), done)
            nodes = [v for a in part for v in a.node_versions(a.strip_prompts)]
            if nodes:
                done = await store.strip_node_fields(workspace, nodes, PROMPT_FIELDS)
                report.prompts_stripped -= deferred(len(nodes), done)
            nodes = [v for a in part for v in a.node_versions(a.strip_node_errors)]
            if nodes:
                done = await store.strip_node_fields(workspace, nodes, ERROR_FIELDS)
                report.errors_stripped -= deferred(len(nodes), done)
            runs = [a.run_version() for a in part if a.strip_run_error]
            if runs:
                done = await store.strip_run_fields(workspace, runs, ERROR_FIELDS)
                report.errors_stripped -= deferred(len(runs), done)
            self._step("hot")


async def run_retention(store: RetentionStore, policy: Policy, *, now: datetime,
                        archive: Archive | None, apply: bool,
                        workspaces: Sequence[str] = (),
                        fault: Callable[[str], None] | None = None,
                        master: MasterKey | None = None,
                        access: AccessStore | None = None,
                        personal: PersonalFields = DEFAULTS) -> list[WorkspaceReport]:
    """Plan (``apply=False``) or run a retention pass over some or all workspaces;
    with ``master``, archived personal fields are encrypted (crypto-shreddable)."""
    if archive is not None and fault is not None:
        archive.fault = fault
    job = Retention(store, policy, now, archive, apply, fault, master, access=access,
                    personal=personal)
    names = list(workspaces) or await store.workspaces()
    return [await job.workspace(ws) for ws in names]


# -- CLI -------------------------------------------------------------------------------------


