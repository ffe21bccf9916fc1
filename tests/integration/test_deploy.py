"""deploy/: every file parses, Kubernetes objects are complete and consistent, every metric
an alert or the dashboard names is exported, and the systemd units verify."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from tests.helpers import ROOT
from worker import constants as c
from worker import settings as settings_module
from worker.metrics import Metrics, exported_names
from worker.settings import Settings

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
METRIC = re.compile(r"\baudit_fleet_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(audit_fleet_[a-z0-9_]+)\{([^}]*)\}")
#: Labels Prometheus adds to every scraped series, and the histogram bucket label.
TARGET_LABELS = {"instance", "job", "pod", "namespace", "container", "service", "le"}


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_all(path):
            if doc.get("kind") == "Kustomization":
                continue
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def setting_env_names() -> set[str]:
    """Every environment variable worker/settings.py reads."""
    return {settings_module._ENV_NAMES.get(f.name, "AUDIT_" + f.name.upper())
            for f in fields(Settings)}


def metric_labels() -> dict[str, set[str]]:
    """Exposition name → label names, for every metric the worker exports."""
    m = Metrics()
    by_family: dict[str, tuple[str, ...]] = {}
    for value in vars(m).values():
        if isinstance(value, MetricWrapperBase):
            by_family[value._name] = tuple(value._labelnames)
    for family in m.fleet.describe():
        by_family[family.name] = tuple(getattr(family, "_labelnames", ()))
    out: dict[str, set[str]] = {}
    for family in m.families():
        labels = set(by_family.get(family.name, ()))
        for name in exported_names_of(family):
            out[name] = labels
    return out


def exported_names_of(family: Any) -> set[str]:
    from worker.metrics import exposition_names

    return exposition_names([family])


# -- every file parses ----------------------------------------------------------------------


def test_every_yaml_and_json_file_parses() -> None:
    """Every YAML (multi-document) and JSON file under deploy/ parses."""
    yaml_files = [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    json_files = list(DEPLOY.rglob("*.json"))
    assert len(yaml_files) >= 12
    assert json_files
    for path in yaml_files:
        assert load_all(path), f"{path} is empty"
    for path in json_files:
        json.loads(path.read_text())


# -- Kubernetes -----------------------------------------------------------------------------

REQUIRED_SPEC = {
    "Deployment": ("selector", "template"),
    "Service": ("ports", "selector"),
    "PodDisruptionBudget": ("selector",),
    "ServiceMonitor": ("selector", "endpoints"),
    "PodMonitor": ("selector", "podMetricsEndpoints"),
    "ScaledObject": ("scaleTargetRef", "triggers"),
    "TriggerAuthentication": ("secretTargetRef",),
    "HorizontalPodAutoscaler": ("scaleTargetRef", "minReplicas", "maxReplicas", "metrics"),
    "CronJob": ("schedule", "jobTemplate"),
}


def test_kubernetes_objects_have_required_fields() -> None:
    """apiVersion, kind, metadata.name, and the spec (or data) each kind needs."""
    objects = k8s_objects()
    kinds = {kind for kind, _ in objects}
    assert kinds >= {"ConfigMap", "Secret", "Deployment", "PodDisruptionBudget", "Service",
                     "ServiceMonitor", "PodMonitor", "ScaledObject", "TriggerAuthentication",
                     "HorizontalPodAutoscaler"}
    for (kind, name), doc in objects.items():
        assert doc["apiVersion"], (kind, name)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        if kind in ("ConfigMap", "Secret"):
            values = doc["data"] if kind == "ConfigMap" else doc["stringData"]
            assert values, name
            assert all(isinstance(v, str) and v for v in values.values()), name
            continue
        spec = doc["spec"]
        for key in REQUIRED_SPEC[kind]:
            assert key in spec, f"{kind}/{name} needs spec.{key}"
    pdb = objects[("PodDisruptionBudget", "audit-fleet")]["spec"]
    assert pdb["maxUnavailable"] == 1  # one worker at a time may be evicted
    assert "minAvailable" not in pdb
    containers = objects[("Deployment", "audit-fleet")]["spec"]["template"]["spec"]["containers"]
    assert all(x.get("name") and x.get("image") for x in containers)


def test_kustomization_lists_existing_files() -> None:
    """kustomization.yaml names only files that exist, and not both autoscalers."""
    (kustomization,) = load_all(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    assert all((K8S / r).is_file() for r in resources)
    assert not {"keda-scaledobject.yaml", "hpa.yaml"} <= set(resources)


def test_selectors_and_references_match_the_deployment() -> None:
    """Services, monitors, the PDB and autoscalers select the Deployment's pods and names."""
    objects = k8s_objects()
    deployment = objects[("Deployment", "audit-fleet")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    match = deployment["spec"]["selector"]["matchLabels"]
    assert match.items() <= pod_labels.items()
    for kind in ("PodDisruptionBudget", "ServiceMonitor", "PodMonitor"):
        (doc,) = [d for (k, _), d in objects.items() if k == kind]
        assert doc["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), kind
    service = objects[("Service", "audit-fleet-metrics")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(port_names)
    monitor = objects[("ServiceMonitor", "audit-fleet")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]}
    pod_monitor = objects[("PodMonitor", "audit-fleet")]
    assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= set(port_names)
    scaled = objects[("ScaledObject", "audit-fleet")]["spec"]["scaleTargetRef"]
    assert scaled["name"] == "audit-fleet"
    hpa_target = objects[("HorizontalPodAutoscaler", "audit-fleet")]["spec"]["scaleTargetRef"]
    assert (hpa_target["kind"], hpa_target["name"]) == ("Deployment", "audit-fleet")
    env_from = container["envFrom"]
    assert {"configMapRef": {"name": "audit-fleet"}} in env_from
    assert {"secretRef": {"name": "audit-fleet"}} in env_from
    assert ("ConfigMap", "audit-fleet") in objects
    assert ("Secret", "audit-fleet") in objects


def _k8s_env() -> dict[str, str]:
    objects = k8s_objects()
    env = dict(objects[("ConfigMap", "audit-fleet")]["data"])
    env.update(objects[("Secret", "audit-fleet")]["stringData"])
    return env


def test_deploy_files_use_only_settings_the_worker_reads() -> None:
    """ConfigMap, Secret, env, systemd and env-file variables all exist in Settings."""
    known = setting_env_names()
    objects = k8s_objects()
    (container,) = objects[("Deployment", "audit-fleet")]["spec"]["template"]["spec"][
        "containers"]
    used = set(_k8s_env()) | {e["name"] for e in container.get("env", [])}
    unit = (SYSTEMD / "audit-fleet@.service").read_text()
    used |= set(re.findall(r"^Environment=(\w+)=", unit, re.M))
    example = (SYSTEMD / "audit-fleet.env.example").read_text()
    used |= set(re.findall(r"^(\w+)=", example, re.M))
    assert used - known == set()
    assert {"AUDIT_REDIS_URL", "AUDIT_STORE_URL", "AUDIT_STREAM", "AUDIT_GROUP"} <= used


def test_kubernetes_configuration_builds_valid_settings() -> None:
    """The ConfigMap plus the example Secret is a configuration the worker accepts."""
    s = Settings.from_env(_k8s_env())
    assert s.streams == (c.DEFAULT_STREAM,)
    assert s.metrics_port == c.DEFAULT_METRICS_PORT
    assert s.shutdown_grace_s == c.DEFAULT_SHUTDOWN_GRACE_S
    assert s.store_scheme == "postgresql"


def test_probes_port_and_grace_period_match_the_worker() -> None:
    """Probes hit /healthz and /readyz on the metrics port; the pod outlives the drain."""
    deployment = k8s_objects()[("Deployment", "audit-fleet")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = Settings.from_env(_k8s_env())
    (port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == settings.metrics_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    grace = pod["terminationGracePeriodSeconds"]
    assert settings.shutdown_grace_s + 10 <= grace <= settings.shutdown_grace_s + 30
    assert settings.shutdown_grace_s + settings.shutdown_deadline_s < grace  # exit before KILL
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert container["command"] + container["args"] == ["audit-fleet", "run"]


def test_keda_scales_on_redis_streams_lag() -> None:
    """The ScaledObject uses the redis-streams scaler with lagCount on the configured group,
    held by a Prometheus query while store writes fail, with a fallback and the ACL
    username and password from the audit-fleet-keda Secret."""
    objects = k8s_objects()
    settings = Settings.from_env(_k8s_env())
    spec = objects[("ScaledObject", "audit-fleet")]["spec"]
    lag, hold = spec["triggers"]
    meta = lag["metadata"]
    assert (lag["type"], lag["name"]) == ("redis-streams", "lag")
    assert (meta["lagCount"], meta["activationLagCount"]) == ("5000", "1")
    assert (meta["stream"], meta["consumerGroup"]) == (settings.streams[0], settings.group)
    assert re.fullmatch(r"[\w.-]+:\d+", meta["address"]), "KEDA wants host:port"
    # one worker always runs: it also reclaims crashed peers' entries and trims
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 20)
    assert spec["fallback"] == {"failureThreshold": 3, "replicas": 2}
    assert (hold["type"], hold["name"]) == ("prometheus", "hold")
    assert set(METRIC.findall(hold["metadata"]["query"])) <= exported_names(Metrics())
    assert 'outcome!="ok"' in hold["metadata"]["query"]
    modifiers = spec["advanced"]["scalingModifiers"]
    assert modifiers["formula"] == "hold > 0 ? hold : lag"
    assert (modifiers["target"], modifiers["metricType"]) == (meta["lagCount"], "AverageValue")
    assert f"* {modifiers['target']}" in hold["metadata"]["query"], "replicas x the target"
    auth = objects[("TriggerAuthentication", lag["authenticationRef"]["name"])]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {"username": ("audit-fleet-keda", "redis-username"),
                    "password": ("audit-fleet-keda", "redis-password")}
    secret = objects[("Secret", "audit-fleet-keda")]
    assert set(secret["stringData"]) == {"redis-username", "redis-password"}


def keda_objects() -> list[dict[str, Any]]:
    """The ScaledObject of deploy/kubernetes and of its Redis Cluster variant."""
    return [k8s_objects()[("ScaledObject", "audit-fleet")],
            load_all(K8S / "variants" / "keda-scaledobject-cluster.yaml")[0]]


def formula_as_promql(scaled: dict[str, Any]) -> str:
    """The ScaledObject's ``hold > 0 ? hold : <lag>`` formula as one PromQL expression over
    its Prometheus triggers' queries (a redis-streams trigger stands in as the series
    ``lag``)."""
    queries = {t["name"]: t["metadata"].get("query", "sum(lag)")
               for t in scaled["spec"]["triggers"]}
    formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]
    match = re.fullmatch(r"hold > 0 \? hold : (\w+)", formula)
    assert match, "the formula holds while `hold` is above 0, and scales on the lag otherwise"
    return f"(({queries['hold']}) > 0) or on() ({queries[match.group(1)]})"


#: Synthetic series: three replicas; writes fail from minute 11 to 30; lag on two shards,
#: growing all along, with a poller hand-over (two instances) in the first minutes.
KEDA_SERIES = [
    ('kube_deployment_spec_replicas{deployment="audit-fleet",namespace="default"}', "3x60"),
    ('audit_fleet_store_write_seconds_count{store="postgres",outcome="ok",instance="w1"}',
     "0+100x10 1000x50"),
    ('audit_fleet_store_write_seconds_count{store="postgres",outcome="unavailable",'
     'instance="w1"}', "0x10 6+6x19 120x30"),
    ('audit_fleet_group_lag{stream="audit:events:{0}",group="audit-writers",instance="w1"}',
     "8000+1000x60"),
    ('audit_fleet_group_lag{stream="audit:events:{0}",group="audit-writers",instance="w2"}',
     "8000+1000x5 _x55"),
    ('audit_fleet_group_lag{stream="audit:events:{1}",group="audit-writers",instance="w1"}',
     "2000+500x60"),
    ("lag", "10000+1500x60"),
]


def keda_series(*, kube_state_metrics: bool = True) -> list[dict[str, str]]:
    out = [{"series": k, "values": v} for k, v in KEDA_SERIES
           if kube_state_metrics or not k.startswith("kube_")]
    if not kube_state_metrics:
        out += [{"series": f'audit_fleet_build_info{{instance="w{i}"}}', "values": "1x60"}
                for i in (1, 2)]
    return out


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian: prometheus)")
def test_keda_holds_the_replica_count_while_the_store_is_down(tmp_path: Path) -> None:
    """Regression: while store writes failed the formula reported no lag, so KEDA scaled
    *in* after the stabilisation window. The ScaledObjects' value, over synthetic series in
    promtool: the (summed) lag while the store is healthy; replicas x target while writes
    fail and the lag grows (desired = current: nothing added, nothing removed); the lag
    again two minutes after the store is back. Without kube-state-metrics the scraped
    workers count as the replicas."""
    main, cluster = keda_objects()
    hold_queries = {t["metadata"]["query"] for s in (main, cluster)
                    for t in s["spec"]["triggers"] if t["name"] == "hold"}
    assert len(hold_queries) == 1, "both ScaledObjects hold with the same query"
    (hold,) = hold_queries
    assert hold.strip() in (ROOT / "docs" / "operations.md").read_text(), "documented as is"
    cases = {
        # (minute, value): healthy and lagging / down and growing / back
        formula_as_promql(cluster): [(5, 13000 + 4500), (20, 15000), (30, 15000),
                                     (35, 43000 + 19500)],
        formula_as_promql(main): [(5, 17500), (20, 15000), (35, 62500)],
    }
    tests = []
    for expr, points in cases.items():
        tests.append({"interval": "1m", "input_series": keda_series(),
                      "promql_expr_test": [
                          {"expr": expr, "eval_time": f"{minute}m",
                           "exp_samples": [{"labels": "{}", "value": value}]}
                          for minute, value in points]})
    tests.append({"interval": "1m", "input_series": keda_series(kube_state_metrics=False),
                  "promql_expr_test": [
        {"expr": hold, "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 10000}]},
        {"expr": hold, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 0}]},
    ]})
    (tmp_path / "keda.test.yaml").write_text(yaml.safe_dump(
        {"evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    result = subprocess.run(["promtool", "test", "rules", "keda.test.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pdb_lets_unhealthy_pods_go_and_the_image_carries_s3() -> None:
    """A pod that is not ready can always be evicted; the image installs the s3 extra."""
    pdb = k8s_objects()[("PodDisruptionBudget", "audit-fleet")]["spec"]
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert '".[s3]"' in (DEPLOY / "Dockerfile").read_text()
    for monitor in ("servicemonitor.yaml", "podmonitor.yaml"):
        assert "release" in (K8S / monitor).read_text()


def test_retention_cronjob_runs_the_retention_command() -> None:
    """The nightly CronJob runs `retention run` with the worker's configuration, one at a time."""
    job = k8s_objects()[("CronJob", "audit-fleet-retention")]["spec"]
    assert job["concurrencyPolicy"] == "Forbid"
    (container,) = job["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] + container["args"][:2] == ["audit-fleet", "retention", "run"]
    refs = [next(iter(e.values()))["name"] for e in container["envFrom"]]
    assert refs == ["audit-fleet", "audit-fleet"]
    from worker.cli import build_parser

    args = build_parser().parse_args(container["args"])
    assert args.archive_dir.startswith("s3://")


def test_hpa_scales_on_an_exported_metric() -> None:
    """The HPA alternative's external metric is one the worker exports."""
    spec = k8s_objects()[("HorizontalPodAutoscaler", "audit-fleet")]["spec"]
    (metric,) = spec["metrics"]
    assert metric["external"]["metric"]["name"] in exported_names(Metrics())
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 20)


# -- alerts and dashboard name only exported metrics ------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    (doc,) = load_all(DEPLOY / "alerts.yaml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def check_expressions(exprs: list[str]) -> None:
    names = exported_names(Metrics())
    labels = metric_labels()
    seen: set[str] = set()
    for expr in exprs:
        for name in METRIC.findall(expr):
            assert name in names, f"{name} (in {expr!r}) is not exported by the worker"
            seen.add(name)
        for name, matchers in SELECTOR.findall(expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in labels[name] | TARGET_LABELS, f"{name} has no label {label}"
    assert len(seen) >= 8


def test_alert_rules_are_complete_and_name_exported_metrics() -> None:
    """Each rule has an expression, a severity and a summary, and uses real metrics."""
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {"AuditFleetLagGrowing", "AuditFleetOldestPendingTooOld",
            "AuditFleetDeadLettersGrowing", "AuditFleetNoConsumers",
            "AuditFleetStoreErrors"} <= names
    for rule in rules:
        assert rule["expr"].strip()
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["runbook_url"].startswith(RUNBOOK_BASE + "/operations.md#")
        assert "runbook" not in rule["annotations"], "Alertmanager templates read runbook_url"
    check_expressions([r["expr"] for r in rules])


def test_scrape_config_adds_no_label_a_metric_carries() -> None:
    """A target label named like a metric label (``consumer``) would rename the metric's own
    label to ``exported_consumer`` and collapse the per-consumer dashboard table."""
    (config,) = load_all(DEPLOY / "prometheus.yml")
    metric_label_names = set().union(*metric_labels().values()) - TARGET_LABELS
    assert {"consumer", "stream", "group", "reason"} <= metric_label_names
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            clash = set(static.get("labels", {})) & metric_label_names
            assert not clash, f"target labels {clash} collide with metric labels"
        for relabel in job.get("relabel_configs", []):
            assert relabel.get("target_label") not in metric_label_names, relabel


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+\s+(.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


#: The one base of every runbook link in the rules (docs/operations.md "Alerts").
RUNBOOK_BASE = "https://audit-fleet.example.com/docs"


def test_alert_runbooks_are_absolute_links_to_real_sections() -> None:
    """Regression: runbook_url was repository-relative (docs/operations.md#…), which no
    Alertmanager, Grafana or pager can open. Every rule's link is absolute, under the one
    documented base, and names a section of operations.md that exists; so do the links in
    the rules' unit tests and in metrics.md."""
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert f"s#{RUNBOOK_BASE}#" in operations, "the docs say how to set the base"
    anchors = _anchors(operations)
    urls = [r["annotations"]["runbook_url"] for r in alert_rules()]
    urls += re.findall(r"runbook_url: (\S+)", (DEPLOY / "alerts.test.yaml").read_text())
    assert len(urls) >= 20
    sections = []
    for url in urls:
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == ("https", urlsplit(RUNBOOK_BASE).netloc), url
        assert url.startswith(RUNBOOK_BASE + "/operations.md#"), url
        sections.append(parts.fragment)
    text = " ".join(str(r["annotations"]) for r in alert_rules())
    text += (ROOT / "docs" / "metrics.md").read_text()
    sections += re.findall(r"operations\.md#([\w-]+)", text)
    for section in sections:
        assert section in anchors, section


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian: prometheus)")
def test_the_documented_runbook_rewrite_keeps_the_rules_and_tests_green(tmp_path: Path) -> None:
    """The sed of docs/operations.md, applied to both files, changes every link and the
    unit tests still pass."""
    mine = "https://git.example.org/ops/audit-fleet/-/blob/main/docs"
    for name in ("alerts.yaml", "alerts.test.yaml"):
        text = (DEPLOY / name).read_text().replace(RUNBOOK_BASE, mine)
        assert RUNBOOK_BASE not in text
        (tmp_path / name).write_text(text)
    result = subprocess.run(["promtool", "test", "rules", "alerts.test.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((tmp_path / "alerts.yaml").read_text())
    assert all(r["annotations"]["runbook_url"].startswith(mine + "/operations.md#")
               for g in rules["groups"] for r in g["rules"])


def test_dashboard_names_exported_metrics() -> None:
    """Every panel query and template variable of the dashboard uses real metrics."""
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
        for t in p.get("targets", []):
            assert t["refId"]
    check_expressions(dashboard_exprs())


def test_the_metric_check_catches_a_typo() -> None:
    """The expression check rejects an unknown metric name and an unknown label."""
    with pytest.raises(AssertionError, match="not exported"):
        check_expressions(["rate(audit_fleet_events_writen_total[5m])"])
    with pytest.raises(AssertionError, match="has no label"):
        check_expressions(['audit_fleet_group_lag{streams="x"}'])


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    """promtool accepts the rules, and the alert unit tests in alerts.test.yaml pass."""
    assert PROMTOOL is not None
    for args in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts.test.yaml"]):
        result = subprocess.run([PROMTOOL, *args], cwd=DEPLOY, capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each dashboard query, with its variables filled in, parses as PromQL."""
    assert PROMTOOL is not None
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            expr = expr[len("label_values("):].rsplit(",", 1)[0]
        expr = expr.replace("$stream", ".*").replace("$group", ".*")
        expr = expr.replace("$__rate_interval", "5m")
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- systemd --------------------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _units(tmp_path: Path, exec_path: str) -> tuple[Path, Path]:
    """The units, with the worker's path replaced by one that exists on this machine."""
    text = (SYSTEMD / "audit-fleet@.service").read_text()
    assert "/opt/audit-fleet/bin/audit-fleet" in text
    service = tmp_path / "audit-fleet@9464.service"
    service.write_text(text.replace("/opt/audit-fleet/bin/audit-fleet", exec_path))
    target = tmp_path / "audit-fleet.target"
    target.write_text((SYSTEMD / "audit-fleet.target").read_text())
    return service, target


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the template instance and the target, with no warnings."""
    assert SYSTEMD_ANALYZE is not None
    exe = shutil.which("true") or "/bin/true"
    service, target = _units(tmp_path, exe)
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(service), str(target)],
                            capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not re.search(r"Unknown key|Failed to parse|ignoring|Unknown section", output), output


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_retention_timer_and_service_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the retention service and its nightly timer."""
    assert SYSTEMD_ANALYZE is not None
    exec_path = shutil.which("true")
    assert exec_path is not None
    service = tmp_path / "audit-fleet-retention.service"
    service.write_text((SYSTEMD / "audit-fleet-retention.service").read_text()
                       .replace("/opt/audit-fleet/bin/audit-fleet", exec_path))
    timer = tmp_path / "audit-fleet-retention.timer"
    timer.write_text((SYSTEMD / "audit-fleet-retention.timer").read_text())
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(timer), str(service)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OnCalendar=*-*-* 03:17:00" in timer.read_text()


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_verify_catches_a_missing_binary(tmp_path: Path) -> None:
    """The verify step is real: a worker path that does not exist fails it."""
    assert SYSTEMD_ANALYZE is not None
    service, _ = _units(tmp_path, str(tmp_path / "no-such-binary"))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(service)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode != 0


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_unit_is_sandboxed(tmp_path: Path) -> None:
    """The offline security review rates the unit's exposure as low (at most 2.5 of 10)."""
    assert SYSTEMD_ANALYZE is not None
    service, _ = _units(tmp_path, shutil.which("true") or "/bin/true")
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=25", str(service)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_systemd_stop_timeout_covers_the_drain() -> None:
    """TimeoutStopSec leaves the worker its drain grace plus a margin before SIGKILL."""
    unit = (SYSTEMD / "audit-fleet@.service").read_text()
    (timeout,) = (int(x) for x in re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.M))
    assert timeout >= c.DEFAULT_SHUTDOWN_GRACE_S + 10
    assert timeout > c.DEFAULT_SHUTDOWN_GRACE_S + c.DEFAULT_SHUTDOWN_DEADLINE_S
    assert re.search(r"^WantedBy=audit-fleet\.target$", unit, re.M)
    assert re.search(r"^PartOf=audit-fleet\.target$", unit, re.M)
    assert "Environment=AUDIT_METRICS_PORT=%i" in unit


#: Peak RSS of a worker: idle + MEMORY_FACTOR x max(in-flight budget, largest event)
#: (docs/operations.md#memory; tests/integration/test_memory_budget.py measures it).
IDLE_MIB, MEMORY_FACTOR = 45, 8


def _memory_needed_mib(settings: Settings) -> float:
    """idle + F x the bound of worker/budget.py: the budget plus two entries per shard."""
    held = settings.inflight_bytes + 2 * len(settings.streams) * settings.max_event_bytes
    return IDLE_MIB + MEMORY_FACTOR * held / 2**20


def test_memory_limits_derive_from_the_byte_budget() -> None:
    """The Kubernetes limit and systemd's MemoryMax hold the worker's byte budget."""
    settings = Settings.from_env(_k8s_env())
    assert settings.inflight_bytes == c.DEFAULT_INFLIGHT_BYTES
    pod = k8s_objects()[("Deployment", "audit-fleet")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    assert float(limit[:-2]) * 1024 >= _memory_needed_mib(settings)
    unit = (SYSTEMD / "audit-fleet@.service").read_text()
    (memory_max,) = re.findall(r"^MemoryMax=(\d+)G$", unit, re.M)
    assert int(memory_max) * 1024 >= _memory_needed_mib(Settings())
