"""The outside observer: samples the consumer group, the processes, and shows progress.

Nothing here asks a worker anything. The group is read with one MULTI/EXEC per
sample (XLEN, XINFO GROUPS, XPENDING ``- +`` COUNT ``detail``); processes are read
from ``/proc`` (CPU ticks, resident set); see :mod:`benchmarks.stats` for how ack
times follow from the snapshots.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import redis.asyncio as aioredis

from .stats import Snapshot, encode_id

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _raw(response: Any, **options: Any) -> Any:
    return response


def sampler_client(url: str) -> aioredis.Redis:
    """A client whose XPENDING/XINFO replies are left raw (cheap to parse)."""
    client = aioredis.Redis.from_url(url)
    for command in ("XPENDING", "XINFO GROUPS", "XLEN"):
        client.set_response_callback(command, _raw)
    return client


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_groups(reply: Any, group: str) -> dict[str, Any]:
    """The named group's fields from an XINFO GROUPS reply (flat pairs or dicts)."""
    for raw in reply or ():
        if isinstance(raw, dict):
            fields = {_text(k): v for k, v in raw.items()}
        else:
            fields = {_text(raw[i]): raw[i + 1] for i in range(0, len(raw), 2)}
        if _text(fields.get("name")) == group:
            return fields
    raise LookupError(f"group {group!r} not found")


class GroupSampler:
    """Takes :class:`Snapshot` s of one stream's group every ``interval`` seconds."""

    def __init__(self, client: aioredis.Redis, stream: str, group: str, *,
                 interval: float = 0.02, detail: int = 1000) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.interval = interval
        self.detail = detail
        self.snapshots: list[Snapshot] = []
        self.errors = 0
        self.last_error = ""
        self._stop = anyio.Event()

    async def snapshot(self) -> Snapshot:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xlen(self.stream)
            pipe.execute_command("XINFO GROUPS", self.stream)
            pipe.execute_command("XPENDING", self.stream, self.group, "-", "+", self.detail)
            length, groups, pending = await pipe.execute()
        t = time.time()
        fields = parse_groups(groups, self.group)
        lag = fields.get("lag")
        ids = tuple(encode_id(row[0]) for row in pending)
        count = int(fields["pending"])
        return Snapshot(t=t, length=int(length), lag=None if lag is None else int(lag),
                        pending=count, last_delivered=encode_id(fields["last-delivered-id"]),
                        pending_ids=ids, complete=len(ids) >= count)

    async def take(self) -> Snapshot | None:
        try:
            snap = await self.snapshot()
        except (LookupError, OSError, aioredis.RedisError) as exc:
            self.errors += 1
            self.last_error = repr(exc)
            return None
        self.snapshots.append(snap)
        return snap

    async def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            await self.take()
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0
            with anyio.move_on_after(delay):
                await self._stop.wait()
        await self.take()

    def stop(self) -> None:
        self._stop.set()

    @property
    def last(self) -> Snapshot | None:
        return self.snapshots[-1] if self.snapshots else None


# -- processes ------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process, from /proc (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / _TICK, total / _TICK


SERVICES = {b"postgres": "postgresql", b"redis-server": "redis"}


def service_cpu() -> dict[str, float]:
    """CPU seconds used so far by every PostgreSQL and Redis server process (by name).

    Other users of the same servers on this machine count too: a rough figure.
    """
    out = dict.fromkeys(SERVICES.values(), 0.0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index(b"(") + 1:data.rindex(b")")]
        name = SERVICES.get(comm)
        if name is not None:
            fields = data[data.rindex(b")") + 2:].split()
            # utime + stime, and cutime + cstime: the postmaster reaps every backend, so
            # connections that closed during the window still count.
            out[name] += sum(int(x) for x in fields[11:15]) / _TICK
    return out


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM: the kernel's high-water mark of the resident set."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Watched(Protocol):
    @property
    def pid(self) -> int: ...

    def note_peak(self) -> None: ...


@dataclass(slots=True)
class RssSampler:
    """Resident set of the current worker processes over time (for the plot), and
    each one's high-water mark (so a process killed with SIGKILL has one too)."""

    children: Callable[[], Sequence[Watched]]
    interval: float = 0.25
    points: list[tuple[float, int, int]] = field(default_factory=list)  # t, max, sum
    _stop: anyio.Event = field(default_factory=anyio.Event)

    async def run(self) -> None:
        while not self._stop.is_set():
            children = self.children()
            for child in children:
                child.note_peak()
            values = [v for v in (rss_bytes(c.pid) for c in children) if v is not None]
            if values:
                self.points.append((time.time(), max(values), sum(values)))
            with anyio.move_on_after(self.interval):
                await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()


# -- progress -------------------------------------------------------------------------------

class Progress:
    """A one-line live progress bar on stderr (a line every few seconds when not a TTY)."""

    def __init__(self, label: str, total: int | None, *, stream: Any = None,
                 width: int = 28) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.start = time.monotonic()
        self._last_print = 0.0
        self._history: list[tuple[float, int]] = []
        self.note = ""

    def rate(self, done: int) -> float:
        now = time.monotonic()
        self._history.append((now, done))
        while len(self._history) > 2 and now - self._history[0][0] > 1.0:
            self._history.pop(0)
        t0, d0 = self._history[0]
        return (done - d0) / (now - t0) if now > t0 else 0.0

    def line(self, done: int, total: int | None, lag: int | None, pending: int,
             rate: float) -> str:
        elapsed = time.monotonic() - self.start
        if total:
            frac = min(1.0, done / total)
            filled = int(frac * self.width)
            bar = "█" * filled + "░" * (self.width - filled)
            head = f"{bar} {frac * 100:5.1f}% {done:>9,}/{total:,}"
        else:
            head = f"{done:>9,} settled"
        lag_s = "?" if lag is None else f"{lag:,}"
        note = f" | {self.note}" if self.note else ""
        return (f"{self.label:<22} {head} | {rate:>9,.0f} ev/s | lag {lag_s} | "
                f"pending {pending:,} | {elapsed:5.1f}s{note}")

    def update(self, done: int, lag: int | None, pending: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        rate = self.rate(done)
        now = time.monotonic()
        if not self.tty and now - self._last_print < 5.0:
            return
        self._last_print = now
        text = self.line(done, self.total, lag, pending, rate)
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, summary: str = "") -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")
        if summary:
            self.stream.write(f"{self.label:<22} {summary}\n")
        self.stream.flush()
