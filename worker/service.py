"""Assemble a worker process: store, Redis, metrics, health and the side loops."""

from __future__ import annotations

import anyio
import redis.asyncio as aioredis

from .consumer import Worker
from .errors import StoreUnavailable
from .fleet import fleet_side_loop
from .health import build_health_server
from .logs import get_logger
from .metrics import Metrics
from .settings import Settings
from .stores import Store, open_store
from .trim import trim_side_loop


async def open_store_waiting(settings: Settings, attempts: int | None = None) -> Store:
    """Open the store, waiting (with backoff) while it is unreachable."""
    log = get_logger(store=settings.store_scheme)
    delay = 0.5
    tries = 0
    while True:
        store = open_store(settings.store_url)
        try:
            await store.open()
            return store
        except StoreUnavailable as exc:
            tries += 1
            if attempts is not None and tries >= attempts:
                raise
            log.warning("store_unreachable_waiting", error=str(exc)[:300], retry_in_s=delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, 10.0)


def build_worker(
    settings: Settings, store: Store, redis: aioredis.Redis, metrics: Metrics
) -> Worker:
    """A worker with the fleet-gauge poller and stream hygiene running beside it."""
    side_loops = [fleet_side_loop(redis, settings, metrics)]
    if settings.trim:
        side_loops.append(trim_side_loop(redis, settings, metrics))
    return Worker(settings, store, redis, metrics, side_loops=side_loops, handle_signals=True)


async def run_worker(settings: Settings) -> None:
    """The ``audit-fleet run`` process: exits normally after a graceful stop."""
    store = await open_store_waiting(settings)
    redis = aioredis.Redis.from_url(settings.redis_url)
    metrics = Metrics()
    worker = build_worker(settings, store, redis, metrics)
    try:
        async with anyio.create_task_group() as tg:
            if settings.metrics_port:
                server = build_health_server(
                    settings, metrics, {"redis": redis.ping, "store": store.ping},
                    draining=lambda: worker.stopping,
                )
                await tg.start(server.serve, settings.metrics_host, settings.metrics_port)
            await worker.run()
            tg.cancel_scope.cancel()
    finally:
        # The hard deadline: an unreachable store (or Redis) cannot hold the exit up past
        # AUDIT_SHUTDOWN_GRACE_S + AUDIT_SHUTDOWN_DEADLINE_S.
        with anyio.move_on_after(settings.shutdown_deadline_s, shield=True) as scope:
            await redis.aclose()
            await store.close()
        if scope.cancelled_caught:
            get_logger().warning("close_deadline_exceeded",
                                 deadline_s=settings.shutdown_deadline_s)
