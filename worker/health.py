"""The worker's HTTP surface: ``/metrics``, ``/healthz`` and ``/readyz``; and the health check.

* ``/metrics``: the Prometheus exposition of the worker's registry (OpenMetrics when the
  scraper asks for it).
* ``/healthz`` (liveness): the process answers and none of its loops is stuck: every
  loop's heartbeat (``audit_fleet_loop_heartbeat_timestamp_seconds``) is younger than
  ``max_heartbeat_age_s``, and every required loop has beaten once the startup grace is
  over. A stuck process is restarted by its supervisor.
* ``/readyz`` (readiness): Redis and the store answer (async checks, each under a timeout),
  and the worker is not draining.

The server is a small HTTP/1.1 responder on anyio, so it runs in the worker's own task
group and its readiness checks use the worker's own clients. ``audit-fleet health``
(:func:`check`) turns an endpoint into an exit code for systemd, Procfile platforms and
Docker ``HEALTHCHECK``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from prometheus_client.exposition import choose_encoder

from .errors import NotReady
from .logs import get_logger

if TYPE_CHECKING:
    from .metrics import Metrics
    from .settings import Settings

#: An async readiness check: raises (or times out) when its dependency is unreachable.
Check = Callable[[], Awaitable[object]]

_MAX_HEAD = 16 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


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

    async def serve(
        self,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen until cancelled. ``await tg.start(server.serve, host, port)`` gives the port."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        async with listener:
            self.port = int(listener.extra(SocketAttribute.local_port))
            self.log.info("http_listening", host=host, port=self.port)
            task_status.started(self.port)
            await listener.serve(self._handle)

    async def _handle(self, client: SocketStream) -> None:
        async with client:
            try:
                with anyio.move_on_after(self.request_timeout_s):
                    head = await _read_head(client)
                    if head is None:
                        return
                    status, ctype, body, is_head = await self._respond(head)
                    await client.send(_response(status, ctype, body, is_head))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError,
                    anyio.EndOfStream, ConnectionError):
                return
            except Exception:
                self.log.exception("http_handler_failed")

    async def _respond(self, head: bytes) -> tuple[int, str, bytes, bool]:
        try:
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _version = request_line.split(" ", 2)
        except ValueError:
            return 400, "text/plain", b"bad request\n", False
        headers = {}
        for line in header_lines:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        is_head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n", False
        path = target.split("?", 1)[0]
        if path == "/metrics":
            encoder, ctype = choose_encoder(headers.get("accept", ""))
            return 200, ctype, encoder(self.metrics.registry), is_head
        if path in ("/healthz", "/livez"):
            ok, doc = self.liveness()
            return (200 if ok else 503), "application/json", _json(doc), is_head
        if path == "/readyz":
            ok, doc = await self.readiness()
            return (200 if ok else 503), "application/json", _json(doc), is_head
        if path == "/":
            return 200, "text/plain", b"audit-fleet worker: /metrics /healthz /readyz\n", is_head
        return 404, "text/plain", b"not found\n", is_head


async def _read_head(client: SocketStream) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > _MAX_HEAD:
            return None
        try:
            chunk = await client.receive(4096)
        except anyio.EndOfStream:
            return None
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


def _json(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


def _response(status: int, ctype: str, body: bytes, is_head: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return head if is_head else head + body


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


