"""The HTTP surface: /metrics, /healthz, /readyz, and the health-check exit code."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port
from worker import health
from worker.cli import health as health_cli
from worker.cli.health import check, default_url
from worker.errors import StoreUnavailable
from worker.health import HealthServer, build_health_server
from worker.metrics import Metrics
from worker.settings import Settings
from worker.stores.null import NullStore

pytestmark = pytest.mark.anyio


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes: (status, headers, body)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(raw)
        data = b""
        with anyio.fail_after(5):
            while True:
                try:
                    data += await conn.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split()[1]), headers, body


async def get(port: int, path: str, method: str = "GET", accept: str = "") -> tuple[
    int, dict[str, str], bytes
]:
    extra = f"Accept: {accept}\r\n" if accept else ""
    return await request(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())


Serve = Callable[[HealthServer], Awaitable[int]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start HealthServers on free ports inside the test's task group."""
    async with anyio.create_task_group() as tg:
        async def start(server: HealthServer) -> int:
            port: int = await tg.start(server.serve, "127.0.0.1", 0)
            return port

        yield start
        tg.cancel_scope.cancel()


async def test_metrics_endpoint_serves_the_registry(serve: Serve) -> None:
    """/metrics is the text exposition of the worker's registry, OpenMetrics on request."""
    m = Metrics()
    m.events_written.labels("s").inc(7)
    m.store_write_seconds.labels("null", "ok").observe(0.02)
    port = await serve(HealthServer(m))

    status, headers, body = await get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert int(headers["content-length"]) == len(body)
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert values[("audit_fleet_events_written_total", (("stream", "s"),))] == 7
    assert values[("audit_fleet_store_write_seconds_count",
                   (("outcome", "ok"), ("store", "null")))] == 1

    status, headers, body = await get(port, "/metrics", accept="application/openmetrics-text")
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


async def test_healthz_follows_heartbeats(serve: Serve) -> None:
    """/healthz is 200 while every loop beats recently and 503 once one is stale."""
    m = Metrics()
    m.heartbeat("reader")
    m.heartbeat("reclaim")
    port = await serve(HealthServer(m, max_heartbeat_age_s=30))

    status, _, body = await get(port, "/healthz")
    doc = json.loads(body)
    assert status == 200
    assert doc["status"] == "ok"
    assert set(doc["loops"]) == {"reader", "reclaim"}

    m.loop_heartbeat.labels("reclaim").set(time.time() - 31)
    status, _, body = await get(port, "/healthz")
    doc = json.loads(body)
    assert status == 503
    assert doc["status"] == "stuck"
    assert doc["loops"]["reclaim"]["ok"] is False
    assert doc["loops"]["reader"]["ok"] is True


async def test_required_loop_missing_after_grace(serve: Serve) -> None:
    """A required loop that never beat is fine during the startup grace, not after."""
    m = Metrics()
    in_grace = await serve(HealthServer(m, required_loops=("reader",), startup_grace_s=60))
    no_grace = await serve(HealthServer(m, required_loops=("reader",), startup_grace_s=0))
    assert (await get(in_grace, "/healthz"))[0] == 200
    assert (await get(no_grace, "/healthz"))[0] == 503
    m.heartbeat("reader")
    assert (await get(no_grace, "/healthz"))[0] == 200


@pytest.mark.redis
async def test_readyz_checks_redis_and_store(
    serve: Any, redis_client: aioredis.Redis
) -> None:
    """/readyz is 200 when every check passes, 503 naming a failing or slow check."""
    store = NullStore()
    port = await serve(HealthServer(Metrics(), checks={"redis": redis_client.ping,
                                                        "store": store.ping}))
    status, _, body = await get(port, "/readyz")
    assert status == 200
    assert json.loads(body) == {"status": "ok", "checks": {"redis": "ok", "store": "ok"}}

    async def down() -> None:
        raise StoreUnavailable("connection refused to postgresql://user:secret@db")

    async def slow() -> None:
        await anyio.sleep(10)

    port = await serve(HealthServer(Metrics(), checks={"redis": redis_client.ping,
                                                        "store": down, "other": slow},
                                    check_timeout_s=0.2))
    status, _, body = await get(port, "/readyz")
    assert status == 503
    assert json.loads(body)["checks"] == {
        "other": "timeout", "redis": "ok", "store": "error: StoreUnavailable"}
    assert b"secret" not in body


async def test_readyz_fails_while_draining(serve: Serve) -> None:
    """A draining worker is not ready, whether told directly or through a callable."""
    stopping = False
    server = HealthServer(Metrics(), checks={"store": NullStore().ping},
                          draining=lambda: stopping)
    port = await serve(server)
    assert (await get(port, "/readyz"))[0] == 200
    stopping = True
    status, _, body = await get(port, "/readyz")
    assert (status, json.loads(body)["status"]) == (503, "draining")

    other = HealthServer(Metrics())
    other_port = await serve(other)
    other.set_draining()
    assert (await get(other_port, "/readyz"))[0] == 503
    assert (await get(other_port, "/healthz"))[0] == 200, "draining is not dead"


async def test_http_edge_cases(serve: Serve) -> None:
    """Unknown paths 404, other methods 405, HEAD has no body, garbage gets 400 or a close."""
    port = await serve(HealthServer(Metrics(), request_timeout_s=1))
    assert (await get(port, "/nope"))[0] == 404
    assert (await get(port, "/healthz?verbose=1"))[0] == 200
    assert (await get(port, "/metrics", method="POST"))[0] == 405
    status, headers, body = await get(port, "/healthz", method="HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 0
    assert (await request(port, b"nonsense\r\n\r\n"))[0] == 400
    # An over-long request line is refused with 400 (aiohttp's limit is 8190 bytes).
    assert (await request(port, b"GET /" + b"x" * 20_000))[0] == 400
    assert (await get(port, "/"))[0] == 200, "the server survives bad requests"


async def test_check_exit_codes(serve: Serve) -> None:
    """check() is 0 for a healthy worker, 1 when unhealthy, unready or unreachable."""
    m = Metrics()
    m.heartbeat("reader")
    failing: dict[str, bool] = {"down": False}

    async def store_ping() -> None:
        if failing["down"]:
            raise StoreUnavailable("down")

    port = await serve(HealthServer(m, checks={"store": store_ping}))
    url = f"http://127.0.0.1:{port}"

    code, message = await anyio.to_thread.run_sync(lambda: check(url, ready=True))
    assert code == 0
    assert "/healthz 200" in message
    assert "/readyz 200" in message
    failing["down"] = True
    assert (await anyio.to_thread.run_sync(lambda: check(url)))[0] == 0
    code, message = await anyio.to_thread.run_sync(lambda: check(url, ready=True))
    assert code == 1
    assert "/readyz 503" in message
    m.loop_heartbeat.labels("reader").set(0)
    assert (await anyio.to_thread.run_sync(lambda: check(url)))[0] == 1
    code, message = await anyio.to_thread.run_sync(
        lambda: check(f"http://127.0.0.1:{free_port()}", timeout_s=1)
    )
    assert code == 1
    assert "unreachable" in message


async def test_health_command_waits_until_healthy(
    serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`audit-fleet health --wait` retries until the worker becomes healthy."""
    m = Metrics()
    m.loop_heartbeat.labels("reader").set(0)
    port = await serve(HealthServer(m))
    parser = argparse.ArgumentParser()
    health_cli.register(parser.add_subparsers())

    args = parser.parse_args(["health", "--url", f"http://127.0.0.1:{port}", "--check"])
    assert await args.func(args) == 1
    assert capsys.readouterr().err == ""

    async def recover() -> None:
        await anyio.sleep(0.4)
        m.heartbeat("reader")

    args = parser.parse_args(["health", "--url", f"http://127.0.0.1:{port}", "--wait", "5"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(recover)
        assert await args.func(args) == 0
    assert "/healthz 200" in capsys.readouterr().out


async def test_health_command_uses_the_metrics_port(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --url the command asks 127.0.0.1 on AUDIT_METRICS_PORT; port 0 is an error."""
    from worker.errors import ConfigError

    m = Metrics()
    m.heartbeat("reader")
    server = HealthServer(m)
    port = await serve(server)
    parser = argparse.ArgumentParser()
    health_cli.register(parser.add_subparsers())
    args = parser.parse_args(["health", "-q"])
    monkeypatch.setenv("AUDIT_METRICS_PORT", str(port))
    assert await args.func(args) == 0
    monkeypatch.setenv("AUDIT_METRICS_PORT", "0")
    with pytest.raises(ConfigError, match="AUDIT_METRICS_PORT is 0"):
        await args.func(args)


def test_defaults_follow_settings() -> None:
    """The stale-heartbeat limit is 3 x the longest loop interval, at least 60 s."""
    s = Settings(store_url="null://")
    assert health.default_max_heartbeat_age_s(s) == 90.0
    assert health.default_max_heartbeat_age_s(s.with_(trim_interval_s=5)) == 60.0
    server = build_health_server(s, Metrics(), {})
    assert server.max_heartbeat_age_s == 90.0
    assert server.required_loops == ("reader",)
    assert default_url(s) == "http://127.0.0.1:9464"
    assert default_url(s.with_(metrics_host="::1", metrics_port=9500)) == "http://[::1]:9500"
    assert default_url(s.with_(metrics_host="10.0.0.5")) == "http://10.0.0.5:9464"
