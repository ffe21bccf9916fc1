"""``python -m benchmarks.pg_variants``: the PostgreSQL store's write against its variants.

One run, one set of generated rows, every variant timed on it in each round (the order
rotated round by round), so the figures are same-run ratios on a shared machine:

``store``
    The store's own statements (:data:`worker.stores._postgres_write.UPSERT_RUNS` and
    ``UPSERT_NODES``: one JSON array per table, the merge written in SQL), with the
    parameters :func:`worker.stores._postgres_write.encode` makes.
``unnest``
    The harness's raw upsert baseline (:mod:`benchmarks.baselines`): typed arrays through
    ``unnest``, ``ON CONFLICT DO UPDATE`` overwriting every column, no merge.
``recordset``
    The same overwrite upsert with one JSON array per table through
    ``jsonb_to_recordset``.
``copy-merge``
    A binary COPY (asyncpg ``copy_records_to_table``) of each table's rows into a
    temporary staging table (``ON COMMIT DELETE ROWS``), then one statement per table
    that inserts the staged rows with the store's own ``ON CONFLICT`` clause (the same
    status-rank and event-ID rules); the tables it leaves are checked to be identical to
    what ``store`` leaves.
``store -INDEX`` / ``store -all-secondary``
    ``store`` with one secondary index of the schema dropped (or all of them).

Each variant writes every batch, one transaction per batch, on one connection, into
tables emptied before it (``TRUNCATE``), in a throwaway database created on the server
and dropped at the end; ``synchronous_commit`` stays on. The documents are encoded
before the timing starts (the driver's own encoding, COPY's included, is timed).
PostgreSQL CPU is that connection's backend process (``/proc/<pg_backend_pid()>``),
client CPU this process's; neither counts the WAL writer or the checkpointer.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import asyncpg
import msgspec

from worker.documents import WriteBatch, coalesce_records
from worker.redisio import Entry
from worker.stores import _postgres_schema, _postgres_write
from worker.stores._postgres_schema import SOURCE_CHARS
from worker.writer import prepare

from . import load
from .baselines import NODE_COLUMNS, NODE_KEY, RUN_COLUMNS, RUN_KEY, _pg_upsert, batch_rows
from .monitor import cpu_seconds

WORKSPACE: Final = "bench_pg_variants"
#: Column types of the JSON recordset (every other column is text).
_RECORD_TYPES: Final = {"attempt": "integer", "started_at": "timestamptz",
                        "completed_at": "timestamptz", "doc": "jsonb"}
_INDEX: Final = re.compile(r"CREATE INDEX IF NOT EXISTS (\w+)\s+ON (\w+)[^;]*;")
_encode = msgspec.json.Encoder().encode

Rows = list[tuple[Any, ...]]
Write = Callable[[asyncpg.Connection, Any], Awaitable[None]]


# -- pure helpers ---------------------------------------------------------------------------

def rotated(names: Sequence[str], round_no: int) -> list[str]:
    """The variants in the order round ``round_no`` runs them (each starts a round once)."""
    if not names:
        return []
    k = round_no % len(names)
    return [*names[k:], *names[:k]]


def secondary_indexes(schema: str) -> dict[str, tuple[str, str]]:
    """The schema's secondary indexes: name -> (table, the CREATE INDEX statement)."""
    return {m.group(1): (m.group(2), m.group(0)) for m in _INDEX.finditer(schema)}


def staged_merge(upsert: str, table: str, alias: str, columns: Sequence[str],
                 stage: str, key: Sequence[str]) -> str:
    """``upsert``'s ON CONFLICT clause applied to the rows of ``stage`` (in key order)."""
    if upsert.count("ON CONFLICT") != 1:
        raise ValueError("the upsert must have exactly one ON CONFLICT clause")
    conflict = upsert[upsert.index("ON CONFLICT"):]
    cols = ", ".join(columns)
    return (f"INSERT INTO {table} AS {alias} ({cols}) SELECT {cols} FROM {stage} "
            f"ORDER BY {', '.join(key)}\n{conflict}")


def recordset_upsert(table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    """The overwrite upsert of one JSON array of row objects (``jsonb_to_recordset``)."""
    cols = ", ".join(columns)
    typed = ", ".join(f"{c} {_RECORD_TYPES.get(c, 'text')}" for c in columns)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in key)
    return (f"INSERT INTO {table} ({cols}) SELECT {cols} "
            f"FROM jsonb_to_recordset($1::text::jsonb) AS u({typed}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}")


def trigger_source(trigger: Any) -> str | None:
    """The ``trigger_source`` column the store's statement derives (``left(…->>'source')``)."""
    source = trigger.get("source") if isinstance(trigger, dict) else None
    if source is None:
        return None
    text = source if isinstance(source, str) else _encode(source).decode()
    return text[:SOURCE_CHARS]


@dataclass
class Sample:
    """One variant's pass over every batch."""

    seconds: float
    client_cpu: float
    server_cpu: float


@dataclass
class Summary:
    """A variant's medians over the rounds, and its median same-round ratios."""

    name: str
    events_per_s: float
    rows_per_s: float
    vs_baseline: float
    vs_store: float
    server_us_per_row: float
    client_us_per_row: float
    rounds: int = field(default=0)


def summarize(samples: dict[str, list[Sample]], events: int, rows: int,
              baseline: str = "unnest", store: str = "store") -> list[Summary]:
    """Medians per variant; ratios are taken within each round, then their median."""
    out = []
    for name, runs in samples.items():
        def ratio(other: str, runs: list[Sample] = runs) -> float:
            return statistics.median(o.seconds / s.seconds
                                     for s, o in zip(runs, samples[other], strict=True))
        out.append(Summary(
            name, events / statistics.median(s.seconds for s in runs),
            rows / statistics.median(s.seconds for s in runs),
            ratio(baseline), ratio(store),
            statistics.median(s.server_cpu for s in runs) / rows * 1e6,
            statistics.median(s.client_cpu for s in runs) / rows * 1e6, len(runs)))
    return out


# -- the rows -------------------------------------------------------------------------------

def generate(events: int, batch_size: int, seed: int, prompt_size: str) -> tuple[
        list[WriteBatch], int]:
    """The harness's load mix, cut into batches and coalesced as the worker does."""
    pool = load.build_templates(seed, 400, prompt_size=prompt_size)
    ids = load.Ids("pgv", 0, WORKSPACE)
    entries = [Entry("s", f"{n}-0", ids.payload(p))
               for n, p in enumerate(load.plan(pool, events, seed=seed))]
    batches = []
    valid_events = 0
    for i in range(0, len(entries), batch_size):
        valid, _dead = prepare(entries[i:i + batch_size], 16 * 1024 * 1024, 5)
        valid_events += len(valid)
        batches.append(coalesce_records(valid))
    return batches, valid_events


def staged_rows(batch: WriteBatch) -> tuple[Rows, Rows]:
    """The rows the store's statements would insert, as COPY records, in key order."""
    runs = []
    for _, run in sorted(batch.runs.items()):
        doc = run.to_doc()
        stored = {k: v for k, v in doc.items() if k not in ("startedAt", "completedAt")}
        runs.append((run.workspace_id, run.run_id, run.workflow_id, run.status,
                     run.started_at, run.completed_at, trigger_source(doc.get("trigger")),
                     _encode(stored).decode()))
    _, nodes = batch_rows(batch)  # the baseline's node rows are exactly the store's
    return runs, nodes


def _records(columns: Sequence[str], rows: Rows) -> str:
    objs = [{c: (msgspec.Raw(v.encode()) if c == "doc" else v) for c, v in zip(columns, r,
                                                                              strict=True)}
            for r in rows]
    return _encode(objs).decode()


# -- the variants ---------------------------------------------------------------------------

RUNS_MERGE: Final = staged_merge(_postgres_write.UPSERT_RUNS, "workflow_runs", "r",
                                 RUN_COLUMNS, "stage_runs", RUN_KEY)
NODES_MERGE: Final = staged_merge(_postgres_write.UPSERT_NODES, "workflow_node_runs", "n",
                                  NODE_COLUMNS, "stage_nodes", NODE_KEY)


def variants(batches: list[WriteBatch]) -> dict[str, tuple[list[Any], Write]]:
    """name -> (per-batch parameters, prepared outside the timing; the batch's write)."""
    store_args = []
    for b in batches:
        runs_json, nodes_json, _, _, _ = _postgres_write.encode(b)
        store_args.append((runs_json.decode(), nodes_json.decode()))
    raw = [batch_rows(b) for b in batches]
    unnest_runs = _pg_upsert("workflow_runs", RUN_COLUMNS, RUN_KEY)
    unnest_nodes = _pg_upsert("workflow_node_runs", NODE_COLUMNS, NODE_KEY)
    rec_runs = recordset_upsert("workflow_runs", RUN_COLUMNS, RUN_KEY)
    rec_nodes = recordset_upsert("workflow_node_runs", NODE_COLUMNS, NODE_KEY)

    async def store(conn: asyncpg.Connection, args: tuple[str, str]) -> None:
        await conn.execute(_postgres_write.UPSERT_RUNS, args[0])
        await conn.execute(_postgres_write.UPSERT_NODES, args[1])

    async def unnest(conn: asyncpg.Connection, args: tuple[Rows, Rows]) -> None:
        runs, nodes = args
        if runs:
            await conn.execute(unnest_runs, *[list(c) for c in zip(*runs, strict=True)])
        if nodes:
            await conn.execute(unnest_nodes, *[list(c) for c in zip(*nodes, strict=True)])

    async def recordset(conn: asyncpg.Connection, args: tuple[str, str]) -> None:
        await conn.execute(rec_runs, args[0])
        await conn.execute(rec_nodes, args[1])

    async def copy_merge(conn: asyncpg.Connection, args: tuple[Rows, Rows]) -> None:
        runs, nodes = args
        await conn.copy_records_to_table("stage_runs", records=runs, columns=RUN_COLUMNS)
        await conn.execute(RUNS_MERGE)
        await conn.copy_records_to_table("stage_nodes", records=nodes, columns=NODE_COLUMNS)
        await conn.execute(NODES_MERGE)

    return {
        "store": (store_args, store),
        "unnest": (raw, unnest),
        "recordset": ([(_records(RUN_COLUMNS, r), _records(NODE_COLUMNS, n)) for r, n in raw],
                      recordset),
        "copy-merge": ([staged_rows(b) for b in batches], copy_merge),
    }


async def _tables(conn: asyncpg.Connection, indexes: dict[str, tuple[str, str]],
                  dropped: Sequence[str]) -> None:
    await conn.execute("TRUNCATE workflow_runs, workflow_node_runs")
    for name, (_, ddl) in indexes.items():
        await conn.execute(f"DROP INDEX IF EXISTS {name}" if name in dropped else ddl)


async def _checksum(conn: asyncpg.Connection) -> str:
    runs = await conn.fetchval("SELECT md5(string_agg(t::text, '|' ORDER BY workspace_id, "
                               "run_id)) FROM workflow_runs t")
    nodes = await conn.fetchval("SELECT md5(string_agg(t::text, '|' ORDER BY workspace_id, "
                                "run_id, node_id, attempt)) FROM workflow_node_runs t")
    return f"{runs}/{nodes}"


async def _pass(conn: asyncpg.Connection, backend: int, params: list[Any],
                write: Write) -> Sample:
    server0 = cpu_seconds(backend) or 0.0
    client0 = time.process_time()
    t0 = time.perf_counter()
    for args in params:
        async with conn.transaction():
            await write(conn, args)
    seconds = time.perf_counter() - t0
    return Sample(seconds, time.process_time() - client0,
                  (cpu_seconds(backend) or 0.0) - server0)


async def measure(admin_dsn: str, batches: list[WriteBatch], rounds: int,
                  say: Callable[[str], None]) -> tuple[dict[str, list[Sample]], dict[str, bool]]:
    """Every variant over ``batches`` in each of ``rounds`` rotated rounds; whether the
    tables each merge variant leaves equal those ``store`` leaves."""
    base = variants(batches)
    indexes = secondary_indexes(_postgres_schema.SCHEMA)
    plans: dict[str, tuple[list[Any], Write, tuple[str, ...]]] = {
        name: (params, write, ()) for name, (params, write) in base.items()}
    store_params, store_write = base["store"]
    for name in indexes:
        plans[f"store -{name}"] = (store_params, store_write, (name,))
    plans["store -all-secondary"] = (store_params, store_write, tuple(indexes))
    merges = [n for n in plans if n not in ("unnest", "recordset")]

    db = f"bench_pg_variants_{os.getpid()}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f"DROP DATABASE IF EXISTS {db}")
    await admin.execute(f"CREATE DATABASE {db}")
    samples: dict[str, list[Sample]] = {name: [] for name in plans}
    same: dict[str, bool] = {}
    try:
        conn = await asyncpg.connect(admin_dsn, database=db, server_settings={"jit": "off"})
        try:
            if await conn.fetchval("SHOW synchronous_commit") != "on":
                raise SystemExit("synchronous_commit is not on: the figures would trade "
                                 "durability")
            await _postgres_schema.apply(conn, _postgres_schema.SCHEMA)
            for stage, table in (("stage_runs", "workflow_runs"),
                                 ("stage_nodes", "workflow_node_runs")):
                await conn.execute(f"CREATE TEMP TABLE {stage} (LIKE {table}) "
                                   "ON COMMIT DELETE ROWS")
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            await _tables(conn, indexes, ())
            await _pass(conn, backend, store_params, store_write)  # warm-up, not counted
            want = await _checksum(conn)
            for r in range(rounds):
                for name in rotated(list(plans), r):
                    params, write, dropped = plans[name]
                    await _tables(conn, indexes, dropped)
                    samples[name].append(await _pass(conn, backend, params, write))
                    if name in merges:
                        same[name] = same.get(name, True) and await _checksum(conn) == want
                say(f"round {r + 1}/{rounds} done, load average "
                    f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        await admin.close()
    return samples, same


def table(summaries: Sequence[Summary]) -> list[str]:
    """The Markdown table of the summaries (as benchmarks/README.md shows it)."""
    lines = ["| variant | events/s | rows/s | × unnest | × store | PG µs/row | client µs/row "
             "| both µs/row |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s.name} | {s.events_per_s:,.0f} | {s.rows_per_s:,.0f} | "
              f"{s.vs_baseline:.2f} | {s.vs_store:.2f} | {s.server_us_per_row:.1f} | "
              f"{s.client_us_per_row:.1f} | {s.server_us_per_row + s.client_us_per_row:.1f} |"
              for s in summaries]
    return lines


def index_costs(summaries: Sequence[Summary], store: str = "store") -> list[str]:
    """The Markdown table of what each dropped index saves the store's write: PostgreSQL
    CPU per row and the write's same-round speed-up."""
    base = next(s for s in summaries if s.name == store)
    lines = ["| dropped | PG µs/row saved | share of the store's PG CPU | write × store |",
             "|---|---|---|---|"]
    for s in summaries:
        if s.name.startswith(f"{store} -"):
            saved = base.server_us_per_row - s.server_us_per_row
            lines.append(f"| {s.name.removeprefix(f'{store} -')} | {saved:.1f} | "
                         f"{saved / base.server_us_per_row:.0%} | {s.vs_store:.2f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pg_variants")
    p.add_argument("--dsn", default=os.environ.get(
        "AUDIT_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a database to connect to while the throwaway one is created and dropped")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--prompt-size", default="default")
    p.add_argument("--json", help="also write the samples and summaries to this file")
    args = p.parse_args(argv)
    batches, events = generate(args.events, args.batch_size, args.seed, args.prompt_size)
    rows = sum(len(b.runs) + len(b.nodes) for b in batches)
    load0 = os.getloadavg()
    print(f"{events} events, {rows} rows, {len(batches)} batches of {args.batch_size}, "
          f"{args.rounds} rounds; load average {' '.join(f'{x:.2f}' for x in load0)}",
          flush=True)
    samples, same = anyio.run(measure, args.dsn, batches, args.rounds,
                              lambda s: print(s, flush=True))
    summaries = summarize(samples, events, rows)
    print("\n".join(table(summaries)))
    print("\n".join(index_costs(summaries)))
    print("tables identical to store's: " + ", ".join(
        f"{name}={'yes' if ok else 'NO'}" for name, ok in same.items()))
    if args.json:
        with open(args.json, "wb") as f:
            f.write(msgspec.json.encode({"events": events, "rows": rows,
                                         "load_average": [load0, os.getloadavg()],
                                         "samples": samples, "summaries": summaries,
                                         "identical": same}))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
