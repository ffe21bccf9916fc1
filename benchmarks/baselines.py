"""The baselines every ratio is measured against, in the same run as the fleet.

``raw-redis``
    The raw limit of the stream side: a minimal XREADGROUP (same COUNT) + JSON decode
    + XACK loop, no framework, no validation, no store, one round trip after another.
    A subprocess, observed by the same sampler as the workers.

``faststream``
    The peer a user would write instead of this project: a FastStream ``RedisBroker``
    batch subscriber on the same stream and group (``StreamSub(batch=True,
    max_records=batch_size)``, FastStream's own XREADGROUP and ack), whose handler decodes
    each entry's event and groups the events by (workspace, run) — no validation, no
    store. A subprocess (``faststream`` is in the ``bench`` extra), same sampler.

``naive``
    The unbatched design: for every entry, decode and validate it, write it to the store
    on its own (one store write) and acknowledge it on its own (one XACK). Uses the
    project's store, so it pays the same merge SQL per row the worker pays per batch.
    A subprocess, observed by the same sampler; run for a fixed time.

``raw upsert`` (:func:`raw_upsert`, in the harness process)
    The store's own raw bulk-upsert rate for the same rows: the entries the worker
    drained are read back from the stream, cut into batches of the same size,
    decoded and coalesced exactly as the worker does, and the resulting rows
    (documents already JSON-encoded, outside the timing) are written with a plain
    ``INSERT … ON CONFLICT DO UPDATE`` (overwrite, no merge functions) per table per
    batch, one transaction per batch, with as many concurrent connections as the
    worker has batches in flight. Written to ``bench_raw_*`` copies of the store's
    tables (``LIKE … INCLUDING ALL``: same columns, keys and indexes), dropped after.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import msgspec
import redis.asyncio as aioredis

from worker.documents import WriteBatch, coalesce_records
from worker.redisio import Entry, entries_from_read, settle
from worker.stores import migrate, open_store
from worker.writer import prepare

_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode

RUN_COLUMNS: Final = ("workspace_id", "run_id", "workflow_id", "status", "started_at",
                      "completed_at", "trigger_source", "doc")
RUN_KEY: Final = ("workspace_id", "run_id")
NODE_COLUMNS: Final = ("workspace_id", "run_id", "node_id", "attempt", "node_key", "type",
                       "status", "event_id", "started_at", "completed_at", "doc")
NODE_KEY: Final = ("workspace_id", "run_id", "node_id", "attempt")
_PG_TYPES: Final = {"attempt": "integer", "started_at": "timestamptz",
                    "completed_at": "timestamptz", "doc": "text"}
RAW_TABLES: Final = {"workflow_runs": "bench_raw_workflow_runs",
                     "workflow_node_runs": "bench_raw_workflow_node_runs"}


# -- raw Redis loop ---------------------------------------------------------------------

async def raw_redis_loop(redis_url: str, stream: str, group: str, consumer: str,
                         batch_size: int, events: int) -> dict[str, Any]:
    """XREADGROUP → json decode each entry → XACK, until ``events`` entries are acked.

    The reply is read raw (no redis-py response callback), as the worker reads it, so
    the baseline is the fastest loop this client library allows.
    """
    client = aioredis.Redis.from_url(redis_url)
    done = 0
    started = time.monotonic()
    try:
        while done < events:
            reply: Any = await client.execute_command(  # type: ignore[no-untyped-call]  # untyped in redis-py
                "XREADGROUP GROUP", group, consumer, "COUNT", batch_size, "BLOCK", 1000,
                "STREAMS", stream, ">")
            if not reply:
                continue
            items = reply.items() if isinstance(reply, dict) else reply
            for _, messages in items:
                ids = []
                for entry_id, fields in messages:
                    _decode(fields[1])  # [b"event", payload]
                    ids.append(entry_id)
                await client.xack(stream, group, *ids)
                done += len(ids)
    finally:
        await client.aclose()
    return {"events": done, "seconds": time.monotonic() - started}


# -- FastStream peer ----------------------------------------------------------------------

async def faststream_consumer(redis_url: str, stream: str, group: str, consumer: str,
                              batch_size: int, events: int) -> dict[str, Any]:
    """A FastStream batch consumer: decode each event, group it by run, until ``events``."""
    from faststream.redis import RedisBroker, StreamSub
    from faststream.redis.annotations import RedisBatchStreamMessage

    # None turns FastStream's logging off (its logger state takes an Optional logger), but
    # RedisBrokerParams types the keyword as a logger only.
    broker = RedisBroker(redis_url, logger=None)  # type: ignore[arg-type]
    done = anyio.Event()
    seen = [0]
    runs_seen: set[tuple[str, str]] = set()

    @broker.subscriber(stream=StreamSub(stream, group=group, consumer=consumer, batch=True,
                                        max_records=batch_size, polling_interval=1000))
    async def handle(msg: RedisBatchStreamMessage) -> None:
        by_run: dict[tuple[str, str], list[Any]] = {}
        entries = msg.raw_message["data"]
        for fields in entries:
            event = _decode(fields[b"event"])
            key = (event.get("workspaceId"), event.get("runId"))
            by_run.setdefault(key, []).append(event)
        runs_seen.update(by_run)
        seen[0] += len(entries)
        if seen[0] >= events:
            done.set()

    await broker.start()
    started = time.monotonic()
    try:
        await done.wait()
    finally:
        seconds = time.monotonic() - started
        await broker.stop()
    return {"events": seen[0], "seconds": seconds, "runs": len(runs_seen)}


# -- naive per-event writer ---------------------------------------------------------------

async def naive_writer(redis_url: str, stream: str, group: str, consumer: str, store_url: str,
                       batch_size: int, seconds: float) -> dict[str, Any]:
    """One store write and one XACK per event, for ``seconds`` (or until drained)."""
    client = aioredis.Redis.from_url(redis_url)
    store = open_store(store_url)
    await store.open()
    await migrate(store)
    done = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            reply = await client.xreadgroup(group, consumer, {stream: ">"}, count=batch_size,
                                            block=200)
            entries = entries_from_read(reply)
            if not entries:
                break
            for entry in entries:
                valid, dead = prepare([entry], 16 * 1024 * 1024, 1000)
                written: list[Entry] = []
                if valid:
                    await store.write(coalesce_records(valid))
                    written.append(entry)
                await settle(client, group, consumer, written, dead)
                done += 1
                if time.monotonic() - started >= seconds:
                    break
    finally:
        await client.aclose()
        await store.close()
    return {"events": done, "seconds": time.monotonic() - started}


# -- the store's raw bulk upsert ---------------------------------------------------------

async def read_batches(client: aioredis.Redis, stream: str, batch_size: int,
                       max_event_bytes: int = 16 * 1024 * 1024) -> tuple[list[WriteBatch], int]:
    """The stream's entries, in order, cut into batches and coalesced as the worker does."""
    batches: list[WriteBatch] = []
    events = 0
    start: Any = "-"
    while True:
        rows = await client.xrange(stream, min=start, max="+", count=batch_size)
        if not rows:
            break
        entries = entries_from_read([(stream, rows)])
        valid, _dead = prepare(entries, max_event_bytes, 1000)
        events += len(valid)
        if valid:
            batches.append(coalesce_records(valid))
        last = entries[-1].id
        ms, _, seq = last.partition("-")
        start = f"{ms}-{int(seq) + 1}"
        if len(rows) < batch_size:
            break
    return batches, events


def _iso(value: Any) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="microseconds") if isinstance(
        value, datetime) else None


def batch_rows(batch: WriteBatch) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Column tuples (RUN_COLUMNS, NODE_COLUMNS) of one batch, in key order, docs encoded."""
    runs = []
    for _, run in sorted(batch.runs.items()):
        doc = run.to_doc()
        trigger = doc.get("trigger")
        source = trigger.get("source") if isinstance(trigger, dict) else None
        runs.append((run.workspace_id, run.run_id, run.workflow_id, run.status,
                     run.started_at, run.completed_at, source, _encode(doc).decode()))
    nodes = []
    for _, node in sorted(batch.nodes.items()):
        d = node.doc
        nodes.append((node.workspace_id, node.run_id, node.node_id, node.attempt,
                      node.node_key, d.get("type"), node.status, node.event_id,
                      d.get("startedAt"), d.get("completedAt"), _encode(d).decode()))
    return runs, nodes


def _pg_upsert(table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    types = [_PG_TYPES.get(col, "text") for col in columns]
    params = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
    select = ", ".join(f"{col}::jsonb" if col == "doc" else col for col in columns)
    updates = ", ".join(f"{col} = EXCLUDED.{col}" for col in columns if col not in key)
    return (f"INSERT INTO {table} ({', '.join(columns)}) "
            f"SELECT {select} FROM unnest({params}) AS u({', '.join(columns)}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}")


async def raw_upsert_postgres(dsn: str, prepared: list[tuple[list[Any], list[Any]]],
                              concurrency: int) -> float:
    import asyncpg  # the store's own driver

    admin = await asyncpg.connect(dsn)
    try:
        for source, copy in RAW_TABLES.items():
            await admin.execute(f"DROP TABLE IF EXISTS {copy}")
            await admin.execute(f"CREATE TABLE {copy} (LIKE {source} INCLUDING ALL)")
    finally:
        await admin.close()
    runs_sql = _pg_upsert(RAW_TABLES["workflow_runs"], RUN_COLUMNS, RUN_KEY)
    nodes_sql = _pg_upsert(RAW_TABLES["workflow_node_runs"], NODE_COLUMNS, NODE_KEY)
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    queue = list(reversed(prepared))

    async def writer() -> None:
        async with pool.acquire() as conn:
            while queue:
                runs, nodes = queue.pop()
                async with conn.transaction():
                    if runs:
                        await conn.execute(runs_sql, *[list(col) for col in zip(*runs,
                                                                                 strict=True)])
                    if nodes:
                        await conn.execute(nodes_sql, *[list(col) for col in zip(*nodes,
                                                                                  strict=True)])

    try:
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(writer)
        seconds = time.perf_counter() - started
    finally:
        async with pool.acquire() as conn:
            for copy in RAW_TABLES.values():
                await conn.execute(f"DROP TABLE IF EXISTS {copy}")
        await pool.close()
    return seconds


def _sqlite_upsert(table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    updates = ", ".join(f"{col} = excluded.{col}" for col in columns if col not in key)
    marks = ", ".join("?" for _ in columns)
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}")


def raw_upsert_sqlite(path: str, prepared: list[tuple[list[Any], list[Any]]]) -> float:
    import sqlite3

    from worker.stores.sqlite import DEFAULT_SYNCHRONOUS, SCHEMA

    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {DEFAULT_SYNCHRONOUS.upper()}")  # as the store
        ddl = SCHEMA
        for source, copy in RAW_TABLES.items():
            conn.execute(f"DROP TABLE IF EXISTS {copy}")
            ddl = ddl.replace(f" {source} ", f" {copy} ").replace(f" {source}_", f" {copy}_")
        conn.executescript(ddl)
        runs_sql = _sqlite_upsert(RAW_TABLES["workflow_runs"], RUN_COLUMNS, RUN_KEY)
        nodes_sql = _sqlite_upsert(RAW_TABLES["workflow_node_runs"], NODE_COLUMNS, NODE_KEY)
        rows = [([tuple(_iso(v) if isinstance(v, datetime) else v for v in r) for r in runs],
                 [tuple(_iso(v) if isinstance(v, datetime) else v for v in n) for n in nodes])
                for runs, nodes in prepared]
        started = time.perf_counter()
        for runs, nodes in rows:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(runs_sql, runs)
            conn.executemany(nodes_sql, nodes)
            conn.execute("COMMIT")
        seconds = time.perf_counter() - started
        for copy in RAW_TABLES.values():
            conn.execute(f"DROP TABLE IF EXISTS {copy}")
    finally:
        conn.close()
    return seconds


async def raw_upsert(store_url: str, batches: list[WriteBatch], events: int,
                     concurrency: int) -> dict[str, Any]:
    """Time the plain batched upsert of ``batches``' rows into copies of the store's tables."""
    from .monitor import service_cpu

    scheme = store_url.split(":", 1)[0]
    prepared = [batch_rows(b) for b in batches]
    rows = sum(len(r) + len(n) for r, n in prepared)
    before = service_cpu()
    if scheme in ("postgresql", "postgres"):
        from worker.stores.postgres import PostgresStore

        seconds = await raw_upsert_postgres(PostgresStore(store_url).dsn, prepared, concurrency)
        how = ("INSERT … SELECT FROM unnest(typed arrays) ON CONFLICT DO UPDATE (overwrite), "
               f"one transaction per batch, {concurrency} connections")
    elif scheme == "sqlite":
        from worker.stores.sqlite import database_path

        path = database_path(store_url.split("?", 1)[0])
        seconds = await anyio.to_thread.run_sync(raw_upsert_sqlite, path, prepared)
        how = ("executemany INSERT … ON CONFLICT DO UPDATE (overwrite), one BEGIN IMMEDIATE "
               "transaction per batch (SQLite has one writer)")
    else:
        raise ValueError(f"no raw upsert baseline for {scheme}://")
    server = {k: round((v - before.get(k, 0.0)) / max(1, events) * 1e6, 1)
              for k, v in service_cpu().items()}
    return {"batches": len(batches), "rows": rows, "events": events,
            "server_cpu_us_per_event": server,
            "seconds": round(seconds, 4), "rows_per_s": round(rows / seconds, 1),
            "events_per_s": round(events / seconds, 1), "method": how}


# -- subprocess entry point -----------------------------------------------------------------

def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks baseline")
    p.add_argument("kind", choices=("raw-redis", "faststream", "naive"))
    p.add_argument("--redis-url", required=True)
    p.add_argument("--stream", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--consumer", required=True)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--events", type=int, default=0)
    p.add_argument("--store-url")
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    if args.kind == "raw-redis":
        result = anyio.run(raw_redis_loop, args.redis_url, args.stream, args.group,
                           args.consumer, args.batch_size, args.events)
    elif args.kind == "faststream":
        result = anyio.run(faststream_consumer, args.redis_url, args.stream, args.group,
                           args.consumer, args.batch_size, args.events)
    else:
        result = anyio.run(naive_writer, args.redis_url, args.stream, args.group, args.consumer,
                           args.store_url, args.batch_size, args.seconds)
    print(msgspec.json.encode(result).decode(), flush=True)
    return 0


__all__ = ["faststream_consumer", "main", "naive_writer", "raw_redis_loop", "raw_upsert",
           "read_batches"]
