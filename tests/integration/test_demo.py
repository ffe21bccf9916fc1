"""`audit-fleet demo` end to end: emits, drains with two worker processes, explains a run;
and it is hermetic: it never touches what AUDIT_* points at."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def demo(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AUDIT_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "worker", "demo", *args], env=full,
                          capture_output=True, text=True, timeout=180, cwd=cwd)


def test_demo_stores_every_run_and_explains_one(tmp_path: Path) -> None:
    """The demo drains every event (bad ones to the DLQ) and prints a decision chain."""
    store = f"sqlite:///{tmp_path / 'demo.db'}"
    done = demo(["--runs", "40", "--seed", "3", "--store-url", store], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "started a private redis-server" in out
    assert "worker exit codes [0, 0]" in out
    assert "holds 3 entries" in out  # the three malformed entries, dead-lettered
    assert "Trigger: webhook" in out
    for node in ("source", "classify", "route", "update-crm"):
        assert f". {node}  [" in out
    # It ends with the URL of a viewer on its own data and a token for it.
    last = out.strip().splitlines()
    assert last[-3].startswith("the run in the viewer: "
                               "http://127.0.0.1:8700/workspaces/workspace_demo/runs/")
    assert last[-1].startswith("aft_")
    assert f"serve --insecure-localhost --bind 127.0.0.1:8700 --store-url '{store}'" in out
    runs = subprocess.run(
        [sys.executable, "-m", "worker", "runs", "--workspace", "workspace_demo",
         "--limit", "100", "--json", "--store-url", store],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert runs.returncode == 0, runs.stderr
    assert runs.stdout.count('"runId"') == 40
    tokens = subprocess.run(
        [sys.executable, "-m", "worker", "tokens", "list", "--json", "--store-url", store],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert '"workspace_demo"' in tokens.stdout
    assert last[-1].split("_")[1] in tokens.stdout


def test_demo_is_hermetic_and_reproducible(redis_url: str, stream: str, tmp_path: Path) -> None:
    """Regression: with AUDIT_STREAM/AUDIT_GROUP pointing at a production stream the demo
    joined that group, ACKed its events and injected demo runs. Now it uses a stream and
    group of its own (even on a shared Redis), ignores AUDIT_STORE_URL, logs to a per-run
    directory, re-running does not grow the dead-letter count, and --seed reproduces the
    stored data exactly."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.xgroup_create(stream, "prod-writers", id="0", mkstream=True)
        client.xadd(stream, {"event": b'{"v": 1}'})
        before = client.xinfo_groups(stream)
        env = {"AUDIT_REDIS_URL": redis_url, "AUDIT_STREAM": stream,
               "AUDIT_GROUP": "prod-writers", "AUDIT_STORE_URL": "sqlite:///./prod.db"}
        store = f"sqlite:///{tmp_path / 'demo.db'}"
        outputs, dumps = [], []
        for _ in range(2):
            done = demo(["--runs", "10", "--seed", "7", "--store-url", store,
                         "--redis-url", redis_url], tmp_path, **env)
            assert done.returncode == 0, done.stdout + done.stderr
            outputs.append(done.stdout)
            runs = subprocess.run(
                [sys.executable, "-m", "worker", "runs", "-w", "workspace_demo", "--json",
                 "--limit", "100", "--store-url", store],
                capture_output=True, text=True, timeout=60, cwd=tmp_path)
            dumps.append(json.loads(runs.stdout)["runs"])
        assert client.xinfo_groups(stream) == before  # the real group: untouched
        assert client.xlen(stream) == 1
        assert not (tmp_path / "prod.db").exists()
        for out in outputs:
            assert f"stream: {stream}" not in out
            assert "holds 3 entries" in out  # not 3, then 6
        streams = [line.split("stream: ")[1].split()[0] for out in outputs
                   for line in out.splitlines() if line.startswith("store: ")]
        assert len(set(streams)) == 2  # a new stream (and group) per run
        logs = [out.split("logs: ")[1].split(")")[0] for out in outputs]
        assert logs[0] != logs[1]
        assert all(Path(log).is_file() for log in logs)
        assert len(dumps[0]) == 10
        assert dumps[0] == dumps[1]  # the same seed: the same runs, byte for byte
        for s in streams:
            client.delete(s, s + ":dlq")
    finally:
        client.delete(stream)
        client.close()


def test_demo_refuses_an_existing_group(redis_url: str, tmp_path: Path) -> None:
    """The demo never joins a group that exists already."""
    import anyio

    from worker.cli.demo import _create_own_group

    async def twice() -> None:
        import redis.asyncio as aioredis

        from worker.errors import AuditFleetError

        client = aioredis.Redis.from_url(redis_url)
        name = f"audit-demo:test-{os.getpid()}:events"
        try:
            await _create_own_group(client, name, "g")
            with pytest.raises(AuditFleetError, match="already exists"):
                await _create_own_group(client, name, "g")
        finally:
            await client.delete(name)
            await client.aclose()

    anyio.run(twice)
