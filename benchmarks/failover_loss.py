"""The loss window of a failover while replication lags, with and without WAIT.

``python -m benchmarks.failover_loss [--lags 0,50,200,1000] [--rate 1000] [--seconds 3]``

For each replication lag and each ``AUDIT_EMIT_WAIT_REPLICAS`` (0 and 1) it starts a
private primary and replica on loopback (``tests/redis_servers.py``: ``ReplicaPair``).
With a lag above 0 the replica follows the primary through a proxy of this script
(``--serve-proxy``, its own process) that holds the primary's replication stream for
that long before passing it on, as a slow or distant link would; the replica's
acknowledgements go back at once. Producers (``--concurrency`` tasks sharing one
``AuditEmitter``) emit at ``--rate`` events/s in all. After ``--seconds`` the proxy
and the primary are SIGKILLed together (what the proxy held is gone, as what a lagging
replica has not received is) and the replica is promoted (``REPLICAOF NO ONE``).

It counts the emits the SDK **confirmed** (returned an entry ID) that are not on the
promoted replica: those are lost, and how far back from the kill the oldest of them was
appended is the loss window. With WAIT 1 an emit is confirmed only once the replica has
it, so none may be lost; the emits that were not confirmed (``NotReplicated``, or the
connection dropped by the kill) are the producer's to retry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from benchmarks.report import markdown_table
from tests.redis_servers import ReplicaPair
from worker.emitter import AuditEmitter, make_event
from worker.errors import NotReplicated, RedisUnavailable

STREAM = "loss:events"


async def _proxy(target_port: int, delay_s: float) -> None:
    """Accept on a free port (printed), connect each client to the target; bytes from
    the target are passed on ``delay_s`` later, bytes to it at once."""
    loop = asyncio.get_running_loop()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def from_target() -> None:
            while data := await up_reader.read(65536):
                held.put_nowait((loop.time() + delay_s, data))

        async def to_client() -> None:
            while True:
                due, data = await held.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()

        async def to_target() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        await asyncio.gather(from_target(), to_client(), to_target())

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def start_proxy(target_port: int, lag_ms: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.failover_loss", "--serve-proxy", str(target_port),
         str(lag_ms)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


async def scenario(base: Path, lag_ms: int, wait: int, args: argparse.Namespace) -> dict[str, Any]:
    pair = ReplicaPair(base / f"lag{lag_ms}-wait{wait}")
    proxy: subprocess.Popen[str] | None = None
    try:
        pair.start_primary()
        if lag_ms > 0:
            proxy, proxy_port = start_proxy(pair.ports["primary"], lag_ms)
            pair.start_replica(upstream_port=proxy_port)
        else:
            pair.start_replica()
        client = aioredis.Redis.from_url(pair.url("primary"))
        emitter = AuditEmitter(client, [STREAM], wait_replicas=wait,
                               wait_timeout_ms=args.wait_timeout_ms)
        confirmed: list[str] = []
        refused = dropped = 0
        latencies: list[float] = []
        stop = anyio.Event()
        interval = args.concurrency / args.rate

        async def producer(n: int) -> None:
            nonlocal refused, dropped
            i = 0
            while not stop.is_set():
                started = time.monotonic()
                event = make_event("run.started", "ws_loss", "wf", f"run_{n}_{i}",
                                   trigger={"type": "webhook", "source": "gmail"})
                i += 1
                try:
                    confirmed.append(await emitter.emit(event))
                    latencies.append(time.monotonic() - started)
                except NotReplicated:
                    refused += 1
                except (RedisError, RedisUnavailable, OSError):
                    dropped += 1  # the kill: the producer does not know whether it landed
                    return
                await anyio.sleep(max(0.0, interval - (time.monotonic() - started)))

        async with anyio.create_task_group() as tg:
            for n in range(args.concurrency):
                tg.start_soon(producer, n)
            await anyio.sleep(args.seconds)
            if proxy is not None:
                proxy.kill()
            pair.kill_primary()
            killed_ms = time.time() * 1000
            stop.set()
        await client.aclose()
        pair.promote()
        promoted = aioredis.Redis.from_url(pair.url("replica"))
        try:
            rows: Any = await promoted.xrange(STREAM)
        finally:
            await promoted.aclose()
        held = {entry_id.decode() for entry_id, _ in rows}
        lost = [i for i in confirmed if i not in held]
        oldest = min((int(i.split("-")[0]) for i in lost), default=None)
        latencies.sort()
        return {"lag_ms": lag_ms, "wait_replicas": wait, "confirmed": len(confirmed),
                "confirmed_per_s": round(len(confirmed) / args.seconds),
                "confirmed_lost": len(lost),
                "window_ms": None if oldest is None else round(killed_ms - oldest),
                "not_replicated": refused, "cut_by_the_kill": dropped,
                "emit_p50_ms": round(1000 * latencies[len(latencies) // 2], 1)
                if latencies else None}
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.kill()
        if proxy is not None:
            proxy.wait(timeout=10)
        pair.stop()


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="bench-failover-loss-"))
    results = []
    try:
        for lag in (int(x) for x in args.lags.split(",")):
            for wait in (0, 1):
                r = await scenario(base, lag, wait, args)
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


COLUMNS = (("lag ms", "lag_ms"), ("WAIT", "wait_replicas"), ("confirmed", "confirmed"),
           ("confirmed/s", "confirmed_per_s"), ("confirmed, lost", "confirmed_lost"),
           ("window ms", "window_ms"), ("NotReplicated", "not_replicated"),
           ("cut by the kill", "cut_by_the_kill"), ("emit p50 ms", "emit_p50_ms"))


def cli(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.failover_loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lags", default="0,50,200,1000", help="replication lags (ms), comma list")
    p.add_argument("--rate", type=float, default=1000.0, help="events/s, all producers")
    p.add_argument("--concurrency", type=int, default=32, help="producer tasks")
    p.add_argument("--seconds", type=float, default=3.0, help="how long to produce")
    p.add_argument("--wait-timeout-ms", type=int, default=2000,
                   help="AUDIT_EMIT_WAIT_TIMEOUT_MS for the WAIT 1 runs")
    p.add_argument("--serve-proxy", nargs=2, type=int, metavar=("TARGET_PORT", "DELAY_MS"),
                   help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = p.parse_args(argv)
    if args.serve_proxy:
        target, delay = args.serve_proxy
        asyncio.run(_proxy(target, delay / 1000))
        return
    results = anyio.run(main, args)
    print(json.dumps(results, indent=2) if args.json else markdown_table(COLUMNS, results))


if __name__ == "__main__":
    cli()
