"""A store that discards writes: the pipeline's own ceiling, for benchmarks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from ..documents import WriteBatch
from .base import NodeQuery, NodeVersion, RunQuery, RunVersion, StoredKey, WriteResult


class NullStore:
    """Accepts every write and keeps nothing."""

    name = "null"

    def __init__(self) -> None:
        self.batches = 0
        self.rows = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def migrate(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def write(self, batch: WriteBatch) -> WriteResult:
        self.batches += 1
        self.rows += len(batch)
        return WriteResult()

    async def get_run(self, workspace: str, run_id: str) -> dict[str, Any] | None:
        return None

    async def get_nodes(self, workspace: str, run_id: str) -> list[dict[str, Any]]:
        return []

    async def list_runs(self, workspace: str, query: RunQuery) -> list[dict[str, Any]]:
        return []

    async def scan_nodes(self, workspace: str, query: NodeQuery) -> AsyncIterator[dict[str, Any]]:
        return
        yield

    async def workspaces(self) -> list[str]:
        return []

    async def runs_with_subject(self, workspace: str, subject: str) -> list[dict[str, Any]]:
        return []

    async def delete_runs(self, workspace: str, run_ids: Sequence[str], *,
                          expected: Sequence[RunVersion] | None = None) -> int:
        return 0

    async def scan_runs(self, workspace: str, before: datetime) -> AsyncIterator[dict[str, Any]]:
        return
        yield

    async def delete_nodes(self, workspace: str, nodes: Sequence[NodeVersion]) -> int:
        return 0

    async def strip_node_fields(self, workspace: str, nodes: Sequence[NodeVersion],
                                fields: Sequence[str]) -> int:
        return 0

    async def strip_run_fields(self, workspace: str, runs: Sequence[RunVersion],
                               fields: Sequence[str]) -> int:
        return 0

    async def put_data_keys(self, workspace: str, keys: Sequence[StoredKey]) -> None:
        return None

    async def data_keys(self, workspace: str,
                        run_ids: Sequence[str] | None = None) -> list[StoredKey]:
        return []

    async def shred_data_keys(self, workspace: str, run_ids: Sequence[str],
                              at: datetime) -> int:
        return 0
