"""Offline checks of cluster/: every `ray up` YAML passes Ray's own config preparation and schema
validation (the checks `ray up` runs before it touches a cloud), keeps metrics, token auth and a
loopback dashboard, and installs torch before dsray; the KubeRay manifests have the structure
KubeRay expects. A broken copy of each config must fail the same validation."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from click.exceptions import ClickException
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RAY_UP = ["aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _validate(cfg: dict) -> dict:
    """What `ray up` does to a config before launching anything (private API: Ray pinned to 2.60)."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def _commands(cfg: dict, key: str) -> str:
    return "\n".join(cfg[key])


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_config_validates(name: str) -> None:
    prepared = _validate(_load(name))
    for node_type in prepared["available_node_types"].values():
        assert all(isinstance(v, int) for v in node_type["resources"].values()), node_type


@pytest.mark.parametrize("name", RAY_UP)
def test_broken_ray_up_config_is_rejected(name: str) -> None:
    cfg = _load(name)
    unknown = {**copy.deepcopy(cfg), "head_start_commands": ["ray start --head"]}  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        _validate(unknown)
    if name == "onprem.yaml":
        # provider type local builds its own node type: available_node_types is refused.
        bad = {**copy.deepcopy(cfg), "available_node_types": {"gpu": {"resources": {"GPU": 8}, "node_config": {}}}}
        with pytest.raises(ClickException):
            _validate(bad)
    else:
        bad = copy.deepcopy(cfg)
        gpu_type = next(k for k in bad["available_node_types"] if k != bad["head_node_type"])
        bad["available_node_types"][gpu_type]["resources"]["GPU"] = 7.5  # resources must be integers
        with pytest.raises(jsonschema.ValidationError):
            _validate(bad)


@pytest.mark.parametrize("name", RAY_UP)
def test_metrics_auth_and_dashboard(name: str) -> None:
    text = (CLUSTER / name).read_text()
    cfg = _load(name)
    head, worker = _commands(cfg, "head_start_ray_commands"), _commands(cfg, "worker_start_ray_commands")
    for cmds in (head, worker):
        assert "--metrics-export-port=8080" in cmds
        # Token auth forced on: a node without the token fails to start instead of running open.
        assert "RAY_AUTH_MODE=token" in cmds
    assert "ray start --head" in head and "--address=$RAY_HEAD_IP:6379" in worker
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in text
    assert "RAY_AUTH_MODE=disabled" not in text and "disabled" not in text.lower()
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # The autoscaler's defaults would bind the dashboard to 0.0.0.0: both lists must be ours.
    assert _validate(cfg)["head_start_ray_commands"] == cfg["head_start_ray_commands"]


@pytest.mark.parametrize("name", RAY_UP)
def test_setup_installs_torch_then_dsray(name: str) -> None:
    prepared = _validate(_load(name))
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = prepared[key]
        torch = [i for i, c in enumerate(cmds) if "torch==" in c]
        dsray = [i for i, c in enumerate(cmds) if "pip install -e ~/dsray" in c]
        assert torch and dsray and torch[0] < dsray[0], (key, cmds)
        assert any('"ray[default]==' + ray.__version__ + '"' in c for c in cmds), (key, cmds)
    assert prepared["file_mounts"]["~/dsray"] == "."


def test_cloud_gpu_node_types() -> None:
    aws = _load("aws-gpu.yaml")["available_node_types"]
    assert {t["node_config"]["InstanceType"] for t in aws.values()} >= {"p5.48xlarge", "p4d.24xlarge"}
    assert all(t["resources"].get("GPU") == 8 for t in aws.values() if t["node_config"]["InstanceType"][0] == "p")
    gcp = _load("gcp-gpu.yaml")["available_node_types"]
    accels = {a["acceleratorType"]: a["acceleratorCount"] for t in gcp.values()
              for a in t["node_config"].get("guestAccelerators", [])}
    assert accels == {"nvidia-tesla-a100": 8, "nvidia-h100-80gb": 8}
    onprem = _load("onprem.yaml")
    assert onprem["provider"]["type"] == "local" and "available_node_types" not in onprem
    assert onprem["provider"]["head_ip"] and onprem["provider"]["worker_ips"]


# ---- KubeRay -----------------------------------------------------------------------------------


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec.get("authOptions", {}).get("mode") == "token"
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    assert len(groups) >= 2
    for name, group in groups:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), (name, params)  # KubeRay wants strings
        assert params["metrics-export-port"] == "8080", name
        assert params.get("dashboard-host") in (None, "127.0.0.1"), name
        containers = group["template"]["spec"]["containers"]
        ray_container = containers[0]
        assert {"containerPort": 8080, "name": "metrics"} in ray_container["ports"], name
        env = {e["name"]: e.get("value") for e in ray_container.get("env", [])}
        assert env.get("RAY_AUTH_MODE") in (None, "token"), name
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]


def test_kuberay_raycluster() -> None:
    doc = _load("kuberay/raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob() -> None:
    doc = _load("kuberay/rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["dsray", "train"], argv
    from dsray.cli import build_parser

    build_parser().parse_args(argv[1:])  # the entrypoint's flags exist (exits 2 if not)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_kuberay_podmonitor_scrapes_the_metrics_port() -> None:
    doc = _load("kuberay/podmonitor.yaml")
    assert doc["kind"] == "PodMonitor"
    assert [e["port"] for e in doc["spec"]["podMetricsEndpoints"]] == ["metrics"]
    selector = doc["spec"]["selector"]["matchLabels"]
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        doc = _load(name)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert selector.items() <= group["template"]["metadata"]["labels"].items(), name
