"""Test doubles and tools shared by the worker tests."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import redis.asyncio as aioredis

from worker import events as ev
from worker.documents import WriteBatch, coalesce
from worker.errors import StoreRejected, StoreUnavailable
from worker.stores import migrate
from worker.stores.base import (
    NodeQuery,
    NodeVersion,
    QueryStore,
    RunQuery,
    RunVersion,
    Store,
    StoredKey,
    WriteResult,
    WriteStore,
)

ROOT = Path(__file__).resolve().parent.parent
"""The repository's top directory (deploy/, docs/ ...)."""

REDIS_URL = os.environ.get("AUDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
"""The shared test Redis (tests isolate themselves by unique stream names)."""
PG_ADMIN_URL = os.environ.get("AUDIT_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")
"""The test PostgreSQL server's admin database (tests create databases of their own)."""

#: The ACL users of docs/events.md exactly (the docs tests read them from here): a
#: producer may only append events to ``audit:events`` and its shards (``audit:events:0``
#: … and the hash-tagged ``audit:events:{0}`` … ``{99}``), never their dead letters; a
#: worker runs the whole pipeline on ``audit:events*``.
PRODUCER_ACL = ("on >producer-pw resetkeys resetchannels ~audit:events ~audit:events:[0-9]* "
                "~audit:events:{[0-9]} ~audit:events:{[0-9][0-9]} "
                "-@all +xadd +ping +hello +auth")
WORKER_ACL = ("on >worker-pw resetkeys resetchannels ~audit:events* -@all +@stream "
              "+eval +evalsha +get +set +pexpire +del +ping +hello +auth +info +time "
              "+memory|usage")
#: What a Redis Cluster client needs besides (docs/scaling.md): the slot map and the
#: command table (``COMMAND``) redis-py reads when it connects.
CLUSTER_ACL = "+cluster|slots +command"
#: The users of the TLS + ACL set-ups (``secure_cluster``, ``secure_sentinel``): no
#: anonymous clients; ``admin`` for replication, Sentinel and redis-cli.
ADMIN_USER = ("admin", "admin-pw")
SECURE_USERS = ("default off", f"{ADMIN_USER[0]} on >{ADMIN_USER[1]} ~* &* +@all",
                f"producer {PRODUCER_ACL} {CLUSTER_ACL}", f"worker {WORKER_ACL} {CLUSTER_ACL}")


async def _admin() -> asyncpg.Connection:
    return await asyncpg.connect(PG_ADMIN_URL)


StoreT = TypeVar("StoreT", bound=Store)


@contextlib.asynccontextmanager
async def migrated(store: StoreT) -> AsyncIterator[StoreT]:
    """``store`` opened and migrated, as a worker's start does; closed afterwards."""
    await store.open()
    try:
        await migrate(store)
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database (its URL), dropped afterwards (for any fixture scope)."""
    name = f"aft_{uuid.uuid4().hex[:16]}"
    conn = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        conn = await _admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def workspace_name(prefix: str = "ws") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def write_events(store: Store, raw_events: Iterable[dict[str, Any]]) -> None:
    """Write events as the worker would: encoded, decoded, coalesced, one batch."""
    decoded = [ev.decode(ev.encode(raw), max_bytes=1 << 24) for raw in raw_events]
    result = await store.write(coalesce(enumerate(decoded)))
    assert not result.rejected


def run_cli(register: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    return parser.parse_args(argv)


class ReadWriteStore(WriteStore, QueryStore, Protocol):
    """What a worker test needs of a store: the worker's write path, and the reads that
    check what it wrote. Every backend is one; so are :class:`MemoryStore` and
    :class:`ControlledStore`."""


S = TypeVar("S", bound=ReadWriteStore)


class ForwardingStore(ReadWriteStore, Generic[S]):
    """Forwards the read-write protocol to ``inner``; a subclass overrides what it changes."""

    def __init__(self, inner: S) -> None:
        self.inner = inner
        self.name = inner.name

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def migrate(self) -> None:
        await self.inner.migrate()

    async def ping(self) -> None:
        await self.inner.ping()

    async def write(self, batch: WriteBatch) -> WriteResult:
        return await self.inner.write(batch)

    async def get_run(self, workspace: str, run_id: str) -> dict[str, Any] | None:
        return await self.inner.get_run(workspace, run_id)

    async def runs_with_subject(self, workspace: str, subject: str) -> list[dict[str, Any]]:
        return await self.inner.runs_with_subject(workspace, subject)

    async def get_nodes(self, workspace: str, run_id: str) -> list[dict[str, Any]]:
        return await self.inner.get_nodes(workspace, run_id)

    async def list_runs(self, workspace: str, query: RunQuery) -> list[dict[str, Any]]:
        return await self.inner.list_runs(workspace, query)

    def scan_nodes(self, workspace: str, query: NodeQuery) -> AsyncIterator[dict[str, Any]]:
        return self.inner.scan_nodes(workspace, query)

    async def workspaces(self) -> list[str]:
        return await self.inner.workspaces()


class StoreProxy(ForwardingStore[Store], Store):
    """Forwards the whole store protocol to ``inner``; a subclass overrides what it changes."""

    async def delete_runs(self, workspace: str, run_ids: Sequence[str], *,
                          expected: Sequence[RunVersion] | None = None) -> int:
        return await self.inner.delete_runs(workspace, run_ids, expected=expected)

    def scan_runs(self, workspace: str, before: datetime) -> AsyncIterator[dict[str, Any]]:
        return self.inner.scan_runs(workspace, before)

    async def delete_nodes(self, workspace: str, nodes: Sequence[NodeVersion]) -> int:
        return await self.inner.delete_nodes(workspace, nodes)

    async def strip_node_fields(self, workspace: str, nodes: Sequence[NodeVersion],
                                fields: Sequence[str]) -> int:
        return await self.inner.strip_node_fields(workspace, nodes, fields)

    async def strip_run_fields(self, workspace: str, runs: Sequence[RunVersion],
                               fields: Sequence[str]) -> int:
        return await self.inner.strip_run_fields(workspace, runs, fields)

    async def put_data_keys(self, workspace: str, keys: Sequence[StoredKey]) -> None:
        await self.inner.put_data_keys(workspace, keys)

    async def data_keys(self, workspace: str,
                        run_ids: Sequence[str] | None = None) -> list[StoredKey]:
        return await self.inner.data_keys(workspace, run_ids)

    async def shred_data_keys(self, workspace: str, run_ids: Sequence[str],
                              at: datetime) -> int:
        return await self.inner.shred_data_keys(workspace, run_ids, at)


class ControlledStore(ForwardingStore[ReadWriteStore]):
    """Wraps a store: can be taken down, slowed, or made to choke on some runs."""

    def __init__(self, inner: ReadWriteStore) -> None:
        super().__init__(inner)
        self.down = False
        self.delay = 0.0
        self.crash_runs: set[str] = set()   # raise an unexpected error (a poison message)
        self.reject_runs: set[str] = set()  # raise StoreRejected (permanent)
        self.gate: anyio.Event | None = None  # set: writes wait until it is set
        self.writes = 0
        self.failures = 0
        self.entered = 0  # writes begun (before the delay, the gate or a failure)

    async def ping(self) -> None:
        if self.down:
            raise StoreUnavailable("store is down (test)")
        await self.inner.ping()

    async def write(self, batch: WriteBatch) -> WriteResult:
        self.entered += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await anyio.sleep(self.delay)
        if self.down:
            self.failures += 1
            raise StoreUnavailable("store is down (test)")
        runs = {run_id for _, run_id in batch.runs}
        if runs & self.crash_runs:
            self.failures += 1
            raise RuntimeError("boom: this run crashes the writer")
        if runs & self.reject_runs:
            self.failures += 1
            raise StoreRejected("value too long for this store (test)")
        self.writes += 1
        return await self.inner.write(batch)


def spawn_worker(name: str, stream: str, redis_url: str, store_url: str, log: Path,
                 **env: str) -> subprocess.Popen[bytes]:
    """``python -m worker run`` as consumer ``name``, logging JSON to ``log``."""
    settings = dict(
        AUDIT_REDIS_URL=redis_url, AUDIT_STREAM=stream, AUDIT_GROUP="audit-writers",
        AUDIT_CONSUMER=name, AUDIT_STORE_URL=store_url, AUDIT_METRICS_PORT="0",
        AUDIT_BATCH_SIZE="200", AUDIT_BLOCK_MS="100", AUDIT_CLAIM_IDLE_MS="1500",
        AUDIT_RECLAIM_INTERVAL_S="0.3", AUDIT_LOG_FORMAT="json", AUDIT_TRIM="false",
    )
    return subprocess.Popen([sys.executable, "-m", "worker", "run"],
                            env={**os.environ, **settings, **env},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


Condition = Callable[[], bool | Awaitable[bool]]


async def wait_until(condition: Condition, within_s: float = 20.0, interval: float = 0.02,
                     what: str = "") -> float:
    """Poll ``condition`` (a function or a coroutine function) until it is true; fail the
    test after ``within_s`` seconds.

    Returns the seconds it took. A test waits exactly as long as the system needs, on an
    idle machine or a loaded one, instead of sleeping a guessed time and then asserting.
    """
    start = time.monotonic()
    try:
        with anyio.fail_after(within_s):
            while True:
                result = condition()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return time.monotonic() - start
                await anyio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"not true within {within_s} s: {what or condition!r}") from None


def as_text(reply: object) -> str:
    """A reply of a client without ``decode_responses`` (bytes) as text; redis-py types
    such replies loosely (text, bytes, sometimes a number)."""
    assert isinstance(reply, bytes | str), reply
    return reply.decode() if isinstance(reply, bytes) else reply


RawEntry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as a client without ``decode_responses`` reads it: ID and fields as bytes."""


def raw_entries(rows: Iterable[tuple[object, object]] | None) -> list[RawEntry]:
    """Entries of an XRANGE or XREADGROUP reply, typed as they are (redis-py's reply types
    allow text and None: the test clients decode no responses, and the entries exist)."""
    out: list[RawEntry] = []
    for entry_id, fields in rows or []:
        assert isinstance(entry_id, bytes), entry_id
        assert isinstance(fields, dict), fields
        out.append((entry_id, cast(dict[bytes, bytes], fields)))
    return out


async def stream_range(redis: aioredis.Redis, key: str, count: int | None = None
                       ) -> list[RawEntry]:
    """XRANGE of all of ``key`` (or its first ``count`` entries)."""
    return raw_entries(await redis.xrange(key, count=count))


async def read_group(redis: aioredis.Redis, group: str, consumer: str, stream: str,
                     count: int) -> list[RawEntry]:
    """XREADGROUP of new entries (``>``) of one stream as ``consumer``."""
    reply = await redis.xreadgroup(group, consumer, {stream: ">"}, count=count)
    if not reply:
        return []
    assert isinstance(reply, list), reply  # RESP2: [[stream, entries]]
    ((_, rows),) = reply
    return raw_entries(rows)


async def command(redis: aioredis.Redis, *args: str | bytes) -> object:
    """A raw command: one redis-py has no method for, or a form its method cannot send
    (two fields of one name in an XADD)."""
    reply: object = await redis.execute_command(*args)  # type: ignore[no-untyped-call]  # untyped in redis-py
    return reply


async def dlq_entries(redis: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    """The dead-letter stream's entries as dicts of text fields (event kept as bytes)."""
    out = []
    for entry_id, fields in await stream_range(redis, stream + ":dlq"):
        row = {k.decode(): (v if k == b"event" else v.decode()) for k, v in fields.items()}
        row["_id"] = entry_id.decode()
        out.append(row)
    return out


async def pending_count(redis: aioredis.Redis, stream: str, group: str) -> int:
    summary = await redis.xpending(stream, group)
    return int(summary["pending"])


def event_ids_of(events: Sequence[dict[str, Any]]) -> set[str]:
    return {e["eventId"] for e in events}


def payload(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


class TcpProxy:
    """A TCP proxy in the current event loop that can cut the link (store outages), for
    the tests and, as a process of its own, for the benchmarks (``benchmarks/proxy.py``).

    A cut closes every open connection and closes each new one at once; with ``vanish``
    it is a host gone away instead: open connections are reset (RST) and nothing listens
    (new connections are refused) until the link is restored, on the same port.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1",
                 port: int = 0, vanish: bool = False) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port
        self.vanish = vanish
        self.cut = False
        #: Blackholed: connections stay open (and new ones are accepted) but no byte
        #: passes either way, like a dropped route: peers wait for their timeouts.
        self.blackhole = False
        self._conns: set[Any] = set()
        self._tg: Any = None
        self._listener: Any = None
        self._serving: anyio.CancelScope | None = None
        self._served = anyio.Event()

    async def __aenter__(self) -> TcpProxy:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        if self._listener is not None:
            await self._listener.aclose()

    async def _listen(self) -> None:
        self._listener = await anyio.create_tcp_listener(local_host=self.host,
                                                         local_port=self.port)
        self.port = self._listener.extra(anyio.abc.SocketAttribute.local_port)
        scope = self._serving = anyio.CancelScope()
        listener = self._listener
        done = self._served = anyio.Event()

        async def serve() -> None:
            try:
                with scope:
                    await listener.serve(self._handle)
            finally:
                done.set()

        self._tg.start_soon(serve)

    async def set_cut(self, cut: bool) -> None:
        """Cut: drop every open connection and refuse new ones until restored."""
        self.cut = cut
        if cut and self.vanish:
            for conn in list(self._conns):  # a reset, as from a host that went away
                sock = conn.extra(anyio.abc.SocketAttribute.raw_socket)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if self._listener is not None and self._serving is not None:
                self._serving.cancel()  # ends every connection's pumps too
                await self._served.wait()
                await self._listener.aclose()
                self._listener = None
        if cut:
            for conn in list(self._conns):
                await conn.aclose()
        elif self.vanish and self._listener is None:
            await self._listen()

    async def set_blackhole(self, on: bool) -> None:
        """Blackhole the link (see :attr:`blackhole`), or let bytes pass again."""
        self.blackhole = on

    async def _handle(self, client: Any) -> None:
        if self.cut:
            await client.aclose()
            return
        if self.blackhole:
            async with client:
                async for _ in client:  # swallow everything until the peer gives up
                    pass
            return
        try:
            upstream = await anyio.connect_tcp(*self.upstream)
        except OSError:
            await client.aclose()
            return
        self._conns.update((client, upstream))

        async def pump(src: Any, dst: Any) -> None:
            try:
                async for chunk in src:
                    if not self.blackhole:
                        await dst.send(chunk)
            except Exception:
                pass
            finally:
                await src.aclose()
                await dst.aclose()
                tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, client, upstream)
                tg.start_soon(pump, upstream, client)
        finally:
            self._conns.discard(client)
            self._conns.discard(upstream)


class MemoryStore(ReadWriteStore):
    """The reference merge of worker.documents, kept in memory (worker-loop tests)."""

    name = "memory"

    def __init__(self) -> None:
        from worker.documents import NodeDoc, RunPatch

        self.runs: dict[tuple[str, str], RunPatch] = {}
        self.nodes: dict[tuple[str, str, str], NodeDoc] = {}
        self.batches = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def migrate(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def write(self, batch: WriteBatch) -> WriteResult:
        import copy

        self.batches += 1
        for key, run in batch.runs.items():
            clean = copy.deepcopy(run)
            clean.sources = []
            if key in self.runs:
                self.runs[key].merge(clean)
            else:
                self.runs[key] = clean
        for nkey, node in batch.nodes.items():
            clean_node = copy.deepcopy(node)
            clean_node.sources = []
            if nkey in self.nodes:
                self.nodes[nkey].merge(clean_node)
            else:
                self.nodes[nkey] = clean_node
        return WriteResult()

    async def get_run(self, workspace: str, run_id: str) -> dict[str, Any] | None:
        run = self.runs.get((workspace, run_id))
        return run.to_doc() if run else None

    async def runs_with_subject(self, workspace: str, subject: str) -> list[dict[str, Any]]:
        return [r.to_doc() for k, r in self.runs.items()
                if k[0] == workspace and subject in r.subjects]

    async def get_nodes(self, workspace: str, run_id: str) -> list[dict[str, Any]]:
        return [n.doc for k, n in self.nodes.items() if k[:2] == (workspace, run_id)]

    async def list_runs(self, workspace: str, query: RunQuery) -> list[dict[str, Any]]:
        return [r.to_doc() for k, r in self.runs.items() if k[0] == workspace][: query.limit]

    async def scan_nodes(self, workspace: str, query: NodeQuery) -> AsyncIterator[dict[str, Any]]:
        for k, n in self.nodes.items():
            if k[0] == workspace:
                yield n.doc

    async def workspaces(self) -> list[str]:
        return sorted({k[0] for k in self.runs})


async def fill_to_maxmemory(client: aioredis.Redis, prefix: str = "pad:") -> int:
    """Write padding keys until a server with ``--maxmemory`` refuses (OOM); returns how many.

    Then the limit (of this private server) is lowered 1 MiB below what is used, so that
    small changes in client buffers never let a write through; :func:`free_padding`
    frees far more than that.
    """
    from redis.exceptions import OutOfMemoryError

    written = 0
    while True:
        try:
            await client.set(f"{prefix}{written}", b"x" * 65536)
        except OutOfMemoryError:
            break
        written += 1
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", max(1, used - 1024 * 1024))
    return written


async def free_padding(client: aioredis.Redis, prefix: str = "pad:") -> None:
    """Delete the padding :func:`fill_to_maxmemory` wrote (DEL is served at maxmemory)."""
    keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.delete(*keys[i : i + 500])


def through(proxy: TcpProxy, url: str) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def workload(seed: int, target: int, workspace: str = "ws_crash", prompt_bytes: int = 400
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Ground-truth runs and their events (at least ``target``, in stream order): mixed
    snapshots, shuffled runs, replays (4% of the events twice), runs interleaved."""
    from worker import samples

    rng = random.Random(seed)
    runs: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    i = 0
    while len(events) < target:
        run = samples.lead_triage_run(rng, workspace, f"run{i:05d}",
                                      prompt_size=lambda r: prompt_bytes)
        evs = samples.run_events(run, snapshot=rng.random() < 0.2)
        if rng.random() < 0.3:
            rng.shuffle(evs)  # out of order: terminal before start, nodes reversed …
        runs.append(run)
        events.extend(evs)
        i += 1
    replays = rng.sample(events, k=len(events) // 25)
    stream_order = events + replays
    # interleave runs like a busy engine would (bounded displacement keeps runs spread)
    for j in range(len(stream_order) - 1, 0, -1):
        k = max(0, j - rng.randrange(0, 50))
        stream_order[j], stream_order[k] = stream_order[k], stream_order[j]
    return runs, stream_order
