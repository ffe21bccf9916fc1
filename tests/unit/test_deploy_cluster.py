"""The Redis Cluster and Sentinel deployment variants agree with what the worker reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from worker.metrics import Metrics, exported_names
from worker.redisclient import mode_of, parse_sentinel_url
from worker.redisio import check_slots
from worker.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
VARIANTS = DEPLOY / "kubernetes" / "variants"


def one(path: Path) -> Any:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return doc


def cluster_settings() -> Settings:
    env = dict(one(VARIANTS / "configmap-cluster.yaml")["data"])
    env["AUDIT_REDIS_URL"] = "redis://redis-cluster-0.redis-cluster:6379/0"
    return Settings.from_env(env)


def test_cluster_configmap_names_hash_tagged_shards_the_slot_check_accepts() -> None:
    """AUDIT_STREAM expands to four hash-tagged shards whose dead-letter keys share slots."""
    s = cluster_settings()
    assert s.redis_mode == "cluster"
    assert s.streams == tuple(f"audit:events:{{{i}}}" for i in range(4))
    check_slots(s.streams)


def test_cluster_keda_scales_on_the_summed_lag_and_holds_while_the_store_fails() -> None:
    """A Prometheus trigger sums an exported lag gauge over the group's shards; a second,
    `hold`, takes over while store writes fail; no trigger reads a single shard (it would
    be another "largest" and scale out during a store outage)."""
    s = cluster_settings()
    scaled = one(VARIANTS / "keda-scaledobject-cluster.yaml")
    assert scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "audit-fleet"
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 2}
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"total", "hold"}
    assert {t["type"] for t in triggers.values()} == {"prometheus"}
    total = triggers["total"]["metadata"]["query"]
    names = set(re.findall(r"\baudit_fleet_[a-z0-9_]+", total))
    assert names == {"audit_fleet_group_lag"}
    assert names <= exported_names(Metrics())
    assert total.startswith("sum(")
    assert f'group="{s.group}"' in total
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    assert modifiers["formula"] == "hold > 0 ? hold : total"
    assert modifiers["target"] == triggers["total"]["metadata"]["threshold"]


def test_sentinel_secret_is_a_url_the_worker_accepts() -> None:
    """The example Sentinel URL parses: three Sentinels, a master name, database 0."""
    secret = one(VARIANTS / "secret-sentinel.example.yaml")
    url = secret["stringData"]["AUDIT_REDIS_URL"]
    assert mode_of(url, "auto") == "sentinel"
    target = parse_sentinel_url(url)
    assert len(target.hosts) == 3
    assert (target.master, target.db) == ("audit", 0)
    assert Settings.from_env(dict(secret["stringData"])).redis_url == url


def test_compose_cluster_profile_creates_a_cluster_and_points_workers_at_it() -> None:
    """Six cluster nodes, a one-shot create, and workers on hash-tagged shards."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    nodes = [n for n, svc in services.items() if "--cluster-enabled" in svc.get("command", [])]
    assert len(nodes) == 6
    init = services["redis-cluster-init"]
    assert "--cluster-replicas 1" in " ".join(init["command"])
    workers = [svc for svc in services.values() if svc.get("profiles") == ["cluster"]
               and svc.get("environment", {}).get("AUDIT_REDIS_MODE") == "cluster"]
    assert len(workers) == 2
    for svc in workers:
        assert svc["depends_on"]["redis-cluster-init"]["condition"] == (
            "service_completed_successfully")
        env = {k: str(v) for k, v in svc["environment"].items()}
        settings = Settings.from_env(env)
        check_slots(settings.streams)
        assert len(settings.streams) == 4
    for name in ("worker-1", "worker-2", "redis"):
        assert "profiles" not in services[name], "the default profile is unchanged"
