"""Sharded streams on a Redis Cluster against one standalone Redis, and skew latency.

``python -m benchmarks.cluster [--events 60000] [--backlog 150000] [--skip-skew]``

Starts its own servers on free loopback ports (a 6-node cluster: 3 masters + 3 replicas,
and one standalone ``redis-server``; see ``tests/redis_servers.py``), so nothing shared
is touched, and prints a table (``--json`` for the raw figures):

* **throughput** — ``--events`` events (lead-triage runs as the SDK writes them) spread
  over 4 shards ``bench:{0..3}`` by runId, then 1 and 2 worker processes
  (``audit-fleet run --burst``, ``null://`` store: the pipeline's own ceiling) drain
  them; events/s from the first acknowledged entry to the last, read from XINFO GROUPS.
* **skew** — a ``--backlog`` of entries on shard 0 while a light trickle (``--rate``
  events/s in all) is appended to shards 1-3; one in-process worker drains both; the
  trickle's end-to-end latency (entry ID time to acknowledgement) p50/p99/max, measured
  per entry, against the 250 ms target.

The numbers depend on the machine and what else runs on it: run it on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis

from tests.redis_servers import RedisCluster, free_ports, wait_for
from worker import events as ev
from worker import samples
from worker.batch import Batch
from worker.consumer import Worker
from worker.emitter import shard_index
from worker.redisclient import connect
from worker.settings import Settings
from worker.stores import open_store
from worker.writer import Outcome

SHARDS = 4
GROUP = "audit-writers"


def payloads(n: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """``n`` encoded events with their runId (about 1 KiB each on average)."""
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    i = 0
    while len(out) < n:
        run = samples.lead_triage_run(rng, "ws_bench", f"run_{seed}_{i}",
                                      prompt_size=lambda r: 300)
        out.extend((run["runId"], ev.encode(e)) for e in samples.run_events(run))
        i += 1
    return out[:n]


def streams(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}:{{{i}}}" for i in range(SHARDS))


async def fill(client: aioredis.Redis, names: tuple[str, ...], items: list[tuple[str, bytes]],
               *, shard: int | None = None) -> None:
    for name in names:
        await client.xgroup_create(name, GROUP, id="0", mkstream=True)
    for i in range(0, len(items), 2000):
        async with client.pipeline(transaction=False) as pipe:
            for run_id, payload in items[i: i + 2000]:
                target = names[shard if shard is not None else shard_index(run_id, len(names))]
                pipe.xadd(target, {"event": payload})
            await pipe.execute()


async def acked(client: aioredis.Redis, names: tuple[str, ...]) -> int:
    done = 0
    for name in names:
        for g in await client.xinfo_groups(name):
            done += int(g.get("entries-read") or 0) - int(g["pending"])
    return done


def redis_stats(ports: list[int]) -> tuple[int, float]:
    """Used memory (bytes) summed over the servers, and their CPU seconds (user + sys)."""
    memory, cpu = 0, 0.0
    for port in ports:
        out = subprocess.run(["redis-cli", "-p", str(port), "info"], capture_output=True,
                             text=True, timeout=10, check=False).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        if info.get("role", "master").strip() == "master":
            memory += int(info.get("used_memory", "0"))
        cpu += float(info.get("used_cpu_sys", "0")) + float(info.get("used_cpu_user", "0"))
    return memory, cpu


async def throughput(url: str, mode: str, workers: int, items: list[tuple[str, bytes]],
                     tag: str, ports: list[int]) -> dict[str, Any]:
    names = streams(f"bench{tag}")
    client = await connect(url, mode)
    try:
        mem0, cpu0 = redis_stats(ports)
        await fill(client, names, items)
        mem1, cpu1 = redis_stats(ports)
        env = dict(os.environ, AUDIT_REDIS_URL=url, AUDIT_REDIS_MODE=mode,
                   AUDIT_STREAM=",".join(names), AUDIT_STORE_URL="null://",
                   AUDIT_METRICS_PORT="0", AUDIT_LOG_LEVEL="warning", AUDIT_BLOCK_MS="200",
                   AUDIT_TRIM="false", AUDIT_BURST="true")
        procs = [await anyio.open_process([sys.executable, "-m", "worker", "run",
                                           "--consumer", f"bench-{n}"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for n in range(workers)]
        first = last = None
        total = len(items)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = await acked(client, names)
            now = time.monotonic()
            if first is None and done > 0:
                first = (now, done)
            if done >= total:
                last = (now, done)
                break
            await anyio.sleep(0.02)
        with anyio.fail_after(60):
            for p in procs:
                await p.wait()
        if first is None or last is None:
            raise RuntimeError("the workers did not drain the shards in time")
        _, cpu2 = redis_stats(ports)
        rate = (last[1] - first[1]) / max(1e-9, last[0] - first[0])
        payload = sum(len(p) for _, p in items) / total
        return {"mode": mode, "workers": workers, "events": total,
                "seconds": round(last[0] - first[0], 3), "events_per_s": round(rate),
                "mean_event_bytes": round(payload),
                "redis_bytes_per_event": round((mem1 - mem0) / total),
                "redis_cpu_us_per_event_xadd": round((cpu1 - cpu0) / total * 1e6, 1),
                "redis_cpu_us_per_event_consume": round((cpu2 - cpu1) / total * 1e6, 1)}
    finally:
        await client.delete(*names, *(n + ":dlq" for n in names))
        await client.aclose()


async def skew(url: str, mode: str, backlog: int, rate: float, seconds: float,
               tag: str) -> dict[str, Any]:
    names = streams(f"skew{tag}")
    client = await connect(url, mode)
    try:
        await fill(client, names, payloads(backlog, seed=7), shard=0)
        settings = Settings(redis_url=url, redis_mode=mode, streams=names, group=GROUP,
                            consumer="skew", store_url="null://", metrics_port=0,
                            block_ms=200, trim=False)
        store = open_store("null://")
        await store.open()
        worker = Worker(settings, store)
        latencies: list[float] = []
        all_seen = anyio.Event()
        hot_done = 0
        process = worker.process

        async def timed(batch: Batch) -> Outcome:
            nonlocal hot_done
            outcome = await process(batch)
            now_ms = time.time() * 1000
            for entry in outcome.written:
                if entry.stream == names[0]:
                    hot_done += 1
                else:
                    latencies.append(now_ms - entry.id_ms)
            if len(latencies) >= len(trickle):
                all_seen.set()
            return outcome

        worker.process = timed  # type: ignore[method-assign]  # times each batch it handles
        trickle = payloads(int(rate * seconds) + 1, seed=9)

        async def produce() -> None:
            for i, (_, payload) in enumerate(trickle):
                await client.xadd(names[1 + i % (SHARDS - 1)], {"event": payload})
                await anyio.sleep(1 / rate)

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await produce()
            with anyio.move_on_after(10):
                await all_seen.wait()
            backlog_left = backlog - hot_done
            worker.stop()
        await store.close()
        latencies.sort()

        def pct(q: float) -> float:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

        return {"mode": mode, "backlog": backlog, "trickle_events": len(latencies),
                "trickle_rate": rate, "hot_shard_left_when_done": backlog_left,
                "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": round(latencies[-1], 1)}
    finally:
        await client.delete(*names, *(n + ":dlq" for n in names))
        await client.aclose()


def start_standalone(base: Path) -> tuple[subprocess.Popen[bytes], str]:
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(base)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"],
                                    capture_output=True, text=True).stdout.strip() == "PONG",
             10, "redis-server")
    return proc, url


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = RedisCluster(base / "cluster")
    standalone, standalone_url = start_standalone(base)
    standalone_port = int(standalone_url.rsplit(":", 1)[1].split("/")[0])
    results: list[dict[str, Any]] = []
    try:
        cluster.start()
        items = payloads(args.events)
        for workers in (1, 2):
            for mode, url in (("standalone", standalone_url), ("cluster", cluster.url)):
                ports = cluster.ports if mode == "cluster" else [standalone_port]
                r = await throughput(url, mode, workers, items, f"{mode[0]}{workers}", ports)
                results.append({"scenario": "throughput", **r})
                print(json.dumps(results[-1]), file=sys.stderr)
        if not args.skip_skew:
            for mode, url in (("standalone", standalone_url), ("cluster", cluster.url)):
                r = await skew(url, mode, args.backlog, args.rate, args.seconds, mode[0])
                results.append({"scenario": "skew", **r})
                print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        cluster.stop()
        standalone.terminate()
        standalone.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)
    return results


def render(results: list[dict[str, Any]]) -> str:
    lines = ["| scenario | redis | workers | events | seconds | events/s | Redis B/event "
             "| Redis CPU µs/event (XADD, consume) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["scenario"] == "throughput":
            lines.append(f"| throughput | {r['mode']} | {r['workers']} | {r['events']} | "
                         f"{r['seconds']} | {r['events_per_s']} | {r['redis_bytes_per_event']} "
                         f"| {r['redis_cpu_us_per_event_xadd']}, "
                         f"{r['redis_cpu_us_per_event_consume']} |")
    lines += ["", "| scenario | redis | backlog | trickle | p50 ms | p99 ms | max ms |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["scenario"] == "skew":
            lines.append(f"| skew | {r['mode']} | {r['backlog']} | {r['trickle_events']} "
                         f"@ {r['trickle_rate']}/s | {r['p50_ms']} | {r['p99_ms']} | "
                         f"{r['max_ms']} |")
    return "\n".join(lines)


def cli() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=60_000, help="events for the throughput runs")
    p.add_argument("--backlog", type=int, default=150_000, help="backlog on the hot shard")
    p.add_argument("--rate", type=float, default=60.0, help="trickle events/s (all shards)")
    p.add_argument("--seconds", type=float, default=8.0, help="how long the trickle runs")
    p.add_argument("--skip-skew", action="store_true")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = p.parse_args()
    results = anyio.run(main, args)
    print(json.dumps(results, indent=2) if args.json else render(results))


if __name__ == "__main__":
    cli()
