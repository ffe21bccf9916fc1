"""The PostgreSQL store's write statements: ``RunPatch.merge`` and ``NodeDoc.merge`` in SQL.

A batch's rows travel as one JSON array per table (a single msgspec encode), are
expanded by ``jsonb_array_elements`` and upserted with ``INSERT ... ON CONFLICT DO
UPDATE``. The run merge is written in that statement (the rules of ``RunPatch.merge``,
the summary recomputed from the merged node index, never incremented); a node row is
replaced only by one with a greater ``(status rank, event_id)``, as in
``NodeDoc.merge``. jsonb cannot hold U+0000: :func:`encode` splits off the runs whose
documents contain one, as rejections, before anything is written.
"""

from __future__ import annotations

from typing import Final

from ..documents import NodeDoc, RunPatch, WriteBatch
from . import _sql
from ._postgres_schema import SOURCE_CHARS
from .base import Rejection

#: Top-level run fields with a merge rule of their own; the rest are extras (first wins).
_KNOWN: Final = ("'{workspaceId,runId,workflowId,status,startedAt,completedAt,trigger,"
                 "totalDuration,error,summary,nodeIndex,eventIds,signedBy,subjects}'::text[]")


def _set_union(name: str) -> str:
    """A run field that is a sorted set of strings present only when non-empty
    (``signedBy``, ``subjects``): the union of the stored ``s.a`` and incoming ``s.b``."""
    return f"""CASE WHEN s.a ? '{name}' OR s.b ? '{name}' THEN jsonb_build_object(
        '{name}', (
            SELECT jsonb_agg(u.id ORDER BY u.id)
            FROM (SELECT jsonb_array_elements_text(s.a->'{name}') COLLATE "C" AS id
                  UNION
                  SELECT jsonb_array_elements_text(s.b->'{name}')) AS u
        )) ELSE '{{}}' END"""


#: nodeIndex merged per key (``s.a`` stored, ``s.b`` incoming): an incoming entry replaces
#: the stored one only if it is new or its status ranks strictly higher.
_MERGED_INDEX: Final = """
    COALESCE(s.a->'nodeIndex', '{}') || COALESCE((
        SELECT jsonb_object_agg(y.key, y.value)
        FROM jsonb_each(s.b->'nodeIndex') AS y
        WHERE s.a #> ARRAY['nodeIndex', y.key] IS NULL
           OR audit_status_rank(y.value->>'status')
              > audit_status_rank(s.a #>> ARRAY['nodeIndex', y.key, 'status'])
    ), '{}')"""

#: The summary, derived from the merged index ``m.idx`` (never incremented).
_SUMMARY: Final = """(
    SELECT jsonb_build_object(
        'nodesExecuted', count(DISTINCT e.value->>'nodeId'),
        'nodeExecutions', count(*),
        'aiCallsMade', count(*) FILTER (WHERE e.value->>'type' = 'ai'),
        'actionsPerformed', COALESCE((
            SELECT jsonb_agg(x.name ORDER BY x.name)
            FROM (SELECT DISTINCT jsonb_array_elements_text(i.value->'actions') COLLATE "C"
                      AS name
                  FROM jsonb_each(m.idx) AS i) AS x
        ), '[]'),
        'totalTokens', COALESCE(sum((e.value->>'tokens')::numeric), 0),
        'failedNodes', count(*) FILTER (WHERE e.value->>'status' = 'failed'))
    FROM jsonb_each(m.idx) AS e)"""

#: ``RunPatch.merge`` of the stored document ``s.a`` (which wins ties) and the incoming
#: ``s.b``. ``|| '{}'`` detoasts each document once (rather than at every reference), and
#: ``OFFSET 0`` keeps ``s`` and ``m`` subqueries, so each is computed once per row.
_MERGED_DOC: Final = f"""(
    SELECT (s.b - {_KNOWN}) || (s.a - {_KNOWN}) || jsonb_build_object(
        'workspaceId', s.a->'workspaceId',
        'runId', s.a->'runId',
        'workflowId', COALESCE(s.a->'workflowId', s.b->'workflowId'),
        'status', audit_pick_status(s.a->>'status', s.b->>'status'),
        'trigger', COALESCE(NULLIF(s.a->'trigger', 'null'), s.b->'trigger', 'null'),
        'totalDuration', CASE
            WHEN NULLIF(s.a->'totalDuration', 'null') IS NULL
                 OR (s.b->>'totalDuration')::numeric > (s.a->>'totalDuration')::numeric
            THEN COALESCE(s.b->'totalDuration', 'null')
            ELSE s.a->'totalDuration' END,
        'error', COALESCE(NULLIF(s.a->'error', 'null'), s.b->'error', 'null'),
        'nodeIndex', m.idx,
        'summary', {_SUMMARY},
        'eventIds', COALESCE((
            SELECT jsonb_agg(u.id ORDER BY u.id)
            FROM (SELECT jsonb_array_elements_text(s.a->'eventIds') COLLATE "C" AS id
                  UNION
                  SELECT jsonb_array_elements_text(s.b->'eventIds')) AS u
        ), '[]')) || {_set_union("signedBy")} || {_set_union("subjects")}
    FROM (SELECT r.doc || '{{}}' AS a, EXCLUDED.doc || '{{}}' AS b OFFSET 0) AS s,
         LATERAL (SELECT {_MERGED_INDEX} AS idx OFFSET 0) AS m)"""

# The merge is written out in the statement (not in SQL functions) so that it is planned
# once per prepared statement: nested SQL functions would be re-planned for every row.
UPSERT_RUNS: Final = f"""
INSERT INTO workflow_runs AS r
    (workspace_id, run_id, workflow_id, status, started_at, completed_at, trigger_source, doc)
SELECT d->>'workspaceId', d->>'runId', d->>'workflowId', d->>'status',
       (d->>'startedAt')::timestamptz, (d->>'completedAt')::timestamptz,
       left(d->'trigger'->>'source', {SOURCE_CHARS}),
       d - '{{startedAt,completedAt}}'::text[]
FROM jsonb_array_elements($1::text::jsonb) AS d
ON CONFLICT (workspace_id, run_id) DO UPDATE SET
    status = audit_pick_status(r.status, EXCLUDED.status),
    started_at = LEAST(r.started_at, EXCLUDED.started_at),
    completed_at = GREATEST(r.completed_at, EXCLUDED.completed_at),
    trigger_source = CASE WHEN NULLIF(r.doc->'trigger', 'null') IS NULL
                          THEN EXCLUDED.trigger_source ELSE r.trigger_source END,
    doc = {_MERGED_DOC}
"""

UPSERT_NODES: Final = """
INSERT INTO workflow_node_runs AS n
    (workspace_id, run_id, node_id, attempt, node_key, type, status, event_id,
     started_at, completed_at, doc)
SELECT d->>'workspaceId', d->>'runId', d->>'nodeId', (d->>'attempt')::integer,
       d->>'nodeKey', d->>'type', d->>'status', d->>'eventId',
       (d->>'startedAt')::timestamptz, (d->>'completedAt')::timestamptz, d
FROM jsonb_array_elements($1::text::jsonb) AS d
ON CONFLICT (workspace_id, run_id, node_id, attempt) DO UPDATE SET
    node_key = EXCLUDED.node_key,
    type = EXCLUDED.type,
    status = EXCLUDED.status,
    event_id = EXCLUDED.event_id,
    started_at = EXCLUDED.started_at,
    completed_at = EXCLUDED.completed_at,
    doc = EXCLUDED.doc
WHERE (audit_status_rank(EXCLUDED.status), EXCLUDED.event_id)
    > (audit_status_rank(n.status), n.event_id)
"""


def encode(batch: WriteBatch) -> tuple[bytes, bytes, int, int, tuple[Rejection, ...]]:
    """The batch as the statements' parameters, in key order (so concurrent writers never
    deadlock on each other): (runs JSON, nodes JSON, run count, node count, rejections)."""
    runs = _sql.sorted_runs(batch)
    nodes = _sql.sorted_nodes(batch)
    runs_json = _sql.encode_json([run.to_doc() for run in runs])
    nodes_json = _sql.encode_json([node.doc for node in nodes])
    rejected: tuple[Rejection, ...] = ()
    if _sql.has_nul(runs_json) or _sql.has_nul(nodes_json):
        runs, nodes, rejected = reject_nul(runs, nodes)
        runs_json = _sql.encode_json([run.to_doc() for run in runs])
        nodes_json = _sql.encode_json([node.doc for node in nodes])
    return runs_json, nodes_json, len(runs), len(nodes), rejected


def reject_nul(
    runs: list[RunPatch], nodes: list[NodeDoc]
) -> tuple[list[RunPatch], list[NodeDoc], tuple[Rejection, ...]]:
    """Split off the runs whose documents hold U+0000, which jsonb cannot store."""
    by_run = _sql.nodes_by_run(nodes)
    bad: dict[tuple[str, str], list[int]] = {}
    for run in runs:
        run_nodes = by_run.get(run.key, [])
        if _sql.has_nul(_sql.encode_json(run.to_doc())) or any(
            _sql.has_nul(_sql.encode_json(node.doc)) for node in run_nodes
        ):
            sources = list(run.sources)
            for node in run_nodes:
                sources.extend(node.sources)
            bad[run.key] = sources
    run_keys = {run.key for run in runs}
    for key, run_nodes in by_run.items():  # nodes whose run patch is not in the batch
        if key not in run_keys and any(
            _sql.has_nul(_sql.encode_json(node.doc)) for node in run_nodes
        ):
            bad[key] = [s for node in run_nodes for s in node.sources]
    rejections = tuple(
        Rejection(
            tuple(sorted(set(sources))),
            f"run {key[1]!r} of workspace {key[0]!r} contains U+0000 (NUL), which "
            "PostgreSQL cannot store in jsonb",
        )
        for key, sources in sorted(bad.items())
    )
    return ([r for r in runs if r.key not in bad],
            [n for n in nodes if (n.workspace_id, n.run_id) not in bad],
            rejections)
