"""Tokens and the access log: the commands, the rules of tokens and of ``serve``, and the
access store on SQLite and on MongoDB through its wire emulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.access_conformance import T0, AccessConformance
from tests.helpers import migrated
from tests.mongo_emulator import FakeMongo, url_of
from worker import cli
from worker.api.server import Bind, Listen
from worker.api.text import clean
from worker.api.tokens import digest, new_token, parse_scopes, parse_workspaces
from worker.archive import Archive
from worker.errors import ConfigError
from worker.stores import Store, migrate, open_store
from worker.stores.access import AccessRecord, access_store

# -- rules (no services) ---------------------------------------------------------------------

def test_scopes_and_workspaces_are_checked() -> None:
    """runs:read alone or with prompts:read; prompts:read alone or unknown scopes refused."""
    assert parse_scopes("runs:read") == ("runs:read",)
    assert parse_scopes("prompts:read, runs:read") == ("runs:read", "prompts:read")
    for bad in ("prompts:read", "runs:write", "", "runs:read,admin"):
        with pytest.raises(ConfigError):
            parse_scopes(bad)
    assert parse_workspaces(["b,a", "a"]) == ("a", "b")
    for names in ([], ["../x"], ["a b"], ["x" * 49]):
        with pytest.raises(ConfigError):
            parse_workspaces(names)


def test_tokens_are_random_and_stored_as_digests() -> None:
    """Each token is new, 256 bits of secret, and only its SHA-256 digest is kept."""
    token, record = new_token(("acme",), ("runs:read",), now=T0)
    other, _ = new_token(("acme",), ("runs:read",), now=T0)
    assert token != other
    assert token.startswith(f"aft_{record.token_id}_")
    assert record.digest == digest(token) != token
    assert token not in repr(record)
    assert record.created_at == T0.replace(microsecond=123000)


@pytest.mark.parametrize(("bind", "kwargs", "message"), [
    ("127.0.0.1:8700", {}, "give --tls-cert"),
    ("0.0.0.0:8700", {"insecure_localhost": True}, "loopback"),
    ("10.1.2.3:8700", {"insecure_localhost": True}, "loopback"),
    ("example.com:80", {"insecure_localhost": True}, "loopback"),
    ("127.0.0.1", {"insecure_localhost": True}, "HOST:PORT"),
    ("127.0.0.1:99999", {"insecure_localhost": True}, "HOST:PORT"),
    ("127.0.0.1:8700", {"cert": "c.pem"}, "both"),
    ("127.0.0.1:8700", {"cert": "/nope/c.pem", "key": "/nope/k.pem"}, "cannot load"),
])
def test_serve_refuses_plain_http_off_loopback(bind: str, kwargs: dict[str, Any],
                                               message: str) -> None:
    """No TLS and no --insecure-localhost, or plain HTTP on a non-loopback address: refused."""
    args = {"cert": None, "key": None, "insecure_localhost": False} | kwargs
    with pytest.raises(ConfigError, match=message):
        Listen.make(bind, **args)


def test_loopback_binds_are_allowed_insecure() -> None:
    """127.0.0.0/8, ::1 and localhost may serve plain HTTP with --insecure-localhost."""
    for bind in ("127.0.0.1:0", "127.8.9.10:8700", "[::1]:8700", "localhost:8700"):
        listen = Listen.make(bind, cert=None, key=None, insecure_localhost=True)
        assert listen.tls is None
        assert listen.bind.loopback
    assert Bind.parse("[::1]:8700").host == "::1"
    assert Listen.make("[::1]:1", cert=None, key=None, insecure_localhost=True).url(5) == \
        "http://[::1]:5"


def test_clean_shows_control_characters_instead_of_sending_them() -> None:
    """ANSI escapes, BEL, NUL and bidi overrides become visible escapes; text stays."""
    assert clean("\x1b[31mred\x1b[0m\x07\x00") == "\\x1b[31mred\\x1b[0m\\x07\\x00"
    assert clean("a\u202eb") == "a\\u202eb"
    assert clean("line\n\ttab") == "line\n\ttab"
    assert clean({"k": "\x1b"}) == '{\n  "k": "\\u001b"\n}'
    assert clean(None) == ""


# -- the access store on every backend (PostgreSQL: tests/integration/test_api.py) ------------

class TestSQLiteAccess(AccessConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[Store]:
        async with migrated(open_store(f"sqlite:///{tmp_path}/a.db")) as store:
            yield store


@pytest.mark.mongo
class TestMongoWireAccess(AccessConformance):
    """The same checks through the real driver against the store tests' wire emulator."""

    @pytest.fixture(params=["database", "field"])
    async def store(self, mongo_wire: FakeMongo,
                    request: pytest.FixtureRequest) -> AsyncIterator[Store]:
        from worker.stores._mongo_options import MongoOptions
        from worker.stores.mongo import MongoStore

        store = MongoStore(url_of(mongo_wire), MongoOptions(tenancy=request.param))
        await store.open()
        try:
            yield store
        finally:
            await store.close()


# -- the commands ----------------------------------------------------------------------------

def test_token_and_access_log_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """tokens create prints the token last; list shows it (not the token); revoke ends it;
    access-log exports the records as a table or JSON lines."""
    monkeypatch.setenv("AUDIT_STORE_URL", f"sqlite:///{tmp_path}/c.db")
    assert cli.main(["migrate"]) == 0
    capsys.readouterr()
    assert cli.main(["tokens", "create", "-w", "acme", "--scope", "runs:read,prompts:read",
                     "--label", "dpo"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    token = out[-1]
    assert token.startswith("aft_")
    token_id = token.split("_")[1]
    assert cli.main(["tokens", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["tokens"]
    assert [(t["tokenId"], t["workspaces"], t["scopes"], t["label"], t["revokedAt"])
            for t in listed] == [(token_id, ["acme"], ["runs:read", "prompts:read"], "dpo",
                                  None)]
    assert token not in json.dumps(listed)
    assert cli.main(["tokens", "create", "-w", "acme", "--scope", "prompts:read"]) == 2
    assert "prompts:read" in capsys.readouterr().err
    assert cli.main(["tokens", "revoke", token_id]) == 0
    assert cli.main(["tokens", "revoke", token_id]) == 1
    capsys.readouterr()
    assert cli.main(["tokens", "list"]) == 0
    table = capsys.readouterr().out
    assert token_id in table
    assert "dpo" in table

    async def add() -> None:
        store = open_store(f"sqlite:///{tmp_path}/c.db")
        await store.open()
        await migrate(store)
        try:
            await access_store(store).record_access([AccessRecord(
                "x1", T0, token_id, "acme", "run_1", "classify", 1, ("input",), "store")])
        finally:
            await store.close()

    anyio.run(add)
    assert cli.main(["access-log", "-w", "acme", "--format", "jsonl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [{
        "id": "x1", "at": "2026-03-01T12:00:00.123000Z", "tokenId": token_id,
        "workspaceId": "acme", "runId": "run_1", "nodeId": "classify", "attempt": 1,
        "fields": ["input"], "source": "store"}]
    assert cli.main(["access-log", "-w", "acme"]) == 0
    assert "classify" in capsys.readouterr().out
    assert cli.main(["access-log", "-w", "beta"]) == 0
    assert capsys.readouterr().out.strip() == "no access records"
    assert cli.main(["serve", "--bind", "0.0.0.0:0", "--insecure-localhost"]) == 2
    assert "loopback" in capsys.readouterr().err


@pytest.mark.anyio
async def test_retention_expires_access_records_with_the_run_summaries(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """retention plan counts and retention run archives, then removes, the access records
    older than the workspace's run-summary days (90 by default; 10 by a per-workspace
    override); `access-log --archive-dir` exports the archived ones with the rest."""
    from tests import reference as ref
    from tests.store_conformance import write
    from worker import retention

    store = open_store(f"sqlite:///{tmp_path}/r.db")
    await store.open()
    await migrate(store)
    try:
        access = access_store(store)
        await access.migrate()
        await write(store, ref.reference_events("acme"))
        await write(store, ref.reference_events("beta"))
        for ws in ("acme", "beta"):
            await access.record_access([
                AccessRecord(f"{ws}-{d}", T0 - timedelta(days=d), "tok", ws, ref.RUN_ID,
                             "classify", 1, ("input",), "store") for d in (5, 20, 95, 200)])
        policy = retention.Policy.from_mapping({"workspaces": {"beta": {"hot": {
            "run_summaries": 10, "node_traces": 10, "prompts": 10, "error_details": 10}}}})
        plan = await retention.run_retention(store, policy, now=T0, archive=None, apply=False,
                                             workspaces=["acme", "beta"], access=access)
        assert [r.access_expired for r in plan] == [2, 3]
        assert len(await access.access_log("acme")) == 4
        done = await retention.run_retention(store, policy, now=T0,
                                             archive=arc_at(tmp_path), apply=True,
                                             workspaces=["acme", "beta"], access=access)
        assert [r.to_json()["accessRecordsExpired"] for r in done] == [2, 3]
        assert [r.record_id for r in await access.access_log("acme")] == ["acme-20", "acme-5"]
        assert [r.record_id for r in await access.access_log("beta")] == ["beta-5"]
    finally:
        await store.close()
    # the removed records are in the archive: access-log exports both, archive verify passes
    monkeypatch.setenv("AUDIT_STORE_URL", f"sqlite:///{tmp_path}/r.db")
    args = ["access-log", "-w", "beta", "--archive-dir", str(tmp_path / "archive"),
            "--format", "jsonl"]
    assert await anyio.to_thread.run_sync(cli.main, args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["beta-200", "beta-95", "beta-20",
                                                          "beta-5"]
    assert await anyio.to_thread.run_sync(cli.main, [*args, "--since", "2025-09-01"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert await anyio.to_thread.run_sync(cli.main, [
        "archive", "verify", "--archive-dir", str(tmp_path / "archive")]) == 0
    assert "beta: OK" in capsys.readouterr().out
    assert await anyio.to_thread.run_sync(cli.main, [
        "archive", "list", "-w", "beta", "--archive-dir", str(tmp_path / "archive"),
        "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["segments"]
    assert sum(m["counts"].get("access", 0) for m in listed) == 3


def arc_at(path: Path) -> Archive:
    return Archive.at(path / "archive")


@pytest.mark.mongo
@pytest.mark.anyio
async def test_the_api_on_mongodb(mongo_wire: FakeMongo) -> None:
    """serve's routes on the MongoDB store (wire emulator): a run with its prompts, the
    access record in the workspace's database, 404 for the other workspace's run of the
    same ID, and the runs listing with its cursor."""
    from aiohttp.test_utils import TestClient, TestServer

    from tests import reference as ref
    from tests.store_conformance import write
    from worker.api.app import ServerConfig, build_app
    from worker.api.reads import Reader
    from worker.stores.mongo import MongoStore

    store = MongoStore(url_of(mongo_wire))
    await store.open()
    try:
        access = access_store(store)
        await access.migrate()
        await write(store, ref.reference_events("acme") + ref.reference_events("beta")
                    + ref.reference_events("acme", run_id="run_second"))
        token, record = new_token(("acme",), ("runs:read", "prompts:read"), now=T0)
        await access.add_token(record)
        client = TestClient(TestServer(build_app(Reader(store, access),
                                                 ServerConfig(secure_cookies=False))))
        await client.start_server()
        try:
            auth = {"Authorization": f"Bearer {token}"}
            run = await client.get(f"/v1/workspaces/acme/runs/{ref.RUN_ID}",
                                   params={"include": "prompts"}, headers=auth)
            assert run.status == 200
            assert (await run.json())["nodes"][1]["input"]["prompt"] == ref.PROMPT
            other = await client.get(f"/v1/workspaces/beta/runs/{ref.RUN_ID}", headers=auth)
            assert other.status == 404
            page = await client.get("/v1/workspaces/acme/runs", params={"limit": "1"},
                                    headers=auth)
            first = await page.json()
            assert first["nextCursor"] is not None
            page = await client.get("/v1/workspaces/acme/runs",
                                    params={"limit": "1", "cursor": first["nextCursor"]},
                                    headers=auth)
            second = await page.json()
            assert second["nextCursor"] is None
            assert {r["runId"] for r in first["runs"] + second["runs"]} == \
                {ref.RUN_ID, "run_second"}
        finally:
            await client.close()
        log = await access.access_log("acme")
        assert sorted(r.node_id or "" for r in log) == ["", "classify", "source", "update-crm"]
        assert await access.access_log("beta") == []
    finally:
        await store.close()
