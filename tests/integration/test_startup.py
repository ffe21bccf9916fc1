"""Start-up of `audit-fleet run` and every command's setup errors: health first, one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import structlog

from tests.helpers import TcpProxy, free_port, spawn_worker, wait_until
from tests.redis_servers import RedisServers
from worker.cli import main

Cli = Callable[..., subprocess.CompletedProcess[str]]

AUDIT = [sys.executable, "-m", "worker"]


@pytest.fixture
def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Cli]:
    """``audit-fleet ARGS`` in this process (fast), in ``cwd``, with only the given
    ``AUDIT_*`` variables; the result looks like a finished subprocess."""

    def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
        for name in [k for k in os.environ if k.startswith("AUDIT_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main(args)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    saved = structlog.get_config()  # `run` points logging at the captured stderr
    yield run
    structlog.configure(**saved)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on stderr and nothing on stdout."""
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "ExceptionGroup" not in done.stderr
    assert lines[0].startswith("audit-fleet: ")
    return lines[0]


@pytest.mark.redis
@pytest.mark.anyio
async def test_health_answers_at_once_while_the_store_is_down(
    tmp_path: Path, redis_url: str, stream: str, pg_url: str
) -> None:
    """Regression: no HTTP server while the store was down at start, so startup probes
    killed the pod. /healthz and /metrics answer within seconds, /readyz says it waits for
    the store; once PostgreSQL is reachable the worker becomes ready."""
    pg = pg_url.split("@", 1)[1].split("/", 1)[0]
    pg_host, pg_port = pg.rsplit(":", 1)
    port = free_port()
    async with TcpProxy(pg_host, int(pg_port)) as proxy:
        await proxy.set_cut(True)
        store_url = pg_url.replace(pg, f"127.0.0.1:{proxy.port}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIT_")}
        env.update(AUDIT_REDIS_URL=redis_url, AUDIT_STREAM=stream, AUDIT_STORE_URL=store_url,
                   AUDIT_METRICS_PORT=str(port), AUDIT_METRICS_HOST="127.0.0.1",
                   AUDIT_LOG_FORMAT="json")
        log = (tmp_path / "worker.log").open("wb")
        # Popen returns at once: the worker runs beside the test's event loop
        proc = subprocess.Popen([*AUDIT, "run"], env=env, stdout=log,  # noqa: ASYNC220
                                stderr=subprocess.STDOUT)
        try:
            started = time.monotonic()
            while True:
                try:
                    status, _ = await anyio.to_thread.run_sync(get, port, "/healthz")
                    break
                except (urllib.error.URLError, ConnectionError):
                    assert proc.poll() is None, (tmp_path / "worker.log").read_text()
                    assert time.monotonic() - started < 15, "no /healthz within 15 s"
                    await anyio.sleep(0.1)
            assert status == 200
            status, body = await anyio.to_thread.run_sync(get, port, "/readyz")
            assert status == 503
            assert json.loads(body)["checks"]["store"] == "waiting for the store"
            status, body = await anyio.to_thread.run_sync(get, port, "/metrics")
            assert status == 200
            assert "audit_fleet_build_info" in body

            await proxy.set_cut(False)
            deadline = time.monotonic() + 30
            while (await anyio.to_thread.run_sync(get, port, "/readyz"))[0] != 200:
                assert proc.poll() is None, (tmp_path / "worker.log").read_text()
                assert time.monotonic() < deadline, "never became ready"
                await anyio.sleep(0.2)
            status, body = await anyio.to_thread.run_sync(get, port, "/healthz")
            assert status == 200
            assert "reader" in json.loads(body)["loops"]
        finally:
            proc.terminate()
            # wait in a thread: the proxy runs on this event loop and carries the close
            await anyio.to_thread.run_sync(lambda: proc.wait(timeout=30))
            log.close()
    assert proc.returncode == 0, (tmp_path / "worker.log").read_text()


@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_while_waiting_for_the_store_exits_0_with_one_line(
    tmp_path: Path, redis_url: str, stream: str, signum: signal.Signals
) -> None:
    """Regression: SIGTERM while the worker still waited for the store at start killed it
    (exit -15). It now exits 0 at once, logging one line, with nothing read."""
    log = tmp_path / "worker.log"
    dead_pg = f"postgresql://audit@127.0.0.1:{free_port()}/test"  # nothing listens there
    proc = spawn_worker("w-start", stream, redis_url, dead_pg, log)
    try:
        await wait_until(lambda: "store_unreachable_waiting" in log.read_text(),
                         what="the worker waits for the store")
        proc.send_signal(signum)
        code = await anyio.to_thread.run_sync(lambda: proc.wait(timeout=20))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 0, text
    stopped = [json.loads(line) for line in text.splitlines() if "stopped_before_start" in line]
    assert [line["signal"] for line in stopped] == [signum.name], text
    assert "Traceback" not in text


def wait_for_http(port: int, path: str, proc: subprocess.Popen[bytes], log: Path,
                  within_s: float = 15.0, status: int | None = None) -> tuple[int, str]:
    """Poll ``path`` until it answers (with ``status`` when given); fail if the worker
    exits meanwhile or nothing comes within ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            got = get(port, path)
            if status is None or got[0] == status:
                return got
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, f"no {path} ({status}) within {within_s} s"
        time.sleep(0.1)


def stop_with_sigterm(proc: subprocess.Popen[bytes], within_s: float = 15.0) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=within_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_run_waits_for_redis_serving_health_then_starts(
    tmp_path: Path, redis_servers: RedisServers, stream: str
) -> None:
    """Regression: `run` ended at once when Redis was unreachable at start. It serves
    /healthz and /metrics from the first second, says "waiting for Redis" on /readyz, and
    starts by itself once a redis-server comes up on the configured port."""
    redis_port, port = free_port(), free_port()
    log = tmp_path / "worker.log"
    proc = spawn_worker("w1", stream, f"redis://127.0.0.1:{redis_port}/0",
                        f"sqlite:///{tmp_path / 'a.db'}", log,
                        AUDIT_METRICS_PORT=str(port), AUDIT_METRICS_HOST="127.0.0.1")
    try:
        status, body = wait_for_http(port, "/healthz", proc, log)
        assert status == 200, body
        status, body = get(port, "/readyz")
        assert status == 503
        assert json.loads(body)["checks"]["redis"] == "waiting for Redis"
        status, body = get(port, "/metrics")
        assert status == 200
        assert "audit_fleet_build_info" in body
        wait_until_logged(log, "redis_unreachable_waiting", proc)
        status, body = get(port, "/healthz")
        assert status == 200
        assert json.loads(body)["loops"]["redis_wait"]["ok"] is True  # alive and waiting

        redis_servers.start(port=redis_port)
        wait_for_http(port, "/readyz", proc, log, within_s=30, status=200)
        status, body = wait_for_http(port, "/healthz", proc, log)
        assert "reader" in json.loads(body)["loops"]
        assert "redis_wait" not in json.loads(body)["loops"]
    finally:
        code = stop_with_sigterm(proc)
    assert code == 0, log.read_text()


def wait_until_logged(log: Path, event: str, proc: subprocess.Popen[bytes],
                      within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while f'"event": "{event}"' not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{event} not logged within {within_s} s"
        time.sleep(0.1)


def test_sigterm_while_waiting_for_redis_exits_0(tmp_path: Path, stream: str) -> None:
    """SIGTERM while the worker waits for Redis ends it at once with exit code 0: nothing
    was read, so nothing needs draining (a rolling update must not count a failure)."""
    port = free_port()
    log = tmp_path / "worker.log"
    proc = spawn_worker("w1", stream, f"redis://127.0.0.1:{free_port()}/0",
                        f"sqlite:///{tmp_path / 'a.db'}", log,
                        AUDIT_METRICS_PORT=str(port), AUDIT_METRICS_HOST="127.0.0.1")
    try:
        wait_for_http(port, "/healthz", proc, log, status=200)
        wait_until_logged(log, "redis_unreachable_waiting", proc)
        started = time.monotonic()
        code = stop_with_sigterm(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()
    assert time.monotonic() - started < 5, "a waiting worker stops at once"
    assert '"event": "stopped_before_start"' in log.read_text()


@pytest.mark.parametrize(("server_args", "url", "expected"), [
    (("--requirepass", "s3cret"), "redis://:wrong-pw@127.0.0.1:{port}/0",
     "authentication failed"),
    (("--requirepass", "s3cret"), "redis://127.0.0.1:{port}/0", "authentication failed"),
    ((), "redis://127.0.0.1:{port}/99", "DB index is out of range"),
    (None, "redis://127.0.0.1:not-a-port/0", "not a valid Redis URL"),
])
def test_permanent_redis_errors_end_the_worker_with_one_line(
    run_cli: Cli, tmp_path: Path, redis_servers: RedisServers, stream: str,
    server_args: tuple[str, ...] | None, url: str, expected: str,
) -> None:
    """Redis refusing for good at start (wrong password, no password, a database index out
    of range) or a URL that cannot be parsed is not waited for: one line naming
    AUDIT_REDIS_URL, password masked, exit code 2."""
    port = 0
    if server_args is not None:
        port = int(redis_servers.start(*server_args).rsplit(":", 1)[1].split("/", 1)[0])
    done = run_cli(["run"], tmp_path, AUDIT_REDIS_URL=url.format(port=port),
                   AUDIT_STREAM=stream, AUDIT_METRICS_PORT="0",
                   AUDIT_STORE_URL=f"sqlite:///{tmp_path / 'a.db'}")
    line = one_line_error(done)
    assert done.returncode == 2
    assert expected in line
    assert "AUDIT_REDIS_URL" in line
    assert "wrong-pw" not in line


@pytest.mark.anyio
async def test_waiting_readiness_and_the_grace_of_required_loops() -> None:
    """Until the store is open its check says "waiting"; required loops count from then."""
    from worker.health import HealthServer
    from worker.metrics import Metrics
    from worker.service import StoreSlot
    from worker.stores.null import NullStore

    slot = StoreSlot()
    server = HealthServer(Metrics(), checks={"store": slot.ping}, startup_grace_s=0.0)
    ok, doc = await server.readiness()
    assert (ok, doc["checks"]) == (False, {"store": "waiting for the store"})
    assert server.liveness()[0] is True
    slot.store = NullStore()
    assert (await server.readiness())[0] is True
    server.require_loops(("reader",))
    assert server.liveness()[0] is False  # grace 0 and the reader has not beaten


@pytest.mark.parametrize(("store_url", "expected"), [
    ("sqlite:///{tmp}/missing/dir/a.db", "directory of the SQLite database"),
    ("postgresql://postgres@127.0.0.1:5432/audit_fleet_no_such_db",
     'database "audit_fleet_no_such_db" does not exist'),
    ("postgresql://no_such_role_x@127.0.0.1:5432/postgres", 'role "no_such_role_x"'),
])
@pytest.mark.redis
def test_permanent_store_errors_end_the_worker_with_one_line(
    run_cli: Cli, tmp_path: Path, redis_url: str, stream: str, store_url: str, expected: str
) -> None:
    """Regression: a store that refuses for good (no such database, role or directory) was
    retried forever or ended in a traceback. One line naming the setting, exit code 2."""
    done = run_cli(["run"], tmp_path, AUDIT_REDIS_URL=redis_url, AUDIT_STREAM=stream,
                   AUDIT_STORE_URL=store_url.format(tmp=tmp_path), AUDIT_METRICS_PORT="0")
    line = one_line_error(done)
    assert done.returncode == 2
    assert expected in line
    assert "AUDIT_STORE_URL" in line
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("command", [
    ["trim"], ["trim", "--dry-run"], ["status"], ["dlq", "list"], ["migrate"],
])
def test_redis_unreachable_is_one_line(run_cli: Cli, tmp_path: Path, command: list[str]) -> None:
    """Regression: `trim` with Redis unreachable printed an ExceptionGroup of ~60 lines.
    Every command says which Redis it could not reach, in one line, exit 1 (`run` waits
    for it instead: test_run_waits_for_redis_serving_health_then_starts)."""
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    done = run_cli(command, tmp_path, AUDIT_REDIS_URL=url, AUDIT_METRICS_PORT="0",
                   AUDIT_STORE_URL=f"sqlite:///{tmp_path / 'a.db'}")
    if command == ["migrate"]:  # needs no Redis
        assert done.returncode == 0, done.stderr
        return
    line = one_line_error(done)
    assert done.returncode == 1
    assert "Redis" in line
    assert "s3cret" not in line


@pytest.mark.parametrize("command", [
    ["runs", "-w", "a"], ["explain", "run_1", "-w", "a"], ["insights", "-w", "a"],
    ["retention", "plan", "-w", "a"],
])
def test_read_only_commands_create_nothing(
    run_cli: Cli, tmp_path: Path, command: list[str]
) -> None:
    """Regression: `runs --store-url sqlite:///./typo-dir/x.db` created the directory and
    the database. A read-only command on a missing SQLite file fails and creates nothing."""
    done = run_cli([*command, "--store-url", "sqlite:///./typo-dir/x.db"], tmp_path)
    line = one_line_error(done)
    assert "no SQLite database at ./typo-dir/x.db" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["archive", "verify"], ["archive", "list"]])
def test_a_missing_or_empty_archive_is_an_error(
    run_cli: Cli, tmp_path: Path, command: list[str]
) -> None:
    """Regression: `archive verify --archive-dir ./typo-dir` said "the archive holds no
    workspace" and exited 0. A missing directory, an empty archive or an absent workspace
    is an error, and nothing is created."""
    done = run_cli([*command, "--archive-dir", "./typo-dir"], tmp_path)
    assert "no archive at ./typo-dir" in one_line_error(done)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    done = run_cli([*command, "--archive-dir", "./empty"], tmp_path)
    assert "holds no workspace" in one_line_error(done)
    done = run_cli([*command, "--archive-dir", "./empty", "-w", "ws1"], tmp_path)
    assert "holds no workspace 'ws1'" in one_line_error(done)
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.redis
def test_status_exits_non_zero_for_a_missing_stream_or_group(
    run_cli: Cli, tmp_path: Path, redis_url: str, stream: str
) -> None:
    """Regression: `status` exited 0 for a stream or group that does not exist."""
    import redis as sync_redis

    env = {"AUDIT_REDIS_URL": redis_url, "AUDIT_STREAM": stream}
    done = run_cli(["status"], tmp_path, **env)
    assert done.returncode == 1
    assert f"stream {stream!r} does not exist" in done.stderr
    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.xadd(stream, {"event": b"{}"}, id="1-0")
        client.xadd(stream, {"event": b"{}"}, id="2-0")
        done = run_cli(["status"], tmp_path, **env)
        assert done.returncode == 1
        assert f"group 'audit-writers' does not exist on stream {stream!r}" in done.stderr
        client.xgroup_create(stream, "audit-writers", id="0")
        done = run_cli(["status"], tmp_path, **env)
        assert (done.returncode, done.stderr) == (0, "")
        # thresholds for cron and CI: lag 2 (both entries undelivered)
        assert run_cli(["status", "--max-lag", "2"], tmp_path, **env).returncode == 0
        done = run_cli(["status", "--max-lag", "1"], tmp_path, **env)
        assert done.returncode == 3
        assert "lag of 'audit-writers'" in done.stderr
        client.xreadgroup("audit-writers", "c1", {stream: ">"}, count=1)
        done = run_cli(["status", "--max-oldest-pending", "60"], tmp_path, **env)
        assert done.returncode == 3  # entry 1-0 was appended in 1970
        assert "oldest pending entry of 'audit-writers'" in done.stderr
        assert run_cli(["status", "--max-oldest-pending", "4e9"], tmp_path,
                       **env).returncode == 0
    finally:
        client.delete(stream)
        client.close()


def test_config_check_and_show(run_cli: Cli, tmp_path: Path) -> None:
    """`config check` fails on an unknown AUDIT_* name (exit 1) and a bad value (exit 2);
    `config show` prints the effective settings with passwords masked."""
    done = run_cli(["config", "check"], tmp_path, AUDIT_BATCHSIZE="5")
    assert done.returncode == 1
    assert done.stderr.strip() == ("audit-fleet: unknown variable AUDIT_BATCHSIZE is ignored "
                                   "(did you mean AUDIT_BATCH_SIZE?)")
    done = run_cli(["config", "check"], tmp_path, AUDIT_BATCH_SIZE="many")
    assert done.returncode == 2
    assert "AUDIT_BATCH_SIZE must be a number" in one_line_error(done)
    assert run_cli(["config", "check"], tmp_path, AUDIT_BATCH_SIZE="50").returncode == 0
    # the store URL's own options are checked too, without connecting or creating anything
    for url, message in [
        ("postgresql://u:s3cret@db.invalid:5432/a?max_size=0", "max_size >= 1"),
        ("postgresql://db.invalid/a?min_size=5&max_size=2", "min_size <= max_size"),
        (f"sqlite:///{tmp_path}/none/a.db?synchronous=off", "synchronous must be one of"),
        (f"sqlite:///{tmp_path}/none/a.db?busy_timeout=-1", "busy_timeout must be >= 0"),
    ]:
        done = run_cli(["config", "check"], tmp_path, AUDIT_STORE_URL=url)
        assert done.returncode == 2, url
        assert message in one_line_error(done)
        assert "s3cret" not in done.stdout + done.stderr
    assert not (tmp_path / "none").exists()
    assert run_cli(["config", "check"], tmp_path,
                   AUDIT_STORE_URL=f"sqlite:///{tmp_path}/none/a.db?synchronous=normal"
                   ).returncode == 0
    done = run_cli(["config", "show", "--json", "--group", "g2"], tmp_path,
                   AUDIT_REDIS_URL="redis://:s3cret@127.0.0.1:6379/0")
    assert done.returncode == 0
    rows = {r["variable"]: r for r in json.loads(done.stdout)["settings"]}
    assert rows["AUDIT_REDIS_URL"] == {"variable": "AUDIT_REDIS_URL", "source": "environment",
                                       "value": "redis://:***@127.0.0.1:6379/0"}
    assert rows["AUDIT_GROUP"]["value"] == "g2"
    assert rows["AUDIT_GROUP"]["source"] == "flag"
    assert rows["AUDIT_BATCH_SIZE"] == {"variable": "AUDIT_BATCH_SIZE", "source": "default",
                                        "value": 500}
    assert "s3cret" not in done.stdout + done.stderr
