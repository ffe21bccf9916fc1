"""The MongoDB store: database per workspace, bulk idempotent upserts on PyMongo async.

Layout
    ``workflow_runs`` (``_id`` = runId) and ``workflow_node_runs`` (``_id`` = the node
    execution's deterministic key from runId, nodeId and attempt), in one database per
    workspace (``<prefix><workspaceId>``, ``AUDIT_MONGO_TENANCY=database``, the default)
    or in one shared database with compound ``_id`` s and every index prefixed by
    ``workspaceId`` (``AUDIT_MONGO_TENANCY=field``; the database is the URL's path, or
    ``audit``). Node payloads above ``AUDIT_MONGO_LARGE_PAYLOAD_BYTES`` (default 4 MiB)
    move to the GridFS bucket ``node_payloads`` under a deterministic file id.

Writes
    One unordered ``bulk_write`` per database and collection per batch, of
    ``UpdateOne(filter, pipeline, upsert=True)`` (the pipelines are in
    :mod:`._mongo_codec`, the bulk writes and their failures in :mod:`._mongo_write`),
    with write concern ``{w: "majority", j: true}`` unless the URL sets ``w`` /
    ``journal``, and retryable writes on (:mod:`._mongo_options`). A
    ``BulkWriteError`` is split per operation: duplicate keys from racing upserts are
    retried, transient errors raise :class:`~worker.errors.StoreUnavailable` (the worker
    retries the batch), and permanent ones reject only the events behind that operation.

Database names
    Validated against MongoDB's rules (forbidden characters, under 64 bytes, not
    admin/local/config). MongoDB refuses two databases whose names differ only by
    case; :mod:`._mongo_names` keeps a map of existing names (lower case -> name) from
    ``listDatabases``, refreshed whenever a batch names a database it does not know and
    once more before it refuses one, and the store rejects the later workspace's events
    with a reason. A server-side refusal (code 13297) racing another worker is mapped the same.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

import bson
from bson.codec_options import CodecOptions
from gridfs import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo import AsyncMongoClient, DeleteOne, IndexModel, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from .. import personal
from ..documents import WriteBatch
from ..errors import ConfigError, StoreError, StoreNotOpen, StoreRejected, StoreUnavailable
from . import _mongo_codec as mc
from . import _mongo_write as mw
from ._mongo_names import DatabaseNames
from ._mongo_options import DEFAULT_SHARED_DB, MongoOptions, client_options
from .base import (
    NodeQuery,
    NodeVersion,
    Rejection,
    RunQuery,
    RunVersion,
    StoredKey,
    WriteResult,
    check_strippable,
)

Doc = dict[str, Any]
T = TypeVar("T")

#: The collection of archive data keys (``worker.shredding``), per workspace database.
DATA_KEYS: Final = "audit_data_keys"
#: Oldest server whose update pipelines support every operator used ($sortArray).
MIN_SERVER_VERSION: Final = (5, 2)


class MongoStore:
    """The MongoDB store (see the module docstring)."""

    name = "mongodb"

    def __init__(self, url: str, options: MongoOptions | None = None, **overrides: Any) -> None:
        self.url = url
        try:
            self.options = replace(options or MongoOptions(),
                                   **{k: v for k, v in overrides.items() if v is not None})
        except TypeError as exc:
            raise ConfigError(f"unknown MongoDB store option: {exc}") from None
        self.shared = self.options.tenancy == "field"
        self.prefix = self.options.db_prefix
        self.shared_db = unquote(urlsplit(url).path.lstrip("/")) or DEFAULT_SHARED_DB
        if self.shared:
            problem = mc.db_name_problem(self.shared_db)
            if problem:
                raise ConfigError(f"the shared MongoDB database cannot be used: {problem}")
        self.codec = CodecOptions(document_class=dict, tz_aware=True, tzinfo=UTC)
        self._client: AsyncMongoClient[Doc] | None = None
        self._indexed: set[str] = set()
        self.names = DatabaseNames(shared=self.shared, prefix=self.prefix,
                                   shared_db=self.shared_db)

    # ------------------------------------------------------------------ lifecycle

    @property
    def client(self) -> AsyncMongoClient[Doc]:
        if self._client is None:
            raise StoreNotOpen("the MongoDB store is not open")
        return self._client

    async def open(self) -> None:
        if self._client is not None:
            return
        try:
            self._client = AsyncMongoClient(self.url, **client_options(self.url, self.options))
        except PyMongoError as exc:
            raise ConfigError(f"AUDIT_STORE_URL is not a usable MongoDB URL: {exc}") from None
        try:
            await self._check_version()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _check_version(self) -> None:
        info = await self._call(self.client.admin.command("buildInfo"))
        version = tuple(int(p) for p in (info.get("versionArray") or [0, 0])[:2])
        if version < MIN_SERVER_VERSION:
            raise ConfigError(
                f"MongoDB {info.get('version')} is too old: the store needs "
                f"{MIN_SERVER_VERSION[0]}.{MIN_SERVER_VERSION[1]} or newer ($sortArray)"
            )

    async def migrate(self) -> None:
        """Create the indexes in every database this store owns (idempotent)."""
        if self.shared:
            await self._ensure_indexes(self.shared_db, force=True)
            return
        names = await self._call(self.client.list_database_names())
        for name in names:
            if self.names.workspace(name) is not None:
                await self._ensure_indexes(name, force=True)

    async def ping(self) -> None:
        await self._call(self.client.admin.command("ping"))

    async def _call(self, awaitable: Awaitable[T]) -> T:
        """Await a driver call, mapping its failures to the store's errors."""
        return await mw.call(awaitable)

    # ------------------------------------------------------------------ databases

    def _db(self, name: str) -> AsyncDatabase[Doc]:
        return self.client.get_database(name, codec_options=self.codec)

    def _read_db(self, workspace: str) -> AsyncDatabase[Doc] | None:
        """The database to read a workspace from, or None if it cannot exist."""
        name = self.names.readable(workspace)
        return None if name is None else self._db(name)

    async def _ensure_indexes(self, name: str, *, force: bool = False) -> None:
        if name in self._indexed and not force:
            return
        db = self._db(name)
        runs = [IndexModel(keys) for keys in mc.run_indexes(self.shared)]
        nodes = [IndexModel(keys) for keys in mc.node_indexes(self.shared)]
        await self._call(db[mc.RUNS].create_indexes(runs))
        await self._call(db[mc.NODES].create_indexes(nodes))
        self._indexed.add(name)

    # ------------------------------------------------------------------ writes

    async def write(self, batch: WriteBatch) -> WriteResult:
        if not len(batch):
            return WriteResult()
        rejected: list[Rejection] = []
        workspaces = {k[0] for k in batch.runs} | {k[0] for k in batch.nodes}
        names, refused = await self.names.resolve(self.client, workspaces)
        targets: dict[str, mw.Target] = {}
        for run in batch.runs.values():
            if run.workspace_id in refused:
                rejected.append(Rejection(tuple(dict.fromkeys(run.sources)),
                                          refused[run.workspace_id]))
                continue
            name = names[run.workspace_id]
            mw.add_run(targets.setdefault(name, mw.Target(name)), run, shared=self.shared,
                       rejected=rejected)
        for node in batch.nodes.values():
            if node.workspace_id in refused:
                rejected.append(Rejection(tuple(dict.fromkeys(node.sources)),
                                          refused[node.workspace_id]))
                continue
            name = names[node.workspace_id]
            mw.add_node(targets.setdefault(name, mw.Target(name)), node, shared=self.shared,
                        large_bytes=self.options.large_payload_bytes, rejected=rejected)
        for target in targets.values():
            try:
                await self._ensure_indexes(target.name)
            except StoreError as exc:
                if mw.code_of(exc) in mw.NAME_CODES:  # another worker made the other case
                    self.names.forget()
                    rejected.extend(op.reject(str(exc)) for op in target.ops())
                    target.clear()
                    continue
                raise StoreUnavailable(str(exc)) from exc
            await mw.upload(self._db(target.name), target, rejected)
        if await mw.bulk_all(self._db, targets.values(), rejected):
            self.names.forget()
        return WriteResult(tuple(rejected))

    # ------------------------------------------------------------------ reads

    def _filter(self, workspace: str, **fields: Any) -> Doc:
        out: Doc = {"workspaceId": workspace} if self.shared else {}
        out.update((k, v) for k, v in fields.items() if v is not None)
        return out

    async def get_run(self, workspace: str, run_id: str) -> Doc | None:
        db = self._read_db(workspace)
        if db is None:
            return None
        key = mc.run_id_key(workspace, run_id, shared=self.shared)
        doc = await self._call(db[mc.RUNS].find_one({"_id": key}))
        return None if doc is None else _run_doc(doc)

    async def runs_with_subject(self, workspace: str, subject: str) -> list[Doc]:
        db = self._read_db(workspace)
        if db is None:
            return []
        cursor = db[mc.RUNS].find(self._filter(workspace, subjects=subject), sort=[("runId", 1)])
        return [_run_doc(d) for d in await self._call(cursor.to_list())]

    async def get_nodes(self, workspace: str, run_id: str) -> list[Doc]:
        db = self._read_db(workspace)
        if db is None:
            return []
        cursor = db[mc.NODES].find(self._filter(workspace, runId=run_id))
        docs = [await self._node_doc(db, d) for d in await self._call(cursor.to_list())]
        docs.sort(key=node_order)
        return docs

    async def list_runs(self, workspace: str, query: RunQuery) -> list[Doc]:
        db = self._read_db(workspace)
        if db is None or query.limit <= 0:
            return []
        span, exact = mc.time_range(query.since, query.until)
        filt = self._filter(workspace, workflowId=query.workflow_id, status=query.status,
                            **{"trigger.source": query.trigger_source, "startedAt": span,
                               "_startedAtUs": exact})
        if query.after is not None:
            filt["$and"] = [mc.after(query.after)]
        # newest first, unknown start last (MongoDB sorts null lowest), ties by runId
        cursor = db[mc.RUNS].find(filt, sort=[("startedAt", -1), ("_startedAtUs", -1),
                                              ("runId", 1)], limit=query.limit)
        return [_run_doc(d) for d in await self._call(cursor.to_list())]

    async def scan_nodes(self, workspace: str, query: NodeQuery) -> AsyncIterator[Doc]:
        """Nodes in (startedAt, runId, nodeId, attempt) order, unknown start last.

        With ``fields``, each document holds only those top-level fields (when present).
        """
        db = self._read_db(workspace)
        if db is None:
            return
        span, exact = mc.time_range(query.since, query.until)
        base = self._filter(
            workspace,
            runId={"$in": list(query.run_ids)} if query.run_ids else None,
            type={"$in": list(query.types)} if query.types else None,
        )
        # MongoDB sorts null first: scan the dated nodes, then (without a time bound)
        # the undated ones, so the order matches the other stores'.
        passes = [{**base, "startedAt": span or {"$ne": None}}]
        if exact:
            passes[0]["_startedAtUs"] = exact
        else:
            passes.append({**base, "startedAt": None})
        projection = None
        if query.fields:
            projection = {mc.escape_key(f, top=True): 1 for f in sorted(set(query.fields))}
            projection[mc.PAYLOAD_FIELD] = 1
        order = [("startedAt", 1), ("_startedAtUs", 1), ("runId", 1), ("nodeId", 1),
                 ("attempt", 1)]
        for filt in passes:
            cursor = db[mc.NODES].find(filt, projection, sort=order, batch_size=500,
                                       allow_disk_use=True)
            try:
                async for stored in cursor:
                    doc = await self._node_doc(db, stored, query.fields)
                    if query.fields:
                        doc = {k: doc[k] for k in query.fields if k in doc}
                    yield doc
            except ConnectionFailure as exc:
                raise StoreUnavailable(f"MongoDB is unreachable: {exc}") from exc
            except OperationFailure as exc:
                raise StoreUnavailable(f"MongoDB: {mw.message(exc)}") from exc
            finally:
                await cursor.close()

    async def _node_doc(self, db: AsyncDatabase[Doc], stored: Doc,
                        fields: Sequence[str] = ()) -> Doc:
        ref = stored.get(mc.PAYLOAD_FIELD)
        if isinstance(ref, dict):
            wanted = {mc.escape_key(f, top=True) for f in fields}
            if not fields or wanted & set(ref.get("fields") or ()):
                data = await self._download(db, ref["fileId"])
                stored = {**stored, **bson.decode(data, codec_options=self.codec)}
        return mc.from_stored(stored)

    async def _download(self, db: AsyncDatabase[Doc], file_id: Any) -> bytes:
        bucket = AsyncGridFSBucket(db, bucket_name=mc.PAYLOAD_BUCKET)
        try:
            grid = await bucket.open_download_stream(file_id)
            data: bytes = await grid.read()
        except NoFile:
            raise StoreError(f"node payload file {file_id} is missing") from None
        except ConnectionFailure as exc:
            raise StoreUnavailable(f"MongoDB is unreachable: {exc}") from exc
        return data

    # -- archive data keys (worker.shredding) --------------------------------------------

    async def put_data_keys(self, workspace: str, keys: Sequence[StoredKey]) -> None:
        db = self._read_db(workspace)
        if db is None:
            raise StoreRejected(f"workspace {workspace!r} has no database name")
        async def insert(doc: Doc) -> None:  # insert-if-absent: a stored key id is kept
            try:
                await db[DATA_KEYS].insert_one(doc)
            except DuplicateKeyError:
                return

        for k in keys:
            await self._call(insert(
                {"_id": f"{workspace}\x1f{k.run_id}\x1f{k.key_id}",
                 "workspaceId": workspace, "runId": k.run_id, "keyId": k.key_id,
                 "wrappedKey": k.wrapped, "createdAt": k.created_at, "shreddedAt": None}))

    async def data_keys(self, workspace: str,
                        run_ids: Sequence[str] | None = None) -> list[StoredKey]:
        db = self._read_db(workspace)
        if db is None:
            return []
        query: Doc = {"workspaceId": workspace}
        if run_ids is not None:
            query["runId"] = {"$in": sorted(set(run_ids))}
        docs = await self._call(db[DATA_KEYS].find(query).to_list(None))
        out = [StoredKey(str(d["runId"]), str(d["keyId"]),
                         None if d.get("wrappedKey") is None else bytes(d["wrappedKey"]),
                         d["createdAt"], d.get("shreddedAt")) for d in docs]
        return sorted(out, key=lambda k: (k.run_id, k.key_id))

    async def shred_data_keys(self, workspace: str, run_ids: Sequence[str],
                              at: datetime) -> int:
        db = self._read_db(workspace)
        if db is None:
            return 0
        result = await self._call(db[DATA_KEYS].update_many(
            {"workspaceId": workspace, "runId": {"$in": sorted(set(run_ids))},
             "wrappedKey": {"$ne": None}},
            {"$set": {"wrappedKey": None, "shreddedAt": at}}))
        return int(result.modified_count)

    async def workspaces(self) -> list[str]:
        if self.shared:
            found = await self._call(self._db(self.shared_db)[mc.RUNS].distinct("workspaceId"))
            return sorted(str(ws) for ws in found)
        out: list[str] = []
        for name in await self._call(self.client.list_database_names()):
            ws = self.names.workspace(name)
            if ws is None:
                continue
            if await self._call(self._db(name)[mc.RUNS].find_one({}, {"_id": 1})) is not None:
                out.append(ws)
        return sorted(out)

    async def delete_runs(self, workspace: str, run_ids: Sequence[str], *,
                          expected: Sequence[RunVersion] | None = None) -> int:
        """Delete node documents, then payload files, then runs (a rerun completes it)."""
        db = self._read_db(workspace)
        if db is None or not run_ids:
            return 0
        if expected is not None:
            return await self._delete_unchanged_runs(db, workspace, run_ids, expected)
        ids = list(dict.fromkeys(run_ids))
        await self._call(db[mc.NODES].delete_many(self._filter(workspace,
                                                               runId={"$in": ids})))
        files = db[f"{mc.PAYLOAD_BUCKET}.files"]
        meta: Doc = {"metadata.runId": {"$in": ids}}
        if self.shared:
            meta = {"metadata.workspaceId": workspace, **meta}
        file_ids = [d["_id"] for d in await self._call(files.find(meta, {"_id": 1}).to_list())]
        await self._drop_files(db, file_ids)
        keys = [mc.run_id_key(workspace, r, shared=self.shared) for r in ids]
        result = await self._call(db[mc.RUNS].delete_many({"_id": {"$in": keys}}))
        return int(result.deleted_count)

    async def _delete_unchanged_runs(self, db: AsyncDatabase[Doc], workspace: str,
                                     run_ids: Sequence[str],
                                     expected: Sequence[RunVersion]) -> int:
        """Compare-and-delete without a transaction: the runs whose document and node
        versions are still the ones read lose those node versions (each guarded by its
        eventId and status), then the run document goes only while the guard of
        :meth:`_unchanged_runs` still matches. A late write keeps its documents; a run
        left with fewer nodes is completed by the next pass."""
        versions = {v.run_id: v for v in expected}
        found = await self._unchanged_runs(db, workspace, [r for r in run_ids if r in versions],
                                           versions)
        if not found:
            return 0
        stored = await self._call(db[mc.NODES].find(
            self._filter(workspace, runId={"$in": sorted(found)}),
            {"runId": 1, "nodeKey": 1, "eventId": 1, "status": 1}).to_list())
        have: dict[str, set[NodeVersion]] = {}
        for d in stored:
            have.setdefault(str(d["runId"]), set()).add(NodeVersion.of(d))
        same = [r for r in sorted(found) if have.get(r, set()) == versions[r].nodes]
        if not same:
            return 0
        await self.delete_nodes(workspace, [n for r in same for n in versions[r].nodes])
        ops = [DeleteOne(found[r]) for r in same]
        result = await self._call(db[mc.RUNS].bulk_write(ops, ordered=False))
        return int(result.deleted_count)

    async def _unchanged_runs(self, db: AsyncDatabase[Doc], workspace: str,
                              run_ids: Sequence[str],
                              versions: Mapping[str, RunVersion]) -> dict[str, Doc]:
        """runId -> a guard matching the stored run document, for the runs whose document
        is still exactly the one read. The guard holds the fields every merge into a run
        document changes (``eventIds`` for run events; ``nodeIndex`` or the start for node
        events), so it stops matching when anything is merged in after this read."""
        ids = [mc.run_id_key(workspace, r, shared=self.shared) for r in sorted(set(run_ids))]
        if not ids:
            return {}
        found = await self._call(db[mc.RUNS].find({"_id": {"$in": ids}}).to_list())
        return {str(d["runId"]): {"_id": d["_id"], **{k: d.get(k) for k in _RUN_GUARD}}
                for d in found if _run_doc(d) == versions[str(d["runId"])].doc}

    # ------------------------------------------------------------------ retention

    async def scan_runs(self, workspace: str, before: datetime) -> AsyncIterator[Doc]:
        """Runs whose completedAt (startedAt if never completed) is before ``before``.

        Two plain range queries on the exact time shadows (completed runs, then runs
        that never completed), each bounded on the BSON date as well.
        """
        db = self._read_db(workspace)
        if db is None:
            return
        bound, day = mc.micros(before), mc.floor_ms(before)
        passes = [
            self._filter(workspace, completedAt={"$lte": day}, _completedAtUs={"$lt": bound}),
            {**self._filter(workspace, startedAt={"$lte": day}, _startedAtUs={"$lt": bound}),
             "completedAt": None},
        ]
        for filt in passes:
            cursor = db[mc.RUNS].find(filt, batch_size=500)
            try:
                async for stored in cursor:
                    yield _run_doc(stored)
            except ConnectionFailure as exc:
                raise StoreUnavailable(f"MongoDB is unreachable: {exc}") from exc
            except OperationFailure as exc:
                raise StoreUnavailable(f"MongoDB: {mw.message(exc)}") from exc
            finally:
                await cursor.close()

    def _node_guard(self, workspace: str, node: NodeVersion) -> Doc:
        """A node document still at this version (the merge replaces a node document only
        by a greater ``(status rank, eventId)``)."""
        return {"_id": mc.node_id_key(workspace, node.node_key, shared=self.shared),
                "eventId": node.event_id, "status": node.status}

    async def _drop_files(self, db: AsyncDatabase[Doc], file_ids: Sequence[Any]) -> None:
        if file_ids:
            chunks = db[f"{mc.PAYLOAD_BUCKET}.chunks"]
            await self._call(chunks.delete_many({"files_id": {"$in": list(file_ids)}}))
            files = db[f"{mc.PAYLOAD_BUCKET}.files"]
            await self._call(files.delete_many({"_id": {"$in": list(file_ids)}}))

    async def delete_nodes(self, workspace: str, nodes: Sequence[NodeVersion]) -> int:
        """Delete node documents still at these versions, then those versions' payload
        files (a newer version's file has another id; a rerun completes it)."""
        db = self._read_db(workspace)
        versions = sorted(set(nodes), key=lambda v: (v.run_id, v.node_key))
        if db is None or not versions:
            return 0
        result = await self._call(db[mc.NODES].bulk_write(
            [DeleteOne(self._node_guard(workspace, v)) for v in versions], ordered=False))
        await self._drop_files(db, [mc.payload_file_id(workspace, v.node_key, v.event_id)
                                    for v in versions])
        return int(result.deleted_count)

    async def strip_node_fields(self, workspace: str, nodes: Sequence[NodeVersion],
                                fields: Sequence[str]) -> int:
        """Remove the fields from node documents still at these versions that hold a value
        in any of them.

        Each document is replaced by itself without the fields (``$replaceWith`` of a
        literal, only if its ``eventId`` and ``status`` are still the version given, so
        a concurrent newer version is never overwritten); a payload stored out of line
        is folded back.
        """
        paths = _escaped_paths(check_strippable(fields, "node"))
        db = self._read_db(workspace)
        if db is None or not nodes:
            return 0
        escaped = {p[0] for p in paths}
        guards = [self._node_guard(workspace, v) for v in sorted(
            set(nodes), key=lambda v: (v.run_id, v.node_key))]
        found = await self._call(db[mc.NODES].find({"$or": guards}).to_list())
        ops: list[UpdateOne] = []
        folded: list[Any] = []
        for stored in found:
            ref = stored.get(mc.PAYLOAD_FIELD)
            doc = dict(stored)
            if isinstance(ref, dict) and escaped & set(ref.get("fields") or ()):
                rest = bson.decode(await self._download(db, ref["fileId"]),
                                   codec_options=self.codec)
                doc = {k: v for k, v in doc.items() if k != mc.PAYLOAD_FIELD} | rest
                folded.append(ref["fileId"])
            if not personal.holds(doc, paths):
                continue
            kept = personal.without(doc, paths)
            if len(bson.encode(kept)) > mw.MAX_BSON_BYTES:
                raise StoreRejected(f"node {stored.get('nodeKey')!r}: what remains after "
                                    "stripping does not fit in one document")
            guard = {"_id": stored["_id"], "eventId": stored.get("eventId"),
                     "status": stored.get("status")}
            ops.append(UpdateOne(guard, [{"$replaceWith": mc.lit(kept)}]))
        if ops:
            await self._call(db[mc.NODES].bulk_write(ops, ordered=False))
        await self._drop_files(db, folded)
        return len(ops)

    async def strip_run_fields(self, workspace: str, runs: Sequence[RunVersion],
                               fields: Sequence[str]) -> int:
        """Set the fields of run documents to null where they hold a value, for the runs
        whose document is still exactly the one read (guarded like :meth:`delete_runs`)."""
        names = check_strippable(fields, "run")
        db = self._read_db(workspace)
        if db is None or not runs:
            return 0
        paths = _escaped_paths(names)
        versions = {v.run_id: v for v in runs}
        found = await self._unchanged_runs(db, workspace, list(versions), versions)
        found = {r: g for r, g in found.items() if personal.holds(versions[r].doc, names)}
        stored: dict[Any, Doc] = {}
        if any(len(p) > 1 for p in paths) and found:  # nested: the new values of their fields
            cursor = db[mc.RUNS].find({"_id": {"$in": [g["_id"] for g in found.values()]}})
            stored = {d["_id"]: d for d in await self._call(cursor.to_list())}
        ops = []
        for _, guard in sorted(found.items()):
            new = personal.without(stored.get(guard["_id"], {}), paths, null_top=True)
            ops.append(UpdateOne(guard, [{"$set": {
                p[0]: mc.lit(None if len(p) == 1 else new.get(p[0])) for p in paths
                if len(p) == 1 or p[0] in new}}]))
        if ops:
            await self._call(db[mc.RUNS].bulk_write(ops, ordered=False))
        return len(ops)

# ---------------------------------------------------------------------- helpers

def _escaped_paths(paths: Sequence[tuple[str, ...]]) -> tuple[tuple[str, ...], ...]:
    """Field paths with each key in its stored (escaped) form."""
    return tuple(tuple(mc.escape_key(k, top=i == 0) for i, k in enumerate(p)) for p in paths)


#: Stored run fields that change whenever anything is merged into a run document.
_RUN_GUARD: Final = ("eventIds", "nodeIndex", "_startedAtUs")


def node_order(doc: Mapping[str, Any]) -> tuple[Any, ...]:
    """Execution order: startedAt (unknown last), attempt, nodeId."""
    started = doc.get("startedAt")
    return (started is None, started.timestamp() if started is not None else 0.0,
            int(doc.get("attempt") or 0), str(doc.get("nodeId")))


def _run_doc(stored: Mapping[str, Any]) -> Doc:
    doc = mc.from_stored(stored)
    index = doc.get("nodeIndex")
    if isinstance(index, dict):
        doc["nodeIndex"] = dict(sorted(index.items()))
    return doc
