"""Private ``redis-server`` processes on loopback, for the tests that need them: single
servers (restarts, kills, maxmemory, a unix socket, TLS), a Redis Cluster and Sentinel.

Used by the fixtures in ``tests/conftest.py``; each server is a process of its own on a free
port, with persistence off; cluster nodes have a short node timeout so a failover takes
about two seconds.
"""

from __future__ import annotations

import ipaddress
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest


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


def cli(port: int, *args: str, timeout: float = 30, options: Sequence[str] = ()) -> str:
    """``redis-cli`` against 127.0.0.1:``port``; ``options`` go first (``Security``'s TLS
    and user flags)."""
    out = subprocess.run([_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *options,
                          *args], capture_output=True, text=True, timeout=timeout, check=False)
    return out.stdout + out.stderr


@dataclass(frozen=True)
class Security:
    """TLS and ACL users for a private set-up (none by default).

    ``tls`` is a throwaway CA's files (:func:`make_tls_files`): the servers then listen
    on TLS only, and replicate, gossip (cluster bus) and talk to Sentinel over TLS.
    ``users`` are ``user`` directives (``"worker on >pw ~* +@all"``; add ``"default
    off"`` to refuse unauthenticated clients); ``admin`` is the user replication,
    Sentinel and ``redis-cli`` use.
    """

    tls: tuple[Path, Path, Path] | None = None
    users: tuple[str, ...] = ()
    admin: tuple[str, str] | None = None

    def directives(self, port: int) -> list[tuple[str, ...]]:
        """Config directives: where to listen, TLS files, users, replication's user."""
        out: list[tuple[str, ...]] = []
        if self.tls is None:
            out.append(("port", str(port)))
        else:
            ca, cert, key = self.tls
            out += [("port", "0"), ("tls-port", str(port)), ("tls-cert-file", str(cert)),
                    ("tls-key-file", str(key)), ("tls-ca-cert-file", str(ca)),
                    ("tls-auth-clients", "no"), ("tls-replication", "yes")]
        out += [("user", *rule.split()) for rule in self.users]
        if self.admin is not None:
            out += [("masteruser", self.admin[0]), ("masterauth", self.admin[1])]
        return out

    def server_args(self, port: int, *, cluster: bool = False) -> list[str]:
        args = [a for d in self.directives(port) for a in (f"--{d[0]}", *d[1:])]
        if cluster and self.tls is not None:
            args += ["--tls-cluster", "yes"]
        return args

    def cli_options(self) -> list[str]:
        out = ["--tls", "--cacert", str(self.tls[0])] if self.tls is not None else []
        if self.admin is not None:
            out += ["--user", self.admin[0], "--pass", self.admin[1], "--no-auth-warning"]
        return out


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
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


def role_server(base: Path, role: str, port: int, *extra: str,
                security: Security = Security()) -> subprocess.Popen[bytes]:
    """A ``redis-server`` on ``port`` with its files in ``base/role``, once it listens."""
    d = base / role
    d.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [_binary("redis-server"), *security.server_args(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(d),
         "--logfile", str(d / "redis.log"), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _listening(port), 10, f"{role} on {port}")
    return proc


@dataclass
class RedisCluster:
    """Six nodes: three masters, one replica each."""

    base: Path
    security: Security = Security()
    ports: list[int] = field(default_factory=list)
    bus_ports: dict[int, int] = field(default_factory=dict)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def cli(self, port: int, *args: str, timeout: float = 30) -> str:
        return cli(port, *args, timeout=timeout, options=self.security.cli_options())

    def start_node(self, port: int) -> None:
        d = self.base / str(port)
        d.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [_binary("redis-server"), *self.security.server_args(port, cluster=True),
             "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf",
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
        out = self.cli(self.ports[0], "--cluster", "create",
                  *(f"127.0.0.1:{p}" for p in self.ports),
                  "--cluster-replicas", "1", "--cluster-yes", timeout=60)
        if "[OK] All 16384 slots covered" not in out:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out}")
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        """Every live node reports cluster_state:ok and the same three masters."""
        def ok() -> bool:
            live = [p for p, proc in self.procs.items() if proc.poll() is None]
            return all("cluster_state:ok" in self.cli(p, "cluster", "info") for p in live) and \
                len(self.masters()) == 3
        wait_for(ok, timeout, "cluster_state:ok")

    def nodes(self) -> list[list[str]]:
        for port, proc in self.procs.items():
            if proc.poll() is None:
                rows = self.cli(port, "cluster", "nodes").splitlines()
                return [line.split() for line in rows if line.strip()]
        return []

    def masters(self) -> list[int]:
        """Ports of the live masters that own slots."""
        out = []
        for row in self.nodes():
            if "master" in row[2] and "fail" not in row[2] and len(row) > 8:
                out.append(int(row[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(out)

    def master_of(self, key: str) -> int:
        slot = int(self.cli(self.ports[0], "cluster", "keyslot", key).strip())
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


def _user_and_password(rule: str) -> tuple[str, str]:
    """The name and the first ``>password`` of a ``user`` directive."""
    name, *rest = rule.split()
    return name, next(r[1:] for r in rest if r.startswith(">"))


@dataclass
class SentinelSetup:
    """A master, one replica and one Sentinel (quorum 1) watching them as ``audit``."""

    base: Path
    master_name: str = "audit"
    #: The servers' security; Sentinel's own users are ``sentinel_users``.
    security: Security = Security()
    sentinel_users: tuple[str, ...] = ()
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.ports['sentinel']}/{self.master_name}/0"

    def cli(self, port: int, *args: str) -> str:
        options = self.security.cli_options()
        if port == self.ports["sentinel"] and self.sentinel_users:
            options = options[:3] if self.security.tls else []  # TLS only: Sentinel's user
            user, password = _user_and_password(self.sentinel_users[-1])
            options += ["--user", user, "--pass", password, "--no-auth-warning"]
        return cli(port, *args, options=options)

    def _server(self, role: str, *extra: str) -> None:
        self.procs[role] = role_server(self.base, role, self.ports[role], *extra,
                                       security=self.security)

    def start(self) -> None:
        m, r, s = free_ports(3)
        self.ports = {"master": m, "replica": r, "sentinel": s}
        self._server("master")
        self._server("replica", "--replicaof", "127.0.0.1", str(m))
        conf = self.base / "sentinel.conf"
        self.base.mkdir(parents=True, exist_ok=True)
        sentinel_security = Security(self.security.tls, self.sentinel_users)
        directives = sentinel_security.directives(s)
        if self.security.admin is not None:
            directives += [("sentinel", "auth-user", self.master_name, self.security.admin[0]),
                           ("sentinel", "auth-pass", self.master_name, self.security.admin[1])]
        conf.write_text(
            "".join(" ".join(d) + "\n" for d in directives) + "bind 127.0.0.1\n"
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
        wait_for(lambda: "master_link_status:up" in self.cli(r, "info", "replication"), 20,
                 "replica in sync")
        wait_for(lambda: "slaves=1" in self.cli(s, "info", "sentinel"), 20,
                 "sentinel sees the replica")

    def master_port(self) -> int:
        out = self.cli(self.ports["sentinel"], "sentinel", "get-master-addr-by-name",
                       self.master_name).split()
        return int(out[1])

    def kill(self, role: str) -> None:
        self.procs[role].kill()
        self.procs[role].wait(timeout=10)

    def stop(self) -> None:
        stop_all(self.procs.values())


class RedisServers:
    """Starts throwaway ``redis-server`` processes on free ports; stops them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.extra: dict[int, tuple[str, ...]] = {}
        self.others: list[subprocess.Popen[bytes]] = []  # unix socket and TLS servers

    def start(self, *args: str, port: int | None = None) -> str:
        """A new server (``args`` are extra ``redis-server`` options); returns its URL."""
        port = port if port is not None else free_ports(1)[0]
        self.extra[port] = args
        self.procs[port] = self._launch(["--port", str(port), "--bind", "127.0.0.1", *args],
                                        partial(_listening, port))
        return f"redis://127.0.0.1:{port}/0"

    def start_unix(self) -> str:
        """A new server listening on a unix socket only; returns its ``unix://`` URL."""
        path = self.tmp_path / f"redis-{len(self.others)}.sock"
        self.others.append(self._launch(
            ["--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700"],
            _accepts_unix(path)))
        return f"unix://{path}?db=0"

    def start_tls(self) -> str:
        """A new server speaking TLS only, with a certificate from a throwaway CA; returns
        its ``rediss://`` URL, which names the CA file (``ssl_ca_certs``)."""
        ca, cert, key = make_tls_files(self.tmp_path)
        (port,) = free_ports(1)
        self.others.append(self._launch(
            ["--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
             "--tls-cert-file", str(cert), "--tls-key-file", str(key),
             "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"],
            partial(_listening, port)))
        return f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"

    def _launch(self, args: list[str], ready: Callable[[], bool]) -> subprocess.Popen[bytes]:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required for this test (apt-get install redis-server)")
        proc = subprocess.Popen(
            [binary, "--save", "", "--appendonly", "no", "--dir", str(self.tmp_path), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out = proc.communicate()[1].decode(errors="replace")
                if "--tls-port" in args and "Bad directive" in out:
                    pytest.skip("this redis-server was built without TLS support")
                pytest.fail(f"redis-server {' '.join(args)} did not start:\n{out[-2000:]}")
            time.sleep(0.05)
        if proc.stderr is not None:  # only start-up errors go there (Redis ignores SIGPIPE)
            proc.stderr.close()
        return proc

    def stop(self, url: str, *, kill: bool = False) -> None:
        """Stop the server at ``url`` (SIGKILL with ``kill``: nothing is saved)."""
        proc = self.procs.pop(int(url.rsplit(":", 1)[1].split("/", 1)[0]))
        if kill:
            proc.kill()
        else:
            proc.terminate()
        proc.wait(timeout=10)

    def restart(self, url: str, *, kill: bool = False) -> None:
        """Stop the server at ``url`` and start it again, same port and options."""
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        self.stop(url, kill=kill)
        self.start(*self.extra[port], port=port)

    def close(self) -> None:
        procs = [*self.procs.values(), *self.others]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        self.procs.clear()
        self.others.clear()


def _accepts_unix(path: Path) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
                return True
        except OSError:
            return False
    return ready


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A CA certificate, and a server certificate and key for 127.0.0.1/localhost it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                    signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5))
                   .not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "audit-fleet test CA")])
    ca_cert = certificate("audit-fleet test CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = certificate("localhost", server_key, ca_name, ca_key, ca=False)
    paths = (folder / "ca.crt", folder / "server.crt", folder / "server.key")
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths
@dataclass
class ReplicaPair:
    """A primary and one replica of it, with no Sentinel: the caller fails over by hand
    (:meth:`promote`). ``replica_upstream`` lets the replica follow another address (a
    delaying proxy in front of the primary: ``benchmarks/failover_loss.py``)."""

    base: Path
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, role: str) -> str:
        return f"redis://127.0.0.1:{self.ports[role]}/0"

    def _server(self, role: str, *extra: str) -> None:
        self.procs[role] = role_server(self.base, role, self.ports[role], *extra)

    def start_primary(self) -> None:
        self.ports["primary"], self.ports["replica"] = free_ports(2)
        self._server("primary")

    def start_replica(self, upstream_port: int | None = None) -> None:
        """The replica, following the primary (or ``upstream_port``); returns once the
        primary counts it as an acknowledging replica (``WAIT 1`` answers 1)."""
        upstream = upstream_port or self.ports["primary"]
        self._server("replica", "--replicaof", "127.0.0.1", str(upstream))
        wait_for(lambda: "master_link_status:up" in cli(self.ports["replica"], "info",
                                                        "replication"), 20, "replica in sync")
        wait_for(lambda: cli(self.ports["primary"], "wait", "1", "200").strip() == "1", 20,
                 "the primary to count the replica")

    def start(self) -> None:
        self.start_primary()
        self.start_replica()

    def wait_acknowledged(self, timeout: float = 10) -> None:
        """Until the primary has the replica's acknowledgement of every write so far."""
        def acked() -> bool:
            info = dict(line.split(":", 1) for line in
                        cli(self.ports["primary"], "info", "replication").splitlines()
                        if ":" in line)
            replica = dict(kv.split("=", 1) for kv in info.get("slave0", "").split(",")
                           if "=" in kv)
            return replica.get("offset") == info["master_repl_offset"].strip()
        wait_for(acked, timeout, "the replica's acknowledgement")

    def pause_replica(self) -> None:
        """SIGSTOP: the replica stays connected but acknowledges nothing more."""
        self.procs["replica"].send_signal(signal.SIGSTOP)

    def resume_replica(self) -> None:
        self.procs["replica"].send_signal(signal.SIGCONT)

    def kill_primary(self) -> None:
        self.procs["primary"].kill()
        self.procs["primary"].wait(timeout=10)

    def promote(self) -> None:
        """The replica becomes a primary (``REPLICAOF NO ONE``), as a failover would."""
        out = cli(self.ports["replica"], "replicaof", "no", "one")
        if "OK" not in out:
            raise RuntimeError(f"REPLICAOF NO ONE failed: {out}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        stop_all(self.procs.values())
