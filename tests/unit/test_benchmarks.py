"""The load-test harness's pure parts: percentiles, ack times, lost/duplicate accounting,
the load generator's mix, and the targets. Nothing here is timed."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from benchmarks import load, report, stats
from benchmarks.monitor import parse_groups
from benchmarks.scenarios import redact, via_port
from benchmarks.stats import Emitted, Snapshot
from worker import events as ev
from worker import samples

# -- percentiles and latency -------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks() -> None:
    """Percentiles follow linear interpolation between ranks (NumPy's default)."""
    values = [float(v) for v in range(1, 101)]
    assert stats.percentile(values, 50) == pytest.approx(50.5)
    assert stats.percentile(values, 99) == pytest.approx(99.01)
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 100) == 100.0
    assert stats.percentile([7.0], 95) == 7.0
    assert math.isnan(stats.percentile([], 50))
    with pytest.raises(ValueError, match=r"0\.\.100"):
        stats.percentile(values, 101)


def test_latency_summary_ignores_unknown_latencies() -> None:
    """Entries never seen settled (NaN) are left out of the percentiles and counted apart."""
    summary = stats.latency_summary([10.0, math.nan, 30.0, 20.0])
    assert summary["count"] == 3
    assert summary["p50"] == 20.0
    assert summary["max"] == 30.0
    assert stats.latency_summary([])["p99"] is None


def test_stream_ids_encode_in_order_and_round_trip() -> None:
    """Encoded entry IDs sort like the IDs, decode back, and expose the append time."""
    raw = ["1796022336979-0", "1796022336979-7", "1796022336980-0"]
    encoded = [stats.encode_id(r) for r in raw]
    assert encoded == sorted(encoded)
    assert [stats.decode_id(e) for e in encoded] == raw
    assert stats.id_ms(stats.encode_id(b"1796022336979-12")) == 1796022336979
    with pytest.raises(ValueError, match="too large"):
        stats.encode_id(f"1-{1 << 22}")


def test_latencies_are_ack_time_minus_entry_time() -> None:
    """Latency is the ack time (s) minus the entry ID's time (ms), never negative."""
    ids = [stats.encode_id("1000000-0"), stats.encode_id("1000500-0"), stats.encode_id("1002000-0")]
    lat = stats.latencies_ms(ids, [1000.25, 1000.4, math.nan])
    assert lat[0] == pytest.approx(250.0)
    assert lat[1] == 0.0
    assert math.isnan(lat[2])


# -- ack times from group snapshots ------------------------------------------------------------

def _snap(t: float, last: int, pending: tuple[int, ...], complete: bool = True,
          length: int = 10, lag: int = 0) -> Snapshot:
    return Snapshot(t=t, length=length, lag=lag, pending=len(pending), last_delivered=last,
                    pending_ids=pending, complete=complete)


def test_ack_times_come_from_the_first_snapshot_showing_an_entry_settled() -> None:
    """An entry is settled once delivered and no longer pending; undelivered ones wait."""
    ids = [1, 2, 3, 4, 5]
    snaps = [
        _snap(10.0, last=0, pending=()),        # nothing delivered yet
        _snap(11.0, last=3, pending=(2, 3)),    # 1 settled; 2 and 3 in flight
        _snap(12.0, last=5, pending=(3,)),      # 2, 4, 5 settled; 3 still pending
        _snap(13.0, last=5, pending=()),        # 3 settled
    ]
    assert stats.assign_ack_times(ids, snaps) == [11.0, 12.0, 13.0, 12.0, 12.0]


def test_a_partial_pending_list_decides_only_up_to_its_last_id() -> None:
    """With only the lowest pending IDs listed, entries above the last one stay unknown
    until a later snapshot decides them; entries never settled stay NaN."""
    ids = [1, 2, 3, 4, 5, 6]
    snaps = [
        _snap(20.0, last=6, pending=(2, 4), complete=False),  # 5 and 6 undecided
        _snap(21.0, last=6, pending=(4, 6), complete=True),   # 2, 5 settled
    ]
    acks = stats.assign_ack_times(ids, snaps)
    assert [acks[0], acks[1], acks[2], acks[4]] == [20.0, 21.0, 20.0, 21.0]
    assert math.isnan(acks[3])
    assert math.isnan(acks[5])


def test_settled_counts_give_crossings_rates_and_series() -> None:
    """Throughput comes from Redis's own counters: crossings are interpolated."""
    curve = [(0.0, 0), (1.0, 100), (2.0, 300), (3.0, 400)]
    assert stats.crossing(curve, 200) == pytest.approx(1.5)
    assert stats.crossing(curve, 500) is None
    # 5% (20) at 0.2 s, 95% (380) at 2.8 s: 360 entries in 2.6 s
    assert stats.rate_between(curve, 400) == pytest.approx(360 / 2.6)
    assert stats.series(curve, 0.0, 3.0, 1.0) == [(0.0, 100.0), (1.0, 200.0), (2.0, 100.0)]
    unknown_lag = Snapshot(4.0, 10, None, 0, 0, (), True)
    assert stats.settled_curve([unknown_lag, _snap(5.0, 1, (), length=10, lag=2)]) == [(5.0, 8)]


# -- lost and duplicates -------------------------------------------------------------------------

def _emitted() -> list[Emitted]:
    return [Emitted("e-start", "r1", load.RUN), Emitted("e-node", "r1", load.NODE),
            Emitted("e-snap", "r2", load.SNAPSHOT, nodes=2), Emitted("e-bad", "r3", load.POISON)]


def _runs() -> list[dict[str, object]]:
    return [{"runId": "r1", "eventIds": ["e-start"]}, {"runId": "r2", "eventIds": ["e-snap"]}]


def _nodes() -> list[dict[str, object]]:
    return [{"eventId": "e-node"}, {"eventId": "e-snap"}, {"eventId": "e-snap"}]


def test_accounting_finds_every_event_where_it_belongs() -> None:
    """Run events in eventIds, node events as node documents, snapshots in both, poison in
    the dead-letter stream: nothing lost, nothing duplicated."""
    acc = stats.account(_emitted(), _runs(), _nodes(), [("e-bad", "unsupported_version")])
    assert (acc.emitted, acc.stored, acc.dead_lettered) == (4, 3, 1)
    assert (acc.lost, acc.duplicates, acc.unexpected) == (0, 0, 0)
    assert acc.dlq_reasons == {"unsupported_version": 1}


@pytest.mark.parametrize(
    ("runs", "nodes", "dlq", "lost", "dup", "unexpected"),
    [
        # a node event missing from the store
        (_runs(), _nodes()[1:], [("e-bad", "x")], 1, 0, 0),
        # a node event stored as two node documents
        (_runs(), [*_nodes(), {"eventId": "e-node"}], [("e-bad", "x")], 0, 1, 0),
        # a run event both stored and dead-lettered
        (_runs(), _nodes(), [("e-bad", "x"), ("e-start", "x")], 0, 1, 0),
        # a snapshot whose second node is missing
        (_runs(), _nodes()[:2], [("e-bad", "x")], 1, 0, 0),
        # a snapshot with one node document too many
        (_runs(), [*_nodes(), {"eventId": "e-snap"}], [("e-bad", "x")], 0, 1, 0),
        # a run event recorded under another run: lost there, unexpected here
        ([{"runId": "r9", "eventIds": ["e-start"]}, _runs()[1]], _nodes(), [("e-bad", "x")],
         1, 0, 1),
        # poison never dead-lettered, and an ID nobody emitted
        (_runs(), [*_nodes(), {"eventId": "ghost"}], [], 1, 0, 1),
    ],
)
def test_accounting_detects_lost_duplicated_and_unexpected_events(
    runs: list[dict[str, object]], nodes: list[dict[str, object]],
    dlq: list[tuple[str, str]], lost: int, dup: int, unexpected: int,
) -> None:
    """Each kind of damage is counted from the documents, never from worker counters."""
    acc = stats.account(_emitted(), runs, nodes, dlq)
    assert (acc.lost, acc.duplicates, acc.unexpected) == (lost, dup, unexpected)


def test_ack_accounting_counts_unsettled_entries_as_lost() -> None:
    """For a store that keeps nothing, every emitted entry must have settled."""
    acc = stats.account_acks([1, 2, 3], [1.0, math.nan, 2.0], dead_letters=1)
    assert (acc.emitted, acc.lost, acc.stored, acc.dead_lettered) == (3, 1, 1, 1)


def test_memory_budget_counts_every_batch_a_worker_can_hold() -> None:
    """Budget = idle + (writers + reader + reclaimer) batches x size x footprint."""
    assert stats.memory_budget(40 << 20, 500, 4, 1000.0, 5.0) == (40 << 20) + 6 * 500 * 5000


# -- the load generator --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool() -> load.Pool:
    return load.build_templates(11, 40, tail=3)


def test_templates_fill_into_valid_events_with_the_given_ids(pool: load.Pool) -> None:
    """Every template, filled, is a valid v1 event carrying exactly the IDs given."""
    ids = load.Ids("t1", 3, "bench_ws")
    for item in list(load.plan(pool, 400, seed=1, poison=0.0)):
        payload = ids.payload(item)
        decoded = ev.decode(payload, max_bytes=16 << 20)
        assert decoded.event.eventId == ids.event_id(item.seq)
        assert decoded.event.runId == ids.run_id(item.run_no)
        assert decoded.event.workspaceId == "bench_ws"
        assert b"PLACEHOLDER" not in payload


def test_the_mix_has_the_designs_node_types_failures_retries_and_poison(
        pool: load.Pool) -> None:
    """ai, conditional and action nodes (and sources), failed and retried nodes, snapshots,
    and the requested share of poison entries that the fleet must dead-letter."""
    items = list(load.plan(pool, 6000, seed=2, poison=0.01))
    mix = load.summarize(items)
    # the plan is seeded: these are its exact counts (1 % poison of 6,000 is 60 ± noise)
    assert mix.by_node_type == {"source": 1545, "ai": 1634, "conditional": 1497, "action": 1468}
    assert mix.by_kind == {load.SNAPSHOT: 629, load.RUN: 1753, load.NODE: 3551, load.POISON: 67}
    assert (mix.events, mix.runs, mix.failed_nodes, mix.retried_nodes) == (6000, 1579, 290, 115)
    bad = next(i for i in items if i.template.kind == load.POISON)
    with pytest.raises(Exception, match="not supported"):
        ev.decode(load.Ids("t", 0, "w").payload(bad), max_bytes=1 << 20)


def test_runs_interleave_but_keep_their_own_order(pool: load.Pool) -> None:
    """Many runs are in progress at once, and each run's events stay in emission order."""
    items = list(load.plan(pool, 3000, seed=3, concurrency=100))
    assert len({i.run_no for i in items[:200]}) > 60
    by_run: dict[int, list[str]] = {}
    for i in items:
        by_run.setdefault(i.run_no, []).append(i.template.type)
    for types in by_run.values():
        if types[0] != "run.snapshot":
            assert types[0] == "run.started"
            assert all(t.startswith("node.") for t in types[1:-1])
        else:
            assert types == ["run.snapshot"]
    assert list(load.plan(pool, 50, seed=3)) == list(load.plan(pool, 50, seed=3))


def test_prompt_sizes_have_a_long_tail_capped_at_256_kib(pool: load.Pool) -> None:
    """The design's sizes: mostly a few KiB, a long tail, never above 256 KiB; the pool's
    tail runs reach the cap exactly and are still valid events."""
    rng = random.Random(5)
    sizes = sorted(samples.default_prompt_size(rng) for _ in range(20_000))
    median, p999 = sizes[len(sizes) // 2], sizes[int(len(sizes) * 0.999)]
    assert 1000 < median < 4000
    assert p999 > 10 * median
    assert sizes[-1] <= load.MAX_PROMPT
    prompts = []
    for run in pool.tail:
        for t in run:
            doc = msgspec.json.decode(t.fill(b"w", b"r", b"e"))
            nodes = doc.get("nodes") or ([doc["node"]] if "node" in doc else [])
            prompts += [len(n["input"]["prompt"]) for n in nodes if "input" in n]
    assert max(prompts) >= load.MAX_PROMPT
    assert min(prompts) >= 64 * 1024


def test_templates_survive_a_round_trip_through_their_file(pool: load.Pool,
                                                           tmp_path: Path) -> None:
    """Producers load the very templates the harness built."""
    path = tmp_path / "templates.json"
    load.save_templates(path, pool)
    again = load.load_templates(path)
    assert again == pool


def test_prompt_size_options() -> None:
    """small is 200 characters, a number is taken as is, out-of-range sizes are refused."""
    rng = random.Random(1)
    assert load.prompt_sizer("small")(rng) == 200
    assert load.prompt_sizer("4096")(rng) == 4096
    with pytest.raises(ValueError, match="prompt size"):
        load.prompt_sizer(str(load.MAX_PROMPT + 1))


# -- small helpers ---------------------------------------------------------------------------

def test_group_fields_are_read_from_flat_and_mapped_replies() -> None:
    """XINFO GROUPS replies parse whether redis-py left them flat or made dicts."""
    flat = [[b"name", b"g", b"pending", 3, b"lag", 0]]
    assert parse_groups(flat, "g")["pending"] == 3
    assert parse_groups([{b"name": b"g", b"lag": 7}], "g")["lag"] == 7
    with pytest.raises(LookupError):
        parse_groups(flat, "other")


def test_store_urls_are_redirected_and_redacted() -> None:
    """The outage proxy keeps credentials, database and options; reports hide passwords."""
    url = "postgresql://bench:s3cret@db.example:5432/audit_bench?max_size=4"
    redirected = "postgresql://bench:s3cret@127.0.0.1:40001/audit_bench?max_size=4"
    assert via_port(url, 40001) == redirected
    assert via_port("postgresql://db/x", 9) == "postgresql://127.0.0.1:9/x"
    assert redact(url) == "postgresql://bench:***@db.example:5432/audit_bench?max_size=4"
    assert redact("null://") == "null://"


def test_targets_compare_ratios_within_one_run() -> None:
    """Each target is judged from numbers of the same run; null duplicates are n/a."""
    pg = "postgresql://postgres@127.0.0.1:5432/audit_bench"
    baselines: dict[str, dict[str, Any]] = {
        "raw_redis_loop": {"events_per_s": 50_000.0},
        "faststream_consumer": {"events_per_s": 25_000.0},
        "raw_store_upsert": {"store": pg, "events_per_s": 10_000.0},
        "naive_per_event": {"store": pg, "events_per_s": 400.0},
    }
    results = [
        {"scenario": "max", "label": "max null", "store": "null://", "workers": 1,
         "events_per_s": 46_000.0, "lost": 0, "duplicates": None},
        {"scenario": "max", "label": "max null 2", "store": "null://", "workers": 2,
         "events_per_s": 52_000.0, "lost": 0, "duplicates": None},
        {"scenario": "max", "label": "max postgresql 2", "store": pg, "workers": 2,
         "events_per_s": 8_600.0, "lost": 0, "duplicates": 0},
        {"scenario": "steady", "label": "steady null", "store": "null://", "workers": 1,
         "target_rate": 23000.0, "latency_ms": {"p99": 120.0}, "lost": 0, "duplicates": None},
        {"scenario": "max", "label": "max postgresql", "store": pg, "workers": 1,
         "events_per_s": 7_000.0, "lost": 0, "duplicates": 0, "within_budget": True,
         "peak_rss_mib": 70.0, "memory_budget_mib": 80.0, "events": 10},
        {"scenario": "steady", "label": "steady postgresql", "store": pg, "workers": 1,
         "target_rate": 3500.0, "latency_ms": {"p99": 260.0}, "lost": 0, "duplicates": 1},
    ]
    verdicts = {t["target"]: t["met"] for t in report.targets(results, baselines)}
    values = {t["target"]: t["value"] for t in report.targets(results, baselines)}
    assert values["null store, 1 worker vs raw XREADGROUP+decode+XACK loop"] == 0.92
    assert verdicts["null store, 1 worker vs raw XREADGROUP+decode+XACK loop"] is True
    assert values["null store, 1 worker vs the FastStream batch consumer"] == 1.84
    assert verdicts["null store, 1 worker vs the FastStream batch consumer"] is False
    assert values["null store, 2 workers vs raw XREADGROUP+decode+XACK loop"] == 1.04
    assert verdicts["null store, 2 workers vs raw XREADGROUP+decode+XACK loop"] is False
    assert values["postgresql store, 2 workers vs its raw batched upsert"] == 0.86
    assert verdicts["postgresql store, 2 workers vs its raw batched upsert"] is True
    assert verdicts["steady null at 23000.0 ev/s: p99 end-to-end"] is False
    assert values["postgresql store, 1 worker vs its raw batched upsert"] == 0.7
    assert verdicts["postgresql store, 1 worker vs its raw batched upsert"] is False
    assert verdicts["postgresql store, 1 worker vs naive per-event writer"] is True
    assert verdicts["steady postgresql at 3500.0 ev/s: p99 end-to-end"] is False
    assert verdicts["max null: lost = 0 and duplicates = 0"] is True
    assert verdicts["steady postgresql: lost = 0 and duplicates = 0"] is False
    assert verdicts["max postgresql: peak worker RSS within budget"] is True
    table = report.results_table(results, baselines)
    assert table.count("| max |") == 4
    assert "| steady | postgresql | 1 |" in table
    assert "| steady | null | 1 |" in table
    assert "| baseline-raw-upsert | postgresql |" in table


def test_profile_summary_reads_py_spy_collapsed_stacks(tmp_path: Path) -> None:
    """Self and total shares per function from py-spy's raw output."""
    path = tmp_path / "p.txt"
    path.write_text("main (w/a.py:1);decode (w/events.py:2) 6\n"
                    "main (w/a.py:1);coalesce (w/documents.py:3) 3\n"
                    "main (w/a.py:1) 1\n")
    frames = {name: (own, total) for name, own, total in report.top_frames(path)}
    assert frames["decode (events.py)"] == (60.0, 60.0)
    assert frames["main (a.py)"] == (10.0, 100.0)
    assert frames["coalesce (documents.py)"] == (30.0, 30.0)


def test_stage_table_splits_the_worker_cpu_by_stage(tmp_path: Path) -> None:
    """benchmarks stages: start-up and idle samples are left out; each busy sample goes
    to the first stage whose frame it holds, the rest to framework; µs = share x CPU."""
    path = tmp_path / "p.collapsed.txt"
    loop = "run (asyncio);Worker._writer (w/consumer.py:1);BatchWriter.process (w/writer.py:2)"
    path.write_text(f"{loop};prepare (w/writer.py:3);_lean (w/intake.py:4) 6\n"
                    f"{loop};coalesce_each (w/documents.py:5) 3\n"
                    f"{loop} 1\n"
                    "run (asyncio);EpollSelector.select (selectors.py:1) 5\n"
                    "<module> (w/__main__.py:1);_find_and_load (importlib) 7\n")
    counts, startup = report.stage_shares(path)
    assert startup == 7
    assert counts == {"decode (prepare)": 6, "coalesce": 3,
                      "framework (tasks, channel, bookkeeping, freeing)": 1,
                      "idle (waiting in select)": 5}
    rows = report.stage_table(path, 20.0)
    assert "| decode (prepare) | 60.0% | 12.0 |" in rows
    assert "| coalesce | 30.0% | 6.0 |" in rows


def test_compliance_benchmark_configures_what_it_compares(tmp_path: Path) -> None:
    """benchmarks.compliance: the signed run requires signatures with a keyring that
    verifies the entries it writes, the redacted run turns every detector on, the plain
    one neither; the table gives each configuration's same-round ratios."""
    from benchmarks import compliance
    from worker.events import decode
    from worker.signing import Keyring, verify

    keyring = tmp_path / "keyring.json"
    assert compliance.variant_env("plain", keyring) == {}
    assert compliance.variant_env("redacted", keyring) == {
        "AUDIT_REDACT_DETECTORS": "email,phone,card,iban"}
    signed = compliance.variant_env("signed", keyring)
    assert signed == {"AUDIT_REQUIRE_SIGNATURE": "true",
                      "AUDIT_SIGNING_KEYS_FILE": str(keyring)}
    items = compliance.payloads(50, seed=3)
    assert len(items) == 50
    compliance.write_keyring(keyring)
    ring = Keyring.load(keyring)
    for payload in items:
        assert decode(payload, max_bytes=1 << 24).doc["workspaceId"] == compliance.WORKSPACE
        assert verify(ring, payload, compliance.signature(payload), required=True).ok
        assert not verify(ring, payload, None, required=True).ok
    out = {"command": "python -m benchmarks.compliance", "events": 50, "rounds": 1,
           "store": "null://", "cpus": 2, "load_1m": {"min": 1.0, "max": 2.0},
           "summary": {v: {"throughput_ratio": r, "cpu_per_event_ratio": c,
                           "throughput_ratios": [r]}
                       for v, r, c in (("plain", 1.0, 1.0), ("signed", 0.8, 1.25),
                                       ("redacted", 0.9, 1.3))}}
    table = compliance.render(out)
    assert "| signed | 0.80x | 1.25x | 0.80 |" in table
    assert "load average (1 min) 1.0-2.0" in table


def test_markdown_table_takes_columns_by_key_and_marks_missing_values() -> None:
    """The scripts' tables: one row per result, ``-`` where a figure is missing."""
    got = report.markdown_table((("lag ms", "lag"), ("lost", "lost")),
                                [{"lag": 50, "lost": 3}, {"lag": 0, "lost": None}])
    assert got.splitlines() == ["| lag ms | lost |", "|---|---|", "| 50 | 3 |", "| 0 | - |"]


def test_scrape_batches_reads_the_histogram_with_the_prometheus_parser() -> None:
    """The harness reads a worker's batch-size histogram (count, sum) from /metrics with
    prometheus_client's parser; no /metrics, or no such histogram, is None."""
    from prometheus_client import CollectorRegistry, start_http_server

    from benchmarks.procs import scrape_batches
    from tests.helpers import free_port
    from worker.metrics import Metrics

    metrics = Metrics()
    metrics.batch_size.observe(5)
    metrics.batch_size.observe(7)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    empty_port = free_port()
    empty, empty_thread = start_http_server(empty_port, addr="127.0.0.1",
                                            registry=CollectorRegistry())
    try:
        assert scrape_batches(port) == (2.0, 12.0)
        assert scrape_batches(empty_port) is None
        assert scrape_batches(free_port()) is None
    finally:
        for s, t in ((server, thread), (empty, empty_thread)):
            s.shutdown()
            t.join(timeout=5)
