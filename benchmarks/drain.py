"""``python -m benchmarks drain``: one worker, in this process, drains a backlog on null://.

For whole-process A/B pairs of two checkouts of the worker on one machine: ``--root`` names
the directory whose ``worker`` package is imported (default: this checkout), the load mix
and the backlog are the same for both (this checkout's ``benchmarks.load``, seed 7). The
worker phase's CPU µs/event and events/s are appended to ``--out`` (one line per run), so
a pair of commands run in turn gives same-machine ratios without the load step's share::

    python -m benchmarks drain --events 50000 --out new.txt
    python -m benchmarks drain --events 50000 --out old.txt --root /tmp/old-checkout
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks drain")
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--root", type=Path, default=None,
                   help="directory holding the worker package to measure (default: this one)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = p.parse_args(argv)
    if args.root is not None:  # that checkout's worker, not the installed one
        for name in [m for m in sys.modules if m == "worker" or m.startswith("worker.")]:
            del sys.modules[name]
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, str(args.root.resolve()))
    import anyio

    import worker

    if args.root is not None and not str(worker.__file__).startswith(str(args.root.resolve())):
        raise SystemExit(f"imported {worker.__file__}, not the worker under {args.root}")
    line = anyio.run(_drain, args.events, args.redis_url)
    with args.out.open("a") as f:
        f.write(line)
    return 0


async def _drain(events: int, redis_url: str) -> str:
    """The worker phase's CPU µs/event and events/s, as one line."""
    import resource
    import time
    import uuid

    import redis.asyncio as aioredis

    from worker.consumer import Worker
    from worker.settings import Settings
    from worker.stores import open_store

    from . import load

    pool = load.build_templates(7, 200)
    ids = load.Ids("drain", 0, "drain_ws")
    payloads = [ids.payload(item) for item in load.plan(pool, events, seed=7)]
    stream = f"bench:drain:{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        for i in range(0, events, 1000):
            pipe = client.pipeline(transaction=False)
            for payload in payloads[i:i + 1000]:
                pipe.xadd(stream, {"event": payload})
            await pipe.execute()
        settings = Settings(redis_url=redis_url, streams=(stream,), consumer="drain",
                            store_url="null://", metrics_port=0, block_ms=50, burst=True,
                            trim=False)
        store = open_store("null://")
        await store.open()
        t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        await Worker(settings, store, client).run()
        t1, c1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await client.delete(stream)
        await client.aclose()
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    return f"{cpu / events * 1e6:.2f} {events / (t1 - t0):.0f}\n"
