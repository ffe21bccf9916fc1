"""Assemble a worker process: store, Redis, metrics, health and the side loops.

Start-up order (``audit-fleet run``):

1. Redis must answer (one ``PING`` under a timeout): a worker that cannot reach it ends
   with one line naming ``AUDIT_REDIS_URL``, and its supervisor restarts it.
2. ``/metrics``, ``/healthz`` and ``/readyz`` are served from here on, so a startup probe or
   a scrape gets an answer from the first second, whatever the store does.
3. The store is opened, waiting with backoff while it is unreachable: ``/healthz`` stays 200
   (the process is alive and its ``store_wait`` loop beats), ``/readyz`` is 503 with
   ``"store": "waiting for the store"``. An error no retry can cure (authentication failed,
   the database does not exist, a bad path) ends the process with one line and a non-zero
   exit instead.
4. The worker runs; ``/healthz`` requires its reader loop from then on.

SIGTERM or SIGINT before the worker runs (while it waits for the store) ends the process
at once with exit code 0 and one log line (``stopped_before_start``): nothing is read yet,
so there is nothing to drain. From then on the worker's own watcher drains (see
:class:`~worker.consumer.Worker`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from redis.exceptions import RedisError
from tenacity import RetryCallState, stop_after_attempt, stop_never

from . import retry
from .consumer import Worker
from .errors import AuditFleetError, NotReady, RedisFailure, StoreUnavailable
from .fleet import fleet_side_loop
from .health import build_health_server
from .logs import get_logger
from .metrics import Metrics
from .redisclient import connect_settings
from .settings import Settings, mask_url
from .stores import Store, open_store
from .trim import trim_side_loop

#: How long the start-up ``PING`` to Redis may take.
REDIS_PING_TIMEOUT_S = 5.0

#: What ``/readyz`` says for the store while the worker waits for it.
WAITING_FOR_STORE = "waiting for the store"


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
    """Open the store, waiting (backoff with jitter, up to 10 s) while it is unreachable.

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
            store = open_store(settings.store_url)
            await store.open()
            return store
    raise AssertionError("unreachable: retrying re-raises")


async def check_redis(redis: aioredis.Redis, settings: Settings) -> None:
    """One ``PING``; a failure becomes a one-line error naming the URL and its setting."""
    try:
        with anyio.fail_after(REDIS_PING_TIMEOUT_S):
            await redis.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        raise AuditFleetError(
            f"cannot reach Redis at {mask_url(settings.redis_url)} (AUDIT_REDIS_URL): "
            f"{detail}"
        ) from None


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
    if settings.trim:
        side_loops.append(trim_side_loop(redis, settings, metrics))
    return Worker(settings, store, redis, metrics, side_loops=side_loops, handle_signals=True)


async def run_worker(settings: Settings) -> None:
    """The ``audit-fleet run`` process: exits normally after a graceful stop."""
    try:
        redis = await connect_settings(settings)
    except RedisFailure as exc:
        raise AuditFleetError(
            f"cannot reach Redis at {mask_url(settings.redis_url)} (AUDIT_REDIS_URL): "
            f"{exc.detail}"
        ) from None
    metrics = Metrics()
    slot = StoreSlot()
    worker: Worker | None = None
    try:
        await check_redis(redis, settings)
        async with anyio.create_task_group() as tg:
            starting = anyio.CancelScope()
            await tg.start(watch_startup_signals, starting, lambda: worker)
            server = None
            if settings.metrics_port:
                server = build_health_server(
                    settings, metrics, {"redis": redis.ping, "store": slot.ping},
                    draining=lambda: worker is not None and worker.stopping,
                    required_loops=(),
                )
                await tg.start(server.serve, settings.metrics_host, settings.metrics_port)
            with starting:
                slot.store = await open_store_waiting(settings, metrics=metrics)
            if slot.store is None:  # a signal before the store opened: exit 0
                tg.cancel_scope.cancel()
                return
            if "store_wait" in metrics.heartbeats():
                metrics.loop_heartbeat.remove("store_wait")
            worker = build_worker(settings, slot.store, redis, metrics)
            if server is not None:
                server.require_loops(("reader",))
            await worker.run()
            tg.cancel_scope.cancel()
    finally:
        # The hard deadline: an unreachable store (or Redis) cannot hold the exit up past
        # AUDIT_SHUTDOWN_GRACE_S + AUDIT_SHUTDOWN_DEADLINE_S.
        with anyio.move_on_after(settings.shutdown_deadline_s, shield=True) as scope:
            await redis.aclose()
            if slot.store is not None:
                await slot.store.close()
        if scope.cancelled_caught:
            get_logger().warning("close_deadline_exceeded",
                                 deadline_s=settings.shutdown_deadline_s)
