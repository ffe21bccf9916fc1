"""``audit-fleet demo``: the whole pipeline on one machine, start to finish.

Hermetic: it never reads or writes what ``AUDIT_*`` points at. It starts a private
``redis-server`` on a free port when the binary is there (else it uses ``--redis-url``, or
``AUDIT_REDIS_URL`` as a last resort), always with a stream and group of its own named for
this run, and refuses a group that already exists. Its store is a SQLite file in a per-run
directory (or ``--store-url``), where the workers' log goes too. It emits a few hundred
lead-triage runs (with retries, failures, low-confidence decisions, replayed duplicates and
a few malformed entries), drains them with two worker processes while showing progress,
and prints one run's decision chain. ``--seed`` reproduces the same runs, events and IDs
(times are relative to the start of the current UTC day).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .. import samples
from ..constants import dlq_key
from ..emitter import AuditEmitter, uuid7
from ..errors import AuditFleetError
from ..redisclient import connect
from ..redisio import text
from ..settings import Settings, mask_url, setting
from .output import progress_bar as _bar

WORKSPACE = "workspace_demo"


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on this machine and explain a run")
    p.add_argument("--runs", type=int, default=300, help="lead-triage runs to emit (300)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    p.add_argument("--redis-url", default=None,
                   help="use this Redis instead of a private redis-server (the demo still "
                   "uses a stream and group of its own)")
    p.add_argument("--store-url", default=None,
                   help="store the demo runs here (default: a SQLite file in a new "
                   "temporary directory)")
    p.add_argument("--serve", action="store_true",
                   help="then serve the viewer on --bind until Ctrl-C")
    p.add_argument("--bind", default="127.0.0.1:8700", help="the viewer's loopback address")
    p.set_defaults(func=cmd_demo)


async def _reachable(url: str) -> bool:
    try:
        client = await connect(url, "auto", socket_connect_timeout=1)
    except Exception:
        return False
    try:
        await client.ping()
        return True
    except Exception:
        return False
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def redis_for_demo(url: str | None) -> AsyncIterator[str]:
    """A private ``redis-server`` on a free port; ``url`` when given or when no binary is
    installed (then AUDIT_REDIS_URL, or the default, if it answers)."""
    binary = shutil.which("redis-server")
    if url is None and binary is None:
        url = setting("redis_url")
    if url is not None:
        if not await _reachable(url):
            raise AuditFleetError(
                f"demo: no Redis at {mask_url(url)} and no redis-server binary to start a "
                "private one (Debian/Ubuntu: apt-get install redis-server; macOS: brew "
                "install redis), or pass --redis-url of a running Redis >= 7"
            )
        yield url
        return
    assert binary is not None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = await anyio.open_process(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    local = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            if await _reachable(local):
                break
            await anyio.sleep(0.05)
        print(f"started a private redis-server on port {port}")
        yield local
    finally:
        proc.terminate()
        with anyio.move_on_after(10, shield=True):
            await proc.wait()


def demo_runs(seed: int, count: int, today: datetime) -> tuple[list[dict[str, Any]],
                                                                list[dict[str, Any]],
                                                                list[dict[str, Any]]]:
    """(runs, events, replayed duplicates), all determined by ``seed`` and ``today``."""
    rng = random.Random(seed)
    runs = [samples.lead_triage_run(
                rng, WORKSPACE, f"run_{seed:x}_{i:04d}",
                start=today - timedelta(seconds=rng.randrange(600, 7 * 86400)))
            for i in range(count)]
    events: list[dict[str, Any]] = []
    for i, run in enumerate(runs):
        events.extend(samples.run_events(run, snapshot=i % 3 == 0))
    for event in events:  # reproducible, time-ordered IDs (UUIDv7 from the seeded rng)
        event["eventId"] = _uuid7(event["ts"], rng)
    replays = rng.sample(events, k=max(1, len(events) // 20))  # at-least-once producers
    return runs, events, replays


def _uuid7(ts: str, rng: random.Random) -> str:
    """A UUIDv7 for the time ``ts``, its random bits from ``rng`` (reproducible)."""
    return uuid7(int(datetime.fromisoformat(ts).timestamp() * 1000), rng.getrandbits(74)).hex


async def cmd_demo(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else int(time.time())
    token = uuid.uuid4().hex[:8]
    # The token is a hash tag: on a cluster the stream and its :dlq share one slot.
    stream, group = f"audit-demo:{{{token}}}:events", f"audit-demo-{token}"
    workdir = Path(tempfile.mkdtemp(prefix=f"audit-fleet-demo-{token}-"))
    store_url = args.store_url or f"sqlite:///{workdir / 'demo.db'}"
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    runs, events, replays = demo_runs(seed, args.runs, today)
    async with redis_for_demo(args.redis_url) as redis_url:
        settings = Settings(redis_url=redis_url, streams=(stream,), group=group,
                            store_url=store_url, metrics_port=0)
        client = await connect(redis_url, "auto")
        try:
            await _create_own_group(client, stream, group)
            emitter = AuditEmitter(client, settings.streams)
            print(f"store: {mask_url(store_url)}   redis: {mask_url(redis_url)}   "
                  f"stream: {stream}   group: {group}   seed: {seed}")

            # 1. the workflow engine side: emit runs as events or snapshots
            await emitter.emit_many(events + replays)
            for payload in BAD_ENTRIES:
                await emitter.emit_raw(stream, payload)
            total = len(events) + len(replays) + len(BAD_ENTRIES)
            print(f"emitted {len(runs)} runs as {total} events "
                  f"({len(replays)} replayed duplicates, {len(BAD_ENTRIES)} malformed)")

            # 2. the fleet: worker processes draining the stream in one consumer group
            codes, elapsed, log = await _drain(client, settings, args.workers, total, workdir)
            lead = "\r" if sys.stdout.isatty() else ""
            print(f"{lead}{_bar(total, total)} {total}/{total} events handled in {elapsed:.1f}s "
                  f"(worker exit codes {codes}; logs: {log})")
            dlq = await client.xlen(dlq_key(stream))
            print(f"dead-letter stream {dlq_key(stream)} holds {dlq} entries")
        finally:
            await client.aclose()
        if any(codes):
            print("a worker failed; see the log above", file=sys.stderr)
            return 1

    # 3. the question: why did it do that?
    pick = next((r for r in runs if r["nodes"][1].get("error") and r["status"] == "completed"),
                runs[0])
    print()
    code = await _explain(store_url, WORKSPACE, pick["runId"])
    if code == 0:
        await _viewer(store_url, WORKSPACE, pick["runId"], args)
    return code


#: Entries no worker can store: they end in the demo stream's dead-letter stream.
BAD_ENTRIES = (
    b"{not json",
    b'{"v": 99, "type": "run.started"}',
    b'{"v": 1, "type": "run.started", "eventId": "x", "workspaceId": "../admin"}',
)


async def _create_own_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """Create the demo's group; refuse one that exists (never join a real fleet's group)."""
    try:
        groups = await client.xinfo_groups(stream)
    except ResponseError:  # no such stream: nobody's group
        groups = []
    if any(text(g["name"]) == group for g in groups):
        raise AuditFleetError(f"demo: group {group!r} already exists on {stream!r}; "
                              "the demo only uses a group of its own")
    await client.xgroup_create(stream, group, id="0", mkstream=True)


async def _drain(client: aioredis.Redis, settings: Settings, workers: int, total: int,
                 workdir: Path) -> tuple[list[int], float, Path]:
    """Run ``workers`` worker processes in burst mode until they have drained the stream."""
    stream, group = settings.streams[0], settings.group
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIT_")}
    env.update(AUDIT_REDIS_URL=settings.redis_url, AUDIT_STREAM=stream, AUDIT_GROUP=group,
               AUDIT_STORE_URL=settings.store_url, AUDIT_METRICS_PORT="0",
               AUDIT_LOG_FORMAT="json", AUDIT_BLOCK_MS="200", AUDIT_BURST="true",
               AUDIT_TRIM="false")
    log = workdir / "workers.log"
    with log.open("ab") as log_file:
        procs = [
            await anyio.open_process(
                [sys.executable, "-m", "worker", "run", "--consumer", f"demo-worker-{n + 1}"],
                env=env, stdout=log_file, stderr=log_file,
            )
            for n in range(workers)
        ]
        began = time.monotonic()
        live = sys.stdout.isatty()
        while any(p.returncode is None for p in procs):
            done = max(0, min(await _group_done(client, stream, group), total))
            if live:
                print(f"\r{_bar(done, total)} {done}/{total} events stored or "
                      f"dead-lettered by {workers} workers", end="", flush=True)
            await anyio.sleep(0.2)
        elapsed = time.monotonic() - began
    return [await p.wait() for p in procs], elapsed, log


async def _group_done(client: aioredis.Redis, stream: str, group: str) -> int:
    """Entries the group has delivered and acknowledged so far."""
    try:
        groups = await client.xinfo_groups(stream)
    except Exception:
        return 0
    for g in groups:
        if text(g["name"]) == group:
            read = g.get("entries-read")
            return int(read or 0) - int(g["pending"])
    return 0


async def _explain(store_url: str, workspace: str, run_id: str) -> int:
    from ..stores import open_store

    store = open_store(store_url)
    await store.open()
    try:
        run = await store.get_run(workspace, run_id)
        nodes = await store.get_nodes(workspace, run_id)
    finally:
        await store.close()
    if run is None:
        print(f"run {run_id} was not found in {store_url}", file=sys.stderr)
        return 1
    from ..explain import build
    from .explain import render

    print(render(build(workspace, run_id, run, nodes)))
    flag = f"--store-url '{store_url}'"
    print(f"\nexplain it yourself: audit-fleet explain {run_id} --workspace {workspace} {flag}")
    print(f"improvement queries: audit-fleet insights --workspace {workspace} --since 7d {flag}")
    return 0


async def _viewer(store_url: str, workspace: str, run_id: str, args: argparse.Namespace) -> None:
    """Print (or, with --serve, start) a local viewer on the demo's data and a token for it."""
    from urllib.parse import quote

    from ..api.server import Listen
    from ..stores import open_store
    from .serve import viewer_token

    listen = Listen.make(args.bind, cert=None, key=None, insecure_localhost=True)
    store = open_store(store_url)
    await store.open()
    try:
        token = await viewer_token(store, workspace, label="demo")
    finally:
        await store.close()
    url = f"{listen.url(listen.bind.port)}/workspaces/{workspace}/runs/{quote(run_id, safe='')}"
    if not args.serve:
        print(f"\nthe viewer:          audit-fleet serve --insecure-localhost --bind {args.bind}"
              f" --store-url '{store_url}'")
    print(f"\nthe run in the viewer: {url}")
    print(f"log in there with this token ({workspace} only, runs:read,prompts:read):")
    print(token)
    if args.serve:
        from argparse import Namespace

        from .serve import cmd_serve

        await cmd_serve(Namespace(bind=args.bind, tls_cert=None, tls_key=None,
                                  insecure_localhost=True, archive_dir=None,
                                  store_url=store_url))
