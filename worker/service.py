"""Assemble a worker process: store, Redis, metrics, health and the side loops.

Start-up order (``audit-fleet run``):

1. ``/metrics``, ``/healthz`` and ``/readyz`` are served from the first second, so a
   startup probe or a scrape gets an answer whatever Redis and the store do.
2. Redis is connected, waiting with backoff while it is unreachable: ``/healthz`` stays 200
   (the process is alive and its ``redis_wait`` loop beats), ``/readyz`` is 503 with
   ``"redis": "waiting for Redis"``. An error no retry can cure (authentication failed, a
   bad URL, a database index out of range) ends the process with one line and a non-zero
   exit instead.
3. The store is opened the same way (``store_wait``, ``"store": "waiting for the store"``;
   authentication failed, the database does not exist, a bad path end the process).
4. The worker runs; ``/healthz`` requires its reader loop from then on.

SIGTERM or SIGINT before the worker runs (while it waits for Redis or the store) ends the
process at once with exit code 0 and one log line (``stopped_before_start``): nothing is
read yet, so there is nothing to drain. From then on the worker's own watcher drains (see
:class:`~worker.consumer.Worker`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from tenacity import RetryCallState, stop_after_attempt, stop_never

from . import retry
from .consumer import Worker
from .errors import ConfigError, NotReady, RedisFailure, RedisUnavailable, StoreUnavailable
from .fleet import fleet_side_loop
from .health import build_health_server
from .logs import get_logger
from .metrics import Metrics
from .redisclient import connect_settings
from .redisio import translated
from .settings import Settings, mask_url
from .stores import Store, migrate, store_from
from .trim import trim_side_loop

#: How long one start-up attempt at Redis (connect and ``PING``) may take.
REDIS_PING_TIMEOUT_S = 5.0

#: What ``/readyz`` says for the store while the worker waits for it.
WAITING_FOR_STORE = "waiting for the store"

#: What ``/readyz`` says for Redis while the worker waits for it.
WAITING_FOR_REDIS = "waiting for Redis"


class RedisSlot:
    """The Redis client once it answers; its readiness check says "waiting" until then."""

    def __init__(self) -> None:
        self.redis: aioredis.Redis | None = None

    async def ping(self) -> None:
        if self.redis is None:
            raise NotReady(WAITING_FOR_REDIS)
        await self.redis.ping()


class StoreSlot:
    """The store once it is open; its readiness check says "waiting" until then."""

    def __init__(self) -> None:
        self.store: Store | None = None

    async def ping(self) -> None:
        if self.store is None:
            raise NotReady(WAITING_FOR_STORE)
        await self.store.ping()


async def open_store_waiting(
    settings: Settings, attempts: int | None = None, metrics: Metrics | None = None
) -> Store:
    """Open and migrate the store (:func:`worker.stores.migrate`), waiting (backoff with
    jitter, up to 10 s) while it is unreachable.

    Only :class:`StoreUnavailable` is waited for; a permanent refusal
    (:class:`~worker.errors.StoreMisconfigured`, a ``ConfigError``) propagates at once.
    """
    log = get_logger(store=settings.store_scheme)

    def waiting(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("store_unreachable_waiting", error=str(exc)[:300], retry_in_s=round(wait, 3))
        if metrics is not None:
            metrics.heartbeat("store_wait")

    async for attempt in retry.retrying(
        StoreUnavailable, initial_s=0.5, max_s=10.0,
        stop=stop_never if attempts is None else stop_after_attempt(attempts),
        before_sleep=waiting,
    ):
        with attempt:
            store = store_from(settings)
            await store.open()
            try:
                await migrate(store)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await store.close()
                raise
            return store
    raise AssertionError("unreachable: retrying re-raises")


async def connect_redis_waiting(
    settings: Settings, attempts: int | None = None, metrics: Metrics | None = None
) -> aioredis.Redis:
    """Connect to Redis and ``PING`` it, waiting (backoff with jitter, up to 10 s) while
    it is unreachable.

    An error no retry can cure ends the wait at once as a one-line :class:`ConfigError`
    naming ``AUDIT_REDIS_URL`` (password masked): authentication failed (``WRONGPASS``,
    ``NOAUTH``), a command refused (``NOPERM``, a database index out of range) or a URL
    that cannot be parsed.
    """
    log = get_logger()
    where = f"Redis at {mask_url(settings.redis_url)} (AUDIT_REDIS_URL)"

    def waiting(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("redis_unreachable_waiting", error=str(exc)[:300],
                    retry_in_s=round(wait, 3))
        if metrics is not None:
            metrics.heartbeat("redis_wait")

    async for attempt in retry.retrying(
        RedisUnavailable, initial_s=0.5, max_s=10.0,
        stop=stop_never if attempts is None else stop_after_attempt(attempts),
        before_sleep=waiting,
    ):
        with attempt:
            return await _connect_redis_once(settings, where)
    raise AssertionError("unreachable: retrying re-raises")


async def _connect_redis_once(settings: Settings, where: str) -> aioredis.Redis:
    """One attempt: :class:`RedisUnavailable` to wait on, :class:`ConfigError` to give up."""
    redis: aioredis.Redis | None = None
    try:
        with anyio.fail_after(REDIS_PING_TIMEOUT_S), translated():
            redis = await connect_settings(settings)
            await redis.ping()
    except TimeoutError:
        await _close(redis)
        raise RedisUnavailable("timeout", f"no answer within {REDIS_PING_TIMEOUT_S:g} s") \
            from None
    except RedisUnavailable as exc:
        await _close(redis)
        if exc.kind == "auth":  # the password or the ACL user is wrong: no wait cures it
            raise ConfigError(f"{where}: authentication failed: {exc.detail}") from None
        raise
    except ConfigError:
        raise
    except RedisFailure as exc:  # refused for good: NOPERM, DB index out of range, …
        await _close(redis)
        raise ConfigError(f"{where}: {exc.detail}") from None
    except ValueError as exc:  # redis-py could not parse the URL
        raise ConfigError(f"AUDIT_REDIS_URL is not a valid Redis URL: {exc}") from None
    return redis


async def _close(redis: aioredis.Redis | None) -> None:
    if redis is not None:
        with anyio.move_on_after(2.0, shield=True):
            await redis.aclose()


async def watch_startup_signals(
    starting: anyio.CancelScope,
    current: Callable[[], Worker | None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Until the worker's own watcher takes the signals over: SIGTERM/SIGINT cancels the
    start-up (``starting``), or stops the worker if it exists already.

    Registered before anything waits, and never removed before the worker registers its
    own handler (which replaces this one), so no signal meets the default action, which
    killed the process (exit -15) while it waited for the store.
    """
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            worker = current()
            if worker is not None:
                worker.stop()
                continue
            get_logger().info("stopped_before_start", signal=signal.Signals(signum).name)
            starting.cancel()


def build_worker(
    settings: Settings, store: Store, redis: aioredis.Redis, metrics: Metrics
) -> Worker:
    """A worker with the fleet-gauge poller and stream hygiene running beside it."""
    side_loops = [fleet_side_loop(redis, settings, metrics)]
    if settings.trim or settings.dlq_bounded:
        side_loops.append(trim_side_loop(redis, settings, metrics))
    return Worker(settings, store, redis, metrics, side_loops=side_loops, handle_signals=True)


async def run_worker(settings: Settings) -> None:
    """The ``audit-fleet run`` process: exits normally after a graceful stop, or after a
    signal while it waits for Redis or the store."""
    metrics = Metrics()
    redis_slot = RedisSlot()
    slot = StoreSlot()
    worker: Worker | None = None
    try:
        async with anyio.create_task_group() as tg:
            starting = anyio.CancelScope()
            await tg.start(watch_startup_signals, starting, lambda: worker)
            server = None
            if settings.metrics_port:
                server = build_health_server(
                    settings, metrics, {"redis": redis_slot.ping, "store": slot.ping},
                    draining=lambda: worker is not None and worker.stopping,
                    required_loops=(),
                )
                await tg.start(server.serve, settings.metrics_host, settings.metrics_port)
            with starting:
                redis_slot.redis = await connect_redis_waiting(settings, metrics=metrics)
                _end_wait(metrics, "redis_wait")
                slot.store = await open_store_waiting(settings, metrics=metrics)
                _end_wait(metrics, "store_wait")
            if redis_slot.redis is None or slot.store is None:  # a signal while waiting: exit 0
                tg.cancel_scope.cancel()
                return
            worker = build_worker(settings, slot.store, redis_slot.redis, metrics)
            if server is not None:
                server.require_loops(("reader",))
            await worker.run()
            tg.cancel_scope.cancel()
    finally:
        # The hard deadline: an unreachable store (or Redis) cannot hold the exit up past
        # AUDIT_SHUTDOWN_GRACE_S + AUDIT_SHUTDOWN_DEADLINE_S.
        with anyio.move_on_after(settings.shutdown_deadline_s, shield=True) as scope:
            if redis_slot.redis is not None:
                await redis_slot.redis.aclose()
            if slot.store is not None:
                await slot.store.close()
        if scope.cancelled_caught:
            get_logger().warning("close_deadline_exceeded",
                                 deadline_s=settings.shutdown_deadline_s)


def _end_wait(metrics: Metrics, loop: str) -> None:
    """A start-up wait is over: its heartbeat no longer counts for ``/healthz``."""
    if loop in metrics.heartbeats():
        metrics.loop_heartbeat.remove(loop)
