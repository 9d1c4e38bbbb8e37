"""deploy/: the YAML parses, Prometheus accepts its config, every metric the Grafana
dashboard queries is one the processes export, the manifests probe /readyz."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from indexer.service import IndexerMetrics
from learners.runtime import RuntimeStats
from indexer.freshness import FreshnessMetrics
from serving.metrics import IndexerStatsCollector, LearnerStatsCollector, Metrics, metric_names
from streams.transport import TopicPartition

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "towerstream.json"

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
    "le", "inf", "nan",
}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return exprs


def metric_names_in(expr: str) -> set[str]:
    """Metric names of a PromQL expression: identifiers that are not functions (followed by
    '('), keywords, label names (inside {} or by/without (...)), durations or strings."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # grouping labels
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        if e[m.end():].lstrip().startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def exported_names() -> set[str]:
    """Every name the scorer, a learner and the indexer export (real metrics module, real stats types)."""
    scorer, learner, indexer = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()
    Metrics(registry=scorer)
    FreshnessMetrics(scorer)  # the scorer's item-delta follower (serving.app)
    stats = RuntimeStats(
        group_id="g", learner="ctr", events_learned=10, events_learned_run=10, events_per_s=1.0,
        events_per_s_run=1.0, records=12, skipped=1, dead_lettered=1, duplicates=0,
        lag={TopicPartition("towerstream.events", 0): 3}, total_lag=3, checkpoints=1, last_checkpoint_at=time.time(),
        elapsed_s=1.0, metrics={"n": 10, "auc": 0.6, "logloss": 0.5, "rolling_auc": 0.6, "rolling_logloss": 0.5},
    )
    learner.register(LearnerStatsCollector(lambda: stats))
    indexer.register(IndexerStatsCollector(IndexerMetrics(builds_total=1, last_build_seconds=1.0, index_version=1,
                                                          last_publish_time=time.time(), last_recall=0.99,
                                                          last_auc=0.7), recall_k=100))
    return metric_names(scorer) | metric_names(learner) | metric_names(indexer)


def test_metric_name_extraction() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, stage) (rate(towerstream_score_latency_seconds_bucket{stage="total"}[1m])))'
    assert metric_names_in(expr) == {"towerstream_score_latency_seconds_bucket"}
    assert metric_names_in("max by (learner) (a_b) / on (job) c") == {"a_b", "c"}


def test_every_dashboard_metric_is_exported() -> None:
    exported = exported_names()
    used = set().union(*(metric_names_in(e) for e in dashboard_exprs()))
    assert len(used) >= 15, used
    missing = sorted(used - exported)
    assert not missing, f"the dashboard queries metrics no process exports: {missing}"


def test_dashboard_covers_the_required_views() -> None:
    exprs = "\n".join(dashboard_exprs())
    for needle in ("rate(towerstream_events_consumed_total", "towerstream_consumer_lag_records",
                   "histogram_quantile(0.5,", "histogram_quantile(0.99,", "towerstream_index_age_seconds",
                   "towerstream_model_age_seconds", "towerstream_index_version", "towerstream_online_auc",
                   "towerstream_dead_letters_total"):
        assert needle in exprs, needle
    dash = json.loads(DASHBOARD.read_text())
    assert all(t["datasource"]["uid"] == "prometheus" for p in dash["panels"] for t in p.get("targets", []))
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/towerstream.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_promql_is_valid_for_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"towerstream:dashboard_expr_{n}", "expr": e} for n, e in enumerate(dashboard_exprs())
    ]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_config_parses_and_passes_promtool() -> None:
    path = DEPLOY / "prometheus" / "prometheus.yml"
    cfg = yaml.safe_load(path.read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in cfg["scrape_configs"]}
    assert {"scorer", "learners", "indexer"} <= set(jobs)
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for targets in (jobs["scorer"], jobs["learners"], jobs["indexer"]):
        for target in targets:
            assert target.split(":")[0] in compose["services"], target  # scrape targets are compose services
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    out = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_file_has_the_whole_pipeline() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    expected = {"kafka", "simulator", "learner-ctr", "learner-lr", "learner-two-tower", "learner-inttower",
                "indexer", "scorer", "prometheus", "grafana"}
    assert expected <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert services["scorer"]["command"][0] == "serve"
    assert services["scorer"]["build"]["dockerfile"] == "deploy/Dockerfile"  # the x-app merge key applied
    assert (DEPLOY / services["scorer"]["build"]["context"] / "deploy" / "Dockerfile").is_file()
    for mount in services["prometheus"]["volumes"][:1] + services["grafana"]["volumes"]:
        assert (DEPLOY / mount.split(":")[0]).exists(), mount


def test_every_app_command_parses_with_the_real_cli() -> None:
    from app.cli import build_parser

    parser = build_parser()
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    commands = {name: s["command"] for name, s in compose["services"].items() if s.get("image") == "towerstream:latest"}
    k8s = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    commands.update({f"k8s/{d['metadata']['name']}": d["spec"]["template"]["spec"]["containers"][0]["args"]
                     for d in k8s if d["kind"] == "Deployment"})
    assert len(commands) == 7 + 6
    for name, argv in commands.items():
        args = parser.parse_args(argv)  # SystemExit (argparse error) on a flag the CLI does not know
        if argv[0] in ("learn", "serve") or argv[:2] == ["index", "run"]:
            port = args.metrics_port if argv[0] != "serve" else args.port
            assert port in (8080, 9100), name
    scorer = parser.parse_args(compose["services"]["scorer"]["command"])
    assert scorer.command == "serve" and len(scorer.shadow) == 3


def test_kubernetes_manifests() -> None:
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = [(d["kind"], d.get("metadata", {}).get("name")) for d in docs]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    names = {d["metadata"]["name"] for d in deployments}
    assert {"learner-ctr", "learner-lr", "learner-two-tower", "learner-inttower", "indexer", "scorer"} <= names
    assert ("Service", "scorer") in kinds and ("ConfigMap", "towerstream-config") in kinds
    for d in deployments:
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", d["metadata"]["name"]
        assert c["envFrom"][0]["configMapRef"]["name"] == "towerstream-config"
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert all((DEPLOY / "k8s" / r).is_file() for r in kustomization["resources"])


def test_dockerfile_installs_every_package() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for pkg in ("streams", "learners", "indexer", "serving"):
        assert f"COPY {pkg} {pkg}" in text
    assert 'ENTRYPOINT ["towerstream"]' in text
