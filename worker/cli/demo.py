"""``audit-fleet demo``: the whole pipeline on one machine, start to finish.

Finds Redis (AUDIT_REDIS_URL, or a local ``redis-server`` on a free port), emits a
few hundred lead-triage runs (with retries, failures, low-confidence decisions,
replayed duplicates and a few malformed entries), drains them with two worker
processes while showing progress, and prints one run's decision chain.
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
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis

from .. import samples
from ..emitter import AuditEmitter
from ..redisio import text
from ..settings import Settings
from .output import progress_bar as _bar

WORKSPACE = "workspace_demo"


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on this machine and explain a run")
    p.add_argument("--runs", type=int, default=300, help="lead-triage runs to emit (300)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    p.set_defaults(func=cmd_demo)


async def _reachable(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        await client.ping()
        return True
    except Exception:
        return False
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def redis_for_demo(url: str) -> AsyncIterator[str]:
    """AUDIT_REDIS_URL if reachable, else a private ``redis-server`` on a free port."""
    if await _reachable(url):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            f"audit-fleet demo: no Redis at {url} and no redis-server binary.\n"
            "  Install one (Debian/Ubuntu: sudo apt-get install redis-server;\n"
            "  macOS: brew install redis; Docker: docker run -d -p 6379:6379 redis:7)\n"
            "  or point AUDIT_REDIS_URL at a running Redis >= 7."
        )
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
        print(f"started a private redis-server on port {port} (no Redis at {url})")
        yield local
    finally:
        proc.terminate()
        with anyio.move_on_after(10, shield=True):
            await proc.wait()


async def cmd_demo(args: argparse.Namespace) -> int:
    base = Settings.from_env(metrics_port=0)
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    async with redis_for_demo(base.redis_url) as redis_url:
        settings = base.with_(redis_url=redis_url)
        stream = settings.streams[0]
        client = aioredis.Redis.from_url(redis_url)
        emitter = AuditEmitter(client, settings.streams)
        print(f"store: {settings.store_url}   redis: {redis_url}   stream: {stream}")

        # 1. the workflow engine side: emit runs as events or snapshots
        now = datetime.now(UTC)  # runs of the last week, so `insights --since 7d` sees them
        runs = [samples.lead_triage_run(
                    rng, WORKSPACE, f"run_{seed:x}_{i:04d}",
                    start=now - timedelta(seconds=rng.randrange(600, 7 * 86400)))
                for i in range(args.runs)]
        events: list[dict[str, Any]] = []
        for i, run in enumerate(runs):
            events.extend(samples.run_events(run, snapshot=i % 3 == 0))
        replays = rng.sample(events, k=max(1, len(events) // 20))  # at-least-once producers
        await emitter.emit_many(events + replays)
        bad = [b"{not json", b'{"v": 99, "type": "run.started"}',
               b'{"v": 1, "type": "run.started", "eventId": "x", "workspaceId": "../admin"}']
        for payload in bad:
            await emitter.emit_raw(stream, payload)
        total = len(events) + len(replays) + len(bad)
        print(f"emitted {len(runs)} runs as {total} events "
              f"({len(replays)} replayed duplicates, {len(bad)} malformed)")

        # 2. the fleet: worker processes draining the stream in one consumer group
        start_len = await _group_done(client, stream, settings.group)
        env = dict(os.environ, AUDIT_REDIS_URL=redis_url, AUDIT_STORE_URL=settings.store_url,
                   AUDIT_METRICS_PORT="0", AUDIT_LOG_FORMAT="json", AUDIT_BLOCK_MS="200",
                   AUDIT_BURST="true")
        log = Path(tempfile.gettempdir()) / "audit-fleet-demo.log"
        with log.open("ab") as log_file:
            procs = [
                await anyio.open_process(
                    [sys.executable, "-m", "worker", "run", "--consumer", f"demo-worker-{n + 1}"],
                    env=env, stdout=log_file, stderr=log_file,
                )
                for n in range(args.workers)
            ]
            began = time.monotonic()
            live = sys.stdout.isatty()
            while any(p.returncode is None for p in procs):
                done = await _group_done(client, stream, settings.group) - start_len
                done = max(0, min(done, total))
                if live:
                    print(f"\r{_bar(done, total)} {done}/{total} events stored or "
                          f"dead-lettered by {args.workers} workers", end="", flush=True)
                await anyio.sleep(0.2)
            elapsed = time.monotonic() - began
        codes = [await p.wait() for p in procs]
        lead = "\r" if live else ""
        print(f"{lead}{_bar(total, total)} {total}/{total} events handled in {elapsed:.1f}s "
              f"(worker exit codes {codes}; logs: {log})")
        dlq = await client.xlen(stream + ":dlq")
        print(f"dead-letter stream {stream}:dlq holds {dlq} entries "
              f"(see: audit-fleet dlq list)")
        await client.aclose()
        if any(codes):
            print("a worker failed; see the log above", file=sys.stderr)
            return 1

    # 3. the question: why did it do that?
    pick = next((r for r in runs if r["nodes"][1].get("error") and r["status"] == "completed"),
                runs[0])
    print()
    return await _explain(settings.store_url, WORKSPACE, pick["runId"])


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
    print(f"\nexplain it yourself: audit-fleet explain {run_id} --workspace {workspace}")
    print(f"improvement queries: audit-fleet insights --workspace {workspace} --since 7d")
    print("the fleet:           audit-fleet status; audit-fleet dlq list")
    return 0
