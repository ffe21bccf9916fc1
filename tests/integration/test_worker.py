"""The worker loop against real Redis: delivery, dead letters, reclaim, backpressure."""

from __future__ import annotations

import json
import random
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests.helpers import (
    ControlledStore,
    MemoryStore,
    as_text,
    command,
    dlq_entries,
    payload,
    pending_count,
    wait_until,
)
from worker import samples
from worker.constants import Reason
from worker.consumer import Worker
from worker.emitter import AuditEmitter, make_event
from worker.metrics import Metrics
from worker.reclaim import Reclaimer
from worker.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def settings(stream: str, redis_url: str, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        redis_url=redis_url, streams=(stream,), metrics_port=0, block_ms=50, burst=True,
        batch_size=50, claim_idle_ms=200, reclaim_interval_s=0.1, max_deliveries=3,
        consumer="w1", shutdown_grace_s=5,
    )
    base.update(kw)
    return Settings(**base)


def runs(n: int, seed: int = 7, workspace: str = "ws1") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [samples.lead_triage_run(rng, workspace, f"run{i}", prompt_size=lambda r: 300)
            for i in range(n)]


def events_of(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, r in enumerate(rs):
        out.extend(samples.run_events(r, snapshot=i % 2 == 1))
    return out


async def run_burst(worker: Worker, limit_s: float = 30) -> None:
    with anyio.fail_after(limit_s):
        await worker.run()


async def test_burst_drains_everything_and_dead_letters_bad_input(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """Valid events are stored and ACKed; each bad entry lands in the DLQ with its reason."""
    emitter = AuditEmitter(redis_client, [stream])
    rs = runs(20)
    evs = events_of(rs)
    await emitter.emit_many(evs)
    await emitter.emit_raw(stream, b"{broken")
    await emitter.emit_raw(stream, json.dumps({**evs[0], "v": 7}).encode())
    await redis_client.xadd(stream, {"other": "field"})
    store = MemoryStore()
    worker = Worker(settings(stream, redis_url), store, redis_client)
    await run_burst(worker)

    assert await pending_count(redis_client, stream, "audit-writers") == 0
    assert len(store.runs) == 20
    for r in rs:
        doc = await store.get_run("ws1", r["runId"])
        assert doc is not None
        assert doc["status"] == r["status"]
        assert doc["summary"]["nodeExecutions"] == len(r["nodes"])
    dead = await dlq_entries(redis_client, stream)
    assert [d["reason"] for d in dead] == [Reason.INVALID_JSON, Reason.UNSUPPORTED_VERSION,
                                           Reason.MISSING_FIELD]
    assert dead[0]["event"] == b"{broken"
    assert dead[0]["stream"] == stream
    assert dead[0]["deliveries"] == "1"
    assert dead[1]["id"] != dead[0]["id"]
    assert dead[1]["error"] == "event version 7 is not supported (this worker reads v1)"


async def test_every_configured_stream_is_read_stored_and_acked(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """With several streams configured (sharded by the SDK), the events of every stream
    are stored and every stream's entries acknowledged."""
    shards = tuple(f"{stream}:{i}" for i in range(3))
    rs = runs(24)
    await AuditEmitter(redis_client, list(shards)).emit_many(events_of(rs))
    lengths = [await redis_client.xlen(s) for s in shards]
    assert min(lengths) > 0, f"the runs must reach every shard: {lengths}"
    store = MemoryStore()
    await run_burst(Worker(settings(stream, redis_url, streams=shards), store, redis_client))

    for r in rs:
        doc = await store.get_run("ws1", r["runId"])
        assert doc is not None, r["runId"]
        assert doc["status"] == r["status"]
        assert doc["summary"]["nodeExecutions"] == len(r["nodes"])
    assert len(store.runs) == len(rs)
    for shard, length in zip(shards, lengths, strict=True):
        (group,) = await redis_client.xinfo_groups(shard)
        assert (group["entries-read"], group["pending"]) == (length, 0), shard
        assert await redis_client.xlen(shard + ":dlq") == 0


async def test_event_over_max_event_bytes_is_dead_lettered_and_its_neighbours_stored(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """AUDIT_MAX_EVENT_BYTES in the worker: an entry over the limit is dead-lettered
    ``too_large`` with its size and the limit; the valid events around it are stored."""
    rs = runs(4)
    evs = events_of(rs)
    limit = max(len(payload(e)) for e in evs) + 64
    big = make_event("run.started", "ws1", "wf_lead_triage", "run-big",
                     trigger={"type": "webhook", "metadata": {"note": "x" * limit}})
    big_payload = payload(big)
    emitter = AuditEmitter(redis_client, [stream])
    await emitter.emit_many(evs[: len(evs) // 2])
    big_id = await emitter.emit_raw(stream, big_payload)
    await emitter.emit_many(evs[len(evs) // 2 :])
    store = MemoryStore()
    cfg = settings(stream, redis_url, max_event_bytes=limit)
    await run_burst(Worker(cfg, store, redis_client))

    assert sorted(k[1] for k in store.runs) == sorted(r["runId"] for r in rs)
    for r in rs:
        doc = await store.get_run("ws1", r["runId"])
        assert doc is not None
        assert doc["summary"]["nodeExecutions"] == len(r["nodes"])
    (dead,) = await dlq_entries(redis_client, stream)
    assert (dead["reason"], dead["id"], dead["event"]) == (Reason.TOO_LARGE, big_id, big_payload)
    assert dead["error"] == f"event is {len(big_payload)} bytes, the limit is {limit}"
    assert await pending_count(redis_client, stream, cfg.group) == 0


async def test_entries_added_before_the_group_exists_are_not_skipped(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """The group is created from ID 0, so a backlog written first is consumed."""
    evs = events_of(runs(3))
    await AuditEmitter(redis_client, [stream]).emit_many(evs)
    assert not await redis_client.exists(stream + ":dlq")
    store = MemoryStore()
    await run_burst(Worker(settings(stream, redis_url), store, redis_client))
    assert len(store.runs) == 3


async def test_poison_message_is_dead_lettered_after_max_deliveries_and_blocks_nothing(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """A run that crashes the writer is redelivered, then dead-lettered; others flow."""
    rs = runs(10)
    poison = rs[4]["runId"]
    evs = events_of(rs)
    emitter = AuditEmitter(redis_client, [stream])
    await emitter.emit_many(evs[:5])
    # an unrelated dead letter, written before the poison's: only its own entry counts as
    # dead-lettered already when the redelivered poison entries are checked for one
    broken_id = await emitter.emit_raw(stream, b"{broken")
    await emitter.emit_many(evs[5:])
    store = ControlledStore(MemoryStore())
    store.crash_runs.add(poison)
    metrics = Metrics()
    worker = Worker(settings(stream, redis_url, max_deliveries=3), store, redis_client, metrics)
    await run_burst(worker)

    inner = store.inner
    assert isinstance(inner, MemoryStore)
    assert {k[1] for k in inner.runs} == {r["runId"] for r in rs} - {poison}
    broken, *dead = await dlq_entries(redis_client, stream)
    assert (broken["id"], broken["reason"]) == (broken_id, Reason.INVALID_JSON)
    poison_events = [e["eventId"] for e in evs if e["runId"] == poison]
    assert len(poison_events) == len(rs[4]["nodes"]) + 2  # live events: start, nodes, end
    assert sorted(json.loads(d["event"])["eventId"] for d in dead) == sorted(poison_events)
    assert {d["reason"] for d in dead} == {Reason.MAX_DELIVERIES}
    assert all(int(d["deliveries"]) == 4 for d in dead)
    assert await pending_count(redis_client, stream, "audit-writers") == 0
    # delivered once by the read, then reclaimed three times (deliveries 2, 3, 4); on a
    # loaded machine a healthy entry waiting for a writer may be reclaimed too (harmless)
    reclaimed = metrics.registry.get_sample_value(
        "audit_fleet_entries_reclaimed_total", {"stream": stream})
    assert reclaimed is not None
    assert reclaimed >= 3 * len(dead)


async def test_store_rejection_dead_letters_only_the_rejected_run(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """A permanent store error is isolated to its run by splitting the batch."""
    rs = runs(8)
    bad = rs[2]["runId"]
    evs = events_of(rs)
    await AuditEmitter(redis_client, [stream]).emit_many(evs)
    store = ControlledStore(MemoryStore())
    store.reject_runs.add(bad)
    await run_burst(Worker(settings(stream, redis_url), store, redis_client))
    inner = store.inner
    assert isinstance(inner, MemoryStore)
    assert {k[1] for k in inner.runs} == {r["runId"] for r in rs} - {bad}
    dead = await dlq_entries(redis_client, stream)
    assert {d["reason"] for d in dead} == {Reason.STORE_REJECTED}
    assert all("too long" in d["error"] for d in dead)
    # each event of the rejected run is dead-lettered, once; no other event is
    bad_ids = [e["eventId"] for e in evs if e["runId"] == bad]
    assert len(bad_ids) == len(rs[2]["nodes"]) + 2  # live events: start, nodes, end
    assert sorted(json.loads(d["event"])["eventId"] for d in dead) == sorted(bad_ids)


async def test_outage_applies_backpressure_and_acks_nothing_early(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """While the store is down nothing is ACKed and the reader stops; then all drains."""
    rs = runs(60)
    evs = events_of(rs)
    await AuditEmitter(redis_client, [stream]).emit_many(evs)
    store = ControlledStore(MemoryStore())
    store.down = True
    cfg = settings(stream, redis_url, batch_size=20, max_inflight=2)
    metrics = Metrics()
    worker = Worker(cfg.with_(retry_max_backoff_s=0.05), store, redis_client, metrics)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        # every writer retries its batch and the reader waits for one: the read stops
        await wait_until(lambda: store.failures >= 20, what="writes retried during the outage")
        groups = await redis_client.xinfo_groups(stream)
        read = int(groups[0]["entries-read"])
        assert read <= (cfg.max_inflight + 1) * cfg.batch_size  # bounded: backpressure
        assert await pending_count(redis_client, stream, cfg.group) == read  # nothing ACKed
        store.down = False
        await wait_until(lambda: worker.stopping, what="the burst drained")
    inner = store.inner
    assert isinstance(inner, MemoryStore)
    assert len(inner.runs) == 60
    assert await pending_count(redis_client, stream, cfg.group) == 0
    retries = metrics.registry.get_sample_value("audit_fleet_store_retries_total",
                                                {"store": "memory"})
    assert retries == store.failures  # every failed write was retried, and counted


async def test_graceful_stop_finishes_and_acks_in_flight_batches(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """stop() ends reading; batches already read are written and ACKed before exit."""
    evs = events_of(runs(100))
    await AuditEmitter(redis_client, [stream]).emit_many(evs)
    store = ControlledStore(MemoryStore())
    store.delay = 0.2
    worker = Worker(settings(stream, redis_url, burst=False, batch_size=25), store, redis_client)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await wait_until(lambda: store.entered > 0, what="a write in flight")
        worker.stop()
    assert store.writes == store.entered  # every batch being written was finished
    assert await pending_count(redis_client, stream, "audit-writers") == 0
    groups = await redis_client.xinfo_groups(stream)
    assert int(groups[0]["entries-read"]) < len(evs)  # it stopped reading early


async def test_lease_renewal_keeps_peers_from_stealing_slow_batches(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """A batch whose write outlasts the claim-idle time stays pending with its worker, its
    delivery count untouched (XCLAIM JUSTID renews the lease): a peer's XAUTOCLAIM gets
    nothing, and the worker's own reclaim sweep has nothing to re-deliver either."""
    evs = events_of(runs(5))
    await AuditEmitter(redis_client, [stream]).emit_many(evs)
    store = ControlledStore(MemoryStore())
    store.gate = anyio.Event()  # the write waits until the test lets it finish
    # 1.5 s: the lease keeper renews every 0.5 s, so a loaded machine may stall a second
    cfg = settings(stream, redis_url, burst=False, claim_idle_ms=1500, max_inflight=1)
    worker = Worker(cfg, store, redis_client)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await wait_until(lambda: store.entered > 0, what="the write began")

        async def all_read() -> bool:
            return await pending_count(redis_client, stream, cfg.group) == len(evs)

        await wait_until(all_read, what="the rest read while the first write waits")
        # Two claim-idle periods pass with the write stuck: without lease renewal the entries
        # go idle, and the worker's own sweep (every 0.1 s) claims them again (delivery 2).
        await anyio.sleep(2 * cfg.claim_idle_ms / 1000)
        rows = await redis_client.xpending_range(stream, cfg.group, "-", "+", len(evs) + 1)
        assert len(rows) == len(evs)
        assert {r["consumer"] for r in rows} == {b"w1"}
        assert [r["times_delivered"] for r in rows] == [1] * len(evs)
        assert max(int(r["time_since_delivered"]) for r in rows) < cfg.claim_idle_ms
        stolen = await redis_client.xautoclaim(stream, cfg.group, "peer", cfg.claim_idle_ms,
                                               "0-0", count=100, justid=True)
        assert stolen == []  # the peer takes nothing
        store.gate.set()

        async def all_acked() -> bool:
            return await pending_count(redis_client, stream, cfg.group) == 0

        await wait_until(all_acked, what="the batch acknowledged")
        worker.stop()
    assert (store.entered, store.writes) == (1, 1)  # one sized read took the whole backlog
    inner = store.inner
    assert isinstance(inner, MemoryStore)
    assert len(inner.runs) == 5


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_reclaimed_entry_with_two_event_fields_is_dead_lettered_as_ambiguous(
    stream: str, redis_url: str, protocol: int
) -> None:
    """An entry with two ``event`` fields that a dead consumer held is reclaimed
    (XAUTOCLAIM, RESP2 and RESP3) and dead-lettered as ambiguous; its neighbours, reclaimed
    with it, are stored."""
    client = aioredis.Redis.from_url(redis_url, protocol=protocol)
    try:
        first = make_event("run.started", "ws1", "wf", "run-first")
        second = make_event("run.started", "ws1", "wf", "run-second")
        neighbour = make_event("run.started", "ws1", "wf", "run-before")
        emitter = AuditEmitter(client, [stream])
        cfg = settings(stream, redis_url, claim_idle_ms=1)
        await Worker(cfg.with_(consumer="dead"), MemoryStore(), client).ensure_groups()
        await emitter.emit(neighbour)
        entry_id = as_text(await command(
            client, "XADD", stream, "*", "event", json.dumps(first), "event", json.dumps(second)))
        await emitter.emit({**neighbour, "eventId": "e-after", "runId": "run-after"})
        # The dead consumer read all three and never settled them: only reclaim sees them.
        held = await read_as_dead_consumer(client, cfg.group, stream)
        assert len(held) == 3
        await anyio.sleep(0.01)
        store = MemoryStore()
        metrics = Metrics()
        await run_burst(Worker(cfg, store, client, metrics))

        assert metrics.entries_reclaimed.labels(stream)._value.get() == 3
        assert sorted(run_id for _, run_id in store.runs) == ["run-after", "run-before"]
        (dead,) = await dlq_entries(client, stream)
        assert (dead["reason"], dead["id"]) == (Reason.DUPLICATE_FIELD, entry_id)
        assert dead["error"] == "entry has 2 'event' fields: ambiguous, none is stored"
        assert json.loads(dead["event"]) == first
        assert json.loads(dead["event_2"]) == second
        assert await pending_count(client, stream, cfg.group) == 0
    finally:
        await client.aclose()


async def read_as_dead_consumer(client: aioredis.Redis, group: str, stream: str) -> list[Any]:
    """XREADGROUP as consumer ``dead``, which then dies: its entries stay pending."""
    reply: Any = await client.xreadgroup(group, "dead", {stream: ">"}, count=100)
    items = reply.items() if isinstance(reply, dict) else reply
    return [e for _, entries in items for e in (entries[0] if isinstance(reply, dict)
                                                  else entries)]


async def test_reclaim_counts_entries_deleted_while_pending(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """XAUTOCLAIM's deleted-IDs element is counted, and the rest is claimed."""
    emitter = AuditEmitter(redis_client, [stream])
    ids = await emitter.emit_many(events_of(runs(2)))
    cfg = settings(stream, redis_url, claim_idle_ms=1)
    dead_worker = Worker(cfg.with_(consumer="dead"), MemoryStore(), redis_client)
    await dead_worker.ensure_groups()
    await redis_client.xreadgroup(cfg.group, "dead", {stream: ">"}, count=100)
    await redis_client.xdel(stream, ids[0], ids[1])
    await anyio.sleep(0.01)
    metrics = Metrics()
    survivor = Worker(cfg, MemoryStore(), redis_client, metrics)
    claimed = await Reclaimer(survivor).sweep(stream)
    assert {e.id for e in claimed} == set(ids[2:])
    assert all(e.deliveries == 2 for e in claimed)
    assert metrics.registry.get_sample_value(
        "audit_fleet_entries_reclaimed_deleted_total", {"stream": stream}) == 2


async def test_group_is_recreated_after_flushall(private_redis: str, stream: str) -> None:
    """NOGROUP (Redis flushed or restarted empty) recreates the group and carries on."""
    client = aioredis.Redis.from_url(private_redis)
    emitter = AuditEmitter(client, [stream])
    rs = runs(6)
    store = MemoryStore()
    worker = Worker(settings(stream, private_redis, burst=False), store, client)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await emitter.emit_many(events_of(rs[:3]))
        with anyio.fail_after(10):
            while len(store.runs) < 3:
                await anyio.sleep(0.05)
        await client.flushall()
        await emitter.emit_many(events_of(rs[3:]))
        with anyio.fail_after(10):
            while len(store.runs) < 6:
                await anyio.sleep(0.05)
        worker.stop()
    assert await pending_count(client, stream, "audit-writers") == 0
    await client.aclose()


async def test_invalid_workspace_never_reaches_the_store(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """A hostile workspace ID is refused at the edge and dead-lettered."""
    event = make_event("run.started", "ws1", "wf", "r1")
    event["workspaceId"] = "admin.$cmd"
    await redis_client.xadd(stream, {"event": json.dumps(event)})
    store = MemoryStore()
    await run_burst(Worker(settings(stream, redis_url), store, redis_client))
    assert store.runs == {}
    dead = await dlq_entries(redis_client, stream)
    assert [d["reason"] for d in dead] == [Reason.SCHEMA]
    assert "workspaceId" in dead[0]["error"]


async def test_an_entry_with_two_event_fields_is_dead_lettered_as_ambiguous(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """Neither of two ``event`` fields is stored; the dead letter keeps both values."""
    first = make_event("run.started", "ws1", "wf", "run-first")
    second = make_event("run.started", "ws1", "wf", "run-second")
    neighbour = make_event("run.started", "ws1", "wf", "run-neighbour")
    emitter = AuditEmitter(redis_client, [stream])
    await emitter.emit(neighbour)
    entry_id = as_text(await command(
        redis_client, "XADD", stream, "*", "event", json.dumps(first), "trace", "t-1",
        "event", json.dumps(second)))
    await emitter.emit({**neighbour, "eventId": "e-after", "runId": "run-after"})
    store = MemoryStore()
    await run_burst(Worker(settings(stream, redis_url), store, redis_client))

    assert sorted(run_id for _, run_id in store.runs) == ["run-after", "run-neighbour"]
    (dead,) = await dlq_entries(redis_client, stream)
    assert dead["reason"] == Reason.DUPLICATE_FIELD
    assert dead["error"] == "entry has 2 'event' fields: ambiguous, none is stored"
    assert dead["id"] == entry_id
    assert json.loads(dead["event"]) == first
    assert json.loads(dead["event_2"]) == second
    assert await pending_count(redis_client, stream, "audit-writers") == 0


async def test_a_sudden_jump_in_entry_size_stays_within_the_byte_budget(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """Regression: after small entries, one read asked for as many entries as the budget
    held at the small size, and took 100 large ones at once (40x the budget). Reads are
    now sized before they take anything: the payload held never exceeds the budget plus
    one entry per reading loop, and every entry is settled once."""
    budget, large = 1024 * 1024, 400 * 1024
    emitter = AuditEmitter(redis_client, [stream])
    small = events_of(runs(20))
    await emitter.emit_many(small)
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(100):  # not JSON: dead-lettered, but held as read like any entry
            pipe.xadd(stream, {"event": b"x" * large + str(i).encode()})
        await pipe.execute()
    cfg = settings(stream, redis_url, batch_size=500, inflight_bytes=budget,
                   max_event_bytes=512 * 1024, max_inflight=4, linger_ms=0)
    store = MemoryStore()
    worker = Worker(cfg, store, redis_client)
    held = worker.budget
    take, peak = held.take, [0]

    def tracked(entries: Any) -> int:
        nbytes = take(entries)
        peak[0] = max(peak[0], held.held)
        return nbytes

    held.take = tracked  # type: ignore[method-assign]
    await run_burst(worker, limit_s=60)

    # The documented bound (worker/budget.py): the budget plus one entry for each of the
    # shard's two reading loops (reader, reclaimer).
    assert peak[0] <= budget + 2 * cfg.max_event_bytes, peak[0]
    assert len(await dlq_entries(redis_client, stream)) == 100
    assert len(store.runs) == 20
    assert await pending_count(redis_client, stream, cfg.group) == 0
