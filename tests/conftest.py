"""Shared fixtures: real Redis and PostgreSQL, each test isolated by unique names."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

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

    def start(self, *args: str, port: int | None = None) -> str:
        """A new server (``args`` are extra ``redis-server`` options); returns its URL."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required for this test (apt-get install redis-server)")
        port = port if port is not None else free_port()
        base = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.tmp_path)]
        self.extra[port] = args
        self.procs[port] = subprocess.Popen([binary, *base, *args],
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        return f"redis://127.0.0.1:{port}/0"

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
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(timeout=10)
        self.procs.clear()


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
