"""The batch-observed end-to-end histogram exposes exactly what prometheus_client's would."""

from __future__ import annotations

import itertools
import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from worker.metrics import BatchHistogram, Metrics

BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


def _exposition(values: list[list[float]], batch: bool) -> list[str]:
    registry = CollectorRegistry()
    if batch:
        hist = BatchHistogram("lat_seconds", "latency", BUCKETS, registry)
        for chunk in values:
            hist.observe_many(chunk)
    else:
        reference = Histogram("lat_seconds", "latency", buckets=BUCKETS, registry=registry)
        for chunk in values:
            for value in chunk:
                reference.observe(value)
    return [line for line in generate_latest(registry).decode().splitlines()
            if not line.startswith("lat_seconds_created")]


def test_batches_give_the_same_buckets_sum_and_count_as_one_observe_per_value() -> None:
    """Random batches, values on bucket bounds included, give the reference's exposition."""
    rng = random.Random(7)
    values = [[rng.choice([*BUCKETS, 0.0, 2.0, rng.random() * 0.3]) for _ in range(n)]
              for n in (0, 1, 17, 500)]
    assert _exposition(values, batch=True) == _exposition(values, batch=False)


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    """le is inclusive: 0.01 is in le="0.01", 0.0100001 is not."""
    registry = CollectorRegistry()
    hist = BatchHistogram("x_seconds", "x", (0.01, 0.1), registry)
    hist.observe_many([0.01, 0.0100001, 5.0])
    text = generate_latest(registry).decode()
    assert 'x_seconds_bucket{le="0.01"} 1.0' in text
    assert 'x_seconds_bucket{le="0.1"} 2.0' in text
    assert 'x_seconds_bucket{le="+Inf"} 3.0' in text
    assert "x_seconds_count 3.0" in text


def test_the_end_to_end_buckets_are_fine_where_the_latency_targets_are() -> None:
    """Between 10 and 250 ms no bucket is wider than 50 ms (the targets sit at 100/150 ms)."""
    bounds = Metrics().end_to_end_seconds.bounds
    inside = [b for b in bounds if 0.01 <= b <= 0.25]
    assert inside[0] == 0.01
    assert inside[-1] == 0.25
    assert max(b - a for a, b in itertools.pairwise(inside)) <= 0.05 + 1e-9
    assert {0.1, 0.15}.issubset(bounds)
