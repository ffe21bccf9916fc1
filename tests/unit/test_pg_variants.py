"""The pure parts of the PostgreSQL write-variants benchmark (benchmarks/pg_variants.py):
round rotation, the statements it derives from the store's, the staged rows, the summary.
Nothing here is timed."""

from __future__ import annotations

import msgspec
import pytest

from benchmarks import pg_variants as pv
from benchmarks.baselines import RUN_COLUMNS, RUN_KEY
from worker.stores import _postgres_schema, _postgres_write


def test_rotation_starts_each_variant_once_and_keeps_the_cycle() -> None:
    """Over n rounds every variant runs first once, and the cyclic order never changes."""
    names = ["a", "b", "c", "d"]
    orders = [pv.rotated(names, r) for r in range(len(names))]
    assert [o[0] for o in orders] == names
    for order in orders:
        assert sorted(order) == names
        k = order.index("a")
        assert order[k:] + order[:k] == names
    assert pv.rotated(names, 5) == orders[1]
    assert pv.rotated([], 3) == []


def test_secondary_indexes_are_read_from_the_schema() -> None:
    """Every CREATE INDEX of the schema is found with its table; primary keys are not."""
    found = pv.secondary_indexes(_postgres_schema.SCHEMA)
    assert len(found) == _postgres_schema.SCHEMA.count("CREATE INDEX")
    assert found["workflow_runs_subjects_idx"][0] == "workflow_runs"
    assert found["workflow_node_runs_started_idx"][0] == "workflow_node_runs"
    for name, (_, ddl) in found.items():
        assert ddl.startswith(f"CREATE INDEX IF NOT EXISTS {name}")
        assert ddl.endswith(";")
        assert ";" not in ddl[:-1]


def test_staged_merge_keeps_the_stores_conflict_clause() -> None:
    """The staged merge inserts from the staging table with the store's ON CONFLICT rules."""
    sql = pv.staged_merge(_postgres_write.UPSERT_RUNS, "workflow_runs", "r", RUN_COLUMNS,
                          "stage_runs", RUN_KEY)
    conflict = _postgres_write.UPSERT_RUNS[_postgres_write.UPSERT_RUNS.index("ON CONFLICT"):]
    assert sql.endswith(conflict)
    assert sql.startswith("INSERT INTO workflow_runs AS r (workspace_id, run_id,")
    assert "FROM stage_runs ORDER BY workspace_id, run_id" in sql
    assert "jsonb_array_elements($1" not in sql
    assert pv.NODES_MERGE.endswith(
        _postgres_write.UPSERT_NODES[_postgres_write.UPSERT_NODES.index("ON CONFLICT"):])
    with pytest.raises(ValueError, match="exactly one"):
        pv.staged_merge("INSERT INTO t SELECT 1", "t", "x", ["a"], "s", ["a"])
    with pytest.raises(ValueError, match="exactly one"):
        pv.staged_merge("ON CONFLICT ON CONFLICT", "t", "x", ["a"], "s", ["a"])


def test_recordset_upsert_types_the_columns_and_overwrites_all_but_the_key() -> None:
    """jsonb_to_recordset gets each column's type; the key columns are never updated."""
    sql = pv.recordset_upsert("t", ["workspace_id", "attempt", "started_at", "doc"],
                              ["workspace_id"])
    assert ("AS u(workspace_id text, attempt integer, started_at timestamptz, doc jsonb)"
            in sql)
    assert "ON CONFLICT (workspace_id) DO UPDATE SET attempt = EXCLUDED.attempt, " in sql
    assert "workspace_id = EXCLUDED" not in sql


def test_trigger_source_matches_the_stores_column() -> None:
    """The source is cut to SOURCE_CHARS; no dict or no source gives NULL; others as JSON."""
    assert pv.trigger_source({"source": "x" * 1000}) == "x" * _postgres_schema.SOURCE_CHARS
    assert pv.trigger_source({"source": "webhook"}) == "webhook"
    assert pv.trigger_source({"kind": "cron"}) is None
    assert pv.trigger_source(None) is None
    assert pv.trigger_source("webhook") is None
    assert pv.trigger_source({"source": {"a": 1}}) == '{"a":1}'


def test_staged_rows_hold_the_documents_the_stores_statements_store() -> None:
    """COPY records carry the documents the store's JSON would (run docs without times)."""
    batches, events = pv.generate(300, 100, 3, "small")
    assert events == 300
    assert len(batches) == 3
    for batch in batches:
        runs, nodes = pv.staged_rows(batch)
        runs_json, nodes_json, n_runs, n_nodes, rejected = _postgres_write.encode(batch)
        assert (len(runs), len(nodes), rejected) == (n_runs, n_nodes, ())
        want_runs = msgspec.json.decode(runs_json)
        for row, want in zip(runs, want_runs, strict=True):
            assert row[:2] == (want["workspaceId"], want["runId"])
            assert msgspec.json.decode(row[-1]) == {
                k: v for k, v in want.items() if k not in ("startedAt", "completedAt")}
        for row, want in zip(nodes, msgspec.json.decode(nodes_json), strict=True):
            assert msgspec.json.decode(row[-1]) == want
            assert row[7] == want["eventId"]


def test_summary_takes_ratios_within_rounds() -> None:
    """A ratio is the median of same-round ratios, not a ratio of medians."""
    samples = {
        "unnest": [pv.Sample(1.0, 0.1, 0.5), pv.Sample(2.0, 0.1, 0.5), pv.Sample(4.0, 0.1, 0.5)],
        "store": [pv.Sample(2.0, 0.2, 1.0), pv.Sample(4.0, 0.2, 1.0), pv.Sample(8.0, 0.2, 1.0)],
    }
    by_name = {s.name: s for s in pv.summarize(samples, events=1000, rows=100)}
    assert by_name["store"].vs_baseline == pytest.approx(0.5)
    assert by_name["unnest"].vs_store == pytest.approx(2.0)
    assert by_name["store"].events_per_s == pytest.approx(250.0)
    assert by_name["store"].rows_per_s == pytest.approx(25.0)
    assert by_name["store"].server_us_per_row == pytest.approx(10_000.0)
    assert by_name["unnest"].client_us_per_row == pytest.approx(1000.0)
    assert by_name["store"].rounds == 3
    assert pv.table(list(by_name.values()))[2] == (
        "| unnest | 500 | 50 | 1.00 | 2.00 | 5000.0 | 1000.0 | 6000.0 |")


def test_index_costs_are_deltas_from_the_store_with_every_index() -> None:
    """Each dropped index is reported as the PostgreSQL CPU per row it saves the store."""
    rows = [pv.Summary("store", 100.0, 100.0, 0.9, 1.0, 40.0, 2.0),
            pv.Summary("unnest", 110.0, 110.0, 1.0, 1.1, 30.0, 7.0),
            pv.Summary("store -a_idx", 120.0, 120.0, 1.1, 1.2, 30.0, 2.0)]
    assert pv.index_costs(rows)[2:] == ["| a_idx | 10.0 | 25% | 1.20 |"]
