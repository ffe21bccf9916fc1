"""Metric names and conventions, the docs that list them, and a worker scraped under load."""

from __future__ import annotations

import json
import random
import re
import time

import anyio
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT, ControlledStore, MemoryStore, ReadWriteStore
from worker import constants as c
from worker import samples
from worker.consumer import Worker
from worker.documents import WriteBatch
from worker.emitter import AuditEmitter
from worker.errors import StoreUnavailable
from worker.fleet import fleet_side_loop
from worker.health import HealthServer
from worker.metrics import Metrics, exported_names
from worker.settings import Settings
from worker.stores.base import WriteResult
from worker.trim import trim_side_loop

NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
#: prometheus_client's process, GC and platform collectors keep their well-known names.
STANDARD = {
    "process_cpu_seconds", "process_max_fds", "process_open_fds",
    "process_resident_memory_bytes", "process_start_time_seconds",
    "process_virtual_memory_bytes", "python_gc_collections", "python_gc_objects_collected",
    "python_gc_objects_uncollectable", "python_info",
}


def test_names_follow_prometheus_conventions() -> None:
    """Prefixed snake_case names; counters gain _total; times end in _seconds."""
    m = Metrics()
    families = [f for f in m.families() if f.name not in STANDARD]
    assert len(families) >= 20
    for f in families:
        assert f.name.startswith("audit_fleet_"), f.name
        assert NAME.match(f.name), f.name
        assert not f.name.endswith("_total"), "prometheus_client adds _total itself"
        assert f.documentation, f"{f.name} needs help text"
        if f.type == "histogram":
            assert f.name.endswith(("_seconds", "_events")), f.name
        if "timestamp" in f.name or "age" in f.name or "idle" in f.name:
            assert f.name.endswith("_seconds"), f.name
    names = exported_names(m)
    counters = [f.name for f in families if f.type == "counter"]
    assert counters
    assert all(n + "_total" in names for n in counters)
    issue_list = [
        "events_read_total", "events_written_total", "events_dead_lettered_total",
        "entries_reclaimed_total", "entries_reclaimed_deleted_total", "batches_total",
        "batch_size_events_bucket", "store_write_seconds_bucket", "end_to_end_seconds_bucket",
        "store_retries_total", "batches_in_flight", "group_lag", "group_pending",
        "stream_length", "group_oldest_pending_age_seconds", "group_consumers",
        "consumer_idle_seconds", "dead_letter_length",
    ]
    for short in issue_list:
        required = "audit_fleet_" + short
        assert required in names, required


def test_registries_are_independent() -> None:
    """Each Metrics has its own registry (or the injected one): no global state between tests."""
    a, b = Metrics(), Metrics()
    a.events_read.labels("s").inc(3)
    assert a.registry.get_sample_value("audit_fleet_events_read_total", {"stream": "s"}) == 3
    assert b.registry.get_sample_value("audit_fleet_events_read_total", {"stream": "s"}) is None
    registry = CollectorRegistry()
    injected = Metrics(registry, prefix="custom")
    assert injected.registry is registry
    assert registry.get_sample_value("custom_build_info", {"version": "0.1.0"}) == 1
    assert "custom_group_lag" in exported_names(injected)


def samples_of(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_started_worker_exports_every_known_label_combination_at_zero() -> None:
    """Regression: counters appeared at 1 on the first dead letter, so increase() saw 0 and
    the dead-letter alert never fired. A worker's counters start at 0 for every stream x
    reason, store x outcome, loop and Redis error kind."""
    settings = Settings(streams=("s0", "s1"), group="g", metrics_port=0, store_url="null://")
    worker = Worker(settings, MemoryStore(), metrics=Metrics())
    got = samples_of(worker.metrics)
    for stream in ("s0", "s1"):
        for reason in c.REASONS:
            key = ("audit_fleet_events_dead_lettered_total",
                   (("reason", reason), ("stream", stream)))
            assert got[key] == 0.0, key
        for name in ("events_read", "events_written", "payload_read_bytes", "batches",
                     "entries_reclaimed", "entries_reclaimed_deleted", "trimmed_entries"):
            assert got[(f"audit_fleet_{name}_total", (("stream", stream),))] == 0.0, name
        key = ("audit_fleet_consumers_deleted_total", (("group", "g"), ("stream", stream)))
        assert got[key] == 0.0
    assert {c.Reason.SCHEMA, c.Reason.INVALID_JSON, c.Reason.TOO_LARGE, c.Reason.MAX_DELIVERIES,
            c.Reason.STORE_REJECTED} <= set(c.REASONS)
    for outcome in ("ok", "unavailable", "rejected", "error"):
        key = ("audit_fleet_store_write_seconds_count", (("outcome", outcome), ("store", "memory")))
        assert got[key] == 0.0, key
    assert got[("audit_fleet_store_retries_total", (("store", "memory"),))] == 0.0
    for loop in ("fleet", "trim"):
        assert got[("audit_fleet_loop_errors_total", (("loop", loop),))] == 0.0
    for kind in ("connection", "timeout", "oom", "loading", "readonly", "auth", "nogroup",
                 "other"):
        assert got[("audit_fleet_redis_errors_total", (("kind", kind),))] == 0.0


def sample(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample of ``m``'s registry, which must exist."""
    value = m.registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def test_no_created_samples_and_process_metrics_on_the_registry() -> None:
    """No ``_created`` series; RSS, CPU, file descriptors and GC on the worker's own registry."""
    m = Metrics()
    m.prime(["s"], "g", "sqlite")
    m.events_read.labels("s").inc()
    text = generate_latest(m.registry).decode()
    assert "_created" not in text
    assert sample(m, "process_resident_memory_bytes") > 1_000_000
    assert sample(m, "process_open_fds") >= 3
    assert sample(m, "process_cpu_seconds_total") > 0
    assert sample(m, "python_gc_collections_total", {"generation": "0"}) >= 0
    assert "python_info" in text


def test_redis_errors_are_counted_by_kind() -> None:
    """Each Redis failure is counted once under a stable kind."""
    from redis import exceptions as rx

    m = Metrics()
    cases = [
        (rx.ConnectionError("refused"), "connection"),
        (ConnectionRefusedError(), "connection"),
        (rx.TimeoutError("slow"), "timeout"),
        (rx.OutOfMemoryError("OOM command not allowed"), "oom"),
        (rx.ResponseError("OOM command not allowed when used memory > 'maxmemory'"), "oom"),
        (rx.BusyLoadingError("loading"), "loading"),
        (rx.ReadOnlyError("READONLY"), "readonly"),
        (rx.AuthenticationError("invalid password"), "auth"),
        (rx.ResponseError("NOGROUP No such key"), "nogroup"),
        (rx.ResponseError("ERR something else"), "other"),
    ]
    for exc, kind in cases:
        assert m.redis_error(exc) == kind, exc
    assert m.registry.get_sample_value("audit_fleet_redis_errors_total", {"kind": "oom"}) == 2
    assert m.registry.get_sample_value("audit_fleet_redis_errors_total",
                                       {"kind": "connection"}) == 2


def test_heartbeats_round_trip() -> None:
    """heartbeat() records the time per loop; heartbeats() reads it back for /healthz."""
    m = Metrics()
    assert m.heartbeats() == {}
    m.heartbeat("reader")
    m.loop_heartbeat.labels("reclaim").set(123.0)
    beats = m.heartbeats()
    assert set(beats) == {"reader", "reclaim"}
    assert beats["reclaim"] == 123.0
    assert abs(beats["reader"] - time.time()) < 5


def test_docs_list_every_metric_and_only_real_ones() -> None:
    """docs/metrics.md names every exported metric family, and nothing else."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`((?:audit_fleet|process|python)_[a-z0-9_]+)", text))
    m = Metrics()
    families = {f.name for f in m.families()}
    missing = {f for f in families if f not in documented and f + "_total" not in documented}
    assert not missing, f"undocumented: {sorted(missing)}"
    unknown = documented - exported_names(m) - families
    assert not unknown, f"documented but not exported: {sorted(unknown)}"


# -- a worker under load, scraped over HTTP --------------------------------------------


class FlakyStore(ControlledStore):
    """Down for its first writes (StoreUnavailable), then up: retries happen for real."""

    def __init__(self, inner: ReadWriteStore, failures: int) -> None:
        super().__init__(inner)
        self.to_fail = failures

    async def write(self, batch: WriteBatch) -> WriteResult:
        if self.to_fail > 0:
            self.to_fail -= 1
            self.failures += 1
            raise StoreUnavailable("store is down (test)")
        return await super().write(batch)


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples_: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    return sum(v for lab, v in samples_.get(name, []) if labels.items() <= lab.items())


async def scrape(port: int) -> str:
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            try:
                data += await conn.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return body.decode()


@pytest.mark.redis
@pytest.mark.anyio
async def test_worker_under_load_exports_every_metric(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """Scraped at /metrics while it works, a worker exports every metric with real values."""
    rng = random.Random(11)
    runs = [samples.lead_triage_run(rng, "ws1", f"run{i}", prompt_size=lambda r: 200)
            for i in range(60)]
    events = [e for r in runs for e in samples.run_events(r)]
    emitter = AuditEmitter(redis_client, [stream])
    group = "audit-writers"
    await redis_client.xgroup_create(stream, group, id="0", mkstream=True)
    # a crashed peer holds entries: two live ones and one since deleted
    crashed = [await emitter.emit_raw(stream, json.dumps(e).encode()) for e in events[:3]]
    await redis_client.xreadgroup(group, "crashed-peer", {stream: ">"}, count=3)
    await redis_client.xdel(stream, crashed[2])
    await emitter.emit_many(events[3:])
    await emitter.emit_raw(stream, b"{not json")

    settings = Settings(
        redis_url=redis_url, streams=(stream,), group=group, consumer="w1", metrics_port=0,
        block_ms=50, batch_size=40, claim_idle_ms=1000, reclaim_interval_s=0.05,
        fleet_poll_interval_s=0.05, trim_interval_s=0.05, store_url="null://",
        shutdown_grace_s=5,
    )
    metrics = Metrics()
    store = FlakyStore(MemoryStore(), failures=2)
    store.delay = 0.01
    worker = Worker(settings, store, redis_client, metrics, side_loops=[
        fleet_side_loop(redis_client, settings, metrics),
        trim_side_loop(redis_client, settings, metrics),
    ])
    server = HealthServer(metrics, checks={"redis": redis_client.ping, "store": store.ping})
    scrapes: list[str] = []

    async def watch(port: int) -> None:
        while True:
            scrapes.append(await scrape(port))
            got = parse(scrapes[-1])
            done = total(got, "audit_fleet_events_written_total") >= len(events) - 1
            # the fleet gauges come from the poller's last round, which may predate the
            # last batch's dead letter: wait until a round has seen it
            seen = total(got, "audit_fleet_dead_letter_length") == 1
            if done and seen and "audit_fleet_group_lag" in got:
                worker.stop()
                return
            await anyio.sleep(0.05)

    with anyio.fail_after(45):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            tg.start_soon(watch, port)
            await worker.run()
            tg.cancel_scope.cancel()

    assert len(scrapes) >= 2, "scraped while the worker was running"
    during = parse(scrapes[-1])
    final = parse(generate_latest(metrics.registry).decode())
    stream_l = {"stream": stream}
    assert total(final, "audit_fleet_events_read_total", **stream_l) >= len(events)
    assert total(final, "audit_fleet_events_written_total", **stream_l) == len(events) - 1
    assert total(final, "audit_fleet_events_dead_lettered_total",
                 stream=stream, reason=c.Reason.INVALID_JSON) == 1
    assert total(final, "audit_fleet_entries_reclaimed_total", **stream_l) == 2
    assert total(final, "audit_fleet_entries_reclaimed_deleted_total", **stream_l) == 1
    assert total(final, "audit_fleet_batches_total", **stream_l) >= 2
    assert total(final, "audit_fleet_batch_size_events_count") >= 2
    assert total(final, "audit_fleet_batch_size_events_sum") == len(events) - 1
    assert total(final, "audit_fleet_store_write_seconds_count", outcome="ok") >= 2
    assert total(final, "audit_fleet_store_write_seconds_count", outcome="unavailable") == 2
    assert total(final, "audit_fleet_store_retries_total", store="memory") == 2
    assert total(final, "audit_fleet_end_to_end_seconds_count") == len(events) - 1
    assert total(final, "audit_fleet_end_to_end_seconds_sum") > 0
    assert "audit_fleet_batches_in_flight" in final
    loops = {lab["loop"] for lab, _ in final["audit_fleet_loop_heartbeat_timestamp_seconds"]}
    assert {"reader", "reclaim", "fleet", "trim"} <= loops
    # fleet gauges, exported by this worker as the elected poller while it ran
    sg = {"stream": stream, "group": group}
    assert total(during, "audit_fleet_fleet_poller") == 1
    assert total(during, "audit_fleet_stream_length", **stream_l) >= 1
    assert total(during, "audit_fleet_dead_letter_length", **stream_l) == 1
    for name in ("audit_fleet_group_lag", "audit_fleet_group_pending",
                 "audit_fleet_group_oldest_pending_age_seconds",
                 "audit_fleet_group_consumers", "audit_fleet_group_active_consumers"):
        assert [lab for lab, _ in during[name]] == [sg], name
    assert total(during, "audit_fleet_group_consumers", **sg) >= 1
    consumers = {lab["consumer"] for lab, _ in during["audit_fleet_consumer_idle_seconds"]}
    assert "w1" in consumers

