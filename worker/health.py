"""The worker's HTTP surface: ``/metrics``, ``/healthz`` and ``/readyz``.

* ``/metrics``: the Prometheus exposition of the worker's registry (OpenMetrics when the
  scraper asks for it).
* ``/healthz`` (liveness): the process answers and none of its loops is stuck: every
  loop's heartbeat (``audit_fleet_loop_heartbeat_timestamp_seconds``) is younger than
  ``max_heartbeat_age_s``, and every required loop has beaten once the startup grace is
  over. A stuck process is restarted by its supervisor.
* ``/readyz`` (readiness): Redis and the store answer (async checks, each under a timeout),
  and the worker is not draining.

The server is aiohttp (``web.AppRunner`` + ``web.TCPSite``) on the worker's own event loop,
in the worker's own task group, and its readiness checks use the worker's own clients.
``audit-fleet health`` (``worker/cli/health.py``) turns an endpoint into an exit code for
systemd, Procfile platforms and Docker ``HEALTHCHECK``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from aiohttp import web
from aiohttp.typedefs import Handler
from anyio.abc import TaskStatus
from prometheus_client.exposition import choose_encoder

from .errors import NotReady
from .logs import get_logger

if TYPE_CHECKING:
    from .metrics import Metrics
    from .settings import Settings

#: An async readiness check: raises (or times out) when its dependency is unreachable.
Check = Callable[[], Awaitable[object]]



def default_max_heartbeat_age_s(settings: Settings) -> float:
    """Three times the longest loop interval, and at least a minute."""
    longest = max(settings.block_ms / 1000, settings.reclaim_interval_s,
                  settings.trim_interval_s, settings.fleet_poll_interval_s)
    return max(60.0, 3 * longest)


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` for one worker."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        checks: Mapping[str, Check] | None = None,
        max_heartbeat_age_s: float = 60.0,
        required_loops: Sequence[str] = (),
        startup_grace_s: float = 60.0,
        check_timeout_s: float = 2.0,
        draining: Callable[[], bool] | None = None,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.metrics = metrics
        self.checks = dict(checks or {})
        self.max_heartbeat_age_s = max_heartbeat_age_s
        self.required_loops = tuple(required_loops)
        self.startup_grace_s = startup_grace_s
        self.check_timeout_s = check_timeout_s
        self.request_timeout_s = request_timeout_s
        self._draining = draining
        self._drain_flag = False
        self._started = time.monotonic()
        self.port: int | None = None
        self.log = get_logger(component="health")

    def add_check(self, name: str, check: Check) -> None:
        """Add a readiness check: the server can start before, say, the store is open."""
        self.checks[name] = check

    # -- the verdicts -------------------------------------------------------------------

    def require_loops(self, loops: Sequence[str]) -> None:
        """From now on these loops must beat (after a fresh start-up grace): the worker runs."""
        self.required_loops = tuple(loops)
        self._started = time.monotonic()

    def set_draining(self) -> None:
        """From now on ``/readyz`` answers 503 (the worker is shutting down)."""
        self._drain_flag = True

    @property
    def draining(self) -> bool:
        return self._drain_flag or bool(self._draining and self._draining())

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Is every loop's heartbeat fresh (and every required loop present after the grace)?"""
        now = time.time()
        loops: dict[str, Any] = {}
        ok = True
        beats = self.metrics.heartbeats()
        for name, last in sorted(beats.items()):
            age = max(0.0, now - last)
            fresh = age <= self.max_heartbeat_age_s
            ok = ok and fresh
            loops[name] = {"age_s": round(age, 3), "ok": fresh}
        in_grace = time.monotonic() - self._started < self.startup_grace_s
        for name in self.required_loops:
            if name not in beats:
                loops[name] = {"age_s": None, "ok": in_grace}
                ok = ok and in_grace
        return ok, {"status": "ok" if ok else "stuck", "max_age_s": self.max_heartbeat_age_s,
                    "loops": loops}

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Do Redis and the store answer, each within ``check_timeout_s``?"""
        if self.draining:
            return False, {"status": "draining", "checks": {}}
        results: dict[str, str] = {}

        async def run(name: str, check: Check) -> None:
            try:
                with anyio.fail_after(self.check_timeout_s):
                    await check()
            except TimeoutError:
                results[name] = "timeout"
            except NotReady as exc:
                results[name] = str(exc)
            except Exception as exc:
                results[name] = f"error: {type(exc).__name__}"
                self.log.warning("readiness_check_failed", check=name,
                                 error=f"{type(exc).__name__}: {exc}"[:300])
            else:
                results[name] = "ok"

        async with anyio.create_task_group() as tg:
            for name, check in self.checks.items():
                tg.start_soon(run, name, check)
        ok = all(v == "ok" for v in results.values())
        doc = {"status": "ok" if ok else "unavailable", "checks": dict(sorted(results.items()))}
        return ok, doc

    # -- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application: the three endpoints and ``/``; every response closes
        its connection and is never cached."""
        app = web.Application(middlewares=[_no_store])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/livez", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/", self._index)
        return app

    async def serve(
        self,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen until cancelled. ``await tg.start(server.serve, host, port)`` gives the port.

        aiohttp's ``AppRunner`` + ``TCPSite`` on the running event loop: the server shares
        the worker's loop and its readiness checks use the worker's own clients."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                               keepalive_timeout=self.request_timeout_s)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host or None, port)
            await site.start()
            self.port = int(runner.addresses[0][1])
            self.log.info("http_listening", host=host, port=self.port)
            task_status.started(self.port)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, ctype = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.metrics.registry), headers={"Content-Type": ctype})

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, doc = self.liveness()
        return _json(200 if ok else 503, doc)

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, doc = await self.readiness()
        return _json(200 if ok else 503, doc)

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text="audit-fleet worker: /metrics /healthz /readyz\n")


@web.middleware
async def _no_store(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # 404, 405: plain text, same headers
        response = web.Response(status=exc.status, text=f"{exc.reason.lower()}\n")
    response.headers["Cache-Control"] = "no-store"
    response.force_close()
    return response


def _json(status: int, doc: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=(json.dumps(doc, sort_keys=True) + "\n").encode(),
                        content_type="application/json")


def build_health_server(
    settings: Settings,
    metrics: Metrics,
    checks: Mapping[str, Check],
    *,
    draining: Callable[[], bool] | None = None,
    required_loops: Sequence[str] = ("reader",),
) -> HealthServer:
    """A :class:`HealthServer` with the defaults a worker built from ``settings`` needs."""
    max_age = default_max_heartbeat_age_s(settings)
    return HealthServer(
        metrics,
        checks=checks,
        max_heartbeat_age_s=max_age,
        required_loops=required_loops,
        startup_grace_s=max_age,
        draining=draining,
    )


# -- audit-fleet health: an exit code for supervisors ------------------------------------------


