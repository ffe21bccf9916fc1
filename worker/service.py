"""Assemble a worker process: store, Redis, metrics, health and the side loops."""

from __future__ import annotations

import anyio
import redis.asyncio as aioredis

from .consumer import Worker
from .errors import StoreUnavailable
from .logs import get_logger
from .metrics import Metrics
from .settings import Settings
from .stores import Store, open_store


async def open_store_waiting(settings: Settings, attempts: int | None = None) -> Store:
    """Open the store, waiting (with backoff) while it is unreachable."""
    log = get_logger(store_url_scheme=settings.store_scheme)
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


def build_worker(settings: Settings, store: Store, metrics: Metrics | None = None) -> Worker:
    redis = aioredis.Redis.from_url(settings.redis_url)
    worker = Worker(settings, store, redis, metrics or Metrics(), handle_signals=True)
    return worker


async def run_worker(settings: Settings) -> None:
    """The ``audit-fleet run`` process: exits 0 after a graceful stop."""
    store = await open_store_waiting(settings)
    worker = build_worker(settings, store)
    try:
        await worker.run()
    finally:
        await worker.redis.aclose()
        await store.close()
