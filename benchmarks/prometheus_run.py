"""The alert rules of deploy/ under a real Prometheus, scraping two real workers.

``python -m benchmarks.prometheus_run`` starts a private ``redis-server``, a ``prometheus``
server with ``deploy/prometheus.yml`` (its intervals; the targets pointed at this machine's
workers) and ``deploy/alerts.yaml``, and ``python -m worker run`` processes on PostgreSQL
(``$AUDIT_TEST_POSTGRES_URL``'s server, a throwaway database). It checks, and prints as JSON:

1. a backlog whose entries were appended 20 minutes ago drains without the stuck alert
   (``AuditFleetOldestPendingTooOld``) ever pending, though the age since append that
   the rule once read is over 15 minutes throughout;
2. one dead letter fires ``AuditFleetDeadLettersGrowing`` (seconds from XADD to firing);
3. a worker started while PostgreSQL is down answers ``/healthz`` at once (seconds from
   spawn), says ``waiting for the store`` on ``/readyz`` and is scraped (``up == 1``).

Needs ``prometheus`` and ``redis-server`` on PATH (Debian: ``apt-get install prometheus
redis-server``). ``RUNS`` (3000 sample runs, about 18 000 events) sizes the backlog and
``BATCH`` (5) the workers' ``AUDIT_BATCH_SIZE`` (small: the drain must outlast a few
scrapes): the defaults take about three minutes;
``RUNS=10000 BATCH=2`` drains for longer than the rules' ``for: 5m`` (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import redis as sync_redis
import yaml

from worker import constants as c
from worker import samples
from worker.events import encode

REPO = Path(__file__).resolve().parent.parent
STREAM = "audit:events"
GROUP = "audit-writers"
PG_URL = os.environ.get("AUDIT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE = "audit_prometheus_run"
#: The stuck rule before it read the time since delivery (issue: it fired on every drain).
OLD_STUCK_RULE = "max by (stream, group) (audit_fleet_group_oldest_pending_age_seconds) > 900"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait(predicate: Any, within_s: float, what: str, every_s: float = 0.5) -> float:
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except (OSError, urllib.error.URLError, sync_redis.RedisError):
            pass
        if time.monotonic() - start > within_s:
            raise TimeoutError(f"{what}: not within {within_s} s")
        time.sleep(every_s)


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        result: list[dict[str, Any]] = json.loads(http(url)[1])["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def alerts(self, name: str) -> list[dict[str, Any]]:
        doc = json.loads(http(f"{self.base}/api/v1/alerts")[1])
        return [a for a in doc["data"]["alerts"] if a["labels"]["alertname"] == name]


def prometheus_config(tmp: Path, targets: list[str]) -> Path:
    """deploy/prometheus.yml with its targets pointed at this machine, beside alerts.yaml."""
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": targets}]
    shutil.copy(REPO / "deploy" / "alerts.yaml", tmp / "alerts.yaml")
    # for comparison: the stuck rule as it was, on the time since append
    (tmp / "before.yaml").write_text(yaml.safe_dump({"groups": [{"name": "before", "rules": [
        {"alert": "StuckOnAppendAge", "expr": OLD_STUCK_RULE, "for": "5m"}]}]}))
    config["rule_files"] = [*config["rule_files"], "before.yaml"]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def spawn_worker(name: str, port: int, redis_url: str, store_url: str, log: Path,
                 **env: str) -> subprocess.Popen[bytes]:
    settings = {
        "AUDIT_REDIS_URL": redis_url, "AUDIT_STREAM": STREAM, "AUDIT_GROUP": GROUP,
        "AUDIT_CONSUMER": name, "AUDIT_STORE_URL": store_url,
        "AUDIT_METRICS_PORT": str(port), "AUDIT_METRICS_HOST": "127.0.0.1",
        "AUDIT_LOG_FORMAT": "json", **env,
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUDIT_")}
    return subprocess.Popen([sys.executable, "-m", "worker", "run"], env={**clean, **settings},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def old_backlog(redis: sync_redis.Redis, runs: int, minutes: int = 20) -> int:
    """Sample runs' events appended with IDs ``minutes`` old (XADD with explicit IDs)."""
    rng = random.Random(15)
    start_ms = int(time.time() * 1000) - minutes * 60_000
    n = 0
    with redis.pipeline(transaction=False) as pipe:
        for i in range(runs):
            run = samples.lead_triage_run(rng, "ws_prom", f"run_{i}",
                                          prompt_size=lambda r: 2000)
            for event in samples.run_events(run):
                pipe.xadd(STREAM, {c.EVENT_FIELD: encode(event)},
                          id=f"{start_ms + n // 50}-{n % 50}")
                n += 1
            if i % 200 == 199:
                pipe.execute()
        pipe.execute()
    return n


async def fresh_database(drop_only: bool = False) -> str:
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        if not drop_only:
            await admin.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await admin.close()
    return PG_URL.rsplit("/", 1)[0] + "/" + DATABASE


def drain(prom: Prometheus, redis: sync_redis.Redis) -> dict[str, Any]:
    """Poll until the backlog is gone from Redis and Prometheus has seen it gone."""
    age = f'max(audit_fleet_group_oldest_pending_age_seconds{{group="{GROUP}"}})'
    idle = f'max(audit_fleet_group_pending_max_idle_seconds{{group="{GROUP}"}})'
    rule = "max by (stream, group) (audit_fleet_group_pending_max_idle_seconds) > 900"
    old_rule = OLD_STUCK_RULE
    seen: dict[str, Any] = {"max_age_since_append_s": 0.0, "max_idle_since_delivery_s": 0.0,
                            "samples": 0, "old_rule_true": 0, "rule_true": 0,
                            "stuck_alert_states": [], "before_alert_states": []}
    start = time.monotonic()
    while True:
        a, i = prom.value(age), prom.value(idle)
        if a is not None and i is not None and a > 0:
            seen["samples"] += 1
            seen["max_age_since_append_s"] = max(seen["max_age_since_append_s"], a)
            seen["max_idle_since_delivery_s"] = max(seen["max_idle_since_delivery_s"], i)
            seen["old_rule_true"] += bool(prom.query(old_rule))
            seen["rule_true"] += bool(prom.query(rule))
        for name, key in (("AuditFleetOldestPendingTooOld", "stuck_alert_states"),
                          ("StuckOnAppendAge", "before_alert_states")):
            states = sorted({a["state"] for a in prom.alerts(name)})
            if states and (not seen[key] or seen[key][-1] != states):
                seen[key].append(states)
        info = redis.xinfo_groups(STREAM)
        if info:
            print(f"drain {time.monotonic() - start:6.0f} s  lag {info[0].get('lag')}  "
                  f"pending {info[0]['pending']}", file=sys.stderr, flush=True)
        done = info and int(info[0]["pending"]) == 0 and int(info[0].get("lag") or 0) == 0
        if done and prom.value(f'max(audit_fleet_group_lag{{group="{GROUP}"}})') == 0:
            break
        if time.monotonic() - start > 1800:
            raise TimeoutError("the backlog did not drain within 30 minutes")
        time.sleep(3)
    if not seen["samples"]:
        raise SystemExit("the backlog drained before Prometheus saw it: raise RUNS")
    seen["drain_s"] = round(time.monotonic() - start, 1)
    return seen


def main() -> None:
    for binary in ("prometheus", "redis-server"):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} is required (Debian: apt-get install {binary})")
    tmp = Path(tempfile.mkdtemp(prefix="audit-prom-"))
    redis_port, prom_port = free_port(), free_port()
    w1, w2, w3 = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    report: dict[str, Any] = {"prometheus": subprocess.run(
        ["prometheus", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]}
    store_url = anyio.run(fresh_database)
    try:
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL))
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        redis = sync_redis.Redis.from_url(redis_url)
        wait(redis.ping, 10, "redis-server")
        report["backlog_events"] = old_backlog(redis, runs=int(os.environ.get("RUNS", "3000")))
        config = prometheus_config(tmp, [f"127.0.0.1:{p}" for p in (w1, w2, w3)])
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=(tmp / "prometheus.log").open("wb"), stderr=subprocess.STDOUT))
        prom = Prometheus(prom_port)
        wait(lambda: http(f"{prom.base}/-/ready")[0] == 200, 30, "prometheus ready")
        started = time.monotonic()
        for name, port in (("w1", w1), ("w2", w2)):
            procs.append(spawn_worker(name, port, redis_url, store_url, tmp / f"{name}.log",
                                      AUDIT_BATCH_SIZE=os.environ.get("BATCH", "5"),
                                      AUDIT_MAX_INFLIGHT="1"))
        wait(lambda: http(f"http://127.0.0.1:{w1}/healthz")[0] == 200, 30,
             "/healthz of a worker whose store is up", every_s=0.05)
        report["store_up_seconds_to_healthz_200"] = round(time.monotonic() - started, 2)

        report["backlog_drain"] = drain(prom, redis)

        redis.xadd(STREAM, {c.EVENT_FIELD: b"{not json"})
        added = time.monotonic()
        wait(lambda: any(a["state"] == "firing"
                         for a in prom.alerts("AuditFleetDeadLettersGrowing")),
             180, "AuditFleetDeadLettersGrowing firing", every_s=1)
        fired = prom.alerts("AuditFleetDeadLettersGrowing")
        report["dead_letter"] = {
            "seconds_from_xadd_to_firing": round(time.monotonic() - added, 1),
            "alerts": [{**a["labels"], "state": a["state"], "value": a["value"]}
                       for a in fired],
        }

        dead_pg = f"postgresql://postgres@127.0.0.1:{free_port()}/{DATABASE}"
        procs.append(spawn_worker("w3", w3, redis_url, dead_pg, tmp / "w3.log"))
        healthz = wait(lambda: http(f"http://127.0.0.1:{w3}/healthz")[0] == 200, 30,
                       "/healthz of the worker whose store is down", every_s=0.05)
        wait(lambda: json.loads(http(f"http://127.0.0.1:{w3}/readyz")[1])["checks"]["redis"]
             == "ok", 30, "the worker whose store is down reaches Redis", every_s=0.1)
        ready = http(f"http://127.0.0.1:{w3}/readyz")
        scraped = wait(lambda: prom.value(f'up{{instance="127.0.0.1:{w3}"}}') == 1, 60,
                       "Prometheus scrapes it", every_s=1)
        report["store_down_at_start"] = {
            "seconds_to_healthz_200": round(healthz, 2),
            "readyz": [ready[0], json.loads(ready[1])["checks"]],
            "seconds_to_up_1_in_prometheus": round(healthz + scraped, 1),
        }
    finally:
        for proc in reversed(procs):
            proc.terminate()
        deadline = time.monotonic() + 40  # a worker drains for up to 25 s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
        anyio.run(partial(fresh_database, drop_only=True))
        report["workdir"] = str(tmp)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
