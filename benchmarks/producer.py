"""A load-generating process: ``python -m benchmarks produce SPEC.json``.

It loads the run templates, prints ``ready``, waits for ``go`` on stdin, then appends
its share of the load to the stream at the target rate (or as fast as it can),
pipelining XADDs in chunks. It records every entry ID Redis returned, and what each
event was, to the spec's output file, then prints ``done`` and a JSON summary.

``mode: raw`` sends the template-filled payloads as they are (the wire format the
producer SDK writes: one ``event`` field of UTF-8 JSON); ``mode: sdk`` decodes each
one and sends it through :meth:`worker.emitter.AuditEmitter.emit_many` (validation
and encoding included), to measure the SDK itself; poison entries, which the SDK
rightly refuses, go through its ``emit_raw``.
"""

from __future__ import annotations

import array
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import redis.asyncio as aioredis

from worker import constants as c
from worker.emitter import AuditEmitter

from . import load
from .stats import encode_id


class Spec(msgspec.Struct, frozen=True):
    redis_url: str
    stream: str
    templates: str
    events: int
    rate: float  # events/s for this producer; 0 = as fast as possible
    seed: int
    tag: str
    producer: int
    workspace: str
    out: str
    concurrency: int = 200
    poison: float = 0.0
    chunk: int = 250
    record: bool = True
    mode: str = "raw"


class Result(msgspec.Struct):
    producer: int
    tag: str
    workspace: str
    entry_ids: list[int]
    run_nos: list[int]
    kinds: str
    nodes: list[int]
    started: float
    finished: float
    bytes: int


async def produce(spec: Spec, *, wait_for_go: bool = True) -> Result:
    templates = load.load_templates(Path(spec.templates))
    ids = load.Ids(spec.tag, spec.producer, spec.workspace)
    planned: Iterator[load.Planned] = load.plan(
        templates, spec.events, seed=spec.seed * 1000 + spec.producer,
        concurrency=spec.concurrency, poison=spec.poison)
    client = aioredis.Redis.from_url(spec.redis_url)
    emitter = AuditEmitter(client, (spec.stream,), validate=True)
    entry_ids = array.array("Q")
    run_nos = array.array("L")
    nodes = array.array("H")
    kinds: list[str] = []
    total_bytes = 0
    field = c.EVENT_FIELD
    try:
        await client.ping()
        if wait_for_go:
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)
        started = time.time()
        t0 = time.monotonic()
        sent = 0
        while sent < spec.events:
            if spec.rate > 0:
                due = min(spec.events, int((time.monotonic() - t0) * spec.rate) + 1) - sent
                if due <= 0:
                    wait = (sent + 1) / spec.rate - (time.monotonic() - t0)
                    await anyio.sleep(max(0.0005, wait))
                    continue
                k = min(due, spec.chunk)
            else:
                k = min(spec.chunk, spec.events - sent)
            items = [next(planned) for _ in range(k)]
            payloads = [ids.payload(item) for item in items]
            total_bytes += sum(len(p) for p in payloads)
            if spec.mode == "sdk":
                good = [msgspec.json.decode(p) for p, i in zip(payloads, items, strict=True)
                        if i.template.kind != load.POISON]
                replies = await emitter.emit_many(good)
                # The SDK refuses invalid events; poison goes the SDK's unvalidated way.
                replies += [await emitter.emit_raw(spec.stream, p)
                            for p, i in zip(payloads, items, strict=True)
                            if i.template.kind == load.POISON]
            else:
                async with client.pipeline(transaction=False) as pipe:
                    for payload in payloads:
                        pipe.execute_command("XADD", spec.stream, "*", field, payload)
                    replies = await pipe.execute()
            entry_ids.extend(encode_id(r) for r in replies)
            if spec.record:
                for item in items:
                    run_nos.append(item.run_no)
                    nodes.append(item.template.nodes)
                    kinds.append(item.template.kind)
            sent += k
        finished = time.time()
    finally:
        await client.aclose()
    return Result(spec.producer, spec.tag, spec.workspace, entry_ids.tolist(), run_nos.tolist(),
                  "".join(kinds), nodes.tolist(), started, finished, total_bytes)


def main(spec_path: str) -> int:
    spec = msgspec.json.decode(Path(spec_path).read_bytes(), type=Spec)
    result = anyio.run(produce, spec)
    Path(spec.out).write_bytes(msgspec.json.encode(result))
    summary: dict[str, Any] = {"events": len(result.entry_ids), "bytes": result.bytes,
                               "seconds": round(result.finished - result.started, 3)}
    print("done " + msgspec.json.encode(summary).decode(), flush=True)
    return 0


def read_result(path: Path) -> Result:
    return msgspec.json.decode(path.read_bytes(), type=Result)
