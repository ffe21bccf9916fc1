"""Worker and helper subprocesses: start, wait until reading, kill -9, reap with rusage.

Workers are real ``python -m worker run`` processes configured only through
``AUDIT_*`` variables, exactly as an operator runs them. Each is reaped with
``wait4``, which returns the kernel's own accounting for that child (CPU time and
peak resident set), so even a worker killed with SIGKILL is fully accounted for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from .monitor import cpu_seconds, peak_rss_bytes, rss_bytes

REPO = Path(__file__).resolve().parent.parent


@dataclass(slots=True)
class Child:
    """One child process and what the kernel says it used."""

    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes] | None = None
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    cpu_at_ready: float = 0.0
    idle_rss: int | None = None
    killed: bool = False
    exit_code: int | None = None
    cpu_total: float | None = None  # user + system, from wait4
    peak_rss: int | None = None  # VmHWM, sampled while it ran
    metrics_port: int = 0
    batches: tuple[float, float] | None = None  # (count, sum) of its batch-size histogram

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.exit_code is None

    def mark_ready(self) -> None:
        self.ready_at = time.monotonic()
        self.cpu_at_ready = cpu_seconds(self.pid) or 0.0
        self.idle_rss = rss_bytes(self.pid)

    def poll(self) -> bool:
        """Reap the child if it has exited; True once it is gone."""
        if self.exit_code is not None:
            return True
        try:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.exit_code = self.popen.returncode if self.popen.returncode is not None else -1
            return True
        if pid == 0:
            return False
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.exit_code
        self.cpu_total = usage.ru_utime + usage.ru_stime
        # Not ru_maxrss: after fork + exec Linux carries the parent's high-water mark
        # over into the child's, so it would report the harness's own size.
        if self.log is not None:
            self.log.close()
        return True

    @property
    def cpu_working(self) -> float:
        """CPU seconds spent after it was ready (start-up imports excluded)."""
        total = self.cpu_total if self.cpu_total is not None else (cpu_seconds(self.pid) or 0.0)
        return max(0.0, total - self.cpu_at_ready)

    def note_peak(self) -> None:
        """Read the kernel's high-water mark of the resident set (VmHWM) while alive."""
        if self.exit_code is None:
            hwm = peak_rss_bytes(self.pid)
            if hwm is not None and (self.peak_rss is None or hwm > self.peak_rss):
                self.peak_rss = hwm

    def current_peak_rss(self) -> int | None:
        self.note_peak()
        return self.peak_rss

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.note_peak()
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            if sig == signal.SIGKILL:
                self.killed = True

    async def wait(self, limit_s: float) -> bool:
        """Wait up to ``limit_s`` for the child to exit (and reap it); False if it runs on."""
        deadline = time.monotonic() + limit_s
        while not self.poll():
            if time.monotonic() > deadline:
                return False
            await anyio.sleep(0.02)
        return True

    async def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (the worker drains and exits 0), SIGKILL after ``grace``."""
        if self.alive and self.metrics_port:
            self.batches = await anyio.to_thread.run_sync(scrape_batches, self.metrics_port)
        self.kill(signal.SIGTERM)
        if not await self.wait(grace):
            self.kill(signal.SIGKILL)
            await self.wait(5.0)


def python() -> str:
    return sys.executable


def spawn(name: str, args: list[str], env: dict[str, str], log_path: Path | None,
          *, stdin: int | None = None, stdout: int | IO[bytes] | None = None) -> Child:
    log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 (closed on reap)
    popen = subprocess.Popen(
        args, cwd=REPO, env={**os.environ, **env}, stdin=stdin,
        stdout=stdout if stdout is not None else (log or subprocess.DEVNULL),
        stderr=log or subprocess.DEVNULL,
    )
    return Child(name, popen, log)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a worker process of a scenario is given (as AUDIT_* variables)."""

    redis_url: str
    stream: str
    group: str
    store_url: str
    batch_size: int = 500
    max_inflight: int = 4
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    reclaim_interval_s: float = 5.0
    extra: tuple[tuple[str, str], ...] = ()

    def env(self, consumer: str, metrics_port: int = 0) -> dict[str, str]:
        env = {
            "AUDIT_REDIS_URL": self.redis_url,
            "AUDIT_STREAM": self.stream,
            "AUDIT_GROUP": self.group,
            "AUDIT_CONSUMER": consumer,
            "AUDIT_STORE_URL": self.store_url,
            "AUDIT_BATCH_SIZE": str(self.batch_size),
            "AUDIT_MAX_INFLIGHT": str(self.max_inflight),
            "AUDIT_BLOCK_MS": str(self.block_ms),
            "AUDIT_CLAIM_IDLE_MS": str(self.claim_idle_ms),
            "AUDIT_RECLAIM_INTERVAL_S": str(self.reclaim_interval_s),
            "AUDIT_METRICS_PORT": str(metrics_port),
            "AUDIT_METRICS_HOST": "127.0.0.1",
            "AUDIT_LOG_FORMAT": "json",
            "AUDIT_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(dict(self.extra))
        return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_worker(cfg: WorkerConfig, consumer: str, log_dir: Path, *, burst: bool = False,
                 command: list[str] | None = None) -> Child:
    args = command or [python(), "-m", "worker", "run"]
    if burst and command is None:
        args = [*args, "--burst"]
    port = free_port()
    child = spawn(consumer, args, cfg.env(consumer, port), log_dir / f"{consumer}.log")
    child.metrics_port = port
    return child


def scrape_batches(port: int) -> tuple[float, float] | None:
    """(count, sum) of a worker's ``batch_size_events`` histogram, from its /metrics.

    Informational only (how many batches the events came in); lost and duplicates are
    never taken from a worker.
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    values = {sample.name: sample.value
              for family in text_string_to_metric_families(text)
              if family.name == "audit_fleet_batch_size_events"
              for sample in family.samples}
    count = values.get("audit_fleet_batch_size_events_count")
    total = values.get("audit_fleet_batch_size_events_sum")
    if count is None or total is None:
        return None
    return count, total


async def consumers(client: aioredis.Redis, stream: str, group: str) -> set[str]:
    try:
        rows = await client.xinfo_consumers(stream, group)
    except aioredis.ResponseError:
        return set()
    return {r["name"].decode() if isinstance(r["name"], bytes) else str(r["name"])
            for r in rows}


def logged_start(child: Child) -> bool:
    """Whether a worker has logged ``worker_started`` (its reader starts right after)."""
    if child.log is None:
        return False
    try:
        with open(child.log.name, "rb") as f:
            return b'"worker_started"' in f.read()
    except OSError:
        return False


async def wait_reading(client: aioredis.Redis, stream: str, group: str, children: list[Child],
                       limit_s: float = 60.0) -> None:
    """Wait until every child reads: it is a consumer of the group (Redis 7.0 creates the
    consumer with its first delivery) or it has logged ``worker_started``."""
    deadline = time.monotonic() + limit_s
    waiting = {c.name: c for c in children if c.ready_at is None}
    while waiting:
        names = await consumers(client, stream, group)
        for name in list(waiting):
            if name in names or logged_start(waiting[name]):
                waiting.pop(name).mark_ready()
        for child in waiting.values():
            if child.poll():
                raise RuntimeError(f"{child.name} exited with {child.exit_code} before reading; "
                                   f"see its log")
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not reading after {limit_s}s: {sorted(waiting)}")
        await anyio.sleep(0.02)


def summarize_children(children: list[Child]) -> dict[str, Any]:
    scraped = [c.batches for c in children if c.batches]
    count = sum(b[0] for b in scraped)
    return {
        "batches": int(count) if scraped else None,
        "mean_batch_size": round(sum(b[1] for b in scraped) / count, 1) if count else None,
        "processes": len(children),
        "killed": sum(1 for c in children if c.killed),
        "exit_codes": sorted({c.exit_code for c in children if c.exit_code is not None}),
        "cpu_seconds": round(sum(c.cpu_working for c in children), 3),
        "peak_rss_bytes": max((c.current_peak_rss() or 0) for c in children) if children else 0,
        "idle_rss_bytes": min((c.idle_rss or 0) for c in children if c.idle_rss) if any(
            c.idle_rss for c in children) else None,
    }
