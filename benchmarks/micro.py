"""``python -m benchmarks micro``: CPU per event of the worker's pure stages, in process.

No Redis, no store, no event loop: the same payloads the load generator sends are cut
into batches and put through :func:`worker.writer.prepare` (decode + validate) and
:func:`worker.documents.coalesce_records`, timed per stage in CPU time (``process_time``, so
other processes on a busy machine matter less), with the time the cyclic garbage
collector spends inside them. Deterministic enough to compare one change with the
next (best of ``--repeat`` rounds); ``--profile`` writes a pyinstrument profile of the
same work.

``--compare`` puts the same entries through three configurations in one run — plain,
signed entries verified (``AUDIT_REQUIRE_SIGNATURE``), and redaction with every detector
on — and prints each one's cost as a ratio of the plain one (same run, same payloads).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from collections.abc import Sequence
from typing import Any

from worker.documents import coalesce_records
from worker.redaction import DETECTORS, Redactor
from worker.redisio import Entry
from worker.signing import Keyring, SignaturePolicy, sign
from worker.writer import prepare

from . import load

#: The micro run's workspace and its signing key (``--compare``).
WORKSPACE = "bench_micro"
_SECRET = b"bench-micro-signing-secret-0123456789"


def stage_costs(events: int, batch_size: int, seed: int, repeat: int,
                prompt_size: str = "default", *, stages: bool = True,
                signed: bool = False, redactor: Redactor | None = None) -> dict[str, Any]:
    pool = load.build_templates(seed, 400, prompt_size=prompt_size)
    ids = load.Ids("micro", 0, WORKSPACE)
    payloads = [ids.payload(p) for p in load.plan(pool, events, seed=seed)]
    policy = None
    if signed:
        policy = SignaturePolicy(Keyring({WORKSPACE: {"k1": _SECRET}}), required=True)
        entries = [Entry("s", f"{n}-0", p, sig=sign(p, "k1", _SECRET))
                   for n, p in enumerate(payloads)]
    else:
        entries = [Entry("s", f"{n}-0", p) for n, p in enumerate(payloads)]
    gc_time = [0.0, 0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_time[1] = time.process_time()
        else:
            gc_time[0] += time.process_time() - gc_time[1]

    gc.callbacks.append(on_gc)
    best: dict[str, float] = {}
    try:
        for _ in range(repeat if stages else 0):
            gc_time[0] = 0.0
            t_prepare = t_coalesce = 0.0
            for i in range(0, len(entries), batch_size):
                chunk = entries[i:i + batch_size]
                t0 = time.process_time()
                valid, _dead = prepare(chunk, 16 * 1024 * 1024, 5, policy)
                if redactor is not None:
                    found: dict[str, int] = {}
                    for _, doc, _ in valid:
                        redactor.event(doc, found)
                t1 = time.process_time()
                coalesce_records(valid)
                t2 = time.process_time()
                t_prepare += t1 - t0
                t_coalesce += t2 - t1
            n = len(entries)
            rnd = {"prepare_us": t_prepare / n * 1e6, "coalesce_us": t_coalesce / n * 1e6,
                   "gc_us": gc_time[0] / n * 1e6}
            rnd["total_us"] = rnd["prepare_us"] + rnd["coalesce_us"]
            if not best or rnd["total_us"] < best["total_us"]:
                best = rnd
    finally:
        gc.callbacks.remove(on_gc)
    return {k: round(v, 2) for k, v in best.items()} | {"events": events,
                                                         "batch_size": batch_size}


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks micro")
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--prompt-size", default="default")
    p.add_argument("--compare", action="store_true",
                   help="plain vs signed (verified) vs redacted (every detector), one run")
    p.add_argument("--profile", help="write a pyinstrument text profile to this file")
    p.add_argument("--no-stages", action="store_true",
                   help="only generate the payloads (to subtract from instruction counts)")
    p.add_argument("--gc", choices=("default", "worker"), default="worker",
                   help="garbage collector settings: Python's defaults, or the worker's own "
                        "(worker.consumer.tuned_gc when it exists)")
    args = p.parse_args(argv)
    tuned: Any = contextlib.nullcontext()
    if args.gc == "worker":
        from worker import consumer

        if hasattr(consumer, "tuned_gc"):
            tuned = consumer.tuned_gc(args.batch_size * consumer.GC_GEN0_PER_EVENT)
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
    if args.compare:
        with tuned:
            return _compare(args)
    with tuned:
        result = stage_costs(args.events, args.batch_size, args.seed, args.repeat,
                             args.prompt_size, stages=not args.no_stages)
    if args.profile:
        profiler.stop()
        with open(args.profile, "w") as f:
            f.write(profiler.output_text(unicode=True, color=False, show_all=False))
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


def _compare(args: argparse.Namespace) -> int:
    redactor = Redactor.build(DETECTORS)
    configs: dict[str, dict[str, Any]] = {
        "plain": {}, "signed": {"signed": True}, "redacted": {"redactor": redactor}}
    results = {name: stage_costs(args.events, args.batch_size, args.seed, args.repeat,
                                 args.prompt_size, **kw)
               for name, kw in configs.items()}
    base = results["plain"]["total_us"]
    for name, r in results.items():
        print(f"{name:9} prepare_us={r['prepare_us']} coalesce_us={r['coalesce_us']} "
              f"total_us={r['total_us']} cost={r['total_us'] / base:.3f}x "
              f"events/s/core={1e6 / r['total_us']:.0f}")
    return 0
