"""`audit-fleet demo` end to end: emits, drains with two worker processes, explains a run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_demo_stores_every_run_and_explains_one(private_redis: str, tmp_path: Path) -> None:
    """The demo drains every event (bad ones to the DLQ) and prints a decision chain."""
    env = dict(os.environ, AUDIT_REDIS_URL=private_redis,
               AUDIT_STORE_URL=f"sqlite:///{tmp_path / 'demo.db'}")
    done = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--runs", "40", "--seed", "3"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "worker exit codes [0, 0]" in out
    assert "holds 3 entries" in out  # the three malformed entries, dead-lettered
    assert "Trigger: webhook" in out
    for node in ("source", "classify", "route", "update-crm"):
        assert f". {node}  [" in out
    runs = subprocess.run(
        [sys.executable, "-m", "worker", "runs", "--workspace", "workspace_demo",
         "--limit", "100", "--json"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert runs.returncode == 0, runs.stderr
    assert runs.stdout.count('"runId"') == 40
