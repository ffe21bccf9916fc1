"""Shared fixtures: real Redis and PostgreSQL, each test isolated by unique names."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
import structlog

from tests.helpers import ADMIN_USER, REDIS_URL, SECURE_USERS, pg_database
from tests.mongo_emulator import FakeMongo, start_emulator
from tests.redis_servers import (
    RedisCluster,
    RedisServers,
    ReplicaPair,
    Security,
    SentinelSetup,
    make_tls_files,
)
from worker.stores import Store, migrate, open_store

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


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    async with pg_database() as url:
        yield url


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
    """The store at ``store_url``, open and migrated."""
    s = open_store(store_url)
    await s.open()
    await migrate(s)
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


_Setup = TypeVar("_Setup", RedisCluster, SentinelSetup, ReplicaPair)


def _started(setup: _Setup) -> Iterator[_Setup]:
    """Start a set-up of private servers, hand it over, stop every process it started."""
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One private six-node Redis Cluster (3 masters, 3 replicas) shared by the session.

    Tests use their own hash-tagged stream names; a test that kills or moves something
    leaves the cluster healthy (three masters, every slot covered) when it ends.
    """
    yield from _started(RedisCluster(tmp_path_factory.mktemp("redis-cluster")))


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A private master, replica and Sentinel for this test (its failover changes them)."""
    yield from _started(SentinelSetup(tmp_path / "sentinel"))


@pytest.fixture
def replica_pair(tmp_path: Path) -> Iterator[ReplicaPair]:
    """A private primary and replica, no Sentinel: the test fails over by hand."""
    yield from _started(ReplicaPair(tmp_path / "pair"))


@pytest.fixture
def secure_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A private six-node cluster on TLS only (a throwaway CA), every client authenticated
    (``SECURE_USERS``)."""
    security = Security(make_tls_files(tmp_path), SECURE_USERS, ADMIN_USER)
    yield from _started(RedisCluster(tmp_path / "cluster", security))


@pytest.fixture
def secure_sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    """Master, replica and Sentinel over TLS; ``SECURE_USERS`` on the servers, and a
    ``fleet`` user (password ``sentinel-pw``) on Sentinel."""
    yield from _started(SentinelSetup(
        tmp_path / "sentinel", security=Security(make_tls_files(tmp_path), SECURE_USERS,
                                                 ADMIN_USER),
        sentinel_users=("default off", "fleet on >sentinel-pw +@all")))
