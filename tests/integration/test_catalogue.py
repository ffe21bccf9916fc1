"""The hostile-input catalogue: every bad entry between valid neighbours of one batch.

Each case is one stream entry (or a few, for ordering cases) with a valid event of a run
of its own before and after it. All cases go into one stream and are read as one batch
by a real worker writing to SQLite or PostgreSQL. For every case the test checks the
verdict the contract (docs/events.md) gives it: dead-lettered with its reason, or
stored as the contract says; that both neighbours are stored; and that the worker kept
running until it was asked to stop.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests.catalogue import CASES, MAX_BYTES, WS, Case, Fields, Result, entry, event
from tests.helpers import REDIS_URL, as_text, command, pg_database, stream_range
from worker.consumer import Worker
from worker.settings import Settings
from worker.stores import Store, migrate, open_store

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.postgres]
STORES = ["sqlite", "postgresql"]


@dataclass
class Outcome:
    """What one worker run over the whole catalogue left behind, per case."""

    store: str
    results: dict[str, Result]
    neighbours: dict[str, tuple[bool, bool]]
    unexpected_dead: list[dict[str, Any]]
    pending: int
    worker_alive: bool
    worker_error: BaseException | None
    #: Reads across case-only workspace variants: (``catalogue``'s view of the ``Catalogue``
    #: run, ``Catalogue``'s view of a ``catalogue`` run).
    cross: tuple[Any, Any] = (None, None)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """One event loop for the module: the catalogue runs once per store."""
    return "asyncio"


@pytest.fixture(scope="module", params=STORES)
async def outcome(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Outcome]:
    kind: str = request.param
    if kind == "sqlite":
        path = Path(tmp_path_factory.mktemp("catalogue")) / "audit.db"
        yield await _run_catalogue(kind, f"sqlite:///{path}")
    else:
        async with pg_database() as url:
            yield await _run_catalogue(kind, url)


async def _xadd(client: aioredis.Redis, stream: str, fields: Fields) -> str:
    flat = [part for name, value in fields for part in (name.encode(), value)]
    return as_text(await command(client, "XADD", stream, "*", *flat))


async def _run_catalogue(kind: str, url: str) -> Outcome:
    stream = f"test:{uuid.uuid4().hex[:12]}:catalogue"
    client = aioredis.Redis.from_url(REDIS_URL)
    store: Store = open_store(url)
    try:
        ids: dict[str, list[str]] = {}
        for i, case in enumerate(CASES):
            await _xadd(client, stream, entry(event(f"nb-{i}-before")))
            ids[case.name] = [await _xadd(client, stream, f) for f in case.entries]
            await _xadd(client, stream, entry(event(f"nb-{i}-after")))
        total = await client.xlen(stream)
        settings = Settings(
            redis_url=REDIS_URL, streams=(stream,), consumer="catalogue", store_url=url,
            metrics_port=0, block_ms=50, batch_size=total, max_event_bytes=MAX_BYTES,
            claim_idle_ms=60_000, max_deliveries=3, shutdown_grace_s=10, trim=False,
        )
        await store.open()
        await migrate(store)
        worker = Worker(settings, store, client)
        state: dict[str, Any] = {"alive": True, "error": None}

        async def run_worker() -> None:
            try:
                await worker.run()
            except BaseException as exc:
                state["error"] = exc
                raise
            finally:
                state["alive"] = False

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_worker)
                while state["alive"]:
                    groups = await client.xinfo_groups(stream)  # empty until the worker starts
                    if groups and groups[0]["lag"] == 0 and groups[0]["pending"] == 0:
                        break
                    await anyio.sleep(0.05)
                alive = bool(state["alive"])
                worker.stop()
        dlq = [{k.decode(): v if k.startswith(b"event") else v.decode() for k, v in f.items()}
               for _, f in await stream_range(client, stream + ":dlq")]
        by_id = {d["id"]: d for d in dlq}
        results: dict[str, Result] = {}
        neighbours: dict[str, tuple[bool, bool]] = {}
        for i, case in enumerate(CASES):
            run_doc, nodes = None, []
            if case.run is not None:
                run_doc = await store.get_run(*case.run)
                nodes = await store.get_nodes(*case.run)
            results[case.name] = Result(run_doc, nodes,
                                        [by_id.pop(x) for x in ids[case.name] if x in by_id])
            neighbours[case.name] = (await store.get_run(WS, f"nb-{i}-before") is not None,
                                     await store.get_run(WS, f"nb-{i}-after") is not None)
        pending = int((await client.xpending(stream, settings.group))["pending"])
        cross = (await store.get_run(WS, "c-ws-case"),
                 await store.get_run("Catalogue", "nb-0-before"))
        return Outcome(kind, results, neighbours, list(by_id.values()), pending, alive,
                       state["error"], cross)
    finally:
        await store.close()
        await client.delete(stream, stream + ":dlq")
        await client.aclose()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hostile_entry(outcome: Outcome, case: Case) -> None:
    """The entry gets the contract's verdict, and both its neighbours are stored."""
    result = outcome.results[case.name]
    reason = case.reason_for(outcome.store)
    assert outcome.neighbours[case.name] == (True, True), "a valid neighbour was lost"
    if reason is not None:
        assert [d["reason"] for d in result.dead] == [reason] * len(case.entries), result.dead
        for d in result.dead:
            assert case.error in d["error"]
            assert int(d["deliveries"]) == 1
        assert result.run is None
    else:
        assert result.dead == []
        assert result.run is not None, "a valid entry was not stored"
        if case.check is not None:
            case.check(result)


async def test_worker_survives_the_whole_catalogue(outcome: Outcome) -> None:
    """The worker settled every entry while running, and stopped only when asked."""
    assert outcome.worker_alive
    assert outcome.worker_error is None
    assert outcome.pending == 0
    assert outcome.unexpected_dead == []


async def test_case_variants_of_a_workspace_are_separate(outcome: Outcome) -> None:
    """``Catalogue`` and ``catalogue`` are two workspaces: neither sees the other's run."""
    run = outcome.results["workspace_case_variant"].run
    assert run is not None
    assert run["workspaceId"] == "Catalogue"
    assert outcome.cross == (None, None)
