"""``python -m benchmarks run [--quick] [--scenario S] [--store URL] …``

Subcommands:

``run``       run scenarios and baselines, print the tables, write JSON + PNG
``report``    print the Markdown tables of a results JSON (for benchmarks/README.md)
``micro``     CPU per event of the worker's pure stages (decode, coalesce), in process
``drain``     one worker of a given checkout drains a backlog in process (A/B pairs)
``produce``   (internal) one load-generating process
``baseline``  (internal) the raw Redis loop, the FastStream peer or the naive writer, as a
              process
``proxy``     (internal) the TCP proxy used by the outage scenario
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

SCENARIOS = ("max", "steady", "burst", "crash", "outage")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="Audit Fleet load-test harness")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run scenarios and baselines")
    run.add_argument("--quick", action="store_true",
                     help="every scenario and baseline, small sizes (under 2 minutes)")
    run.add_argument("--scenario", action="append", choices=SCENARIOS,
                     help="run only these (repeatable; default: all)")
    run.add_argument("--store", action="append",
                     help="store URL (repeatable): null://, sqlite:///path.db, "
                          "postgresql://…/audit_bench, mongodb://…  (default: null:// and "
                          "PostgreSQL at $AUDIT_BENCH_PG_URL if reachable, else SQLite)")
    run.add_argument("--workers", type=int, help="worker processes (default 1 for max and "
                     "steady, 2 for burst, crash and outage)")
    run.add_argument("--events", type=int, help="events for max and burst (backlog size)")
    run.add_argument("--rate", type=float, help="events/s for steady, crash and outage "
                     "(default: half, resp. 0.3 x, the saturation measured in this run)")
    run.add_argument("--duration", type=float, help="seconds of load for steady, crash, outage")
    run.add_argument("--batch-size", type=int, default=500, help="AUDIT_BATCH_SIZE (500)")
    run.add_argument("--max-inflight", type=int, default=4, help="AUDIT_MAX_INFLIGHT (4)")
    run.add_argument("--block-ms", type=int, default=1000, help="AUDIT_BLOCK_MS (1000)")
    run.add_argument("--producers", type=int, default=1, help="load-generating processes (1)")
    run.add_argument("--producer-mode", choices=("raw", "sdk"), default="raw",
                     help="raw: pre-validated payloads; sdk: through AuditEmitter.emit_many")
    run.add_argument("--prompt-size", default="default",
                     help="default (log-normal, long tail to 256 KiB) | small (200) | N chars")
    run.add_argument("--snapshot-share", type=float, default=0.25,
                     help="share of runs sent as one run.snapshot (0.25)")
    run.add_argument("--poison", type=float, default=0.001,
                     help="share of entries that must be dead-lettered (0.001)")
    run.add_argument("--concurrency", type=int, default=200,
                     help="runs in progress at once, their events interleaved (200)")
    run.add_argument("--templates", type=int, default=400, help="run templates to build (400)")
    run.add_argument("--kill-every", type=float, default=3.0, help="crash: seconds between kills")
    run.add_argument("--outage-after", type=float, default=3.0, help="outage: seconds before")
    run.add_argument("--outage-for", type=float, default=4.0, help="outage: seconds down")
    run.add_argument("--claim-idle-ms", type=int, default=1000,
                     help="crash: AUDIT_CLAIM_IDLE_MS, how soon peers reclaim (1000)")
    run.add_argument("--naive-seconds", type=float, help="how long the naive writer runs")
    run.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    run.add_argument("--no-faststream", action="store_true",
                     help="skip the FastStream peer baseline (it needs the bench extra)")
    run.add_argument("--redis-url", default=os.environ.get("AUDIT_REDIS_URL",
                                                           "redis://127.0.0.1:6379/0"))
    run.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    run.add_argument("--keep", action="store_true",
                     help="keep streams and stored documents after each scenario")
    run.add_argument("--no-plot", action="store_true")
    run.add_argument("--profile", choices=("py-spy", "pyinstrument"),
                     help="profile the first worker of each scenario (py-spy attaches to it; "
                          "pyinstrument runs it)")
    run.add_argument("--sample-ms", type=float, default=20.0,
                     help="group sampling interval (20 ms): the latency resolution")
    run.add_argument("--seed", type=int, default=7)
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="print the Markdown tables of a results JSON")
    rep.add_argument("path", type=Path)
    rep.set_defaults(func=cmd_report)

    stg = sub.add_parser("stages", help="µs/event per worker stage from a run's py-spy profiles")
    stg.add_argument("path", type=Path, help="results.json of a run with --profile py-spy")
    stg.set_defaults(func=cmd_stages)

    return p


def internal(command: str, rest: list[str]) -> int:
    """The helper processes the harness starts (not for direct use)."""
    if command == "produce":
        from .producer import main as produce_main

        return produce_main(rest[0])
    if command == "baseline":
        from .baselines import main as baseline_main

        return baseline_main(rest)
    from .proxy import main as proxy_main

    return proxy_main(rest)


def options(args: argparse.Namespace) -> Any:
    from .scenarios import Options

    quick = bool(args.quick)
    return Options(
        redis_url=args.redis_url, stores=list(args.store or []),
        scenarios=list(args.scenario or SCENARIOS), quick=quick, workers=args.workers,
        events=args.events, rate=args.rate, duration=args.duration, batch_size=args.batch_size,
        max_inflight=args.max_inflight, block_ms=args.block_ms, producers=args.producers,
        producer_mode=args.producer_mode, prompt_size=args.prompt_size,
        snapshot_share=args.snapshot_share, poison=args.poison, concurrency=args.concurrency,
        templates=args.templates, seed=args.seed, kill_every=args.kill_every,
        outage_after=args.outage_after, outage_for=args.outage_for,
        claim_idle_ms=args.claim_idle_ms,
        naive_seconds=args.naive_seconds or (3.0 if quick else 10.0),
        baselines=not args.no_baselines,
        faststream=not args.no_faststream and importlib.util.find_spec("faststream") is not None,
        sample_interval=args.sample_ms / 1000, out=args.out,
        keep=args.keep, plot=not args.no_plot, profile=args.profile,
    )


async def default_stores(quick: bool, out: Path) -> list[str]:
    from .scenarios import default_pg_url, pg_reachable

    pg = default_pg_url()
    if await pg_reachable(pg):
        return ["null://", pg]
    return ["null://", f"sqlite:///{out}/bench.db"]


async def run_plan(opts: Any) -> dict[str, Any]:
    from . import report
    from .scenarios import Harness, store_label

    started = time.time()
    h = Harness(opts)
    try:
        await h.setup()
        stores = opts.stores or await default_stores(opts.quick, h.dir)
        real = [s for s in stores if not s.startswith("null:")] or stores
        q = opts.quick
        n_backlog = opts.events or (30_000 if q else 200_000)
        n_store = opts.events or (10_000 if q else 50_000)
        steady_s = opts.duration or (8.0 if q else 30.0)
        chaos_s = opts.duration or (12.0 if q else 40.0)
        print(f"audit-fleet benchmarks {h.tag}: stores {', '.join(stores)}; results in {h.dir}",
              file=sys.stderr)
        print(f"  load mix (20k planned events): {h.mix['by_kind']} kinds, node types "
              f"{h.mix['by_node_type']}, mean {h.mix['bytes'] // max(1, h.mix['events'])} B, "
              f"max {h.mix['max_bytes']:,} B", file=sys.stderr)
        for store in stores:
            await h.prepare_store(store)
        print("  batch footprint (x payload bytes): " + ", ".join(
            f"{store_label(k)} {v:.1f}" for k, v in h.footprint.items()), file=sys.stderr)
        results: list[dict[str, Any]] = []
        if "max" in opts.scenarios:
            if opts.baselines:
                await h.baseline_raw_redis(n_backlog)
                if opts.faststream:
                    await h.baseline_faststream(n_backlog)
            for store in stores:
                null = store.startswith("null:")
                results.append(await h.max(store, opts.workers or 1,
                                           n_backlog if null else n_store,
                                           raw_upsert=opts.baselines and not null))
                if null and opts.baselines:
                    await h.baseline_raw_redis(n_backlog)  # again: the mean brackets the run
                    if opts.faststream:
                        await h.baseline_faststream(n_backlog)
                if opts.baselines and not null and store == real[0]:
                    await h.baseline_naive(store, 3_000 if q else 20_000)
                if opts.workers is None:  # how a second worker process scales
                    results.append(await h.max(store, 2, n_backlog if null else n_store))

        async def rate_for(store: str, workers: int, share: float) -> float:
            """``share`` of the saturation this many workers reached on this store."""
            if opts.rate:
                return float(opts.rate)
            if (store, workers) not in h.saturation:
                results.append(await h.max(store, workers, min(n_store, 5_000)))
            return max(50.0, round(h.saturation.get((store, workers), 1000.0) * share, -1))

        if "steady" in opts.scenarios:
            for store in stores:  # null:// too: the pipeline's own latency at half its ceiling
                workers = opts.workers or 1
                rate = await rate_for(store, workers, 0.5)
                results.append(await h.steady(store, workers, rate, steady_s))
        for store in real:
            if "burst" in opts.scenarios:
                results.append(await h.burst(store, opts.workers or 2, n_store))
            if "crash" in opts.scenarios:
                workers = opts.workers or 2
                rate = await rate_for(store, workers, 0.3)
                results.append(await h.crash(store, workers, rate, chaos_s))
            if "outage" in opts.scenarios:
                workers = opts.workers or 2
                rate = await rate_for(store, workers, 0.3)
                results.append(await h.outage(store, workers, rate, chaos_s))
        checks = report.targets(results, h.baselines)
        out: dict[str, Any] = {
            "meta": await meta(h, stores, started),
            "options": {k: str(v) if isinstance(v, Path) else v
                        for k, v in dataclasses.asdict(opts).items()},
            "load_mix": h.mix,
            "batch_footprint_x_payload": {store_label(k): round(v, 2)
                                          for k, v in h.footprint.items()},
            "baselines": h.baselines,
            "scenarios": results,
            "targets": checks,
            "series": h.series,
            "dir": str(h.dir),
        }
        out["meta"]["stores"] = [store_label(s) for s in stores]
        out["meta"]["seconds"] = round(time.time() - started, 1)
        return out
    finally:
        await h.close()


def write_outputs(out: dict[str, Any], plot: bool) -> None:
    """The JSON (with profile summaries) and the PNG, next to the run's logs."""
    from . import report

    directory = Path(out.pop("dir"))
    profiles = {}
    for r in out["scenarios"]:
        for path in r.get("profile") or []:
            if path.endswith(".collapsed.txt") and Path(path).exists():
                profiles[path] = report.top_frames(Path(path))
    out["profiles"] = profiles
    if plot:
        png = report.plot(out["series"], directory / "throughput_lag.png")
        out["plot"] = str(png) if png else "matplotlib missing: pip install -e '.[bench]'"
    path = directory / "results.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(out)))
    out["path"] = str(path)


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent).stdout.strip()


async def meta(h: Any, stores: Sequence[str], started: float) -> dict[str, Any]:
    info = await h.client.info("server")
    pg_version = None
    for s in stores:
        if s.startswith(("postgresql:", "postgres:")):
            import asyncpg

            from worker.stores.postgres import PostgresStore

            conn = await asyncpg.connect(PostgresStore(s).dsn)
            try:
                pg_version = await conn.fetchval("SHOW server_version")
            finally:
                await conn.close()
    return {
        "command": "python -m benchmarks " + shlex.join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "redis": info.get("redis_version"),
        "postgresql": pg_version,
        "tag": h.tag,
    }


def print_summary(out: dict[str, Any]) -> None:
    from . import report

    print()
    print(f"command: {out['meta']['command']}  ({out['meta']['seconds']} s, "
          f"{out['meta']['cpus']} CPUs, Redis {out['meta']['redis']}"
          + (f", PostgreSQL {out['meta']['postgresql']}" if out["meta"]["postgresql"] else "")
          + ")")
    print()
    print(report.results_table(out["scenarios"], out["baselines"]))
    print()
    print(report.targets_table(out["targets"]))
    for path, frames in out.get("profiles", {}).items():
        print(f"\nprofile {path} (self %, total %):")
        for name, own, total in frames[:12]:
            print(f"  {own:5.1f} {total:5.1f}  {name}")
    print()
    print(f"JSON: {out['path']}")
    if out.get("plot"):
        print(f"PNG:  {out['plot']}")


def cmd_run(args: argparse.Namespace) -> int:
    from .procs import REPO

    os.chdir(REPO)
    commit = git_commit()
    opts = options(args)
    try:
        out = anyio.run(run_plan, opts)
    except KeyboardInterrupt:
        print("\nbenchmarks: interrupted (the scenario's streams were removed)", file=sys.stderr)
        return 130
    out["meta"]["commit"] = commit
    write_outputs(out, opts.plot)
    print_summary(out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    data = msgspec.json.decode(args.path.read_bytes())
    data["path"] = str(args.path)
    print_summary(data)
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    """Split each profiled scenario's worker CPU per event into the worker's stages."""
    from .report import stage_table

    data = msgspec.json.decode(args.path.read_bytes())
    for scenario in data["scenarios"]:
        for profile in scenario.get("profile") or ():
            path = Path(profile)
            if path.suffix == ".txt" and path.exists():
                print(f"\n{scenario['label']} ({scenario['workers']} worker(s))")
                print("\n".join(stage_table(path, scenario["cpu_us_per_event"])))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("produce", "baseline", "proxy"):
        return internal(argv[0], argv[1:])
    if argv and argv[0] == "micro":
        from .micro import main as micro_main

        return micro_main(argv[1:])
    if argv and argv[0] == "drain":
        from .drain import main as drain_main

        return drain_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    result: int = func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
