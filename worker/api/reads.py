"""What a principal may read, through the existing query code, with every prompt read logged.

The documents are the command line's: the runs listing of ``audit-fleet runs --json``,
the explanation of ``explain --json`` (from hot storage or, as ``explain --archive``,
from the archive), the node document as stored, the result of ``insights --json``.

Scopes decide what of them leaves the server:

- ``runs:read`` alone: prompts (node ``input``) and raw outputs (node ``output``) are
  withheld (null, and named in ``withheld``, of the document and of each node); trigger
  metadata is redacted as
  ``explain`` does without ``--show-prompts``;
- with ``prompts:read``, a request that asks for them (``include=prompts``) gets the
  document of ``explain --json --show-prompts``, and before it is sent one access
  record per node whose prompt or output it holds (plus one for the trigger metadata)
  is written to the store's access log. If that write fails, nothing is returned.

Every function takes the workspace from the caller, who has checked that the principal
is bound to it; none of them crosses workspaces.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from .. import explain, insights, queries
from ..archive import Archive, OpenDoc
from ..shredding import MasterKey, load_opener
from ..stores import RunQuery, Store
from ..stores.access import AccessRecord, AccessStore
from .tokens import Principal

#: Node fields only ``prompts:read`` reveals.
PROMPT_FIELDS: Final = ("input", "output")
#: ``reveal`` value that reveals every node (the API's ``include=prompts``).
ALL: Final = "all"

Reveal = Collection[tuple[str, int]] | str | None


@dataclass(slots=True)
class Reader:
    """The read side of one server: a store, its access log, optionally an archive."""

    store: Store
    access: AccessStore
    archive: Archive | None = None
    #: The archive master key (``AUDIT_ARCHIVE_MASTER_KEY_FILE``): opens sealed fields.
    master: MasterKey | None = None
    clock: Callable[[], datetime] = field(default=queries.utcnow)

    async def runs(self, workspace: str, query: RunQuery) -> dict[str, Any]:
        rows, cursor = await queries.list_runs_page(self.store, workspace, query)
        out: dict[str, Any] = queries.jsonable(
            {"workspace": workspace, "runs": rows, "nextCursor": cursor})
        return out

    async def insights(self, workspace: str, **options: Any) -> dict[str, Any]:
        return await insights.compute(self.store, workspace, **options)

    async def insights_with_charts(self, workspace: str,
                                   **options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Insights and the chart distributions, from one scan of the nodes."""
        dist = insights.Distributions(since=options.get("since"), until=options.get("until"))
        result = await insights.compute(self.store, workspace, distributions=dist, **options)
        return result, dist.result()

    async def explanation(self, who: Principal, workspace: str, run_id: str, *,
                          reveal: Reveal = None, archived: bool = False,
                          ) -> dict[str, Any] | None:
        """The explanation document, with the prompts of the nodes in ``reveal`` (pairs of
        node ID and attempt, or :data:`ALL`); the caller checked ``prompts:read``."""
        if archived:
            if self.archive is None:
                return None
            found = await explain.read_archived(self.archive, workspace, run_id, self._keys(
                workspace))
            if found is None:
                return None
            run, nodes, segments = found
            source = "archive " + ", ".join(segments)
        else:
            run = await self.store.get_run(workspace, run_id)
            nodes = await self.store.get_nodes(workspace, run_id)
            if run is None and not nodes:
                return None
            source = "store"
        safe = explain.build(workspace, run_id, run, nodes, source=source)
        doc = safe.to_json()
        if not reveal:
            return withhold(doc)
        full = explain.build(workspace, run_id, run, nodes, show_prompts=True,
                             source=source).to_json()
        if reveal == ALL:
            shown = [(n["nodeId"], n["attempt"]) for n in full["nodes"]]
            doc = full | {"withheld": []}
            for node in doc["nodes"]:
                node["withheld"] = []
        else:
            wanted = set(reveal)
            shown = [k for k in ((n["nodeId"], n["attempt"]) for n in full["nodes"])
                     if k in wanted]
            doc = withhold(doc, keep=full, shown=set(shown))
        records = [self._record(who, workspace, run_id, n["nodeId"], n["attempt"],
                                [f for f in PROMPT_FIELDS if _held(n.get(f))], archived)
                   for n in full["nodes"] if (n["nodeId"], n["attempt"]) in set(shown)]
        if reveal == ALL and isinstance(full["run"].get("trigger"), Mapping) \
                and full["run"]["trigger"].get("metadata") is not None:
            records.append(self._record(who, workspace, run_id, None, None, ["trigger"],
                                        archived))
        await self.access.record_access([r for r in records if r.fields])
        return doc

    def _keys(self, workspace: str) -> explain.KeysFor:
        """The data keys of an archived run, as ``explain --archive`` opens them."""
        async def keys(run_id: str) -> OpenDoc:
            return (await load_opener(self.store, self.master, workspace, [run_id])).open

        return keys

    async def node(self, who: Principal, workspace: str, run_id: str, node_id: str,
                   attempt: int | None, *, prompts: bool) -> dict[str, Any] | None:
        """One node execution's stored document (the latest attempt unless one is named)."""
        nodes = [n for n in await self.store.get_nodes(workspace, run_id)
                 if n.get("nodeId") == node_id
                 and (attempt is None or n.get("attempt") == attempt)]
        if not nodes:
            return None
        doc: dict[str, Any] = queries.jsonable(max(nodes, key=lambda n: n.get("attempt") or 0))
        if not prompts:
            held = [f for f in PROMPT_FIELDS if doc.get(f) is not None]
            for name in PROMPT_FIELDS:
                doc.pop(name, None)
            return {"node": doc, "withheld": held}
        fields = [f for f in PROMPT_FIELDS if doc.get(f) is not None]
        if fields:
            await self.access.record_access([self._record(
                who, workspace, run_id, node_id, doc.get("attempt"), fields, False)])
        return {"node": doc, "withheld": []}

    def _record(self, who: Principal, workspace: str, run_id: str, node_id: str | None,
                attempt: int | None, fields: list[str], archived: bool) -> AccessRecord:
        return AccessRecord(uuid.uuid4().hex, self.clock(), who.token_id, workspace, run_id,
                            node_id, attempt, tuple(fields),
                            "archive" if archived else "store")


def _held(value: Any) -> bool:
    """Whether a returned field holds data (not nothing, not the mark of an erased one)."""
    return value is not None and not (isinstance(value, Mapping)
                                      and value.get("erased") is True)


def withhold(doc: dict[str, Any], *, keep: Mapping[str, Any] | None = None,
             shown: Collection[tuple[str, int]] = ()) -> dict[str, Any]:
    """The explanation without prompts and outputs, but for the nodes ``shown`` (whose
    fields come from ``keep``, the unredacted document); ``withheld`` names what is out."""
    full = {(n["nodeId"], n["attempt"]): n for n in (keep or {}).get("nodes", [])}
    held: set[str] = set()
    for node in doc["nodes"]:
        key = (node["nodeId"], node["attempt"])
        mine = []
        for name in PROMPT_FIELDS:
            if key in shown:
                node[name] = full[key].get(name)
            elif node.get(name) is not None:
                node[name] = None
                mine.append(name)
        node["withheld"] = mine
        held.update(mine)
    doc["withheld"] = sorted(held)
    return doc
