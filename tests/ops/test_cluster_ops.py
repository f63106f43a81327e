"""The cluster examples in ops/: schema-valid (offline, bundled schemas) and consistent with what
the server does (probes, drain timings, node ids, balancing on /readyz, scraping every node)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "ops" / "kubernetes" / "threadline.yaml"
CLUSTER = ROOT / "ops" / "cluster"
COMPOSE_FILES = [CLUSTER / "compose.yml", ROOT / "ops" / "docker-compose.yml"]
HEARTBEAT_S = 20 + 10  # THREADLINE_HEARTBEAT_INTERVAL_S + THREADLINE_HEARTBEAT_TIMEOUT_S


def _k8s() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    return {d["kind"]: d for d in docs}


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_kubernetes_example_passes_the_kubernetes_schemas() -> None:
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PodDisruptionBudget", "Job"}
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_deployment_probes_and_drains_as_the_server_does() -> None:
    found = _k8s()
    deployment = found["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    env = _env(container)
    # Grace: the preStop pause, then the server's own graceful timeout, with room to spare.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    graceful = float(env["THREADLINE_GRACEFUL_TIMEOUT_S"]["value"])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + graceful + 1, (grace, pre_stop, graceful)
    # Every pod a distinct node, named in its log lines.
    assert env["THREADLINE_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Secrets come from a Secret, never from the manifest.
    for name in ("THREADLINE_DATABASE_URL", "THREADLINE_JWT_SECRET"):
        assert "value" not in env[name] and "secretKeyRef" in env[name]["valueFrom"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_service_and_disruption_budget_select_the_pods() -> None:
    found = _k8s()
    labels = found["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert found["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found["Service"]["spec"]["selector"].items() <= labels.items()
    pdb = found["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable", 0) >= 1
    (job_container,) = found["Job"]["spec"]["template"]["spec"]["containers"]
    assert job_container["args"] == ["migrate", "up"]
    ingress = found["Ingress"]["metadata"]["annotations"]
    assert int(ingress["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > HEARTBEAT_S


def _check_jsonschema() -> str:
    found = shutil.which("check-jsonschema") or str(
        Path(sys.executable).with_name("check-jsonschema")
    )
    if not Path(found).exists():
        pytest.fail("check-jsonschema is a dev dependency (pyproject.toml) and must be installed")
    return found


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_the_compose_files_pass_the_compose_schema(path: Path) -> None:
    check = subprocess.run(
        [_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_cluster_compose_stack_is_two_nodes_on_one_database_behind_a_balancer() -> None:
    compose = yaml.safe_load((CLUSTER / "compose.yml").read_text())
    services = compose["services"]
    nodes = {name: s for name, s in services.items() if name.startswith("node-")}
    assert len(nodes) >= 2
    envs = [s["environment"] for s in nodes.values()]
    assert len({e["THREADLINE_NODE_ID"] for e in envs}) == len(nodes)  # distinct names
    assert len({e["THREADLINE_DATABASE_URL"] for e in envs}) == 1  # one database
    assert len({e["THREADLINE_JWT_SECRET"] for e in envs}) == 1  # one signing key
    for service in nodes.values():
        grace = float(service["stop_grace_period"].rstrip("s"))
        assert grace > float(service["environment"]["THREADLINE_GRACEFUL_TIMEOUT_S"])
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["migrate", "up"]
    assert {"postgres", "balancer", "prometheus", "grafana"} <= set(services)
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (CLUSTER / source).exists(), source

    haproxy = (CLUSTER / "haproxy.cfg").read_text()
    assert re.search(r"option httpchk GET /readyz", haproxy)
    for name in nodes:
        assert re.search(rf"server {name} {name}:8000 check", haproxy), name
    tunnel = re.search(r"timeout tunnel (\d+)(h|m|s)", haproxy)
    assert tunnel is not None
    seconds = int(tunnel.group(1)) * {"h": 3600, "m": 60, "s": 1}[tunnel.group(2)]
    assert seconds > HEARTBEAT_S

    scrape = yaml.safe_load((CLUSTER / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == sorted(f"{name}:8000" for name in nodes)  # each node, directly
    assert scrape["rule_files"] == ["alerts.yml"]
