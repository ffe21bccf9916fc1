"""Migrations run in ``audit-fleet migrate`` and at a worker's start only: ``open()``
connects, ``migrate`` runs each migration once, and the read commands run no DDL (a
read-only PostgreSQL role can run them)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from tests.helpers import PG_ADMIN_URL
from tests.reference import RUN_ID, WORKSPACE, reference_events
from tests.store_conformance import write
from worker import cli
from worker.service import open_store_waiting
from worker.settings import Settings
from worker.stores import migrate, open_store
from worker.stores.access import AccessRecord, PostgresAccess, SQLiteAccess, access_store
from worker.stores.postgres import PostgresStore
from worker.stores.sqlite import SQLiteStore

#: Every migration there is, by the class that runs it.
MIGRATIONS: dict[str, Any] = {"store": (SQLiteStore, PostgresStore),
                              "access": (SQLiteAccess, PostgresAccess)}

#: The commands that only read (``serve`` also reads only, but runs until stopped).
READ_COMMANDS = [
    ["runs", "-w", WORKSPACE],
    ["explain", RUN_ID, "-w", WORKSPACE],
    ["insights", "-w", WORKSPACE, "--since", "3650d"],
    ["access-log", "-w", WORKSPACE],
    ["tokens", "list"],
    ["retention", "plan", "-w", WORKSPACE],
]


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A fresh SQLite file or a fresh PostgreSQL database (these tests are synchronous:
    the commands run their own event loop)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/audit.db"
        return
    yield from _fresh_database()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database."""
    yield from _fresh_database()


def _fresh_database() -> Iterator[str]:
    name = f"aft_{os.urandom(8).hex()}"
    anyio.run(_admin, f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        anyio.run(_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def audit(monkeypatch: pytest.MonkeyPatch,
          capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """``audit-fleet ARGS`` in this process against ``url``: (exit code, stdout + stderr)."""

    def run(args: list[str], url: str) -> tuple[int, str]:
        for name in [k for k in os.environ if k.startswith("AUDIT_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("AUDIT_STORE_URL", url)
        capsys.readouterr()
        code = cli.main(args)
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each migration ran, from now on."""
    calls = {name: 0 for name in MIGRATIONS}
    for name, classes in MIGRATIONS.items():
        for cls in classes:
            real = cls.migrate

            async def counting(self: Any, _real: Any = real, _name: str = name) -> None:
                calls[_name] += 1
                await _real(self)

            monkeypatch.setattr(cls, "migrate", counting)
    return calls


def _seed(url: str) -> None:
    """Migrate, then store one run and one access record."""
    async def seed() -> None:
        store = open_store(url)
        await store.open()
        try:
            await migrate(store)
            await write(store, reference_events())
            await access_store(store).record_access([AccessRecord(
                "a1", datetime(2026, 3, 1, tzinfo=UTC), "tok", WORKSPACE, RUN_ID, "classify",
                1, ("input",), "store")])
        finally:
            await store.close()

    anyio.run(seed)


def test_migrate_runs_each_migration_once(
    store_url: str, audit: Callable[..., tuple[int, str]], counted: dict[str, int]
) -> None:
    """Regression: `audit-fleet migrate` migrated the store twice (open() migrated, then
    migrate did). On a fresh database each migration runs once, and its tables are there."""
    code, out = audit(["migrate"], store_url)
    assert code == 0, out
    assert counted == {"store": 1, "access": 1}
    assert audit(["tokens", "list"], store_url) == (0, "no tokens\n")
    assert audit(["runs", "-w", WORKSPACE], store_url)[0] == 0
    assert counted == {"store": 1, "access": 1}


def test_a_store_never_migrated_says_so(
    tmp_path: Any, audit: Callable[..., tuple[int, str]]
) -> None:
    """A command on a database `migrate` never ran on fails with one line that says to run
    it (opening created no table)."""
    code, out = audit(["tokens", "create", "-w", WORKSPACE, "--scope", "runs:read"],
                      f"sqlite:///{tmp_path}/new.db")
    assert code == 1
    assert "no such table" in out
    assert "run audit-fleet migrate" in out


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_read_commands_run_no_migration(
    store_url: str, audit: Callable[..., tuple[int, str]], counted: dict[str, int],
    command: list[str],
) -> None:
    """Regression: `retention plan`, `tokens list` and `access-log` created the access
    tables (CREATE ... IF NOT EXISTS) and so needed DDL rights. No read command migrates."""
    _seed(store_url)
    before = dict(counted)
    code, out = audit(command, store_url)
    assert code == 0, out
    assert counted == before


def test_a_worker_start_migrates_everything(tmp_path: Any, counted: dict[str, int]) -> None:
    """A worker's start (open_store_waiting) is the other place migrations run: the run
    tables and the access tables, once each."""
    url = f"sqlite:///{tmp_path}/w.db"

    async def start() -> list[Any]:
        store = await open_store_waiting(Settings(store_url=url, metrics_port=0))
        try:
            return await access_store(store).list_tokens()
        finally:
            await store.close()

    assert anyio.run(start) == []
    assert counted == {"store": 1, "access": 1}


@pytest.fixture
def read_only_url(pg_url: str) -> Iterator[str]:
    """``pg_url`` for a role that may connect and SELECT, nothing more (no CREATE)."""
    role = f"aft_ro_{os.urandom(6).hex()}"
    _seed(pg_url)

    async def grant() -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            db = urlsplit(pg_url).path.lstrip("/")
            await conn.execute(f'CREATE ROLE "{role}" LOGIN')
            await conn.execute(f'GRANT CONNECT ON DATABASE "{db}" TO "{role}"')
            await conn.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
            await conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f'DROP OWNED BY "{role}"')
            await conn.execute(f'DROP ROLE "{role}"')
        finally:
            await conn.close()

    anyio.run(grant)
    parts = urlsplit(pg_url)
    try:
        yield urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
    finally:
        anyio.run(drop)


@pytest.mark.postgres
def test_a_read_only_role_runs_the_read_commands(
    read_only_url: str, audit: Callable[..., tuple[int, str]]
) -> None:
    """The read commands need no DDL right: a role that may only SELECT runs them all,
    while `migrate` with that role is refused (so the role really cannot create)."""
    for command in READ_COMMANDS:
        code, out = audit(command, read_only_url)
        assert code == 0, (command, out)
        if command[0] == "runs":
            assert RUN_ID in out
    code, out = audit(["migrate"], read_only_url)
    assert code != 0
    assert "permission denied" in out
