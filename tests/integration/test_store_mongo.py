"""The MongoDB store against a real server: the conformance suite, in both tenancy modes,
plus what only a real server shows (its own errors, races and indexes).

Runs when ``AUDIT_TEST_MONGODB_URL`` names a MongoDB 5.2+ replica set, e.g.::

    docker run -d --name audit-mongo -p 27017:27017 mongo:7 --replSet rs0
    docker exec audit-mongo mongosh --quiet --eval \\
        "rs.initiate({_id: 'rs0', members: [{_id: 0, host: 'localhost:27017'}]})"
    AUDIT_TEST_MONGODB_URL='mongodb://localhost:27017/?replicaSet=rs0' .venv/bin/pytest -k mongo

(docs/mongodb.md has the details.)

Every test writes under a database prefix of its own and drops those databases after.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio
import pytest
from pymongo import AsyncMongoClient

from tests.reference import RUN_ID, reference_events
from tests.store_conformance import (
    T0,
    StoreConformance,
    assert_stored,
    event,
    expected,
    node,
    write,
)
from worker import events as ev
from worker.documents import node_key
from worker.settings import Settings
from worker.stores import _mongo_codec as mc
from worker.stores._mongo_options import MongoOptions
from worker.stores.base import Store
from worker.stores.mongo import MongoStore

MONGO_URL = os.environ.get("AUDIT_TEST_MONGODB_URL", "")

if not MONGO_URL:
    pytest.skip("no MongoDB server here: set AUDIT_TEST_MONGODB_URL to a MongoDB 5.2+ replica "
                "set to run the store against it (see docs/mongodb.md); the wire-level tests "
                "in test_store_mongo_wire.py run without one", allow_module_level=True)

pytestmark = pytest.mark.mongo


async def drop_prefixed(prefix: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(MONGO_URL)
    try:
        for name in await client.list_database_names():
            if name.startswith(prefix):
                await client.drop_database(name)
    finally:
        await client.close()


async def opened(prefix: str, **env: str) -> MongoStore:
    settings = Settings.from_env({"AUDIT_MONGO_DB_PREFIX": prefix, **env})
    store = MongoStore(MONGO_URL, settings.mongo_options())
    await store.open()
    return store


@pytest.fixture
def prefix() -> str:
    """A database prefix no other test uses (dropped afterwards)."""
    return f"aft{uuid.uuid4().hex[:8]}_"


@pytest.fixture
async def raw(prefix: str) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    """A plain driver client on the test server, to look behind the store."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(MONGO_URL, tz_aware=True)
    try:
        yield client
    finally:
        await client.close()
        await drop_prefixed(prefix)


class TestMongoConformance(StoreConformance):
    """The shared suite, database per workspace."""

    @pytest.fixture
    async def store(self, prefix: str) -> AsyncIterator[Store]:
        s = await opened(prefix)
        try:
            yield s
        finally:
            await s.close()
            await drop_prefixed(prefix)


class TestMongoSharedDatabaseConformance(StoreConformance):
    """The shared suite, one database with a workspaceId field."""

    @pytest.fixture
    async def store(self, prefix: str) -> AsyncIterator[Store]:
        url = _with_database(MONGO_URL, prefix + "shared")
        s = MongoStore(url, MongoOptions(tenancy="field"))
        await s.open()
        try:
            yield s
        finally:
            await s.close()
            await drop_prefixed(prefix)


def _with_database(url: str, name: str) -> str:
    head, _, query = url.partition("?")
    scheme, _, rest = head.partition("://")
    hosts = rest.split("/", 1)[0]
    return f"{scheme}://{hosts}/{name}" + (f"?{query}" if query else "")


@pytest.mark.anyio
async def test_indexes_on_the_server_are_exactly_the_designs(
    prefix: str, raw: AsyncMongoClient[dict[str, Any]]
) -> None:
    """After a write, each collection holds _id plus exactly the design's indexes."""
    store = await opened(prefix)
    try:
        await write(store, reference_events("acme"))
        await store.migrate()
    finally:
        await store.close()
    db = raw[prefix + "acme"]
    runs = [list(i["key"].items()) async for i in await db[mc.RUNS].list_indexes()]
    nodes = [list(i["key"].items()) async for i in await db[mc.NODES].list_indexes()]
    assert sorted(runs) == sorted([[("_id", 1)], *mc.run_indexes(False)])
    assert sorted(nodes) == sorted([[("_id", 1)], *mc.node_indexes(False)])


@pytest.mark.anyio
async def test_hostile_keys_are_stored_escaped(
    prefix: str, raw: AsyncMongoClient[dict[str, Any]]
) -> None:
    """What the server holds has no $-prefixed or dotted keys; the store reads them back."""
    store = await opened(prefix)
    try:
        hostile: dict[str, Any] = {"$where": {"a.b": 1}, "_id": "spoof"}
        events = [event(ev.RUN_STARTED, "acme", "r1", "e1", T0, **hostile)]
        assert (await write(store, events)).rejected == ()
        await assert_stored(store, events)
    finally:
        await store.close()
    doc = await raw[prefix + "acme"][mc.RUNS].find_one({"_id": "r1"})
    assert doc is not None
    assert doc["%24where"] == {"a%2Eb": 1}
    assert doc["%5Fid"] == "spoof"


@pytest.mark.anyio
async def test_large_payload_lives_in_gridfs(
    prefix: str, raw: AsyncMongoClient[dict[str, Any]]
) -> None:
    """A payload above the threshold is a GridFS file; the node document stays small."""
    store = await opened(prefix, AUDIT_MONGO_LARGE_PAYLOAD_BYTES="65536")
    prompt = "p" * 300_000
    events = [event(ev.NODE_COMPLETED, "acme", "r1", "e1", T0,
                    node=node("classify", "ai", T0, T0 + timedelta(seconds=1),
                              input={"prompt": prompt}))]
    try:
        for _ in range(2):  # redelivery finds the same file
            assert (await write(store, events)).rejected == ()
        await assert_stored(store, events)
    finally:
        await store.close()
    db = raw[prefix + "acme"]
    assert len(await db[f"{mc.PAYLOAD_BUCKET}.files"].find({}).to_list()) == 1
    stored = await db[mc.NODES].find_one({"_id": node_key("r1", "classify", 1)})
    assert stored is not None
    assert "input" not in stored
    assert stored[mc.PAYLOAD_FIELD]["bytes"] > 300_000


@pytest.mark.anyio
async def test_database_differing_by_case_is_refused(
    prefix: str, raw: AsyncMongoClient[dict[str, Any]]
) -> None:
    """A workspace whose database would differ from an existing one only by case is refused."""
    await raw[prefix + "Acme"]["marker"].insert_one({"x": 1})
    store = await opened(prefix)
    try:
        result = await write(store, reference_events("acme"))
        assert result.rejected
        assert all("differs only by case" in r.reason for r in result.rejected)
        assert (await write(store, reference_events("Acme"))).rejected == ()
    finally:
        await store.close()


@pytest.mark.anyio
async def test_document_growing_past_16_mib_rejects_only_its_events(prefix: str,
                                                                    raw: Any) -> None:
    """The server's 'too large' error rejects the events behind that run, with its message."""
    store = await opened(prefix)
    big = "x" * (9 * 1024 * 1024)
    first = [event(ev.RUN_STARTED, "acme", "r1", "a", T0, blobA=big)]
    second = [event(ev.RUN_STARTED, "acme", "r1", "b", T0, blobB=big)]
    try:
        assert (await write(store, first)).rejected == ()
        result = await write(store, second + reference_events("acme", "other"))
        (rejection,) = result.rejected
        assert rejection.sources == (0,)
        assert "run 'r1'" in rejection.reason
        assert "16" in rejection.reason  # the server names its size limit
        await assert_stored(store, reference_events("acme", "other"))
    finally:
        await store.close()


@pytest.mark.anyio
async def test_concurrent_writers_converge(prefix: str, raw: Any) -> None:
    """Several stores upserting the same events at once (duplicate-key races) store fold()."""
    stores = [await opened(prefix) for _ in range(4)]
    events = reference_events("acme") + reference_events("acme", "second")
    try:
        async with anyio.create_task_group() as tg:
            for i, store in enumerate(stores):
                for _ in range(3):
                    tg.start_soon(write, store, events[i % 2::2] if i % 3 else events)
        await write(stores[0], events)
        await assert_stored(stores[0], events)
        runs, _ = expected(events)
        assert await stores[1].get_run("acme", RUN_ID) == runs[("acme", RUN_ID)]
    finally:
        for store in stores:
            await store.close()
