"""The store protocol every backend implements (``factory.open_store`` picks a backend).

Documents cross this boundary in their canonical form (see ``worker.documents``):
plain dicts whose known time fields are timezone-aware UTC datetimes. Every store
returns exactly what :func:`worker.documents.fold` says for the events written;
the shared conformance suite (``tests/store_conformance.py``) checks it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol, runtime_checkable

from ..documents import WriteBatch
from ..errors import ConfigError
from ..personal import FieldPath, check_path


@dataclass(frozen=True, slots=True)
class Rejection:
    """A part of a batch the store refused for good: its events are dead-lettered."""

    #: The indices of its events' entries in their batch (``documents.Record``).
    sources: tuple[int, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of a write. Everything not rejected is durable."""

    rejected: tuple[Rejection, ...] = ()


@dataclass(frozen=True, slots=True)
class RunQuery:
    """Filters of ``list_runs``; results are newest ``startedAt`` first."""

    workflow_id: str | None = None
    status: str | None = None
    trigger_source: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50
    #: Keyset pagination: only runs after this ``(startedAt, runId)`` in the listing order
    #: (the last run of the previous page; a ``None`` start sorts after every time).
    after: tuple[datetime | None, str] | None = None


@dataclass(frozen=True, slots=True)
class NodeQuery:
    """Filters of ``scan_nodes`` (by node ``startedAt``)."""

    since: datetime | None = None
    until: datetime | None = None
    types: tuple[str, ...] = ()
    run_ids: tuple[str, ...] = ()
    fields: tuple[str, ...] = field(default=())  # a projection hint; () means everything


@dataclass(frozen=True, slots=True)
class NodeVersion:
    """A node document as retention read (and archived) it: its key and its version.

    A node document changes only when one of greater ``(status rank, eventId)``
    replaces it (``worker.documents``), so ``(eventId, status)`` names its version;
    retention's own stripping keeps it.
    """

    run_id: str
    node_key: str
    event_id: str
    status: str

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> NodeVersion:
        return cls(str(doc["runId"]), str(doc["nodeKey"]), str(doc["eventId"]),
                   str(doc["status"]))


@dataclass(frozen=True, slots=True)
class RunVersion:
    """A run as retention read (and archived) it: the run document exactly as the store
    returned it, and the versions of all of the run's node documents."""

    run_id: str
    doc: Mapping[str, Any] = field(hash=False)
    nodes: frozenset[NodeVersion] = frozenset()

    @classmethod
    def of(cls, run: Mapping[str, Any], nodes: Iterable[Mapping[str, Any]] = ()) -> RunVersion:
        return cls(str(run["runId"]), run, frozenset(NodeVersion.of(n) for n in nodes))


#: Fields retention may remove from node documents: prompts, responses, error details.
STRIPPABLE_NODE_FIELDS: Final = frozenset({"input", "output", "error"})
#: Fields retention may null in run documents: error details.
STRIPPABLE_RUN_FIELDS: Final = frozenset({"error"})


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A row of ``audit_data_keys`` (``worker.shredding``): ``wrapped`` is None once
    shredded."""

    run_id: str
    key_id: str
    wrapped: bytes | None
    created_at: datetime
    shredded_at: datetime | None = None


def check_strippable(fields: Sequence[str], kind: str) -> tuple[FieldPath, ...]:
    """The field paths to strip from ``kind`` ("node" or "run") documents, as key tuples,
    sorted: dotted paths that :mod:`worker.personal` accepts (never identity fields)."""
    names = sorted(set(fields))
    try:
        if not names:
            raise ConfigError("no field named")
        return tuple(check_path(kind, name) for name in names)
    except ConfigError as exc:
        raise ValueError(f"cannot strip {names or 'nothing'} from {kind} documents: "
                         f"{exc}") from None


@runtime_checkable
class Connection(Protocol):
    """What every user of a store needs: its name, open, close, migrate and ping."""

    #: Short name used in metrics labels: ``sqlite``, ``postgresql``, ``mongodb``, ``null``.
    name: str

    async def open(self) -> None:
        """Connect (nothing more: no table or index is created). Using a store before
        this, or after :meth:`close`, raises :class:`worker.errors.StoreNotOpen`."""

    async def close(self) -> None:
        """Release connections."""

    async def migrate(self) -> None:
        """Create schema and indexes idempotently (``audit-fleet migrate`` and worker
        start only, through :func:`worker.stores.factory.migrate`)."""

    async def ping(self) -> None:
        """Raise :class:`worker.errors.StoreUnavailable` if the store cannot be reached."""


@runtime_checkable
class WriteStore(Connection, Protocol):
    """The worker's side: durable, idempotent batch writes."""

    async def write(self, batch: WriteBatch) -> WriteResult:
        """Merge a batch durably (see ``worker.documents``), all or per rejection.

        Raises :class:`~worker.errors.StoreUnavailable` for a transient failure (retry the
        whole batch) and :class:`~worker.errors.StoreRejected` when the batch as a whole
        cannot be written (the caller splits it per run to isolate the cause).
        """



@runtime_checkable
class QueryStore(Connection, Protocol):
    """The read side: explain, runs, insights, erasure and restore look-ups."""

    async def get_run(self, workspace: str, run_id: str) -> dict[str, Any] | None:
        """One run document, or None."""

    async def runs_with_subject(self, workspace: str, subject: str) -> list[dict[str, Any]]:
        """Run documents whose ``subjects`` hold this keyed subject hash (erasure)."""

    async def get_nodes(self, workspace: str, run_id: str) -> list[dict[str, Any]]:
        """A run's node documents in execution order (startedAt, attempt, nodeId)."""

    async def list_runs(self, workspace: str, query: RunQuery) -> list[dict[str, Any]]:
        """Run documents matching ``query``, newest first, at most ``query.limit``."""

    def scan_nodes(self, workspace: str, query: NodeQuery) -> AsyncIterator[dict[str, Any]]:
        """Stream node documents matching ``query`` (for insights and archival)."""

    async def workspaces(self) -> list[str]:
        """Workspaces that hold data."""



@runtime_checkable
class RetentionStore(QueryStore, Protocol):
    """Retention and erasure: compare-and-delete and strip against archived versions."""

    async def delete_runs(self, workspace: str, run_ids: Sequence[str], *,
                          expected: Sequence[RunVersion] | None = None) -> int:
        """Delete runs and all their node documents; returns runs deleted.

        With ``expected`` (retention), compare-and-delete: a run goes only if its run
        document is still exactly ``doc`` and its node documents are still exactly the
        ``nodes`` versions (none replaced, none added), checked and deleted atomically;
        a run that changed, or has no version in ``expected``, stays for the next pass.
        """

    # -- retention (worker.retention) ------------------------------------------------------
    # The destructive operations take the versions retention read (and archived) and
    # change only documents still at that version: a late event merged in between keeps
    # its document in hot storage until a later pass has archived it.

    def scan_runs(self, workspace: str, before: datetime) -> AsyncIterator[dict[str, Any]]:
        """Stream run documents whose ``completedAt`` (``startedAt`` if the run never
        completed) is before ``before``, in no particular order (retention candidates)."""

    async def delete_nodes(self, workspace: str, nodes: Sequence[NodeVersion]) -> int:
        """Delete node documents still at these versions, keeping their runs; returns count."""

    async def strip_node_fields(self, workspace: str, nodes: Sequence[NodeVersion],
                                fields: Sequence[str]) -> int:
        """Remove ``fields`` from the node documents still at these versions; returns how
        many held one of them. A field is a top-level name (retention strips
        :data:`STRIPPABLE_NODE_FIELDS`) or a dotted path (``metadata.contact``: erasure of
        configured personal fields, ``worker.personal``), checked by
        :func:`check_strippable`."""

    async def strip_run_fields(self, workspace: str, runs: Sequence[RunVersion],
                               fields: Sequence[str]) -> int:
        """Set top-level ``fields`` (:data:`STRIPPABLE_RUN_FIELDS`, or configured personal
        ones) to null and remove nested ones (dotted paths) in the run documents still
        exactly as in ``runs`` (their nodes are not compared); returns how many held a
        value."""

    # -- archive data keys (worker.shredding) --------------------------------------------

    async def put_data_keys(self, workspace: str, keys: Sequence[StoredKey]) -> None:
        """Store new data keys (durable on return; a key id already stored is kept)."""

    async def data_keys(self, workspace: str,
                        run_ids: Sequence[str] | None = None) -> list[StoredKey]:
        """The data keys of these runs (all of the workspace's with None), shredded ones
        included."""

    async def shred_data_keys(self, workspace: str, run_ids: Sequence[str],
                              at: datetime) -> int:
        """Remove the key material of these runs' data keys, keeping when; returns how many
        keys were shredded now (already shredded ones are not counted again)."""


@runtime_checkable
class Store(WriteStore, RetentionStore, Protocol):
    """An async audit store: every backend implements all of it. Code that needs only a
    part takes :class:`WriteStore`, :class:`QueryStore` or :class:`RetentionStore`."""
