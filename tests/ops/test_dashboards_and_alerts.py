"""The Grafana dashboard, the alert rules and the runbooks agree with the metrics we export."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from server import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "threadline.json"
PROVISIONING = ROOT / "ops" / "grafana" / "provisioning"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "ops" / "prometheus" / "alerts_test.yml"
RUNBOOKS = ROOT / "ops" / "runbooks"

# Contract, section 5: these names are promised to dashboards and users.
CONTRACT_METRICS = {
    "threadline_ws_connections",
    "threadline_ws_frames_total",
    "threadline_ws_disconnects_total",
    "threadline_ws_outbound_queue_depth",
    "threadline_thread_actors",
    "threadline_actor_restarts_total",
    "threadline_http_requests_total",
    "threadline_http_request_duration_seconds",
    "threadline_rate_limited_total",
    "threadline_llm_requests_total",
    "threadline_llm_tokens_total",
    "threadline_llm_cost_usd_total",
    "threadline_llm_time_to_first_token_seconds",
    "threadline_llm_circuit_state",
    "threadline_summaries_total",
    "threadline_db_pool_connections",
    "threadline_event_delivery_seconds",
    # section 6, several nodes
    "threadline_cluster_nodes",
    "threadline_broker_messages_total",
    "threadline_broker_lag_seconds",
}
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum", ""),
}
# Labels Prometheus adds at scrape time, and the histogram bucket label.
_TARGET_LABELS = {"instance", "job", "le"}
_NAME_RE = re.compile(r"\bthreadline_[a-z0-9_]+")
_SELECTOR_RE = re.compile(r"\b(threadline_[a-z0-9_]+)\s*\{([^}]*)\}")
_GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _wrappers() -> list[MetricWrapperBase]:
    return [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]


def exported_series() -> dict[str, MetricWrapperBase]:
    """Every series name ``server.metrics`` can expose, mapped to its metric."""
    names: dict[str, MetricWrapperBase] = {}
    for metric in _wrappers():
        base = metric._name  # counters are stored without their "_total"
        for suffix in _SUFFIXES[metric._type]:
            names[base + suffix] = metric
    return names


def contract_name(metric: MetricWrapperBase) -> str:
    return metric._name + ("_total" if metric._type == "counter" else "")


def dashboard_exprs() -> list[str]:
    def walk(node: Any) -> list[str]:
        found: list[str] = []
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                found.extend(walk(value))
        elif isinstance(node, list):
            for item in node:
                found.extend(walk(item))
        return found

    data = json.loads(DASHBOARD.read_text())
    return walk(data["panels"]) + [
        var["definition"] for var in data["templating"]["list"] if "definition" in var
    ]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_the_registry_defines_every_contract_metric() -> None:
    assert {contract_name(m) for m in _wrappers()} >= CONTRACT_METRICS


def test_the_metric_name_resolver_handles_suffixes() -> None:
    series = exported_series()
    for name in (
        "threadline_http_requests_total",
        "threadline_event_delivery_seconds_bucket",
        "threadline_event_delivery_seconds_count",
        "threadline_llm_circuit_state",
    ):
        assert name in series
    for name in ("threadline_http_requests", "threadline_llm_circuit_state_total"):
        assert name not in series


def _check_expr(expr: str, where: str, series: dict[str, MetricWrapperBase]) -> list[str]:
    problems = [
        f"{where}: unknown metric {name}" for name in _NAME_RE.findall(expr) if name not in series
    ]
    for name, matchers in _SELECTOR_RE.findall(expr):
        metric = series.get(name)
        if metric is None:
            continue
        allowed = set(metric._labelnames) | _TARGET_LABELS
        for matcher in filter(None, (m.strip() for m in matchers.split(","))):
            label = re.split(r"[=!~]", matcher, maxsplit=1)[0].strip()
            if label not in allowed:
                problems.append(f"{where}: {name} has no label {label!r}")
    return problems


def test_every_dashboard_metric_and_label_exists() -> None:
    series = exported_series()
    problems: list[str] = []
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for expr in exprs:
        problems += _check_expr(expr, "dashboard", series)
    assert not problems, "\n".join(problems)


def test_every_alert_metric_and_label_exists() -> None:
    series = exported_series()
    problems: list[str] = []
    for rule in alert_rules():
        problems += _check_expr(rule["expr"], rule["alert"], series)
    assert not problems, "\n".join(problems)


def test_the_dashboard_shows_every_contract_metric() -> None:
    series = exported_series()
    shown = {contract_name(series[n]) for e in dashboard_exprs() for n in _NAME_RE.findall(e)}
    assert shown >= CONTRACT_METRICS, sorted(CONTRACT_METRICS - shown)


def test_the_dashboard_is_provisionable() -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] and data["title"] and data["schemaVersion"] >= 30
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"].lower() for p in data["panels"])
    for topic in (
        "connections",
        "delivery",
        "slow-consumer",
        "restarts",
        "time to first token",
        "tokens",
        "spend",
        "circuit",
        "rate-limited",
        "db pool",
        "errors",
        "cluster nodes",
        "broker",
    ):
        assert topic in titles, topic
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "threadline.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    variable = next(v for v in data["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == source["uid"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "threadline.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_every_alert_has_a_runbook_that_exists() -> None:
    rules = alert_rules()
    assert len(rules) >= 10
    index = (RUNBOOKS / "README.md").read_text()
    for rule in rules:
        annotations = rule["annotations"]
        assert annotations.get("summary"), rule["alert"]
        url = annotations["runbook_url"]
        path = ROOT / url
        assert url.startswith("ops/runbooks/") and path.is_file(), (rule["alert"], url)
        text = path.read_text()
        assert "/readyz" in text and "What to do" in text, url
        assert rule["alert"] in index, f"{rule['alert']} missing from the runbook index"
        assert rule["labels"]["severity"] in {"page", "warn", "info"}


def test_every_runbook_is_in_the_index() -> None:
    index = (RUNBOOKS / "README.md").read_text()
    for page in RUNBOOKS.glob("*.md"):
        if page.name != "README.md":
            assert f"({page.name})" in index, page.name


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing = "promtool not installed (Debian: apt-get install prometheus; `make tools`)"
        if os.environ.get("THREADLINE_REQUIRE_TOOLS") == "1":  # set by `make test`: CI must run it
            pytest.fail(missing)
        pytest.skip(missing)
    return promtool


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = _promtool()
    check = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ALERT_TESTS.parent,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each dashboard query, as a recording rule, after Grafana's variables."""
    promtool = _promtool()
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue  # a Grafana templating function, not PromQL
        promql = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": promql})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_compose_stack_mounts_files_that_exist_where_they_are_expected() -> None:
    compose_path = ROOT / "ops" / "docker-compose.yml"
    compose = yaml.safe_load(compose_path.read_text())
    mounts: dict[str, str] = {}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (compose_path.parent / source).exists(), source
                mounts[target] = source
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "threadline.yml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert any(target.startswith(folder) for target in mounts), mounts
    scrape = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["threadline:8000"]
    assert "threadline" in compose["services"]
    # The rule file Prometheus loads is mounted next to its configuration.
    assert "/etc/prometheus/" + scrape["rule_files"][0] in mounts
    source = yaml.safe_load((PROVISIONING / "datasources" / "threadline.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
