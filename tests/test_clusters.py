"""clusters/: every batchscale cluster file loads; the Ray cluster-launcher YAML passes the JSON
schema the installed Ray ships (and broken copies do not); the KubeRay RayJob manifest has the
fields the CRD requires (checked by hand: there is no CRD schema offline); and the three
descriptions of the same hardware agree (GPUs per node, node count, CPUs per worker)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from bench.config import load_cluster

CLUSTERS = Path(__file__).resolve().parent.parent / "clusters"


def _kind(path: Path) -> str:
    doc = yaml.safe_load(path.read_text())
    if "apiVersion" in doc:
        return "kubernetes"
    if "cluster_name" in doc:
        return "ray-launcher"
    return "batchscale"


BATCHSCALE_FILES = sorted(p for p in CLUSTERS.glob("*.yaml") if _kind(p) == "batchscale")


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def ray_schema_errors(config: dict) -> str | None:
    """None if the launcher config is valid for the installed Ray, else the error text.
    Ray's own check first (defaults merged, head type checked); the shipped schema as fallback."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # the private API moved: validate against the shipped schema file
        import jsonschema
        import ray.autoscaler

        schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
        try:
            jsonschema.validate(config, schema)
        except jsonschema.ValidationError as err:
            return err.message
        return None
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as err:  # jsonschema.ValidationError or ValueError
        return str(err).splitlines()[0]
    return None


def test_expected_cluster_files_exist():
    names = {p.name for p in CLUSTERS.glob("*.yaml")}
    assert {"local.yaml", "single-node-multi-gpu.yaml", "aws-gpu.yaml", "aws-h100.yaml",
            "kuberay-rayjob.yaml", "kuberay-h100.yaml"} <= names


@pytest.mark.parametrize("path", BATCHSCALE_FILES, ids=lambda p: p.name)
def test_batchscale_cluster_files_load(path):
    cluster, _ = load_cluster(path)
    assert cluster.name == path.stem


def test_single_node_multi_gpu():
    cluster, _ = load_cluster(CLUSTERS / "single-node-multi-gpu.yaml")
    assert cluster.address in (None, "auto") and cluster.use_gpu
    assert cluster.resources_per_worker == {"CPU": 8, "GPU": 1}
    assert cluster.hardware.nodes == 1 and cluster.hardware.gpus_per_node == 8


def test_one_gpu_two_workers_shares_the_gpu_over_gloo():
    from bench.launcher import backend_for

    cluster, _ = load_cluster(CLUSTERS / "one-gpu-two-workers.yaml")
    assert cluster.use_gpu and cluster.resources_per_worker["GPU"] == 0.5 and backend_for(cluster) == "gloo"
    assert backend_for(load_cluster(CLUSTERS / "single-node-multi-gpu.yaml")[0]) == "nccl"
    assert backend_for(load_cluster(CLUSTERS / "local.yaml")[0]) == "gloo"


@pytest.mark.parametrize("doc, expect", [
    ({"use_gpu": True, "resources_per_worker": {"GPU": 0.5}}, "need backend: gloo"),
    ({"use_gpu": True, "backend": "nccl", "resources_per_worker": {"GPU": 0.5}}, "need backend: gloo"),
    ({"use_gpu": False, "backend": "nccl"}, "backend nccl needs use_gpu: true"),
    ({"backend": "mpi"}, "backend"),
], ids=["shared-auto", "shared-nccl", "nccl-on-cpu", "unknown"])
def test_backend_refusals(tmp_path, doc, expect):
    from bench.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "c", **doc}))
    with pytest.raises(ConfigError, match=expect):
        load_cluster(path)


def test_launcher_yaml_passes_ray_schema():
    assert ray_schema_errors(_load("aws-gpu.yaml")) is None


@pytest.mark.parametrize("breakage, expect", [
    (lambda c: c["available_node_types"]["gpu_h100"]["resources"].update(GPU="8"), "integer"),
    (lambda c: c.update(gpus_per_node=8), "gpus_per_node"),
    (lambda c: c["available_node_types"]["gpu_h100"].update(instance="p5"), "instance"),
    (lambda c: c.update(head_node_type="missing"), "head_node_type"),
    (lambda c: c.pop("provider"), "provider"),
], ids=["string-gpu-count", "unknown-top-key", "unknown-node-key", "unknown-head-type", "no-provider"])
def test_broken_launcher_yaml_fails(breakage, expect):
    config = _load("aws-gpu.yaml")
    breakage(config)
    error = ray_schema_errors(config)
    assert error is not None and expect in error


def test_launcher_matches_its_batchscale_file():
    launcher = _load("aws-gpu.yaml")
    cluster, _ = load_cluster(CLUSTERS / "aws-h100.yaml")
    assert cluster.launcher == "aws-gpu.yaml"
    gpu_types = [t for t in launcher["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert len(gpu_types) == 1
    gpu = gpu_types[0]
    assert gpu["resources"]["GPU"] == cluster.hardware.gpus_per_node == 8
    assert gpu["min_workers"] == gpu["max_workers"] == cluster.hardware.nodes
    # every GPU of a node gets a worker: 8 workers x CPUs per worker must fit the node's CPUs
    assert gpu["resources"]["CPU"] >= cluster.hardware.gpus_per_node * cluster.resources_per_worker["CPU"]
    assert cluster.hardware.gpu_model == "NVIDIA H100 80GB HBM3"
    assert cluster.storage_path and cluster.storage_path.startswith("/mnt/shared")
    assert any("batchscale" in cmd for cmd in launcher["setup_commands"])


# --- KubeRay RayJob ---------------------------------------------------------------------------

def rayjob_problems(doc: dict) -> list[str]:
    """The fields the RayJob CRD (ray.io/v1) requires, per docs REFERENCE: entrypoint,
    rayClusterSpec.headGroupSpec.template, workerGroupSpecs[] groupName/minReplicas/maxReplicas/
    template, GPUs as nvidia.com/gpu container limits, rayVersion set."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        problems.append("apiVersion/kind must be ray.io/v1 RayJob")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name missing")
    spec = doc.get("spec") or {}
    if "batchscale run" not in str(spec.get("entrypoint", "")):
        problems.append("spec.entrypoint must run `batchscale run`")
    for key in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished"):
        if key not in spec:
            problems.append(f"spec.{key} missing")
    rcs = spec.get("rayClusterSpec") or {}
    if not re.fullmatch(r"\d+\.\d+\.\d+", str(rcs.get("rayVersion", ""))):
        problems.append("rayClusterSpec.rayVersion must be a Ray version like 2.60.0")
    head = (rcs.get("headGroupSpec") or {}).get("template") or {}
    if not (head.get("spec") or {}).get("containers"):
        problems.append("headGroupSpec.template.spec.containers missing")
    groups = rcs.get("workerGroupSpecs") or []
    if not groups:
        problems.append("workerGroupSpecs missing")
    for i, group in enumerate(groups):
        for key in ("groupName", "minReplicas", "maxReplicas", "template"):
            if key not in group:
                problems.append(f"workerGroupSpecs[{i}].{key} missing")
        if not group.get("minReplicas", 0) <= group.get("replicas", group.get("minReplicas", 0)) \
                <= group.get("maxReplicas", 0):
            problems.append(f"workerGroupSpecs[{i}]: need minReplicas <= replicas <= maxReplicas")
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        if not any(isinstance((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu"), int)
                   for c in containers):
            problems.append(f"workerGroupSpecs[{i}]: no container limits nvidia.com/gpu")
    return problems


def test_rayjob_has_required_fields():
    assert rayjob_problems(_load("kuberay-rayjob.yaml")) == []


def test_rayjob_checker_catches_breakage():
    doc = _load("kuberay-rayjob.yaml")
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    del group["groupName"]
    del group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    del doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    problems = rayjob_problems(doc)
    assert any("groupName" in p for p in problems)
    assert any("nvidia.com/gpu" in p for p in problems)
    assert any("headGroupSpec.template" in p for p in problems)


def test_rayjob_matches_its_batchscale_file():
    doc = _load("kuberay-rayjob.yaml")
    cluster, _ = load_cluster(CLUSTERS / "kuberay-h100.yaml")
    assert cluster.launcher == "kuberay-rayjob.yaml" and cluster.address == "auto"
    (group,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == cluster.hardware.gpus_per_node
    assert group["replicas"] == cluster.hardware.nodes
    assert int(limits["cpu"]) >= cluster.hardware.gpus_per_node * cluster.resources_per_worker["CPU"]
    assert "kuberay-h100.yaml" in doc["spec"]["entrypoint"]
    # results and checkpoints on the shared volume mounted in every pod
    assert "--results-dir /mnt/results" in doc["spec"]["entrypoint"]
    assert cluster.storage_path.startswith("/mnt/results")
    assert {"name": "results", "mountPath": "/mnt/results"} in container["volumeMounts"]
    version = doc["spec"]["rayClusterSpec"]["rayVersion"]
    assert version in container["image"]
