"""The PostgreSQL store's schema and its migration (``audit-fleet migrate``, worker start).

Tables::

    workflow_runs      (workspace_id, run_id) -> workflow_id, status, started_at,
                       completed_at, trigger_source, doc jsonb
    workflow_node_runs (workspace_id, run_id, node_id, attempt) -> node_key, type, status,
                       event_id, started_at, completed_at, doc jsonb
    audit_data_keys    (workspace_id, run_id, key_id) -> wrapped_key, created_at,
                       shredded_at

with the indexes each query of the read side uses, and the two SQL functions the merge
ranks statuses with.
"""

from __future__ import annotations

from typing import Final

import asyncpg

#: Key of the advisory lock that serialises concurrent migrations.
MIGRATE_LOCK: Final = 0x6175_6469_7466_6C74  # "auditflt"
#: Longest trigger source kept in the indexed column (the full value stays in ``doc``).
SOURCE_CHARS: Final = 256

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS workflow_runs (
    workspace_id   text COLLATE "C" NOT NULL,
    run_id         text COLLATE "C" NOT NULL,
    workflow_id    text COLLATE "C" NOT NULL,
    status         text COLLATE "C" NOT NULL,
    started_at     timestamptz,
    completed_at   timestamptz,
    trigger_source text COLLATE "C",
    doc            jsonb NOT NULL,
    PRIMARY KEY (workspace_id, run_id)
);
CREATE TABLE IF NOT EXISTS workflow_node_runs (
    workspace_id text COLLATE "C" NOT NULL,
    run_id       text COLLATE "C" NOT NULL,
    node_id      text COLLATE "C" NOT NULL,
    attempt      integer NOT NULL,
    node_key     text COLLATE "C" NOT NULL,
    type         text COLLATE "C",
    status       text COLLATE "C" NOT NULL,
    event_id     text COLLATE "C" NOT NULL,
    started_at   timestamptz,
    completed_at timestamptz,
    doc          jsonb NOT NULL,
    PRIMARY KEY (workspace_id, run_id, node_id, attempt)
);
-- recent runs by workflow
CREATE INDEX IF NOT EXISTS workflow_runs_workflow_idx
    ON workflow_runs (workspace_id, workflow_id, started_at DESC);
-- failed runs (runs by status)
CREATE INDEX IF NOT EXISTS workflow_runs_status_idx
    ON workflow_runs (workspace_id, status, started_at DESC);
-- runs by trigger source
CREATE INDEX IF NOT EXISTS workflow_runs_trigger_idx
    ON workflow_runs (workspace_id, trigger_source, started_at DESC);
-- recent runs of a workspace (list_runs without filters, retention)
CREATE INDEX IF NOT EXISTS workflow_runs_started_idx
    ON workflow_runs (workspace_id, started_at DESC);
-- runs of a data subject (erasure): keyed subject hashes, only on runs that carry them
CREATE INDEX IF NOT EXISTS workflow_runs_subjects_idx
    ON workflow_runs USING gin ((doc->'subjects')) WHERE doc ? 'subjects';
-- nodes by run: served by the primary key (workspace_id, run_id, node_id, attempt)
-- AI nodes over time (nodes by type)
CREATE INDEX IF NOT EXISTS workflow_node_runs_type_idx
    ON workflow_node_runs (workspace_id, type, started_at DESC);
-- node traces by time (insights, retention)
CREATE INDEX IF NOT EXISTS workflow_node_runs_started_idx
    ON workflow_node_runs (workspace_id, started_at);

-- archive data keys (worker.shredding): wrapped_key NULL once shredded
CREATE TABLE IF NOT EXISTS audit_data_keys (
    workspace_id text COLLATE "C" NOT NULL,
    run_id       text COLLATE "C" NOT NULL,
    key_id       text COLLATE "C" NOT NULL,
    wrapped_key  bytea,
    created_at   timestamptz NOT NULL,
    shredded_at  timestamptz,
    PRIMARY KEY (workspace_id, run_id, key_id)
);

CREATE OR REPLACE FUNCTION audit_status_rank(s text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE s WHEN 'running' THEN 0 WHEN 'completed' THEN 1 WHEN 'failed' THEN 3 ELSE 2 END
$$;

CREATE OR REPLACE FUNCTION audit_pick_status(a text, b text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN a IS NULL THEN b
        WHEN b IS NULL THEN a
        WHEN audit_status_rank(b) > audit_status_rank(a) THEN b
        WHEN audit_status_rank(b) = audit_status_rank(a) AND b COLLATE "C" > a THEN b
        ELSE a
    END
$$;
"""


async def apply(conn: asyncpg.Connection, ddl: str) -> None:
    """Run ``ddl`` in one transaction, under the migration lock: several workers may
    start at once, and CREATE ... IF NOT EXISTS is not safe against itself."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
        await conn.execute(ddl)
