"""The scenarios (steady, max, burst, crash, outage) and the baselines, run by one harness.

Every scenario has its own stream, consumer group and workspace, so any store URL can
be used, with data already in it, and its accounting only reads what it wrote. One
run of the harness shares one template pool and one results directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec
import redis.asyncio as aioredis

from worker import constants as c
from worker.documents import coalesce_records
from worker.redisio import Entry
from worker.stores import migrate, open_store
from worker.stores.base import NodeQuery, RunQuery, Store
from worker.writer import prepare

from . import baselines, load, stats
from .monitor import GroupSampler, Progress, RssSampler, host_cpu, sampler_client, service_cpu
from .procs import (
    Child,
    WorkerConfig,
    python,
    spawn,
    spawn_worker,
    summarize_children,
    wait_reading,
)
from .producer import Result, Spec, read_result

GROUP = "bench-writers"
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(slots=True)
class Options:
    """What ``python -m benchmarks run`` was asked to do."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    stores: list[str] = field(default_factory=list)
    scenarios: list[str] = field(default_factory=list)
    quick: bool = False
    workers: int | None = None
    events: int | None = None
    rate: float | None = None
    duration: float | None = None
    batch_size: int = 500
    max_inflight: int = 4
    block_ms: int = 1000
    producers: int = 1
    producer_mode: str = "raw"
    prompt_size: str = "default"
    snapshot_share: float = 0.25
    poison: float = 0.001
    concurrency: int = 200
    templates: int = 400
    seed: int = 7
    kill_every: float = 3.0
    outage_after: float = 3.0
    outage_for: float = 4.0
    claim_idle_ms: int = 1000
    naive_seconds: float = 4.0
    baselines: bool = True
    faststream: bool = True  # the FastStream peer baseline (bench extra)
    sample_interval: float = 0.02
    detail: int = 1000
    out: Path = Path("benchmarks/results")
    keep: bool = False
    plot: bool = True
    profile: str | None = None  # "py-spy" or "pyinstrument": profile worker 0 of max runs


@dataclass(slots=True)
class Load:
    """What a scenario put through the fleet, and what the observer saw."""

    label: str
    stream: str
    workspace: str
    store_url: str
    workers: list[Child]
    results: list[Result]
    snapshots: list[stats.Snapshot]
    rss: list[tuple[float, int, int]]
    marks: dict[str, float]
    requested_workers: int = 1
    host_busy: float | None = None
    service_cpu: dict[str, float] = field(default_factory=dict)
    ids: list[int] = field(default_factory=list)
    ack: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ids = sorted(i for r in self.results for i in r.entry_ids)
        self.ack = stats.assign_ack_times(self.ids, self.snapshots)

    @property
    def emitted(self) -> int:
        return len(self.ids)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.results)

    def settled_times(self) -> list[float]:
        return [t for t in self.ack if not math.isnan(t)]

    def emitted_events(self) -> list[stats.Emitted]:
        out: list[stats.Emitted] = []
        for r in self.results:
            ids = load.Ids(r.tag, r.producer, r.workspace)
            for seq, (kind, run_no, nodes) in enumerate(zip(r.kinds, r.run_nos, r.nodes,
                                                            strict=True)):
                out.append(stats.Emitted(ids.event_id(seq), ids.run_id(run_no), kind, nodes))
        return out

    def run_ids(self) -> list[str]:
        out: set[str] = set()
        for r in self.results:
            ids = load.Ids(r.tag, r.producer, r.workspace)
            out.update(ids.run_id(n) for k, n in zip(r.kinds, r.run_nos, strict=True)
                       if k != load.POISON)
        return sorted(out)


class Harness:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.tag = secrets.token_hex(3)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = (opts.out / f"{stamp}-{self.tag}").resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.templates_path = self.dir / "templates.json"
        self.client = aioredis.Redis.from_url(opts.redis_url)
        self.sampler_client = sampler_client(opts.redis_url)
        self.results: list[dict[str, Any]] = []
        self.baselines: dict[str, Any] = {}
        self.footprint: dict[str, float] = {}
        self.pool: load.Pool | None = None
        self.mix: dict[str, Any] = {}
        self.idle_rss: dict[str, int] = {}
        #: Saturation throughput by (store URL, workers), from this run's max scenarios.
        self.saturation: dict[tuple[str, int], float] = {}
        self.labels: set[str] = set()
        self.counter = 0
        self.series: dict[str, Any] = {}
        self.profile_outputs: list[str] = []
        self.profilers: list[Child] = []

    # -- set-up -------------------------------------------------------------------------

    async def setup(self) -> None:
        o = self.opts
        templates = await anyio.to_thread.run_sync(
            lambda: load.build_templates(o.seed, o.templates, prompt_size=o.prompt_size,
                                         snapshot_share=o.snapshot_share))
        load.save_templates(self.templates_path, templates)
        sample = list(load.plan(templates, 20_000, seed=o.seed, concurrency=o.concurrency,
                                poison=o.poison))
        mix = load.summarize(sample)
        self.mix = msgspec.to_builtins(mix)
        self.pool = templates
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()
        await self.sampler_client.aclose()

    def worker_config(self, stream: str, store_url: str, **changes: Any) -> WorkerConfig:
        o = self.opts
        cfg = WorkerConfig(redis_url=o.redis_url, stream=stream, group=GROUP,
                           store_url=store_url, batch_size=o.batch_size,
                           max_inflight=o.max_inflight, block_ms=o.block_ms)
        return dataclasses.replace(cfg, **changes)

    def names(self, scenario: str, store_url: str, workers: int = 1) -> tuple[str, str, str]:
        """Stream, workspace and label of a scenario: unique within the harness run."""
        self.counter += 1
        short = store_label(store_url)
        stream = f"bench:{self.tag}:{self.counter:02d}-{scenario}-{short}"
        workspace = f"bench_{self.tag}_{self.counter:02d}_{scenario}"[:48]
        label = f"{scenario} {short}" + (f" {workers}w" if workers > 1 else "")
        if label in self.labels:
            label += f" #{self.counter}"
        self.labels.add(label)
        return stream, workspace, label

    # -- the engine -----------------------------------------------------------------------

    async def _start_producers(self, stream: str, workspace: str, events: int, rate: float,
                               record: bool, label: str) -> list[tuple[Child, Path]]:
        o = self.opts
        n = max(1, o.producers)
        out: list[tuple[Child, Path]] = []
        for p in range(n):
            share = events // n + (1 if p < events % n else 0)
            spec_path = self.dir / f"producer-{self.counter:02d}-{p}.spec.json"
            result_path = self.dir / f"producer-{self.counter:02d}-{p}.result.json"
            spec = Spec(redis_url=o.redis_url, stream=stream, templates=str(self.templates_path),
                        events=share, rate=rate / n if rate > 0 else 0.0,
                        seed=o.seed + self.counter,
                        tag=self.tag, producer=self.counter * 100 + p, workspace=workspace,
                        out=str(result_path), concurrency=o.concurrency, poison=o.poison,
                        record=record, mode=o.producer_mode)
            spec_path.write_bytes(msgspec.json.encode(spec))
            log = self.dir / "logs" / f"{label.replace(' ', '-')}-producer-{p}.log"
            child = spawn(f"producer-{p}",
                          [python(), "-m", "benchmarks", "produce", str(spec_path)], {}, log,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            out.append((child, result_path))
        for child, _ in out:
            line = await anyio.to_thread.run_sync(_readline, child)
            if line.strip() != "ready":
                raise RuntimeError(f"producer did not start: {line!r}; {_log_tail(child)}")
        return out

    @staticmethod
    async def _go(producers: list[tuple[Child, Path]]) -> None:
        for child, _ in producers:
            assert child.popen.stdin is not None
            child.popen.stdin.write(b"go\n")
            child.popen.stdin.flush()
        for child, _ in producers:
            line = await anyio.to_thread.run_sync(_readline, child)
            if not line.startswith("done"):
                raise RuntimeError(f"producer failed: {line!r}; {_log_tail(child)}")
            await child.wait(30)

    async def run_load(
        self,
        scenario: str,
        store_url: str,
        *,
        workers: int,
        events: int,
        rate: float = 0.0,
        preload: bool = False,
        spawn_one: Callable[[WorkerConfig, str], Child] | None = None,
        config_changes: dict[str, Any] | None = None,
        chaos: Callable[[ChaosContext], Coroutine[Any, Any, None]] | None = None,
        drain_timeout: float = 120.0,
        stop_when_exited: bool = False,
        record: bool = True,
    ) -> Load:
        stream, workspace, label = self.names(scenario, store_url, workers)
        await self.client.delete(stream, c.dlq_key(stream))
        await self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        cfg = self.worker_config(stream, store_url, **(config_changes or {}))
        log_dir = self.dir / "logs"
        if spawn_one is None and self.opts.profile:
            spawn_one = self._profiled_spawner()
        children: list[Child] = []
        generation = [0]

        def new_worker() -> Child:
            generation[0] += 1
            name = f"{self.tag}-{self.counter:02d}-{scenario}-w{generation[0]}"
            child = (spawn_one(cfg, name) if spawn_one is not None
                     else spawn_worker(cfg, name, log_dir))
            children.append(child)
            return child

        producers = await self._start_producers(stream, workspace, events, rate, record, label)
        sampler = GroupSampler(self.sampler_client, stream, GROUP,
                               interval=self.opts.sample_interval, detail=self.opts.detail)
        rss = RssSampler(lambda: [ch for ch in children if ch.alive])
        progress = Progress(label, events)
        marks: dict[str, float] = {}
        done = anyio.Event()
        cpu_start = host_cpu()
        services_start = service_cpu()
        failed = False

        async def show() -> None:
            while not done.is_set():
                snap = sampler.last
                if snap is not None:
                    progress.update(snap.settled or 0, snap.lag, snap.pending)
                with anyio.move_on_after(0.2):
                    await done.wait()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sampler.run)
                tg.start_soon(rss.run)
                tg.start_soon(show)
                if preload:
                    progress.note = "loading backlog"
                    marks["load_start"] = time.time()
                    await self._go(producers)
                    marks["load_end"] = time.time()
                    progress.note = ""
                    started = [new_worker() for _ in range(workers)]
                    marks["workers_start"] = time.time()
                    await wait_reading(self.client, stream, GROUP, started)
                    marks["workers_ready"] = time.time()
                else:
                    started = [new_worker() for _ in range(workers)]
                    marks["workers_start"] = time.time()
                    await wait_reading(self.client, stream, GROUP, started)
                    marks["workers_ready"] = time.time()
                    marks["load_start"] = time.time()
                    ctx = ChaosContext(self, children, new_worker, stream, marks, progress)
                    if chaos is not None:
                        tg.start_soon(chaos, ctx)
                    await self._go(producers)
                    marks["load_end"] = time.time()
                    ctx.load_done.set()
                await self._wait_drained(sampler, children, events, drain_timeout,
                                         stop_when_exited)
                marks["drained"] = time.time()
                done.set()
                sampler.stop()
                rss.stop()
        except BaseException:
            failed = True
            raise
        finally:
            done.set()
            progress.close()
            with anyio.CancelScope(shield=True):
                for child, _ in producers:
                    child.kill()
                    await child.wait(5)
                for child in children:
                    await child.stop()
                for profiler in self.profilers:
                    await profiler.wait(60)
                if failed and not self.opts.keep:  # a failed scenario leaves no stream behind
                    await self.client.delete(stream, c.dlq_key(stream))
            self.profilers = []
        busy, total = (b - a for a, b in zip(cpu_start, host_cpu(), strict=True))
        services = {k: round(v - services_start.get(k, 0.0), 3) for k, v in service_cpu().items()}
        results = [read_result(path) for _, path in producers]
        return Load(label, stream, workspace, store_url, children, results,
                    list(sampler.snapshots), list(rss.points), marks, workers,
                    host_busy=busy / total if total else None, service_cpu=services)

    async def _wait_drained(self, sampler: GroupSampler, children: list[Child], events: int,
                            limit_s: float, stop_when_exited: bool) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            snap = sampler.last
            if snap is None and sampler.errors > 100:
                raise RuntimeError(f"the group sampler fails: {sampler.last_error}")
            if snap is not None and snap.length >= events and snap.pending == 0 and (
                    snap.lag == 0 or (snap.lag is None and snap.settled == events)):
                return
            if stop_when_exited and all(not ch.alive or ch.poll() for ch in children):
                return
            for ch in children:
                ch.poll()
            await anyio.sleep(0.05)
        raise TimeoutError(f"not drained after {limit_s:.0f}s; see the worker logs in "
                           f"{self.dir / 'logs'}")

    # -- analysis -----------------------------------------------------------------------------

    async def analyze(self, run: Load, scenario: str, *, target_rate: float | None = None,
                      account_store: bool = True, extra: dict[str, Any] | None = None,
                      store_for_budget: str | None = None,
                      memory_budget: bool = True) -> dict[str, Any]:
        o = self.opts
        settled = run.settled_times()
        lat = stats.latencies_ms(run.ids, run.ack)
        marks = run.marks
        curve = stats.settled_curve(run.snapshots)
        first_entry = stats.id_ms(run.ids[0]) / 1000 if run.ids else marks.get("load_start", 0)
        last_entry = stats.id_ms(run.ids[-1]) / 1000 if run.ids else first_entry
        final = curve[-1][1] if curve else len(settled)
        done_at = stats.crossing(curve, final) if final else None
        if scenario in ("max", "burst") or scenario.startswith("baseline"):
            throughput = stats.rate_between(curve, final)
        else:
            throughput = (final / (done_at - first_entry)
                          if done_at and done_at > first_entry else None)
        if "workers_ready" in marks and marks.get("load_end", 0) <= marks["workers_ready"]:
            drain_from = marks["workers_ready"]  # a backlog loaded before the workers started
        elif scenario == "burst":
            drain_from = first_entry  # the backlog arrives while the workers run
        else:
            drain_from = last_entry  # after the load: how long until the last one settled
        drain_s = done_at - drain_from if done_at else None
        procs = summarize_children(run.workers)
        dead_letters = await self._dead_letters(run.stream)
        is_null = run.store_url.startswith("null:")
        if account_store and not is_null:
            accounting = await self._account_store(run, dead_letters)
            acc = accounting.as_dict()
            acc["method"] = "store documents + dead-letter stream vs emitted event IDs"
        else:
            accounting = stats.account_acks(run.ids, run.ack, len(dead_letters))
            for _, reason in dead_letters:
                accounting.dlq_reasons[reason] = accounting.dlq_reasons.get(reason, 0) + 1
            acc = accounting.as_dict()
            acc["duplicates"] = None
            acc["method"] = ("settled stream entries (acknowledged after the write, or "
                             "dead-lettered) vs emitted; a null:// store keeps nothing, so "
                             "duplicates cannot be observed")
        mean_bytes = run.bytes / run.emitted if run.emitted else 0
        budget_key = store_for_budget or run.store_url
        idle = self.idle_rss.get(budget_key) or procs["idle_rss_bytes"]
        footprint = self.footprint.get(budget_key) or self.footprint.get(run.store_url) or 1.0
        budget = (stats.memory_budget(idle, o.batch_size, o.max_inflight, mean_bytes,
                                      footprint) if idle and memory_budget else None)
        out: dict[str, Any] = {
            "scenario": scenario,
            "label": run.label,
            "store": redact(run.store_url),
            "workers": run.requested_workers,
            "worker_processes": procs["processes"],
            "events": run.emitted,
            "settled": len(settled),
            "mean_event_bytes": round(mean_bytes),
            "target_rate": round(target_rate, 1) if target_rate else None,
            "events_per_s": round(throughput, 1) if throughput else None,
            "latency_ms": stats.latency_summary(lat),
            "drain_s": round(drain_s, 3) if drain_s is not None else None,
            "lost": accounting.lost,
            "duplicates": acc["duplicates"],
            "accounting": acc,
            "cpu_us_per_event": (round(procs["cpu_seconds"] / len(settled) * 1e6, 1)
                                 if settled else None),
            "cpu_seconds": procs["cpu_seconds"],
            "peak_rss_mib": round(procs["peak_rss_bytes"] / 2**20, 1),
            "idle_rss_mib": round(idle / 2**20, 1) if idle else None,
            "memory_budget_mib": round(budget / 2**20, 1) if budget else None,
            "within_budget": (procs["peak_rss_bytes"] <= budget) if budget else None,
            "batch_footprint_x_payload": round(footprint, 2),
            "killed": procs["killed"],
            "batches": procs["batches"],
            "mean_batch_size": procs["mean_batch_size"],
            "exit_codes": procs["exit_codes"],
            "samples": len(run.snapshots),
            "host_cpu_busy": round(run.host_busy, 3) if run.host_busy is not None else None,
            "server_cpu_us_per_event": {k: round(v / len(settled) * 1e6, 1)
                                        for k, v in run.service_cpu.items()} if settled else {},
            "marks": {k: round(v - first_entry, 3) for k, v in run.marks.items()},
        }
        if extra:
            out.update(extra)
        if self.profile_outputs:
            out["profile"] = self.profile_outputs
            self.profile_outputs = []
        t0 = min([first_entry, *run.marks.values()])
        end = max(done_at or t0 + 1, run.marks.get("drained", t0 + 1))
        self.series[run.label] = {
            "throughput": stats.series(curve, t0, end, 0.25),
            "lag": [(round(s.t - t0, 3), (s.lag if s.lag is not None else 0) + s.pending)
                    for s in run.snapshots[::5]],
            "rss": [(round(t - t0, 3), mx) for t, mx, _ in run.rss],
            "latency_p99": stats.windowed_p99(run.ids, lat, t0, 0.5),
            "marks": {k: round(v - t0, 3) for k, v in run.marks.items()},
        }
        if not o.keep:
            await self._cleanup(run)
        return out

    async def _dead_letters(self, stream: str) -> list[tuple[str | None, str]]:
        out: list[tuple[str | None, str]] = []
        async for _, fields in _xrange_all(self.client, c.dlq_key(stream)):
            reason = _text(fields.get(b"reason", b""))
            event_id: str | None = None
            with contextlib.suppress(Exception):
                event_id = msgspec.json.decode(fields.get(b"event", b"")).get("eventId")
            out.append((event_id, reason))
        return out

    async def _account_store(self, run: Load,
                             dead_letters: list[tuple[str | None, str]]) -> stats.Accounting:
        store = await self.open_store(run.store_url)
        try:
            run_ids = run.run_ids()
            runs = await store.list_runs(run.workspace, RunQuery(limit=len(run_ids) + 1000))
            nodes = [n async for n in store.scan_nodes(
                run.workspace, NodeQuery(fields=("eventId", "runId", "nodeKey")))]
        finally:
            await store.close()
        return stats.account(run.emitted_events(), runs, nodes, dead_letters)

    async def _cleanup(self, run: Load) -> None:
        await self.client.delete(run.stream, c.dlq_key(run.stream))
        if run.store_url.startswith("null:"):
            return
        store = await self.open_store(run.store_url)
        try:
            ids = run.run_ids()
            for i in range(0, len(ids), 1000):
                await store.delete_runs(run.workspace, ids[i:i + 1000])
        finally:
            await store.close()

    async def open_store(self, url: str) -> Store:
        store = open_store(url)
        await store.open()
        await migrate(store)
        return store

    # -- helpers per store ------------------------------------------------------------------

    async def prepare_store(self, url: str) -> str:
        """Create the benchmark database if needed and the schema; returns the URL."""
        if url.startswith(("postgresql:", "postgres:")):
            await ensure_pg_database(url)
        if url.startswith("sqlite:"):
            from worker.stores.sqlite import database_path

            Path(database_path(url.split("?", 1)[0])).parent.mkdir(parents=True, exist_ok=True)
        try:
            store = await self.open_store(url)
        except Exception as exc:
            raise SystemExit(f"benchmarks: cannot open the store {redact(url)}: {exc}") from exc
        try:
            assert self.pool is not None
            o = self.opts
            workspace = f"bench_{self.tag}_footprint"
            self.footprint[url], runs = await measure_footprint(
                self.pool, o.batch_size, o.seed, o.concurrency, store, workspace)
            if not url.startswith("null:"):
                await store.delete_runs(workspace, runs)
        finally:
            await store.close()
        if url not in self.idle_rss:
            self.idle_rss[url] = await self.probe_idle_rss(url)
        return url

    async def probe_idle_rss(self, store_url: str) -> int:
        """Resident set of a worker that is connected and waiting on an empty stream."""
        stream, _, _ = self.names("idle", store_url)
        await self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        cfg = self.worker_config(stream, store_url)
        child = spawn_worker(cfg, f"{self.tag}-idle-{self.counter}", self.dir / "logs")
        try:
            await wait_reading(self.client, stream, GROUP, [child])
            await anyio.sleep(0.3)
            from .monitor import rss_bytes

            return rss_bytes(child.pid) or 0
        finally:
            await child.stop()
            await self.client.delete(stream)

    # -- scenarios ---------------------------------------------------------------------------

    async def max(self, store_url: str, workers: int, events: int, *,
                  raw_upsert: bool = False) -> dict[str, Any]:
        """Saturation: a backlog loaded first, then drained; optionally followed by the
        store's raw upsert of the very same rows (read back from the drained stream)."""
        run = await self.run_load("max", store_url, workers=workers, events=events, preload=True,
                                  record=not store_url.startswith("null:"))
        if raw_upsert:
            await self.baseline_raw_upsert(store_url, run.stream)
        result = await self.analyze(run, "max", account_store=True)
        if result["events_per_s"]:
            key = (store_url, workers)
            self.saturation[key] = max(self.saturation.get(key, 0.0), result["events_per_s"])
        return result

    async def steady(self, store_url: str, workers: int, rate: float,
                     duration: float) -> dict[str, Any]:
        events = max(1, int(rate * duration))
        run = await self.run_load("steady", store_url, workers=workers, events=events, rate=rate)
        return await self.analyze(run, "steady", target_rate=rate)

    async def burst(self, store_url: str, workers: int, events: int) -> dict[str, Any]:
        run = await self.run_load("burst", store_url, workers=workers, events=events, rate=0.0)
        return await self.analyze(run, "burst")

    async def crash(self, store_url: str, workers: int, rate: float,
                    duration: float) -> dict[str, Any]:
        o = self.opts
        events = max(1, int(rate * duration))
        kills: list[float] = []

        async def killer(ctx: ChaosContext) -> None:
            i = 0
            while not ctx.load_done.is_set():
                with anyio.move_on_after(o.kill_every):
                    await ctx.load_done.wait()
                if ctx.load_done.is_set():
                    return
                alive = [ch for ch in ctx.children if ch.alive]
                if not alive:
                    continue
                victim = alive[i % len(alive)]
                i += 1
                victim.kill(signal.SIGKILL)
                kills.append(time.time())
                ctx.marks[f"kill{i}"] = time.time()
                ctx.progress.note = f"killed {i}"
                fresh = ctx.new_worker()
                with contextlib.suppress(Exception):
                    await wait_reading(self.client, ctx.stream, GROUP, [fresh], limit_s=30)

        run = await self.run_load(
            "crash", store_url, workers=workers, events=events, rate=rate, chaos=killer,
            config_changes={"claim_idle_ms": o.claim_idle_ms, "reclaim_interval_s": 0.5})
        return await self.analyze(run, "crash", target_rate=rate,
                                  extra={"kills": len(kills), "kill_every_s": o.kill_every,
                                         "claim_idle_ms": o.claim_idle_ms})

    async def outage(self, store_url: str, workers: int, rate: float,
                     duration: float) -> dict[str, Any]:
        o = self.opts
        events = max(1, int(rate * duration))
        scheme = urlsplit(store_url).scheme
        proxy: Child | None = None
        worker_url = store_url
        if scheme in ("postgresql", "postgres", "mongodb"):
            proxy, port = await start_proxy(store_url, self.dir / "logs" / "proxy.log")
            worker_url = via_port(store_url, port)
            method = (f"TCP proxy between the workers and the store: at +{o.outage_after}s every "
                      f"connection is reset and new ones are refused for {o.outage_for}s")
        elif scheme == "sqlite":
            method = (f"another process holds an EXCLUSIVE lock on the database file from "
                      f"+{o.outage_after}s for {o.outage_for}s (writers get SQLITE_BUSY)")
        else:
            return {"scenario": "outage", "label": f"outage {store_label(store_url)}",
                    "store": redact(store_url), "skipped": f"{scheme}:// has no store to take "
                    "away (it keeps nothing)"}

        async def cut_and_restore(ctx: ChaosContext) -> None:
            await anyio.sleep(o.outage_after)
            ctx.marks["outage_start"] = time.time()
            ctx.progress.note = "STORE DOWN"
            if proxy is not None:
                proxy.kill(signal.SIGUSR1)
                await anyio.sleep(o.outage_for)
                proxy.kill(signal.SIGUSR2)
            else:
                from worker.stores.sqlite import database_path

                path = database_path(store_url.split("?", 1)[0])
                await anyio.to_thread.run_sync(hold_sqlite_lock, path, o.outage_for)
            ctx.marks["outage_end"] = time.time()
            ctx.progress.note = "store back"

        try:
            run = await self.run_load("outage", worker_url, workers=workers, events=events,
                                      rate=rate, chaos=cut_and_restore, drain_timeout=180)
        finally:
            if proxy is not None:
                await proxy.stop(5)
        run.store_url = store_url
        marks = run.marks
        recovery = None
        if "outage_end" in marks:
            settled = run.settled_times()
            last = max(settled) if settled else math.nan
            recovery = round(last - marks["outage_end"], 3)
        return await self.analyze(run, "outage", target_rate=rate, store_for_budget=worker_url,
                                  extra={"outage": method, "outage_s": o.outage_for,
                                         "recovered_after_s": recovery})

    # -- baselines ----------------------------------------------------------------------------

    async def baseline_raw_redis(self, events: int) -> dict[str, Any]:
        return await self._baseline_loop(
            "raw-redis", "raw_redis_loop", events,
            "XREADGROUP COUNT batch_size + msgspec JSON decode of each entry + one XACK per "
            "batch, sequential, no framework")

    async def baseline_faststream(self, events: int) -> dict[str, Any]:
        return await self._baseline_loop(
            "faststream", "faststream_consumer", events,
            "FastStream RedisBroker batch subscriber (StreamSub batch=True, max_records="
            "batch_size, FastStream's read and ack); the handler decodes each event and "
            "groups the batch by run")

    async def _baseline_loop(self, kind: str, key: str, events: int,
                             method: str) -> dict[str, Any]:
        """One run of a baseline consumer process; the recorded rate is the mean of its runs."""
        o = self.opts

        def spawn_loop(cfg: WorkerConfig, name: str) -> Child:
            args = [python(), "-m", "benchmarks", "baseline", kind, "--redis-url",
                    o.redis_url, "--stream", cfg.stream, "--group", GROUP, "--consumer", name,
                    "--batch-size", str(o.batch_size), "--events", str(events)]
            return spawn(name, args, {}, self.dir / "logs" / f"{name}.log")

        run = await self.run_load(f"baseline-{kind}", "null://", workers=1, events=events,
                                  preload=True, spawn_one=spawn_loop, record=False)
        result = await self.analyze(run, f"baseline-{kind}", account_store=False,
                                    memory_budget=False)
        result["method"] = method
        runs = [*self.baselines.get(key, {}).get("runs", []), result]
        rates = [r["events_per_s"] for r in runs if r.get("events_per_s")]
        self.baselines[key] = {
            "events_per_s": round(sum(rates) / len(rates), 1) if rates else None,
            "cpu_us_per_event": runs[-1].get("cpu_us_per_event"),
            "method": method + "; measured before and after the null-store worker run, "
                      "mean of the two",
            "runs": runs,
        }
        return result

    async def baseline_naive(self, store_url: str, events: int) -> dict[str, Any]:
        o = self.opts

        def spawn_naive(cfg: WorkerConfig, name: str) -> Child:
            args = [python(), "-m", "benchmarks", "baseline", "naive", "--redis-url",
                    o.redis_url, "--stream", cfg.stream, "--group", GROUP, "--consumer", name,
                    "--store-url", store_url, "--batch-size", str(o.batch_size),
                    "--seconds", str(o.naive_seconds)]
            return spawn(name, args, {}, self.dir / "logs" / f"{name}.log")

        run = await self.run_load("baseline-naive", store_url, workers=1, events=events,
                                  preload=True, spawn_one=spawn_naive, stop_when_exited=True,
                                  record=False)
        result = await self.analyze(run, "baseline-naive", account_store=False,
                                    memory_budget=False)
        result["lost"] = None
        result["method"] = ("per entry: decode + validate, one store.write() of that event "
                            f"alone, one XACK; run for {o.naive_seconds}s")
        self.baselines["naive_per_event"] = result
        return result

    async def baseline_raw_upsert(self, store_url: str, stream: str) -> dict[str, Any]:
        if store_label(store_url) not in ("postgresql", "sqlite"):
            result: dict[str, Any] = {
                "store": redact(store_url),
                "skipped": f"no raw upsert baseline for {store_label(store_url)}:// here"}
            self.baselines["raw_store_upsert"] = result
            return result
        batches, events = await baselines.read_batches(self.client, stream, self.opts.batch_size)
        progress = Progress(f"baseline-raw-upsert {store_label(store_url)}", None)
        progress.close(f"{len(batches)} batches of {events} events …")
        runs = [await baselines.raw_upsert(store_url, batches, events,
                                           concurrency=self.opts.max_inflight)
                for _ in range(2)]
        result = dict(runs[-1])
        result["events_per_s"] = round(sum(r["events_per_s"] for r in runs) / len(runs), 1)
        result["rows_per_s"] = round(sum(r["rows_per_s"] for r in runs) / len(runs), 1)
        result["seconds"] = round(sum(r["seconds"] for r in runs) / len(runs), 4)
        result["runs"] = runs
        result["method"] += "; run twice, mean of the two"
        result["store"] = redact(store_url)
        self.baselines["raw_store_upsert"] = result
        return result

    def _profiled_spawner(self) -> Callable[[WorkerConfig, str], Child]:
        """Spawns workers; the first one is profiled (py-spy attached, or pyinstrument)."""
        o = self.opts
        first = [True]

        def spawn_profiled(cfg: WorkerConfig, name: str) -> Child:
            log_dir = self.dir / "logs"
            if not first[0]:
                return spawn_worker(cfg, name, log_dir)
            first[0] = False
            if o.profile == "py-spy":
                child = spawn_worker(cfg, name, log_dir)
                out = self.dir / f"profile-{name}.collapsed.txt"
                spy = Path(python()).with_name("py-spy")
                cmd = [str(spy) if spy.exists() else "py-spy", "record", "--pid", str(child.pid),
                       "-r", "200", "-f", "raw", "-o", str(out)]
                self.profilers.append(spawn("py-spy", cmd, {}, log_dir / f"py-spy-{name}.log"))
                self.profile_outputs = [str(out)]
                return child
            out = self.dir / f"profile-{name}.pyinstrument.txt"
            cmd = [python(), "-m", "pyinstrument", "-o", str(out), "-m", "worker", "run"]
            self.profile_outputs = [str(out)]
            return spawn_worker(cfg, name, log_dir, command=cmd)

        return spawn_profiled


@dataclass(slots=True)
class ChaosContext:
    harness: Harness
    children: list[Child]
    new_worker: Callable[[], Child]
    stream: str
    marks: dict[str, float]
    progress: Progress
    load_done: anyio.Event = field(default_factory=anyio.Event)


# -- helpers ------------------------------------------------------------------------------------

def _readline(child: Child) -> str:
    assert child.popen.stdout is not None
    return child.popen.stdout.readline().decode()


def _log_tail(child: Child, lines: int = 5) -> str:
    if child.log is None:
        return "no log"
    try:
        with open(child.log.name, "rb") as f:
            tail = f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"see {child.log.name}"
    return f"{child.log.name}: " + " | ".join(tail)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _xrange_all(client: aioredis.Redis, stream: str, count: int = 1000) -> Any:
    start: Any = "-"
    while True:
        rows: Any = await client.xrange(stream, min=start, max="+", count=count)
        for entry_id, fields in rows:
            yield _text(entry_id), fields
        if len(rows) < count:
            return
        ms, _, seq = _text(rows[-1][0]).partition("-")
        start = f"{ms}-{int(seq) + 1}"


def store_label(url: str) -> str:
    scheme = urlsplit(url).scheme
    return {"postgres": "postgresql", "mongodb+srv": "mongodb"}.get(scheme, scheme)


def redact(url: str) -> str:
    """A store URL with its password hidden (results files are shared)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


async def measure_footprint(pool: load.Pool, batch_size: int, seed: int, concurrency: int,
                            store: Store, workspace: str) -> tuple[float, list[str]]:
    """Bytes one batch occupies in a worker per byte of its payloads: the entries as read,
    the decoded events, the coalesced write batch and whatever the store allocates to
    write it (its JSON, the driver's buffers), at the peak (tracemalloc). Measured in
    this process on a second batch (the first warms the store's statement cache).
    Returns the factor and the run IDs written (to delete)."""
    ids = load.Ids("footprint", 0, workspace)
    items = list(load.plan(pool, 2 * batch_size, seed=seed, concurrency=concurrency))
    payloads = [ids.payload(i) for i in items]
    first, second = payloads[:batch_size], payloads[batch_size:]
    entries = [Entry("s", f"{n}-0", p) for n, p in enumerate(first)]
    valid, _ = prepare(entries, 16 * 1024 * 1024, 5)
    await store.write(coalesce_records(valid))
    del entries, valid
    size = sum(len(p) for p in second)
    tracemalloc.start()
    try:
        entries = [Entry("s", f"{n}-0", bytes(bytearray(p))) for n, p in enumerate(second)]
        valid, _ = prepare(entries, 16 * 1024 * 1024, 5)
        await store.write(coalesce_records(valid))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    run_ids = sorted({ids.run_id(i.run_no) for i in items})
    return max(1.0, peak / size), run_ids


async def ensure_pg_database(url: str) -> None:
    """Create the URL's database (e.g. ``audit_bench``) if it does not exist."""
    import asyncpg

    from worker.stores.postgres import PostgresStore

    dsn = PostgresStore(url).dsn
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    if not name:
        raise ValueError("the PostgreSQL URL must name a database, e.g. /audit_bench")
    if not _DB_NAME.match(name):
        raise ValueError(f"refusing to create database {name!r}: use letters, digits and _")
    admin = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def pg_reachable(url: str) -> bool:
    import asyncpg

    parts = urlsplit(url)
    admin = urlunsplit(parts._replace(path="/postgres", query=""))
    try:
        conn = await asyncpg.connect(admin, timeout=2)
    except Exception:
        return False
    await conn.close()
    return True


def via_port(url: str, port: int) -> str:
    """The same URL with its host and port replaced by 127.0.0.1:``port``."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def start_proxy(store_url: str, log: Path) -> tuple[Child, int]:
    parts = urlsplit(store_url)
    default = 27017 if parts.scheme.startswith("mongodb") else 5432
    target = f"{parts.hostname or '127.0.0.1'}:{parts.port or default}"
    child = spawn("proxy", [python(), "-m", "benchmarks", "proxy", "--target", target], {}, log,
                  stdout=subprocess.PIPE)
    line = await anyio.to_thread.run_sync(_readline, child)
    if not line.startswith("listening"):
        raise RuntimeError(f"proxy did not start: {line!r}")
    return child, int(line.split()[1])


def hold_sqlite_lock(path: str, seconds: float) -> None:
    """Hold an exclusive lock on a SQLite database for ``seconds`` (an outage)."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def default_pg_url() -> str:
    return os.environ.get("AUDIT_BENCH_PG_URL",
                          "postgresql://postgres@127.0.0.1:5432/audit_bench")
