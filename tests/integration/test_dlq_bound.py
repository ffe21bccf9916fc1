"""The dead-letter bounds against real Redis: by age and by size, the oldest only, counted,
logged, and announced by the fleet gauges before anything goes."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest
from redis.typing import EncodableT, FieldT
from structlog.testing import capture_logs

from tests.helpers import as_text, stream_range
from worker import constants as c
from worker.dlq_bound import bound_dead_letters, dlq_bytes
from worker.fleet import poll_fleet, redis_time_ms
from worker.metrics import Metrics
from worker.settings import Settings
from worker.trim import hygiene_once

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

KIB = 1024


def settings_for(stream: str, redis_url: str, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(redis_url=redis_url, streams=(stream,), consumer="me",
                                store_url="null://", metrics_port=0, trim=False,
                                max_event_bytes=256 * KIB, dlq_max_age_s=0, dlq_max_bytes=0)
    base.update(kw)
    return Settings(**base)


async def dead_letter(redis: aioredis.Redis, stream: str, size: int, at_ms: int | None = None,
                      ) -> str:
    """One dead letter with the worker's fields and a ``size``-byte payload."""
    fields: dict[FieldT, EncodableT] = {
        "reason": c.Reason.SCHEMA, "error": "e", "stream": stream, "id": "1-1",
        "deliveries": 1, "event": b"x" * size, "consumer": "w", "ts": 0}
    entry_id = await redis.xadd(c.dlq_key(stream), fields, id=f"{at_ms}-*" if at_ms else "*")
    return as_text(entry_id)


async def dlq_ids(redis: aioredis.Redis, stream: str) -> list[str]:
    return [i.decode() for i, _ in await stream_range(redis, c.dlq_key(stream))]


def dropped(metrics: Metrics, stream: str, bound: str) -> float:
    value: float = metrics.dead_letters_dropped.labels(stream, bound)._value.get()
    return value


async def test_the_age_bound_drops_only_dead_letters_older_than_it(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """Dead letters older than AUDIT_DLQ_MAX_AGE_S go (exact XTRIM MINID), younger ones
    stay; the drop is counted per bound and logged with the range."""
    now = await redis_time_ms(redis_client, stream)
    old = [await dead_letter(redis_client, stream, 100, now - 7200_000 + i) for i in range(3)]
    young = [await dead_letter(redis_client, stream, 100, now - 1800_000),
             await dead_letter(redis_client, stream, 100)]
    cfg = settings_for(stream, redis_url, dlq_max_age_s=3600)
    metrics = Metrics()
    metrics.prime(cfg.streams, cfg.group, "null")
    with capture_logs() as logs:
        await hygiene_once(redis_client, cfg, metrics)
    assert await dlq_ids(redis_client, stream) == young
    assert dropped(metrics, stream, "age") == 3
    assert dropped(metrics, stream, "size") == 0
    (log,) = [e for e in logs if e["event"] == "dead_letters_dropped"]
    assert (log["log_level"], log["bound"], log["dropped"], log["first_id"]) == (
        "warning", "age", 3, old[0])
    assert young[0] > log["below"] > old[-1]
    # A second round finds nothing to drop.
    assert await bound_dead_letters(redis_client, cfg, metrics) == []


async def test_the_size_bound_drops_the_oldest_until_the_stream_fits(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """Past AUDIT_DLQ_MAX_BYTES (MEMORY USAGE, exact) the oldest dead letters go until the
    stream fits: the kept ones are the newest, in order; each drop is counted."""
    ids = [await dead_letter(redis_client, stream, 50 * KIB) for _ in range(40)]
    assert await dlq_bytes(redis_client, stream) > 40 * 50 * KIB  # type: ignore[operator]
    cfg = settings_for(stream, redis_url, dlq_max_bytes=512 * KIB)
    metrics = Metrics()
    with capture_logs() as logs:
        await hygiene_once(redis_client, cfg, metrics)
    kept = await dlq_ids(redis_client, stream)
    usage = await dlq_bytes(redis_client, stream)
    assert usage is not None
    assert usage <= 512 * KIB
    assert 5 <= len(kept) < 40
    assert kept == ids[-len(kept):]  # the newest, none skipped
    assert dropped(metrics, stream, "size") == 40 - len(kept)
    (log,) = [e for e in logs if e["event"] == "dead_letters_dropped"]
    assert (log["bound"], log["dropped"], log["first_id"]) == ("size", 40 - len(kept), ids[0])


async def test_the_size_bound_never_drops_the_newest_dead_letter(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """One dead letter larger than the bound (a ``too_large`` entry keeps its payload) stays:
    the older ones go, the newest never."""
    await dead_letter(redis_client, stream, 100 * KIB)
    newest = await dead_letter(redis_client, stream, 900 * KIB)
    metrics = Metrics()
    await bound_dead_letters(redis_client, settings_for(stream, redis_url,
                                                        dlq_max_bytes=512 * KIB), metrics)
    assert await dlq_ids(redis_client, stream) == [newest]
    assert dropped(metrics, stream, "size") == 1


async def test_no_bound_drops_nothing_and_a_missing_stream_is_fine(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """With both bounds at 0 nothing goes, however old or large; a stream without dead
    letters is no error."""
    now = await redis_time_ms(redis_client, stream)
    ids = [await dead_letter(redis_client, stream, 200 * KIB, now - 10**9) for _ in range(5)]
    metrics = Metrics()
    off = settings_for(stream, redis_url)
    assert not off.dlq_bounded
    await hygiene_once(redis_client, off, metrics)
    assert await dlq_ids(redis_client, stream) == ids
    on = settings_for("test:nothing:here", redis_url, dlq_max_age_s=1, dlq_max_bytes=512 * KIB)
    assert await bound_dead_letters(redis_client, on, metrics) == []


async def test_the_fleet_gauges_announce_a_bound_before_it_drops(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """The poller exports the dead-letter stream's bytes and oldest age beside both bounds
    (what the 80% alerts compare); the dropped counters start at 0; a bound that is off
    exports no bound gauge."""
    now = await redis_time_ms(redis_client, stream)
    await dead_letter(redis_client, stream, 100 * KIB, now - 3000_000)
    await dead_letter(redis_client, stream, 100 * KIB)
    cfg = settings_for(stream, redis_url, dlq_max_age_s=3600, dlq_max_bytes=256 * KIB * 2,
                       fleet_poll_interval_s=0.5)
    metrics = Metrics()
    metrics.prime(cfg.streams, cfg.group, "null")
    assert await poll_fleet(redis_client, cfg, metrics)
    text = generate_latest(metrics.registry).decode()
    samples = {line.split(" ")[0]: float(line.split(" ")[1])
               for line in text.splitlines() if line.startswith("audit_fleet_dead_letter")}
    label = f'{{stream="{stream}"}}'
    assert samples[f"audit_fleet_dead_letter_length{label}"] == 2
    assert samples[f"audit_fleet_dead_letter_bytes{label}"] > 200 * KIB
    assert samples[f"audit_fleet_dead_letter_max_bytes{label}"] == 512 * KIB
    assert 3000 <= samples[f"audit_fleet_dead_letter_oldest_age_seconds{label}"] < 3100
    assert samples[f"audit_fleet_dead_letter_max_age_seconds{label}"] == 3600
    for bound in c.DLQ_BOUNDS:
        assert samples[f'audit_fleet_dead_letters_dropped_total{{bound="{bound}",'
                       f'stream="{stream}"}}'] == 0
    # Over 80% of the age bound (3000 s of 3600): AuditFleetDeadLettersNearAgeBound's
    # condition holds while nothing has been dropped yet.
    assert await dlq_ids(redis_client, stream) != []

    metrics = Metrics()
    assert await poll_fleet(redis_client, cfg.with_(dlq_max_age_s=0, dlq_max_bytes=0), metrics)
    text = generate_latest(metrics.registry).decode()
    assert "audit_fleet_dead_letter_max_bytes{" not in text
    assert "audit_fleet_dead_letter_max_age_seconds{" not in text
    assert f"audit_fleet_dead_letter_bytes{label}" in text
