"""Private Redis Cluster and Sentinel set-ups on loopback, for the tests that need them.

Used by the session fixtures in ``tests/conftest.py``; each node is a ``redis-server``
process of its own on a free port, with persistence off and a short node timeout so a
failover takes about two seconds.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is required (apt-get install redis-server)")
    return path


def cli(port: int, *args: str, timeout: float = 30) -> str:
    out = subprocess.run([_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, text=True, timeout=timeout, check=False)
    return out.stdout + out.stderr


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def stop_all(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every live process, then wait (SIGKILL after 10 s)."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class RedisCluster:
    """Six nodes: three masters, one replica each."""

    base: Path
    ports: list[int] = field(default_factory=list)
    bus_ports: dict[int, int] = field(default_factory=dict)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start_node(self, port: int) -> None:
        d = self.base / str(port)
        d.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             # an explicit bus port: the default (port + 10000) overflows for high ports
             "--cluster-port", str(self.bus_ports[port]),
             "--cluster-node-timeout", "1000", "--save", "", "--appendonly", "no",
             "--dir", str(d), "--logfile", str(d / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _listening(port), 10, f"redis-server on {port}")

    def start(self) -> None:
        ports = free_ports(12)
        self.ports = ports[:6]
        self.bus_ports = dict(zip(ports[:6], ports[6:], strict=True))
        for port in self.ports:
            self.start_node(port)
        out = cli(self.ports[0], "--cluster", "create",
                  *(f"127.0.0.1:{p}" for p in self.ports),
                  "--cluster-replicas", "1", "--cluster-yes", timeout=60)
        if "[OK] All 16384 slots covered" not in out:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out}")
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        """Every live node reports cluster_state:ok and the same three masters."""
        def ok() -> bool:
            live = [p for p, proc in self.procs.items() if proc.poll() is None]
            return all("cluster_state:ok" in cli(p, "cluster", "info") for p in live) and \
                len(self.masters()) == 3
        wait_for(ok, timeout, "cluster_state:ok")

    def nodes(self) -> list[list[str]]:
        for port, proc in self.procs.items():
            if proc.poll() is None:
                return [line.split() for line in cli(port, "cluster", "nodes").splitlines()
                        if line.strip()]
        return []

    def masters(self) -> list[int]:
        """Ports of the live masters that own slots."""
        out = []
        for row in self.nodes():
            if "master" in row[2] and "fail" not in row[2] and len(row) > 8:
                out.append(int(row[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(out)

    def master_of(self, key: str) -> int:
        slot = int(cli(self.ports[0], "cluster", "keyslot", key).strip())
        for row in self.nodes():
            if "master" not in row[2] or "fail" in row[2]:
                continue
            for rng in row[8:]:
                if rng.startswith("["):
                    continue
                low, _, high = rng.partition("-")
                if int(low) <= slot <= int(high or low):
                    return int(row[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no master owns the slot of {key!r}")

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.kill()
        proc.wait(timeout=10)

    def restart(self, port: int) -> None:
        self.start_node(port)

    def stop(self) -> None:
        stop_all(self.procs.values())


@dataclass
class SentinelSetup:
    """A master, one replica and one Sentinel (quorum 1) watching them as ``audit``."""

    base: Path
    master_name: str = "audit"
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.ports['sentinel']}/{self.master_name}/0"

    def _server(self, role: str, *extra: str) -> None:
        d = self.base / role
        d.mkdir(parents=True, exist_ok=True)
        port = self.ports[role]
        self.procs[role] = subprocess.Popen(
            [_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(d),
             "--logfile", str(d / "redis.log"), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _listening(port), 10, f"{role} on {port}")

    def start(self) -> None:
        m, r, s = free_ports(3)
        self.ports = {"master": m, "replica": r, "sentinel": s}
        self._server("master")
        self._server("replica", "--replicaof", "127.0.0.1", str(m))
        conf = self.base / "sentinel.conf"
        self.base.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            f"port {s}\nbind 127.0.0.1\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {m} 1\n"
            f"sentinel down-after-milliseconds {self.master_name} 1000\n"
            f"sentinel failover-timeout {self.master_name} 5000\n"
        )
        d = self.base / "sentinel"
        d.mkdir(parents=True, exist_ok=True)
        self.procs["sentinel"] = subprocess.Popen(
            [_binary("redis-server"), str(conf), "--sentinel", "--dir", str(d),
             "--logfile", str(d / "sentinel.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _listening(s), 10, "sentinel")
        wait_for(lambda: "master_link_status:up" in cli(r, "info", "replication"), 20,
                 "replica in sync")
        wait_for(lambda: "slaves=1" in cli(s, "info", "sentinel"), 20,
                 "sentinel sees the replica")

    def master_port(self) -> int:
        out = cli(self.ports["sentinel"], "sentinel", "get-master-addr-by-name",
                  self.master_name).split()
        return int(out[1])

    def kill(self, role: str) -> None:
        self.procs[role].kill()
        self.procs[role].wait(timeout=10)

    def stop(self) -> None:
        stop_all(self.procs.values())
