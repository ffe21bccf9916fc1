"""Verifiable archives: gzip JSONL segments, manifests and a hash chain per workspace.

Layout (keys of a :class:`BlobStore`; the local implementation maps them to files)::

    <workspace>/HEAD.json                            the chain head: last seq + chain hash
    <workspace>/<seq:08d>-<period>.jsonl.gz          a segment: one record per line
    <workspace>/<seq:08d>-<period>.manifest.json     its manifest

A record is ``{"kind": "run" | "node" | "access", "doc": {...}}``: a run or node document
exactly as the store returned it, or an API access record (``AccessRecord.to_json``,
archived when retention removes the run summaries of its time), times as RFC 3339 UTC
strings. A manifest holds the
segment's counts, time range, size and SHA-256, the previous manifest's chain hash,
and its own chain hash: the SHA-256 of the manifest's canonical JSON without that
field. ``HEAD.json`` names the last committed segment and its chain hash, so
:meth:`Archive.verify` detects a changed byte (segment SHA-256, manifest chain hash),
a removed segment in the middle (sequence gap, broken link) and a removed last
segment (HEAD ahead of the manifests).

Appending a segment (:meth:`Archive.append`) is crash-safe: the segment is spooled
to a temporary file, fsynced and renamed into place (and the directory fsynced),
then the manifest, then HEAD, which is the commit point; then the segment is read
back and verified. Files of a sequence number above HEAD are leftovers of an
interrupted append and are removed by :meth:`Archive.recover` before the next
append. Only after a verified commit does retention delete anything from hot storage.

Backends implement the :class:`BlobStore` protocol: atomic ``put_file``/``put_bytes``
(a whole object or nothing), ``get_bytes``, ``list``, ``delete``, a local ``scratch``
folder and a per-workspace writer ``lock``. :class:`LocalBlobStore` is a directory;
:class:`S3BlobStore` an S3-compatible bucket through boto3 (``audit-fleet[s3]``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Final

import anyio

from .archive_blobs import BlobStore, LocalBlobStore, S3BlobStore
from .documents import NodeDoc, RunPatch, WriteBatch
from .errors import ArchiveError, ConfigError
from .queries import (
    format_time,
    jsonable,
    utcnow,
)
from .stores import Store

FORMAT: Final = 1
GENESIS: Final = "0" * 64
#: Fields retention may remove from hot documents after archiving them, per record kind
#: (every kind an archive holds: runs, nodes, and API access records, which never change).
STRIPPABLE: Final = {"run": frozenset({"error"}), "node": frozenset({"input", "output", "error"}),
                     "access": frozenset()}
#: The record kinds of a run (what reading a run back gathers).
RUN_KINDS: Final = frozenset({"run", "node"})
_TIME_FIELDS: Final = ("startedAt", "completedAt")
_SEGMENT = re.compile(r"\A(\d{8})-([0-9A-Za-z_-]{1,32})\.(jsonl\.gz|manifest\.json)\Z")


#: Turns an archived record's doc into the doc it stands for (``worker.shredding``'s
#: ``Opener.open``: decrypts personal fields, or marks them erased).
OpenDoc = Callable[[str, dict[str, Any]], dict[str, Any]]


# -- records ---------------------------------------------------------------------------------

def canonical(value: Any) -> str:
    return json.dumps(jsonable(value), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)


def encode_record(kind: str, doc: Mapping[str, Any]) -> bytes:
    return (canonical({"kind": kind, "doc": doc}) + "\n").encode()


def _restore_times(kind: str, doc: dict[str, Any]) -> dict[str, Any]:
    for name in ("at",) if kind == "access" else _TIME_FIELDS:
        value = doc.get(name)
        if isinstance(value, str):
            doc[name] = datetime.fromisoformat(value)
    return doc


def decode_record(line: bytes) -> tuple[str, dict[str, Any]]:
    raw = json.loads(line)
    kind, doc = raw["kind"], raw["doc"]
    if kind not in STRIPPABLE or not isinstance(doc, dict):
        raise ArchiveError(f"not an archive record: kind {kind!r}")
    return kind, _restore_times(kind, doc)


def field_hashes(doc: Mapping[str, Any]) -> dict[str, str]:
    """A short hash of each non-null top-level field (what "already archived" compares)."""
    return {k: hashlib.sha256(canonical(v).encode()).hexdigest()[:32]
            for k, v in doc.items() if v is not None}


def doc_key(kind: str, doc: Mapping[str, Any]) -> str:
    if kind == "access":
        return f"access\x1f{doc['id']}"
    if kind == "run":
        return f"run\x1f{doc['runId']}"
    return f"node\x1f{doc['runId']}\x1f{doc['nodeKey']}"


@dataclass(slots=True)
class Catalog:
    """What a workspace's committed segments hold, per document, as field hashes."""

    versions: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def add(self, kind: str, doc: Mapping[str, Any]) -> None:
        self.versions.setdefault(doc_key(kind, doc), []).append(field_hashes(doc))

    def covers(self, kind: str, doc: Mapping[str, Any]) -> bool:
        """Whether an archived version equals ``doc`` up to fields retention strips."""
        mine = field_hashes(doc)
        strippable = STRIPPABLE[kind]
        for archived in self.versions.get(doc_key(kind, doc), ()):
            if all(archived.get(k) == h for k, h in mine.items()) and \
                    set(archived) - set(mine) <= strippable:
                return True
        return False



# -- segments --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SegmentName:
    seq: int
    period: str

    @property
    def stem(self) -> str:
        return f"{self.seq:08d}-{self.period}"

    def segment_key(self, workspace: str) -> str:
        return f"{workspace}/{self.stem}.jsonl.gz"

    def manifest_key(self, workspace: str) -> str:
        return f"{workspace}/{self.stem}.manifest.json"


def chain_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "chainHash"}
    return hashlib.sha256(canonical(body).encode()).hexdigest()


class Spool:
    """A segment being written: records gzip-compressed into a scratch file."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / f"{uuid.uuid4().hex}.jsonl.gz.tmp"
        self._raw: IO[bytes] = open(self.path, "wb")  # noqa: SIM115 - closed in finish()
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", mtime=0)
        self.runs = 0
        self.nodes = 0
        self.access = 0
        self.first: datetime | None = None
        self.last: datetime | None = None
        self.keys: list[tuple[str, dict[str, str]]] = []

    def add(self, kind: str, doc: Mapping[str, Any]) -> None:
        self._gz.write(encode_record(kind, doc))
        if kind == "run":
            self.runs += 1
        elif kind == "access":
            self.access += 1
        else:
            self.nodes += 1
        self.keys.append((doc_key(kind, doc), field_hashes(doc)))
        for name in ("at",) if kind == "access" else _TIME_FIELDS:
            when = doc.get(name)
            if isinstance(when, datetime):
                self.first = when if self.first is None else min(self.first, when)
                self.last = when if self.last is None else max(self.last, when)

    def __len__(self) -> int:
        return self.runs + self.nodes + self.access

    def finish(self) -> tuple[str, int]:
        """Close the file: its SHA-256 and size."""
        self._gz.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        digest = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest(), self.path.stat().st_size

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._gz.close()
            self._raw.close()
        self.path.unlink(missing_ok=True)


def read_records(data: bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as gz:
        for line in gz:
            if line.strip():
                yield decode_record(line)


@dataclass(slots=True)
class VerifyReport:
    workspace: str
    segments: int = 0
    records: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"workspace": self.workspace, "ok": self.ok, "segments": self.segments,
                "records": self.records, "headSeq": self.head_seq, "headHash": self.head_hash,
                "problems": self.problems, "leftovers": self.leftovers}


class Archive:
    """The segments of every workspace in one blob store."""

    def __init__(self, blobs: BlobStore, fault: Any = None) -> None:
        self.blobs = blobs
        #: Test hook: called with each step's name; raising there simulates a crash.
        self.fault = fault

    @classmethod
    def at(cls, location: str | Path, fault: Any = None) -> Archive:
        """The archive at a directory path (or ``file://`` URL), or ``s3://bucket/prefix``."""
        text = str(location)
        if text.startswith("s3://"):
            bucket, _, prefix = text[len("s3://"):].partition("/")
            if not bucket:
                raise ConfigError(f"an S3 archive URL names a bucket: {text!r}")
            return cls(S3BlobStore(bucket, prefix), fault)
        if text.startswith("file://"):
            text = text[len("file://"):]
        return cls(LocalBlobStore(text), fault)

    def _step(self, name: str) -> None:
        if self.fault is not None:
            self.fault(name)

    # reading ---------------------------------------------------------------------------

    def workspaces(self) -> list[str]:
        return [k for k in self.blobs.list("") if re.fullmatch(r"[A-Za-z0-9_-]{1,48}", k)]

    def head(self, workspace: str) -> dict[str, Any]:
        try:
            raw = self.blobs.get_bytes(f"{workspace}/HEAD.json")
        except FileNotFoundError:
            return {"format": FORMAT, "workspace": workspace, "seq": 0, "chainHash": GENESIS}
        head: dict[str, Any] = json.loads(raw)
        return head

    def names(self, workspace: str) -> dict[int, dict[str, str]]:
        """Every segment/manifest key of a workspace by sequence number."""
        out: dict[int, dict[str, str]] = {}
        for key in self.blobs.list(workspace):
            match = _SEGMENT.match(key.rsplit("/", 1)[-1])
            if match:
                kind = "segment" if match.group(3) == "jsonl.gz" else "manifest"
                out.setdefault(int(match.group(1)), {})[kind] = key
        return out

    def manifests(self, workspace: str) -> list[dict[str, Any]]:
        """Committed manifests (sequence up to HEAD), in order."""
        head_seq = int(self.head(workspace)["seq"])
        out = []
        for seq, keys in sorted(self.names(workspace).items()):
            if seq <= head_seq and "manifest" in keys:
                out.append(json.loads(self.blobs.get_bytes(keys["manifest"])))
        return out

    def read_segment(self, workspace: str, manifest: Mapping[str, Any], *,
                     check: bool = True) -> list[tuple[str, dict[str, Any]]]:
        data = self.blobs.get_bytes(f"{workspace}/{manifest['segment']}")
        if check and hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            raise ArchiveError(f"segment {manifest['segment']} does not match its SHA-256")
        records = list(read_records(data))
        problem = foreign_document(workspace, manifest, records)
        if problem is not None:  # even with a valid hash: a segment never crosses workspaces
            raise ArchiveError(problem)
        return records

    def records(self, workspace: str, opener: OpenDoc | None = None) -> Iterator[
            tuple[str, str, dict[str, Any]]]:
        """Every committed record: (segment file, kind, doc), oldest segment first;
        ``opener`` decrypts (else encrypted fields stay as archived)."""
        for manifest in self.manifests(workspace):
            for kind, doc in self.read_segment(workspace, manifest):
                yield manifest["segment"], kind, doc if opener is None else opener(kind, doc)

    def catalog(self, workspace: str, opener: OpenDoc | None = None) -> Catalog:
        cat = Catalog()
        for _, kind, doc in self.records(workspace, opener):
            cat.add(kind, doc)
        return cat

    # writing ---------------------------------------------------------------------------

    def recover(self, workspace: str) -> list[str]:
        """Remove what an interrupted append left behind (above HEAD, scratch files)."""
        head_seq = int(self.head(workspace)["seq"])
        removed = []
        for seq, keys in sorted(self.names(workspace).items()):
            if seq > head_seq:
                for key in keys.values():
                    self.blobs.delete(key)
                    removed.append(key)
        scratch = self.blobs.scratch(workspace)
        for leftover in scratch.iterdir():
            leftover.unlink(missing_ok=True)
        return removed

    def spool(self, workspace: str) -> Spool:
        return Spool(self.blobs.scratch(workspace))

    def append(self, workspace: str, period: str, spool: Spool) -> dict[str, Any]:
        """Commit a spooled segment as the next link of the workspace's chain.

        The caller holds :meth:`BlobStore.lock` and has called :meth:`recover`.
        Returns the manifest once the segment is committed and read back verified.
        """
        if not re.fullmatch(r"[0-9A-Za-z_-]{1,32}", period):
            raise ArchiveError(f"bad period name {period!r}")
        head = self.head(workspace)
        name = SegmentName(int(head["seq"]) + 1, period)
        sha, size = spool.finish()
        self._step("spool")
        self.blobs.put_file(name.segment_key(workspace), spool.path)
        self._step("segment")
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "workspace": workspace,
            "seq": name.seq,
            "period": period,
            "segment": name.stem + ".jsonl.gz",
            "createdAt": format_time(utcnow()),
            "counts": {"runs": spool.runs, "nodes": spool.nodes, "records": len(spool)}
            | ({"access": spool.access} if spool.access else {}),
            "timeRange": {"from": spool.first and format_time(spool.first),
                          "to": spool.last and format_time(spool.last)},
            "bytes": size,
            "sha256": sha,
            "prevChainHash": head["chainHash"],
        }
        manifest["chainHash"] = chain_hash(manifest)
        self.blobs.put_bytes(name.manifest_key(workspace), canonical(manifest).encode())
        self._step("manifest")
        new_head = {"format": FORMAT, "workspace": workspace, "seq": name.seq,
                    "chainHash": manifest["chainHash"], "updatedAt": manifest["createdAt"]}
        self.blobs.put_bytes(f"{workspace}/HEAD.json", canonical(new_head).encode())
        self._step("head")
        self._verify_written(workspace, manifest, spool)
        self._step("verify")
        return manifest

    def _verify_written(self, workspace: str, manifest: Mapping[str, Any], spool: Spool) -> None:
        records = self.read_segment(workspace, manifest)
        got = [(doc_key(kind, doc), field_hashes(doc)) for kind, doc in records]
        if got != spool.keys:
            raise ArchiveError(f"segment {manifest['segment']} does not read back as written")

    # verification ----------------------------------------------------------------------

    def verify(self, workspace: str) -> VerifyReport:
        """Check every committed segment, manifest, link and the head of the chain."""
        report = VerifyReport(workspace)
        head = self.head(workspace)
        report.head_seq = int(head["seq"])
        report.head_hash = str(head["chainHash"])
        names = self.names(workspace)
        prev = GENESIS
        for seq in range(1, report.head_seq + 1):
            keys = names.get(seq, {})
            if "manifest" not in keys:
                report.problems.append(f"segment {seq}: manifest missing (segment removed?)")
                continue
            try:
                manifest = json.loads(self.blobs.get_bytes(keys["manifest"]))
            except (ValueError, OSError) as exc:
                report.problems.append(f"segment {seq}: manifest unreadable ({exc})")
                continue
            report.segments += 1
            if manifest.get("chainHash") != chain_hash(manifest):
                report.problems.append(f"segment {seq}: manifest was modified "
                                       "(chain hash does not match its content)")
            if manifest.get("seq") != seq or manifest.get("workspace") != workspace:
                report.problems.append(f"segment {seq}: manifest names another position")
            if manifest.get("prevChainHash") != prev:
                report.problems.append(f"segment {seq}: chain broken (previous link does not "
                                       "match: a segment before it was removed or replaced)")
            prev = manifest.get("chainHash")
            self._verify_segment(workspace, seq, manifest, keys, report)
        if report.head_seq and prev != report.head_hash:
            report.problems.append("HEAD does not match the last manifest's chain hash")
        for seq, keys in sorted(names.items()):
            if seq == report.head_seq + 1:  # what an interrupted append leaves
                report.leftovers.extend(sorted(keys.values()))
            elif seq > report.head_seq + 1:
                report.problems.append(f"segment {seq} lies beyond HEAD (seq "
                                       f"{report.head_seq}): HEAD was rolled back or removed")
        return report

    def _verify_segment(self, workspace: str, seq: int, manifest: Mapping[str, Any],
                        keys: Mapping[str, str], report: VerifyReport) -> None:
        expected = f"{workspace}/{manifest.get('segment')}"
        if keys.get("segment") != expected:
            report.problems.append(f"segment {seq}: file {manifest.get('segment')} missing")
            return
        data = self.blobs.get_bytes(expected)
        if hashlib.sha256(data).hexdigest() != manifest.get("sha256") or \
                len(data) != manifest.get("bytes"):
            report.problems.append(f"segment {seq}: content changed (SHA-256 mismatch)")
            return
        try:
            records = list(read_records(data))
        except (OSError, ValueError, EOFError, KeyError, ArchiveError) as exc:
            report.problems.append(f"segment {seq}: unreadable ({exc})")
            return
        problem = foreign_document(workspace, manifest, records)
        if problem is not None:
            report.problems.append(f"segment {seq}: {problem}")
        runs = sum(1 for kind, _ in records if kind == "run")
        access = sum(1 for kind, _ in records if kind == "access")
        counts = manifest.get("counts") or {}
        if runs != counts.get("runs") or access != counts.get("access", 0) or \
                len(records) - runs - access != counts.get("nodes"):
            report.problems.append(f"segment {seq}: record counts differ from the manifest")
        report.records += len(records)


def foreign_document(workspace: str, manifest: Mapping[str, Any],
                     records: Iterable[tuple[str, Mapping[str, Any]]]) -> str | None:
    """Why a segment of ``workspace`` holds data of another workspace, or None.

    The manifest must name ``workspace``, and every document in the segment must carry
    that ``workspaceId``; a segment whose hashes were recomputed around another
    workspace's documents passes every hash check, but not this one.
    """
    segment = manifest.get("segment")
    if manifest.get("workspace") != workspace:
        return (f"segment {segment} names workspace {manifest.get('workspace')!r} "
                f"but lies in workspace {workspace!r}")
    for kind, doc in records:
        if doc.get("workspaceId") != workspace:
            return (f"segment {segment} holds a {kind} document of workspace "
                    f"{doc.get('workspaceId')!r} (run {doc.get('runId')!r}), "
                    f"not of workspace {workspace!r}")
    return None


def access_docs(archive: Archive, workspace: str) -> list[dict[str, Any]]:
    """The API access records in a workspace's committed segments (``AccessRecord.to_json``
    form), oldest segment first."""
    return [doc for _, kind, doc in archive.records(workspace) if kind == "access"]


# -- reading runs back -----------------------------------------------------------------------

def merge_run(workspace: str, run_id: str, runs: Sequence[Mapping[str, Any]],
              nodes: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any] | None,
                                                          list[dict[str, Any]]]:
    """Merge archived versions of one run with the store's own merge rules."""
    patch: RunPatch | None = None
    for doc in runs:
        one = RunPatch.from_doc(doc)
        if patch is None:
            patch = one
        else:
            patch.merge(one)
    merged: dict[str, NodeDoc] = {}
    for doc in nodes:
        node = NodeDoc.from_doc(doc)
        have = merged.get(node.node_key)
        if have is None:
            merged[node.node_key] = node
        else:
            have.merge(node)
    run_doc = None
    if patch is not None:
        run_doc = dict(runs[0]) if len(runs) == 1 else patch.to_doc()
    return run_doc, [n.doc for n in merged.values()]


def _gather(archive: Archive, workspace: str, run_ids: set[str],
            opener: OpenDoc | None = None) -> dict[
        str, tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]]:
    found: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]] = {}
    for segment, kind, raw in archive.records(workspace):
        run_id = raw.get("runId")
        if run_id not in run_ids or kind not in RUN_KINDS:
            continue
        doc = raw if opener is None else opener(kind, raw)
        runs, nodes, segments = found.setdefault(run_id, ([], [], []))
        (runs if kind == "run" else nodes).append(doc)
        if segment not in segments:
            segments.append(segment)
    return found


async def read_run(archive: Archive, workspace: str, run_id: str,
                   opener: OpenDoc | None = None) -> tuple[
        dict[str, Any] | None, list[dict[str, Any]], list[str]] | None:
    """A run read from the archive (warm storage): its run doc, nodes and segments."""
    found = await anyio.to_thread.run_sync(_gather, archive, workspace, {run_id}, opener)
    if run_id not in found:
        return None
    runs, nodes, segments = found[run_id]
    run, merged = merge_run(workspace, run_id, runs, nodes)
    return run, merged, segments


def batch_for(workspace: str, run_id: str, run: Mapping[str, Any] | None,
              nodes: Sequence[Mapping[str, Any]], batch: WriteBatch | None = None) -> WriteBatch:
    """The idempotent write that puts an archived run back into a store."""
    batch = WriteBatch() if batch is None else batch
    if run is not None:
        patch = RunPatch.from_doc(run)
    else:  # only node traces were archived: the run document itself is still hot
        workflow = str(nodes[0].get("workflowId")) if nodes else ""
        patch = RunPatch(workspace, run_id, workflow)
    batch.add(patch, [NodeDoc.from_doc(n) for n in nodes])
    return batch


async def restore(store: Store, archive: Archive, workspace: str, *,
                  segments: Sequence[int] = (), run_ids: Sequence[str] = (),
                  replace: bool = False, chunk: int = 200,
                  opener: OpenDoc | None = None) -> dict[str, int]:
    """Write archived runs back through the store's idempotent write.

    ``segments`` selects every run that has a record in those segments; ``run_ids``
    selects runs directly. Each run is rebuilt from all of its archived records
    (decrypted by ``opener``; a shredded field comes back marked erased). With
    ``replace`` the hot copies are deleted first, so a run whose hot copy had been
    reduced (prompts stripped) comes back exactly as archived.
    """
    wanted = set(run_ids)
    if segments:
        manifests = {m["seq"]: m for m in archive.manifests(workspace)}
        for seq in segments:
            if seq not in manifests:
                raise ArchiveError(f"workspace {workspace!r} has no committed segment {seq}")
            records = await anyio.to_thread.run_sync(archive.read_segment, workspace,
                                                     manifests[seq])
            wanted.update(str(doc["runId"]) for kind, doc in records if kind in RUN_KINDS)
    found = await anyio.to_thread.run_sync(_gather, archive, workspace, wanted, opener)
    missing = wanted - set(found)
    if missing:
        raise ArchiveError(f"not in the archive: {', '.join(sorted(missing)[:5])}")
    ordered = sorted(found)
    restored = nodes_written = 0
    for start in range(0, len(ordered), chunk):
        part = ordered[start:start + chunk]
        batch = WriteBatch()
        for run_id in part:
            runs, nodes, _ = found[run_id]
            run, merged = merge_run(workspace, run_id, runs, nodes)
            batch_for(workspace, run_id, run, merged, batch)
            nodes_written += len(merged)
        if replace:
            await store.delete_runs(workspace, part)
        result = await store.write(batch)
        if result.rejected:
            reasons = "; ".join(r.reason for r in result.rejected)
            raise ArchiveError(f"the store rejected part of the restore: {reasons}")
        restored += len(part)
    return {"runs": restored, "nodes": nodes_written}


# -- CLI -------------------------------------------------------------------------------------


