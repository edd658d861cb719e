"""The files that take llmray to a real cluster, checked without one: the `ray up` cluster files against Ray's own
schema, the KubeRay manifests against the fields KubeRay documents, the jobs' recipes and runtime_env, and that
what the recipes ask for fits the nodes the cluster files offer."""

import math
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from packaging.requirements import Requirement

from llmray.recipe.load import load_recipe

CLUSTER_FILES = sorted(REPO.glob("cluster*.yaml"))
K8S_FILES = sorted((REPO / "k8s").glob("*.yaml"))
RECIPES = sorted(p for p in (REPO / "jobs").glob("*.yaml") if p.name != "runtime_env.yaml")
ENTRY_POINTS = ["pretrain", "sweep", "export", "serve_deploy"]
PYPROJECT = (REPO / "pyproject.toml").read_text()  # read by pattern: tomllib is Python 3.11+, we support 3.10
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)
RAY_PIN = Requirement(re.search(r'^\s*"(ray\[[^"]*)"', PYPROJECT, re.M).group(1)).specifier


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_shipped_files_are_there():
    assert [p.name for p in CLUSTER_FILES] == ["cluster-gcp.yaml", "cluster.yaml"]
    assert {p.name for p in K8S_FILES} >= {"rayjob.yaml", "raycluster.yaml"}
    assert {p.name for p in RECIPES} >= {"pretrain_tiny.yaml", "pretrain_small.yaml", "pretrain_large.yaml"}
    for name in ENTRY_POINTS:
        assert (REPO / "jobs" / f"{name}.py").is_file(), name


# ---- `ray up` cluster files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_rays_schema(path):
    """What `ray up` does before it touches the cloud: fill in the provider's defaults, then validate against
    ray/autoscaler/ray-schema.json (and Ray's own cross-checks: head type, min/max workers)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(path)
    validate_config(prepare_config(config))
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_head_takes_no_training_and_workers_have_gpus(path):
    config = load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), head["resources"]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 for v in workers.values()), workers
    assert all(v.get("min_workers", 0) == 0 for v in workers.values()), "idle GPU nodes cost money"
    assert any(v["resources"]["GPU"] == 8 for v in workers.values()) and any(
        v["resources"]["GPU"] == 1 for v in workers.values())
    assert config["idle_timeout_minutes"] > 0
    if config["provider"]["type"] == "aws":
        assert config["provider"]["cache_stopped_nodes"] is False
        assert {"gpu_8x_h100", "gpu_1x_a10g"} <= set(types)
        assert types["gpu_8x_h100"]["node_config"]["InstanceType"] == "p5.48xlarge"
        assert types["gpu_1x_a10g"]["node_config"]["InstanceType"] == "g5.2xlarge"
        assert all("IamInstanceProfile" in t["node_config"] for t in types.values()), "S3 access by instance role"
    else:
        assert types["gpu_8x_h100"]["node_config"]["machineType"] == "a3-highgpu-8g"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_keeps_the_dashboard_private(path):
    """The job API runs arbitrary code: no ingress for 8265; `ray dashboard FILE` tunnels over SSH instead."""
    config = load(path)
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        assert not (rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", -1)), rule
    assert "8265" not in " ".join(config.get("docker", {}).get("run_options", [])), "a published dashboard port"
    assert "ray dashboard" in path.read_text()


def installed_versions(commands: list[str]) -> list[str]:
    """llmray versions that setup commands install: `llmray==X` or a wheel `llmray-X-py3-none-any.whl`."""
    found = []
    for c in commands:
        found += re.findall(r"llmray==([0-9][^\s\"']*)", c) + re.findall(r"llmray-([0-9][^-]*)-py3", c)
    return found


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_installs_this_version_on_the_pinned_ray(path):
    config = load(path)
    commands = config["setup_commands"] + config.get("head_setup_commands", []) + config.get(
        "worker_setup_commands", [])
    assert installed_versions(commands) == [VERSION], commands
    assert any(re.search(r"torch==\S+", c) for c in commands), "CUDA torch, pinned"
    image = config["docker"]["image"]
    ray_version = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)", image).group(1)
    assert RAY_PIN.contains(ray_version), f"{image} is not Ray {RAY_PIN} (pyproject.toml)"
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray stop" in command or "ray start" in command
    assert any("--head" in c for c in config["head_start_ray_commands"])


# ---- KubeRay manifests ----------------------------------------------------------------------------------------------

# Fields of KubeRay's ray.io/v1 CRDs (RayJobSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec): a typo in a
# manifest is silently dropped by the API server's pruning, so it is caught here.
RAYJOB_FIELDS = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "shutdownAfterJobFinishes",
                 "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit", "submissionMode",
                 "submitterPodTemplate", "submitterConfig", "entrypointNumCpus", "entrypointNumGpus",
                 "entrypointResources", "jobId", "metadata", "suspend", "managedBy", "deletionStrategy"}
RAYCLUSTER_FIELDS = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling",
                     "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
HEAD_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                 "numOfHosts", "idleTimeoutSeconds", "scaleStrategy", "suspend"}


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_kuberay_manifest_structure(path):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayJob", "RayCluster")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    if doc["kind"] == "RayJob":
        assert set(doc["spec"]) <= RAYJOB_FIELDS, set(doc["spec"]) - RAYJOB_FIELDS
    spec = cluster_spec(doc)
    assert set(spec) <= RAYCLUSTER_FIELDS, set(spec) - RAYCLUSTER_FIELDS
    assert RAY_PIN.contains(spec["rayVersion"]), spec["rayVersion"]
    head, workers = spec["headGroupSpec"], spec["workerGroupSpecs"]
    assert set(head) <= HEAD_FIELDS and all(set(w) <= WORKER_FIELDS for w in workers)
    for group in [head, *workers]:  # rayStartParams is map[string]string in the CRD
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        for c in containers(group):
            assert c["name"] and c["image"] and c["resources"]["limits"] and c["resources"]["requests"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head takes no training work"
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(head))
    names = [w["groupName"] for w in workers]
    assert len(names) == len(set(names))
    for w in workers:
        assert 0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"], w["groupName"]
        limits = containers(w)[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, w["groupName"]
        assert containers(w)[0]["resources"]["requests"].get("nvidia.com/gpu") == limits["nvidia.com/gpu"]


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_kuberay_image_is_this_release_built_on_the_pinned_ray(path):
    spec = cluster_spec(load(path))
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] for c in containers(g)}
    assert len(images) == 1, f"head and workers must run one image: {images}"
    assert images.pop().rsplit(":", 1)[1] == VERSION
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)", dockerfile, re.M).group(1)
    assert base == spec["rayVersion"], f"k8s/Dockerfile builds on Ray {base}, the manifest says {spec['rayVersion']}"
    installs = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    assert set(installed_versions(installs)) == {VERSION}, installs


def test_rayjob_runs_a_shipped_entry_point_and_recipe():
    doc = load(REPO / "k8s" / "rayjob.yaml")
    argv = doc["spec"]["entrypoint"].split()
    assert argv[0] == "python" and argv[1] == "jobs/pretrain.py" and (REPO / argv[1]).is_file()
    load_recipe(REPO / argv[2], [a for a in argv[3:] if "=" in a])
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv

    # Ray's own validation of the fields; the working_dir is a path inside the image, checked against the Dockerfile
    RuntimeEnv(**{k: v for k, v in runtime_env.items() if k != "working_dir"})
    workdir = re.search(r"^WORKDIR (\S+)", (REPO / "k8s" / "Dockerfile").read_text(), re.M).group(1)
    assert runtime_env["working_dir"] == workdir, "the job's working_dir is the image's copy of the repo"
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


# ---- recipes, runtime_env, entry points -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    recipe = load_recipe(path)
    if recipe.scaling.use_gpu:
        assert recipe.scaling.cpus_per_worker != "auto" and recipe.scaling.data_cpus != "auto", (
            "an autoscaling cluster has no CPUs to budget from at submit time")


def test_large_recipe_is_multi_node_zero3_bf16_on_object_storage():
    r = load_recipe(REPO / "jobs" / "pretrain_large.yaml")
    assert r.scaling.use_gpu and r.scaling.num_workers * r.scaling.gpus_per_worker > 8  # more than one node
    assert r.train.zero_stage == 3 and r.train.precision == "bf16"
    assert r.run.storage_path.startswith("s3://"), "every node must reach the checkpoints"
    small = load_recipe(REPO / "jobs" / "pretrain_small.yaml")
    assert small.scaling.use_gpu and small.scaling.num_workers * small.scaling.gpus_per_worker == 1


def node_classes(path: Path) -> list[dict]:
    """Worker node classes a cluster file offers: CPUs, GPUs per node and how many nodes at most."""
    doc = load(path)
    if path.parent.name == "k8s":
        out = []
        for w in cluster_spec(doc)["workerGroupSpecs"]:
            limits = containers(w)[0]["resources"]["limits"]
            out.append({"name": w["groupName"], "CPU": float(limits["cpu"]),
                        "GPU": int(limits.get("nvidia.com/gpu", 0)), "max": w["maxReplicas"]})
        return out
    return [{"name": k, "CPU": v["resources"]["CPU"], "GPU": v["resources"].get("GPU", 0), "max": v["max_workers"]}
            for k, v in doc["available_node_types"].items() if k != doc["head_node_type"]]


def fits(recipe, node: dict) -> bool:
    """Ray Train places one bundle {CPU, GPU} per worker; the tokenize tasks need data_cpus besides."""
    s = recipe.scaling
    cpu = 1.0 if s.cpus_per_worker == "auto" else float(s.cpus_per_worker)
    gpu = s.gpus_per_worker if s.use_gpu else 0
    per_node = math.floor(node["CPU"] / cpu) if cpu else s.num_workers
    if gpu:
        per_node = min(per_node, math.floor(node["GPU"] / gpu))
    nodes = math.ceil(s.num_workers / per_node) if per_node else math.inf
    data = 1.0 if s.data_cpus == "auto" else float(s.data_cpus)
    return nodes <= node["max"] and nodes * node["CPU"] - s.num_workers * cpu >= data


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_fits_every_cluster_file(path):
    recipe = load_recipe(path)
    for cluster in [*CLUSTER_FILES, *K8S_FILES]:
        if cluster.name == "rayjob.yaml" and path.name != "pretrain_large.yaml":
            continue  # the RayJob's cluster is sized for its own recipe
        classes = node_classes(cluster)
        assert any(fits(recipe, n) for n in classes), f"{path.name} fits no node class of {cluster.name}: {classes}"


def test_fit_check_refuses_what_does_not_fit():
    too_big = load_recipe(REPO / "jobs" / "pretrain_large.yaml", ["scaling.num_workers=40",
                                                                  "train.global_batch_size=320"])
    assert not any(fits(too_big, n) for n in node_classes(REPO / "cluster.yaml"))  # 40 GPUs > 4 x 8


def test_runtime_env_is_valid_and_keeps_the_upload_small(tmp_path):
    """Zip the repo as `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml` does."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
    from ray.runtime_env import RuntimeEnv

    env = load(REPO / "jobs" / "runtime_env.yaml")
    RuntimeEnv(**env)
    assert "working_dir" not in env, "--working-dir . sets it"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert not any(k in env["env_vars"] for k in ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY")), "no secrets in git"
    target = tmp_path / "pkg.zip"
    create_package(str(REPO), target, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(target).namelist()
    assert "jobs/pretrain.py" in names and "llmray/cli.py" in names and "jobs/pretrain_large.yaml" in names
    for heavy in (".venv/", ".git/", "runs/", "demo/", "wandb/"):
        assert not any(n.startswith(heavy) for n in names), heavy
    assert target.stat().st_size < GCS_STORAGE_MAX_SIZE // 100


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_runs_and_documents_itself(name):
    out = subprocess.run([sys.executable, f"jobs/{name}.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_entry_point_fails_nonzero_naming_the_error(tmp_path):
    out = subprocess.run([sys.executable, "jobs/pretrain.py", "jobs/pretrain_large.yaml", "train.zero_stgae=3",
                          "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "train.zero_stgae: unknown key" in out.stderr, out.stderr
    bad = tmp_path / "serve.yaml"
    config = load(REPO / "serve" / "config.yaml")
    config["applications"][0]["args"]["max_batch_sise"] = 4
    bad.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "jobs/serve_deploy.py", str(bad)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "max_batch_sise" in out.stderr, out.stderr


def test_export_entry_point_refuses_to_overwrite_an_object_store_target(s3, tmp_path):
    import boto3

    boto3.client("s3").put_object(Bucket="llmray", Key="exports/a/config.json", Body=b"{}")
    out = subprocess.run([sys.executable, "jobs/export.py", "s3://llmray/runs/x/checkpoint_1", "--out",
                          "s3://llmray/exports/a"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "already exists" in out.stderr, out.stderr
