"""The throughput cost of signing and of redaction, measured on whole worker processes.

``python -m benchmarks.compliance [--events 20000] [--rounds 3] [--store null://|sqlite|URL]``

The same backlog — ``--events`` entries of the load generator's mix (lead-triage runs,
log-normal prompt sizes, a quarter sent as one ``run.snapshot``) — is drained by a fresh
``python -m worker run --burst`` process, configured only through ``AUDIT_*`` variables
as an operator runs it, three ways:

* **plain** — no signature, no redaction;
* **signed** — every entry carries its ``sig`` (HMAC-SHA256 with the workspace's key) and
  the worker runs with ``AUDIT_REQUIRE_SIGNATURE`` and a keyring file;
* **redacted** — ``AUDIT_REDACT_DETECTORS=email,phone,card,iban`` (every detector).

Each round runs the three in a rotated order, each on its own stream of the Redis at
``--redis-url`` (named ``bench:compliance:<run>:<variant>:<round>``, deleted afterwards;
nothing else is touched). Throughput is counted from the first acknowledged entry to
the last (XINFO GROUPS, so interpreter start-up is excluded), and the worker's CPU from
``/proc`` over the same span. The figures are **ratios to the plain run of the same
round** (median over rounds): absolute rates depend on the machine and on what else
runs on it, and the load average is printed with them.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis

from worker.signing import sign

from . import load
from .monitor import cpu_seconds

VARIANTS = ("plain", "signed", "redacted")
WORKSPACE = "bench_compliance"
GROUP = "audit-writers"
_SECRET = b"bench-compliance-signing-secret-0123456789"
_DETECTORS = "email,phone,card,iban"


def payloads(events: int, seed: int) -> list[bytes]:
    """``events`` encoded events of the load generator's mix (no poison)."""
    pool = load.build_templates(seed, 400)
    ids = load.Ids("compliance", 0, WORKSPACE)
    return [ids.payload(p) for p in load.plan(pool, events, seed=seed)]


def write_keyring(path: Path) -> None:
    """The signed run's keyring file (``AUDIT_SIGNING_KEYS_FILE``)."""
    path.write_text(json.dumps({WORKSPACE: {"k1": base64.b64encode(_SECRET).decode()}}))


def signature(payload: bytes) -> bytes:
    """The ``sig`` field of a signed run's entry."""
    return sign(payload, "k1", _SECRET)


def variant_env(variant: str, keyring: Path) -> dict[str, str]:
    if variant == "signed":
        return {"AUDIT_REQUIRE_SIGNATURE": "true", "AUDIT_SIGNING_KEYS_FILE": str(keyring)}
    if variant == "redacted":
        return {"AUDIT_REDACT_DETECTORS": _DETECTORS}
    return {}


async def fill(client: aioredis.Redis, stream: str, items: Sequence[bytes],
               signed: bool) -> None:
    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for i in range(0, len(items), 2000):
        async with client.pipeline(transaction=False) as pipe:
            for payload in items[i:i + 2000]:
                fields: dict[str, bytes | str] = {"event": payload}
                if signed:
                    fields["sig"] = signature(payload)
                pipe.xadd(stream, fields)  # type: ignore[arg-type]
            await pipe.execute()


async def acked(client: aioredis.Redis, stream: str) -> int:
    for group in await client.xinfo_groups(stream):
        if group["name"] in (GROUP, GROUP.encode()):
            return int(group.get("entries-read") or 0) - int(group["pending"])
    return 0


async def drain(client: aioredis.Redis, redis_url: str, store_url: str, stream: str,
                variant: str, keyring: Path, total: int) -> dict[str, Any]:
    """One worker process drains ``stream``: events/s and CPU µs/event while it works."""
    env = dict(os.environ, AUDIT_REDIS_URL=redis_url, AUDIT_STREAM=stream,
               AUDIT_GROUP=GROUP, AUDIT_STORE_URL=store_url, AUDIT_METRICS_PORT="0",
               AUDIT_LOG_LEVEL="warning", AUDIT_BLOCK_MS="200", AUDIT_TRIM="false",
               **variant_env(variant, keyring))
    for name in ("AUDIT_REQUIRE_SIGNATURE", "AUDIT_SIGNING_KEYS_FILE",
                 "AUDIT_REDACT_DETECTORS", "AUDIT_REDACT_DROP", "AUDIT_REDACT_MASK"):
        if name not in variant_env(variant, keyring):
            env.pop(name, None)
    load_before = os.getloadavg()[0]
    proc = await anyio.open_process(
        [sys.executable, "-m", "worker", "run", "--burst", "--consumer", f"bench-{variant}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first: tuple[float, int, float] | None = None
    last: tuple[float, int, float] | None = None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        done = await acked(client, stream)
        now = time.monotonic()
        cpu = cpu_seconds(proc.pid)
        if first is None and done > 0 and cpu is not None:
            first = (now, done, cpu)
        if done >= total and cpu is not None:
            last = (now, done, cpu)
            break
        if proc.returncode is not None:
            break
        await anyio.sleep(0.02)
    with anyio.fail_after(60):
        await proc.wait()
    if first is None or last is None:
        err = b"" if proc.stderr is None else await proc.stderr.receive()
        raise RuntimeError(f"{variant}: the worker did not drain the stream "
                           f"(exit {proc.returncode}): {err[-500:]!r}")
    events = last[1] - first[1]
    seconds = max(1e-9, last[0] - first[0])
    dead = await client.xlen(stream + ":dlq")
    return {"variant": variant, "events": total, "seconds": round(seconds, 3),
            "events_per_s": round(events / seconds),
            "cpu_us_per_event": round((last[2] - first[2]) / max(1, events) * 1e6, 1),
            "dead_letters": dead, "load_1m": round((load_before + os.getloadavg()[0]) / 2, 2)}


async def measure(opts: argparse.Namespace) -> dict[str, Any]:
    items = payloads(opts.events, opts.seed)
    run = uuid.uuid4().hex[:8]
    client = aioredis.Redis.from_url(opts.redis_url)
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        keyring = Path(tmp) / "keyring.json"
        write_keyring(keyring)
        try:
            for r in range(opts.rounds):
                order = VARIANTS[r % 3:] + VARIANTS[:r % 3]  # spread drifting load evenly
                results: dict[str, dict[str, Any]] = {}
                for variant in order:
                    stream = f"bench:compliance:{run}:{variant}:{r}"
                    try:
                        await fill(client, stream, items, signed=variant == "signed")
                        store = opts.store if opts.store != "sqlite" else \
                            f"sqlite:///{tmp}/{variant}-{r}.db"  # a fresh file per run
                        results[variant] = await drain(client, opts.redis_url, store,
                                                       stream, variant, keyring, len(items))
                    finally:
                        await client.delete(stream, stream + ":dlq")
                    print(f"round {r + 1} {variant}: {results[variant]}", file=sys.stderr,
                          flush=True)
                rounds.append(results)
        finally:
            await client.aclose()
    summary = {}
    for variant in VARIANTS:
        rate = [rd[variant]["events_per_s"] / rd["plain"]["events_per_s"] for rd in rounds]
        cpu = [rd[variant]["cpu_us_per_event"] / rd["plain"]["cpu_us_per_event"]
               for rd in rounds]
        summary[variant] = {"throughput_ratio": round(statistics.median(rate), 3),
                            "cpu_per_event_ratio": round(statistics.median(cpu), 3),
                            "throughput_ratios": [round(x, 3) for x in rate],
                            "cpu_per_event_ratios": [round(x, 3) for x in cpu]}
    loads = [rd[v]["load_1m"] for rd in rounds for v in VARIANTS]
    return {"command": "python -m benchmarks.compliance " + " ".join(opts.argv),
            "events": len(items), "rounds": opts.rounds, "store": opts.store,
            "cpus": os.cpu_count(), "load_1m": {"min": min(loads), "max": max(loads)},
            "summary": summary, "runs": rounds}


def render(out: dict[str, Any]) -> str:
    lines = [f"$ {out['command']}",
             f"{out['events']} events x {out['rounds']} rounds, store {out['store']}, "
             f"{out['cpus']} CPUs, load average (1 min) {out['load_1m']['min']}-"
             f"{out['load_1m']['max']} during the runs", "",
             "| configuration | throughput vs plain | worker CPU per event vs plain |"
             " per round (throughput) |", "|---|---|---|---|"]
    for variant in VARIANTS:
        s = out["summary"][variant]
        lines.append(f"| {variant} | {s['throughput_ratio']:.2f}x | "
                     f"{s['cpu_per_event_ratio']:.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in s['throughput_ratios'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.compliance",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--events", type=int, default=20_000, help="backlog size (20000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three runs (3)")
    p.add_argument("--store", default="null://", help="AUDIT_STORE_URL of the workers "
                   "(null://: the pipeline's own cost), or sqlite: a fresh SQLite file for "
                   "each run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--redis-url", default=os.environ.get("AUDIT_REDIS_URL",
                                                         "redis://127.0.0.1:6379/0"))
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    opts = p.parse_args(args)
    if opts.events < 1 or opts.rounds < 1:
        p.error("--events and --rounds must be >= 1")
    opts.argv = args
    out = anyio.run(measure, opts)
    print(json.dumps(out, indent=2) if opts.json else render(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
