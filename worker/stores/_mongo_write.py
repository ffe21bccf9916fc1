"""The write side of the MongoDB store: operations, bulk writes and what failures mean.

A batch becomes, per database, a :class:`Target`: update operations for
``workflow_runs`` and ``workflow_node_runs`` (each with the stream entries behind it)
and the node payloads to store in GridFS first. :func:`bulk_all` sends one unordered
``bulk_write`` per database and collection and splits a ``BulkWriteError`` per
operation: duplicate keys from racing upserts are sent again, transient errors raise
:class:`~worker.errors.StoreUnavailable` (the worker retries the whole batch), and
permanent ones reject only the events behind that operation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import anyio
import bson
from bson.errors import InvalidDocument
from gridfs import AsyncGridFSBucket
from gridfs.errors import FileExists
from pymongo import UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

from ..documents import NodeDoc, RunPatch
from ..errors import StoreError, StoreRejected, StoreUnavailable
from . import _mongo_codec as mc
from .base import Rejection

Doc = dict[str, Any]
T = TypeVar("T")

#: The server's document limit; a single update larger than this cannot be sent.
MAX_BSON_BYTES: Final = 16 * 1024 * 1024
DUPLICATE_KEY_RETRIES: Final = 5

DUPLICATE_KEY_CODES: Final = frozenset({11000, 11001, 12582})
#: Errors a retry of the same batch can outlive: failover, shutdown, network, timeouts,
#: write-concern failures, lock and interruption codes.
TRANSIENT_CODES: Final = frozenset({
    6, 7, 24, 46, 50, 63, 64, 79, 89, 91, 100, 112, 133, 134, 150, 189, 251, 262, 9001,
    10058, 10107, 11600, 11601, 11602, 13388, 13435, 13436,
})
#: Errors of the deployment or the server version, not of the data: retrying (and an
#: operator) can fix them, dead-lettering the events cannot.
ENVIRONMENT_CODES: Final = frozenset({
    13, 18, 168, 8000, 31082, 40324, 40352, 31325,
})
TRANSIENT_LABELS: Final = ("RetryableWriteError", "TransientTransactionError",
                           "SystemOverloadedError", "RetryableError")
#: The server refuses a database whose name differs from an existing one only by case.
DB_DIFFERS_BY_CASE: Final = 13297
INVALID_NAMESPACE: Final = 73
NAME_CODES: Final = frozenset({DB_DIFFERS_BY_CASE, INVALID_NAMESPACE})
_ENCODING_ERRORS: Final = (InvalidDocument, OverflowError, RecursionError, TypeError)


# --------------------------------------------------------------------------- errors


def transient(exc: OperationFailure) -> bool:
    """Whether a server error may go away by itself (retry the batch)."""
    if exc.code in TRANSIENT_CODES:
        return True
    return any(exc.has_error_label(label) for label in TRANSIENT_LABELS)


def clip(text: str, limit: int = 1000) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def message(exc: OperationFailure) -> str:
    """The server's own message and code."""
    details = exc.details or {}
    text = details.get("errmsg") or str(exc)
    return f"{clip(str(text))} (code {exc.code})"


def code_of(exc: BaseException) -> int | None:
    """The server error code behind a store error, if any."""
    cause = exc.__cause__
    return cause.code if isinstance(cause, OperationFailure) else None


async def call(awaitable: Awaitable[T]) -> T:
    """Await a driver call, mapping its failures to the store's errors.

    Connection failures, transient and deployment errors are :class:`StoreUnavailable`;
    any other server error is a :class:`StoreError` with the server's message.
    """
    try:
        return await awaitable
    except ConnectionFailure as exc:
        raise StoreUnavailable(f"MongoDB is unreachable: {exc}") from exc
    except OperationFailure as exc:
        if transient(exc) or exc.code in ENVIRONMENT_CODES:
            raise StoreUnavailable(f"MongoDB: {message(exc)}") from exc
        raise StoreError(f"MongoDB: {message(exc)}") from exc
    except PyMongoError as exc:
        raise StoreUnavailable(f"MongoDB: {exc}") from exc


# --------------------------------------------------------------------------- operations


@dataclass(slots=True)
class Op:
    """One update of a bulk write, and the stream entries behind it."""

    model: UpdateOne
    sources: list[int]
    what: str

    def reject(self, reason: str) -> Rejection:
        return Rejection(tuple(dict.fromkeys(self.sources)), f"{self.what}: {reason}")


@dataclass(slots=True)
class Blob:
    """A node payload stored out of line in GridFS."""

    file_id: str
    data: bytes
    metadata: Doc
    op: Op


@dataclass(slots=True)
class Target:
    """What one batch writes to one database."""

    name: str
    runs: list[Op] = field(default_factory=list)
    nodes: list[Op] = field(default_factory=list)
    blobs: list[Blob] = field(default_factory=list)

    def ops(self) -> list[Op]:
        return [*self.runs, *self.nodes]

    def clear(self) -> None:
        self.runs, self.nodes, self.blobs = [], [], []


def add_run(target: Target, run: RunPatch, *, shared: bool,
            rejected: list[Rejection]) -> None:
    """Queue the upsert that merges ``run`` (or reject it if it cannot be sent)."""
    filt = {"_id": mc.run_id_key(run.workspace_id, run.run_id, shared=shared)}
    op = Op(UpdateOne(filt, [], upsert=True), run.sources, f"run {run.run_id!r}")
    try:
        pipeline = mc.run_pipeline(run)
        size = len(bson.encode({"u": pipeline}))
    except _ENCODING_ERRORS as exc:
        rejected.append(op.reject(f"cannot be encoded as BSON: {exc}"))
        return
    if size > MAX_BSON_BYTES:
        rejected.append(op.reject(f"the update is {size} bytes, above MongoDB's "
                                  f"{MAX_BSON_BYTES}-byte document limit"))
        return
    op.model = UpdateOne(filt, pipeline, upsert=True)
    target.runs.append(op)


def add_node(target: Target, node: NodeDoc, *, shared: bool, large_bytes: int,
             rejected: list[Rejection]) -> None:
    """Queue the conditional replace of one node document; a payload above
    ``large_bytes`` moves to a GridFS file with a deterministic id."""
    what = f"node {node.node_id!r} attempt {node.attempt} of run {node.run_id!r}"
    key = mc.node_id_key(node.workspace_id, node.node_key, shared=shared)
    op = Op(UpdateOne({"_id": key}, [], upsert=True), node.sources, what)
    blob: Blob | None = None
    try:
        stored = {"_id": key, **mc.escape_doc(node.doc)}
        mc.add_exact_times(stored, node.doc)
        size = len(bson.encode(stored))
        if size > large_bytes:
            stored, rest = mc.split_payload(stored)
            file_id = mc.payload_file_id(node.workspace_id, node.node_key, node.event_id)
            data = bson.encode(rest)
            stored[mc.PAYLOAD_FIELD] = {"fileId": file_id, "bytes": len(data),
                                        "fields": sorted(rest)}
            size = len(bson.encode(stored))
            blob = Blob(file_id, data, {
                "workspaceId": node.workspace_id, "runId": node.run_id,
                "nodeKey": node.node_key, "eventId": node.event_id,
            }, op)
    except _ENCODING_ERRORS as exc:
        rejected.append(op.reject(f"cannot be encoded as BSON: {exc}"))
        return
    if size > MAX_BSON_BYTES:
        rejected.append(op.reject(f"the document is {size} bytes inline, above MongoDB's "
                                  f"{MAX_BSON_BYTES}-byte limit"))
        return
    op.model = UpdateOne({"_id": key}, mc.node_pipeline(node, stored), upsert=True)
    target.nodes.append(op)
    if blob is not None:
        target.blobs.append(blob)


# --------------------------------------------------------------------------- payloads


async def upload(db: AsyncDatabase[Doc], target: Target, rejected: list[Rejection]) -> None:
    """Store out-of-line payloads (durably) before the node documents that point at them."""
    if not target.blobs:
        return
    bucket = AsyncGridFSBucket(db, bucket_name=mc.PAYLOAD_BUCKET)
    files = db[f"{mc.PAYLOAD_BUCKET}.files"]
    ids = [b.file_id for b in target.blobs]
    found = await call(files.find({"_id": {"$in": ids}}, {"_id": 1}).to_list())
    have = {d["_id"] for d in found}
    for blob in target.blobs:
        if blob.file_id in have:
            continue
        try:
            await _upload_one(db, bucket, blob)
        except StoreRejected as exc:
            target.nodes.remove(blob.op)
            rejected.append(blob.op.reject(str(exc)))


async def _upload_one(db: AsyncDatabase[Doc], bucket: AsyncGridFSBucket, blob: Blob) -> None:
    chunks = db[f"{mc.PAYLOAD_BUCKET}.chunks"]
    files = db[f"{mc.PAYLOAD_BUCKET}.files"]
    for _ in range(2):
        try:
            await bucket.upload_from_stream_with_id(
                blob.file_id, blob.metadata["nodeKey"], blob.data, metadata=blob.metadata)
            return
        except (DuplicateKeyError, FileExists):
            # A racing worker stored it, or a crashed upload left chunks behind.
            if await call(files.find_one({"_id": blob.file_id}, {"_id": 1})):
                return
            await call(chunks.delete_many({"files_id": blob.file_id}))
        except ConnectionFailure as exc:
            raise StoreUnavailable(f"MongoDB is unreachable: {exc}") from exc
        except OperationFailure as exc:
            if transient(exc) or exc.code in ENVIRONMENT_CODES:
                raise StoreUnavailable(f"MongoDB: {message(exc)}") from exc
            raise StoreRejected(f"payload file: {message(exc)}") from exc
    raise StoreUnavailable(f"payload file {blob.file_id} kept colliding; retrying")


# --------------------------------------------------------------------------- bulk writes


async def bulk_all(db_of: Callable[[str], AsyncDatabase[Doc]], targets: Iterable[Target],
                   rejected: list[Rejection]) -> bool:
    """Send every target's bulk writes concurrently; True if a database name clashed.

    Raises :class:`StoreUnavailable` if any write failed transiently (after all of them
    have finished: the rest is durable and idempotent, the retry sends it again).
    """
    jobs = [(t.name, coll, ops) for t in targets
            for coll, ops in ((mc.NODES, t.nodes), (mc.RUNS, t.runs)) if ops]
    failures: list[Exception] = []
    clashes: list[str] = []

    async def run(name: str, coll: str, ops: list[Op]) -> None:
        try:
            got, clash = await bulk(db_of(name), coll, ops)
        except Exception as exc:
            failures.append(exc)
            return
        rejected.extend(got)
        if clash:
            clashes.append(name)

    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(run, *job)
    for exc in failures:
        if isinstance(exc, StoreUnavailable):
            raise exc
    if failures:
        raise failures[0]
    return bool(clashes)


async def bulk(db: AsyncDatabase[Doc], coll_name: str,
               ops: list[Op]) -> tuple[list[Rejection], bool]:
    """One unordered bulk write, split per operation on failure.

    Returns the rejections, and whether the server refused the database's name.
    """
    coll = db[coll_name]
    rejections: list[Rejection] = []
    pending = ops
    for _ in range(DUPLICATE_KEY_RETRIES + 1):
        try:
            await coll.bulk_write([op.model for op in pending], ordered=False)
            return rejections, False
        except BulkWriteError as exc:
            pending = split(exc, pending, rejections)
            if not pending:
                return rejections, False
        except ConnectionFailure as exc:
            raise StoreUnavailable(f"MongoDB is unreachable: {exc}") from exc
        except WriteConcernError as exc:
            raise StoreUnavailable(f"MongoDB write concern: {message(exc)}") from exc
        except OperationFailure as exc:
            if transient(exc) or exc.code in ENVIRONMENT_CODES:
                raise StoreUnavailable(f"MongoDB: {message(exc)}") from exc
            if exc.code in NAME_CODES:
                return rejections + [op.reject(message(exc)) for op in pending], True
            raise StoreRejected(f"MongoDB refused the batch: {message(exc)}") from exc
        except (InvalidDocument, OverflowError) as exc:
            raise StoreRejected(f"MongoDB cannot encode the batch: {exc}") from exc
        except PyMongoError as exc:
            raise StoreUnavailable(f"MongoDB: {exc}") from exc
    raise StoreUnavailable(f"duplicate keys on upsert into {db.name}.{coll_name} "
                           f"persisted after {DUPLICATE_KEY_RETRIES} retries")


def split(exc: BulkWriteError, ops: list[Op], rejections: list[Rejection]) -> list[Op]:
    """Sort a bulk failure per operation; return the operations to send again."""
    details = exc.details or {}
    concern = details.get("writeConcernErrors") or []
    if concern:
        err = concern[0]
        raise StoreUnavailable(
            f"MongoDB write concern not satisfied: {err.get('errmsg')} "
            f"(code {err.get('code')})"
        ) from exc
    retry: list[Op] = []
    failed: Doc | None = None
    for err in details.get("writeErrors") or []:
        op = ops[err["index"]]
        code = err.get("code")
        if code in DUPLICATE_KEY_CODES:
            retry.append(op)
        elif code in TRANSIENT_CODES or code in ENVIRONMENT_CODES:
            failed = err
        else:
            rejections.append(op.reject(f"{clip(str(err.get('errmsg')))} (code {code})"))
    if failed is not None or any(exc.has_error_label(x) for x in TRANSIENT_LABELS):
        err = failed or {}
        raise StoreUnavailable(f"MongoDB: {err.get('errmsg', exc)} "
                               f"(code {err.get('code')})") from exc
    return retry
