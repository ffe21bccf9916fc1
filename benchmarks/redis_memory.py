"""Redis memory per stream entry, for the capacity model of docs/scaling.md.

``python -m benchmarks.redis_memory [--events 10000,50000] [--mixes small,default,4096]
[--cluster]``

Starts its own ``redis-server`` on a free loopback port (the same binary and defaults as
the fleet's Redis: ``stream-node-max-bytes 4096``, ``stream-node-max-entries 100``), so
nothing shared is touched. For each load mix (the load harness's templates,
``benchmarks/load.py``: ``small`` = 200-character prompts, ``default`` = the log-normal
long tail up to 256 KiB, or a fixed prompt size) and each entry count N it appends N
entries to one stream as the SDK writes them (one ``event`` field) and reads:

* ``INFO memory`` ``used_memory`` before and after (what the allocator holds for them);
* ``MEMORY USAGE <stream> SAMPLES 0`` (the stream alone, every node counted);
* ``used_memory`` again after one consumer group has read every entry (all of them
  pending: the pending entries list's cost per entry) and after it has acknowledged
  them, each done on a connection of its own that is closed before memory is read (its
  buffers are not counted). ``MEMORY USAGE`` is not used for these: it estimates a
  radix tree's nodes at 240 bytes each and overstates the pending list.

Bytes per entry minus the mean payload is Redis's own overhead per entry. The figures
are allocator bytes on a master; each replica holds the same again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis

from benchmarks import load
from benchmarks.report import markdown_table
from tests.redis_servers import free_ports, wait_for

STREAM = "mem:events:{0}"
GROUP = "audit-writers"


def mix(spec: str, n: int, seed: int = 3) -> list[bytes]:
    """``n`` payloads of the load harness's mix ``spec`` (as ``--prompt-size`` takes it)."""
    pool = load.build_templates(seed, 200, prompt_size=spec)
    ids = load.Ids("mem", 0, "ws_mem")
    return [ids.payload(item) for item in load.plan(pool, n, seed=seed)]


async def used_memory(client: aioredis.Redis) -> int:
    info = await client.info("memory")
    return int(info["used_memory"])


async def stream_usage(client: aioredis.Redis) -> int:
    """``MEMORY USAGE`` of the stream with every node counted (groups and PEL included)."""
    return int(await client.execute_command(  # type: ignore[no-untyped-call]
        "MEMORY", "USAGE", STREAM, "SAMPLES", "0"))


async def measure(url: str, spec: str, payloads: list[bytes]) -> dict[str, Any]:
    n = len(payloads)
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushall()
        await client.execute_command("MEMORY", "PURGE")  # type: ignore[no-untyped-call]
        base = await used_memory(client)
        for i in range(0, n, 1000):
            async with client.pipeline(transaction=False) as pipe:
                for payload in payloads[i: i + 1000]:
                    pipe.xadd(STREAM, {"event": payload})
                await pipe.execute()
        added = await used_memory(client) - base
        usage = await stream_usage(client)
        await client.xgroup_create(STREAM, GROUP, id="0")
        ids = await on_own_connection(url, read_all, n)
        pending = await used_memory(client) - base
        await on_own_connection(url, ack_all, ids)
        acked = await used_memory(client) - base
    finally:
        await client.aclose()
    mean = sum(len(p) for p in payloads) / n
    return {"mix": spec, "entries": n, "mean_payload_bytes": round(mean),
            "used_memory_per_entry": round(added / n),
            "memory_usage_per_entry": round(usage / n),
            "overhead_per_entry": round(added / n - mean),
            "pending_cost_per_entry": round((pending - added) / n),
            "after_ack_per_entry": round(acked / n)}


async def on_own_connection(url: str, job: Any, arg: Any) -> Any:
    """Run ``job`` on a connection of its own, closed before memory is read again: its
    query and reply buffers are not counted."""
    client = aioredis.Redis.from_url(url, single_connection_client=True)
    try:
        return await job(client, arg)
    finally:
        await client.aclose()
        await anyio.sleep(0.2)


async def read_all(client: aioredis.Redis, n: int) -> list[bytes]:
    ids: list[bytes] = []
    while len(ids) < n:
        reply: Any = await client.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=1000)
        ids += [entry_id for _, entries in reply for entry_id, _ in entries]
    return ids


async def ack_all(client: aioredis.Redis, ids: list[bytes]) -> None:
    for i in range(0, len(ids), 1000):
        await client.xack(STREAM, GROUP, *ids[i: i + 1000])


def start_server(base: Path, cluster: bool) -> tuple[subprocess.Popen[bytes], int]:
    """A private server; with ``cluster``, a one-node Redis Cluster that owns every slot
    (a cluster node keeps per-slot key bookkeeping a standalone server does not)."""
    port, bus = free_ports(2)
    extra = ["--cluster-enabled", "yes", "--cluster-port", str(bus)] if cluster else []
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(base), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cli(*args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                              text=True).stdout.strip()

    wait_for(lambda: cli("ping") == "PONG", 10, "redis-server")
    if cluster:
        cli("cluster", "addslotsrange", "0", "16383")
        wait_for(lambda: "cluster_state:ok" in cli("cluster", "info"), 10, "cluster_state:ok")
    return proc, port


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="bench-redis-memory-"))
    proc, port = start_server(base, args.cluster)
    url = f"redis://127.0.0.1:{port}/0"
    results = []
    try:
        for spec in args.mixes.split(","):
            for n in (int(x) for x in args.events.split(",")):
                r = {"server": "cluster node" if args.cluster else "standalone",
                     **await measure(url, spec, mix(spec, n))}
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)
    return results


COLUMNS = (("server", "server"), ("mix", "mix"), ("entries", "entries"),
           ("mean payload B", "mean_payload_bytes"),
           ("used_memory B/entry", "used_memory_per_entry"),
           ("MEMORY USAGE B/entry", "memory_usage_per_entry"),
           ("overhead B/entry", "overhead_per_entry"),
           ("+ pending B/entry", "pending_cost_per_entry"),
           ("after ACK B/entry", "after_ack_per_entry"))


def cli() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.redis_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", default="10000,50000", help="entry counts, comma-separated")
    p.add_argument("--mixes", default="small,default,4096",
                   help="load mixes (--prompt-size values of the harness), comma-separated")
    p.add_argument("--cluster", action="store_true",
                   help="measure on a one-node Redis Cluster instead of a standalone server")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = p.parse_args()
    results = anyio.run(main, args)
    print(json.dumps(results, indent=2) if args.json else markdown_table(COLUMNS, results))


if __name__ == "__main__":
    cli()
