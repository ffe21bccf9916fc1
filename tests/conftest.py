"""Shared fixtures: real Redis and PostgreSQL, each test isolated by unique names."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import structlog

from tests.mongo_emulator import FakeMongo, start_emulator
from tests.redis_servers import RedisCluster, SentinelSetup
from worker.stores import Store, open_store

# Plain tracebacks in test logs: structlog's default renders each logged exception with rich
# when rich is installed, locals included, which takes seconds per logged error on a busy
# machine (the poison tests took a minute instead of a second) and prints event data.
structlog.configure(processors=[
    *structlog.get_config()["processors"][:-1],
    structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
])

# The test PostgreSQL is on loopback without TLS. Under asyncpg's default sslmode=prefer a
# connect cancelled mid-handshake (a worker cancelled mid-write, as the fault tests do)
# leaves a future with "unexpected connection_lost() call" that nobody retrieves; the
# event loop reports it and anyio's test runner fails the test with it. A URL or an
# environment that sets sslmode itself still wins.
os.environ.setdefault("PGSSLMODE", "disable")

REDIS_URL = os.environ.get("AUDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get("AUDIT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def stream() -> str:
    """A stream name no other test uses."""
    return f"test:{uuid.uuid4().hex[:12]}:events"


@pytest.fixture
async def redis_client(stream: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the shared test Redis; deletes this test's stream keys afterwards."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        prefix = stream.rsplit(":", 1)[0]
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def _admin() -> asyncpg.Connection:
    return await asyncpg.connect(PG_ADMIN_URL)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    async with pg_database() as url:
        yield url


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database (its URL), dropped afterwards (for any fixture scope)."""
    name = f"aft_{uuid.uuid4().hex[:16]}"
    conn = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        conn = await _admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServers:
    """Starts throwaway ``redis-server`` processes on free ports; stops them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.extra: dict[int, tuple[str, ...]] = {}
        self.others: list[subprocess.Popen[bytes]] = []  # unix socket and TLS servers

    def start(self, *args: str, port: int | None = None) -> str:
        """A new server (``args`` are extra ``redis-server`` options); returns its URL."""
        port = port if port is not None else free_port()
        self.extra[port] = args
        self.procs[port] = self._launch(["--port", str(port), "--bind", "127.0.0.1", *args],
                                        _accepts_tcp(port))
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
        port = free_port()
        self.others.append(self._launch(
            ["--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
             "--tls-cert-file", str(cert), "--tls-key-file", str(key),
             "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"],
            _accepts_tcp(port)))
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


def _accepts_tcp(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False
    return ready


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


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[RedisServers]:
    """A factory of private ``redis-server`` processes (maxmemory, restarts, kills …)."""
    servers = RedisServers(tmp_path)
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture
def private_redis(redis_servers: RedisServers) -> str:
    """A throwaway redis-server of this test's own (for FLUSHALL, restarts, outages)."""
    return redis_servers.start()


@pytest.fixture
def unix_redis(redis_servers: RedisServers) -> str:
    """A throwaway redis-server on a unix socket only (no TCP port): its ``unix://`` URL."""
    return redis_servers.start_unix()


@pytest.fixture
def tls_redis(redis_servers: RedisServers) -> str:
    """A throwaway redis-server speaking TLS only: its ``rediss://`` URL (names the CA)."""
    return redis_servers.start_tls()


@pytest.fixture(name="store_url",
                params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def fixture_store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A fresh SQLite file or a fresh PostgreSQL database (the query, retention, archive tests)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture(name="store")
async def fixture_store(store_url: str) -> AsyncIterator[Store]:
    """The store at ``store_url``, open."""
    s = open_store(store_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(scope="session")
def mongo_wire_server() -> Iterator[FakeMongo]:
    """One emulated MongoDB primary for the whole session (tests/mongo_emulator.py)."""
    fake = start_emulator()
    try:
        yield fake
    finally:
        fake.server.stop()


@pytest.fixture
def mongo_wire(mongo_wire_server: FakeMongo) -> FakeMongo:
    """The session's emulated MongoDB primary, emptied for this test."""
    mongo_wire_server.reset()
    return mongo_wire_server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One private six-node Redis Cluster (3 masters, 3 replicas) shared by the session.

    Tests use their own hash-tagged stream names; a test that kills or moves something
    leaves the cluster healthy (three masters, every slot covered) when it ends.
    """
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A private master, replica and Sentinel for this test (its failover changes them)."""
    setup = SentinelSetup(tmp_path / "sentinel")
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()
