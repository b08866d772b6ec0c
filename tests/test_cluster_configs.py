"""cluster/: launcher YAMLs validate against the schema inside the installed Ray, KubeRay manifests carry what
KubeRay needs, and no config turns authentication off, exposes the dashboard or holds a secret."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHERS = sorted(CLUSTER.glob("*.yaml"))
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
# Addresses that put the dashboard (and with it the job API: arbitrary code) on every interface.
PUBLIC_HOSTS = {"0.0.0.0", "::", "[::]", "*"}
# KubeRay starts the head with --dashboard-host=0.0.0.0 unless rayStartParams says otherwise.
KUBERAY_DEFAULT_DASHBOARD_HOST = "0.0.0.0"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY", re.IGNORECASE)
# Credentials with a recognisable shape: hub, AWS, GitHub, OpenAI-style and W&B (40 hex) keys.
SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{30,}|\bAKIA[0-9A-Z]{16}\b|\bghp_[A-Za-z0-9]{36}|\bsk-[A-Za-z0-9]{32,}"
                          r"|\b[0-9a-f]{40}\b")


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


# ---------------------------------------------------------------- the security checker


def _dashboard_host(command: str) -> str | None:
    m = re.search(r"--dashboard-host[= ]+(\S+)", command)
    return m.group(1).strip("'\"") if m else None


def _auth_disabled(texts: Iterator[str]) -> list[str]:
    return [f"authentication switched off: {t.strip()[:120]!r}" for t in texts
            if re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?(?!token\b)\w", t)]


def launcher_problems(cfg: dict[str, Any]) -> list[str]:
    """Why a cluster-launcher config is unsafe: a `ray start` without token mode, auth switched off anywhere,
    a head dashboard bound to every interface (or left to a default)."""
    problems = _auth_disabled(strings(cfg))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg.get(key, []) if "ray start" in c]
        if not starts:
            problems.append(f"{key}: no `ray start` command")
        problems += [f"{key}: `ray start` without RAY_AUTH_MODE=token" for c in starts
                     if not re.search(r"\bRAY_AUTH_MODE=token\b", c)]
        problems += [f"{key}: dashboard bound to {_dashboard_host(c)}" for c in starts
                     if _dashboard_host(c) in PUBLIC_HOSTS]
    head = [c for c in cfg.get("head_start_ray_commands", []) if "ray start" in c]
    if head and not any(_dashboard_host(c) for c in head):
        problems.append("head_start_ray_commands: no explicit --dashboard-host (say 127.0.0.1)")
    return problems


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        yield from group["template"]["spec"]["containers"]


def kuberay_problems(doc: dict[str, Any]) -> list[str]:
    """Why a RayCluster/RayJob is unsafe: no token mode, auth switched off in a container, the dashboard on
    every interface (KubeRay's default), the head service exposed outside the cluster, a literal secret."""
    spec = cluster_spec(doc)
    problems = _auth_disabled(strings(doc))
    auth = spec.get("authOptions")
    if auth is None or auth.get("mode", "token") != "token":  # KubeRay: mode defaults to token once set
        problems.append(f"authOptions: token mode is not on ({auth!r})")
    head = spec["headGroupSpec"]
    host = head.get("rayStartParams", {}).get("dashboard-host", KUBERAY_DEFAULT_DASHBOARD_HOST)
    if host in PUBLIC_HOSTS:
        problems.append(f"headGroupSpec.rayStartParams.dashboard-host: {host} (every interface)")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"headGroupSpec.serviceType: {head['serviceType']} exposes the head outside the cluster")
    for c in containers(spec):
        for env in c.get("env", []):
            if env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token":
                problems.append(f"container {c['name']}: RAY_AUTH_MODE={env.get('value')!r} overrides token mode")
            elif SECRET_NAME.search(env["name"]) and "value" in env:
                problems.append(f"container {c['name']}: {env['name']} has a literal value; use secretKeyRef")
    return problems


def secret_problems(path: Path) -> list[str]:
    text = path.read_text()
    found = [f"{path.name}: credential-shaped text {m.group(0)[:8]}..." for m in SECRET_VALUE.finditer(text)]
    found += [f"{path.name}: a Kubernetes Secret with data" for d in yaml.safe_load_all(text)
              if isinstance(d, dict) and d.get("kind") == "Secret" and (d.get("data") or d.get("stringData"))]
    return found


# ---------------------------------------------------------------- launcher configs


def test_there_are_aws_and_gcp_launchers_and_kuberay_manifests():
    assert {p.name for p in LAUNCHERS} == {"aws.yaml", "gcp.yaml"}
    assert {d["kind"] for p in MANIFESTS for d in load(p)} == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_validates_against_rays_own_schema(path):
    cfg = load(path)[0]
    jsonschema.validate(cfg, json.loads(RAY_SCHEMA.read_text()))
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs before calling the cloud


def test_the_schema_check_is_not_vacuous():
    cfg = load(CLUSTER / "aws.yaml")[0]
    schema = json.loads(RAY_SCHEMA.read_text())
    for mutate in (lambda c: c.update(max_workerz=4), lambda c: c["available_node_types"]["head"].pop("node_config"),
                   lambda c: c.update(idle_timeout_minutes="ten")):
        bad = copy.deepcopy(cfg)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_shape_head_on_demand_cpu_gpu_workers_from_zero_spot_and_on_demand(path):
    cfg = load(path)[0]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = {name: t for name, t in types.items() if name.startswith("gpu-")}
    spot = {name for name, t in gpu.items() if _is_spot(t["node_config"])}
    assert spot and set(gpu) - spot, "GPU workers need a spot and an on-demand group"
    assert not _is_spot(head["node_config"])
    for name, t in gpu.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name  # autoscaling from zero
        assert _gpus(t["node_config"]) == 8, name
    assert min(gpu[s]["priority"] for s in spot) > max(gpu[o]["priority"] for o in set(gpu) - spot)


def _is_spot(node_config: dict[str, Any]) -> bool:
    return (node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or node_config.get("scheduling", {}).get("provisioningModel") == "SPOT")


def _gpus(node_config: dict[str, Any]) -> int:
    known = {"p5.48xlarge": 8, "p5e.48xlarge": 8}  # AWS: GPUs come from the instance type
    if "InstanceType" in node_config:
        return known.get(node_config["InstanceType"], 0)
    accel = node_config.get("guestAccelerators", [])
    return sum(a["acceleratorCount"] for a in accel if "h100" in a["acceleratorType"])


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_is_authenticated_and_keeps_the_dashboard_private(path):
    cfg = load(path)[0]
    assert launcher_problems(cfg) == []
    bucket = "s3://" if cfg["provider"]["type"] == "aws" else "gs://"
    assert bucket in path.read_text()  # checkpoints go to object storage, not a node's disk


LAUNCHER_MUTATIONS = {
    "auth mode disabled": lambda c: c["head_start_ray_commands"].__setitem__(
        -1, c["head_start_ray_commands"][-1].replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")),
    "worker without token mode": lambda c: c["worker_start_ray_commands"].__setitem__(
        -1, c["worker_start_ray_commands"][-1].replace("RAY_AUTH_MODE=token ", "")),
    "auth disabled in setup": lambda c: c["setup_commands"].append("echo 'export RAY_AUTH_MODE=disabled' >> ~/.bashrc"),
    "dashboard on 0.0.0.0": lambda c: c["head_start_ray_commands"].__setitem__(
        -1, c["head_start_ray_commands"][-1].replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")),
    "dashboard host left to a default": lambda c: c["head_start_ray_commands"].__setitem__(
        -1, c["head_start_ray_commands"][-1].replace("--dashboard-host=127.0.0.1", "")),
}


@pytest.mark.parametrize("mutation", LAUNCHER_MUTATIONS)
def test_launcher_checker_catches(mutation):
    cfg = load(CLUSTER / "aws.yaml")[0]
    LAUNCHER_MUTATIONS[mutation](cfg)
    assert launcher_problems(cfg), mutation


# ---------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_has_what_kuberay_requires(path):
    for doc in load(path):
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        if doc["kind"] == "RayJob":
            assert doc["spec"]["entrypoint"].strip()
            assert doc["spec"]["shutdownAfterJobFinishes"] is True  # GPUs go back when the job ends
        spec = cluster_spec(doc)
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["rayVersion"] == ray.__version__
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict)
        _check_pod(head["template"]["spec"], head["rayStartParams"])
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and isinstance(group["rayStartParams"], dict)
            assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"], group["groupName"]
            _check_pod(group["template"]["spec"], group["rayStartParams"])
            (worker,) = group["template"]["spec"]["containers"]
            assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8", group["groupName"]
        selectors = [g["template"]["spec"]["nodeSelector"] for g in spec["workerGroupSpecs"]]
        assert {s["karpenter.sh/capacity-type"] for s in selectors} == {"spot", "on-demand"}


def _check_pod(pod: dict[str, Any], params: dict[str, str]) -> None:
    assert pod["containers"], "a pod template needs containers"
    for c in pod["containers"]:
        assert c["name"] and c["image"]
    # $(VAR) in rayStartParams is expanded by Kubernetes only when VAR is in the container's env; otherwise bash
    # would see `$(VAR)` and run VAR as a command.
    defined = {e["name"] for e in pod["containers"][0].get("env", [])}
    for value in params.values():
        for var in re.findall(r"\$\((\w+)\)", value):
            assert var in defined, f"rayStartParams uses $({var}) but the Ray container does not define {var}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_is_authenticated_and_keeps_the_dashboard_private(path):
    for doc in load(path):
        assert kuberay_problems(doc) == []


KUBERAY_MUTATIONS = {
    "no authOptions": lambda s: s.pop("authOptions"),
    "auth mode disabled": lambda s: s["authOptions"].update(mode="disabled"),
    "auth disabled by a container env": lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    .append({"name": "RAY_AUTH_MODE", "value": "disabled"}),
    "dashboard on 0.0.0.0": lambda s: s["headGroupSpec"]["rayStartParams"].update({"dashboard-host": "0.0.0.0"}),
    "dashboard host left to KubeRay's default": lambda s: s["headGroupSpec"]["rayStartParams"].pop("dashboard-host"),
    "head behind a LoadBalancer": lambda s: s["headGroupSpec"].update(serviceType="LoadBalancer"),
    "literal hub token": lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    .append({"name": "HF_TOKEN", "value": "hf_notarealtokenbutshapedlikeone"}),
}


@pytest.mark.parametrize("kind", ["raycluster.yaml", "rayjob.yaml"])
@pytest.mark.parametrize("mutation", KUBERAY_MUTATIONS)
def test_kuberay_checker_catches(kind, mutation):
    (doc,) = load(CLUSTER / "kuberay" / kind)
    KUBERAY_MUTATIONS[mutation](cluster_spec(doc))
    assert kuberay_problems(doc), mutation


# ---------------------------------------------------------------- secrets


@pytest.mark.parametrize("path", [*LAUNCHERS, *MANIFESTS, *sorted((CLUSTER / "kuberay").glob("Dockerfile"))],
                         ids=lambda p: p.name)
def test_no_secret_lives_in_a_config(path):
    assert secret_problems(path) == []


def test_secret_checker_catches_a_committed_token(tmp_path):
    leaked = tmp_path / "leak.yaml"
    leaked.write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: x}\nstringData: {auth_token: abc}\n---\n"
                      "setup_commands: ['echo hf_" + "a" * 34 + " > ~/.cache/huggingface/token']\n")
    assert len(secret_problems(leaked)) == 2
