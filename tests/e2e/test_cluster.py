"""`ray job submit` against a real two-node Ray cluster started on this machine (a head and a second node, each
its own raylet), checkpoints on a real S3 API (moto on 127.0.0.1). What a user does on a cloud cluster, minus
the cloud: submit jobs/pretrain.py with the repo as working_dir, watch it succeed or fail, restore elsewhere.

Only the processes this module starts are stopped: each node runs under `ray start --block` in its own process
group and temp dir; `ray stop` would kill every Ray on the machine.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, free_port, moto_s3, s3_client

BUCKET = "llmray-cluster"
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def node_ports() -> list[str]:
    """Every port a node listens on, chosen free: two raylets on one machine must not collide on the defaults."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


class TwoNodeCluster:
    def __init__(self, root: str):
        self.root = root
        # The GCS declares a node dead after 3 failed health checks 1 s apart (Ray's default: 5 at 3 s), so the next
        # look at the nodes by Ray Data's AutoscalingCoordinator (every 20 s; an elastic Train group asks it what is
        # left) sees a lost node gone, not the one after.
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        self.env.pop("RAY_ADDRESS", None)
        # the job's `python` is this interpreter, as on a cluster whose nodes have the project installed
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []

    def _start(self, args: list[str], log: str) -> None:
        out = open(os.path.join(self.root, log), "w")
        self.procs.append(subprocess.Popen([ray_cli(), "start", "--block", "--disable-usage-stats", *args],
                                           env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    COMMON = ["--num-cpus=2", "--num-gpus=0", "--object-store-memory=150000000"]

    def start(self) -> None:
        self._start(["--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                     f"--ray-client-server-port={free_port()}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                     *self.COMMON, f"--temp-dir={self.root}", *node_ports()], "head.log")
        self.wait_nodes(1)
        self.add_node()
        self.wait_nodes(2)

    def add_node(self, log: str = "node2.log") -> None:
        self._start([f"--address=127.0.0.1:{self.gcs_port}", "--node-ip-address=127.0.0.1", *self.COMMON,
                     f"--temp-dir={self.root}", *node_ports()], log)

    def kill_node(self, index: int) -> None:
        """SIGKILL node `index`'s every process (its raylet, and the workers and actors on it): a lost machine."""
        import psutil

        node = self.procs.pop(index)
        tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        for proc in tree:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        node.wait()

    def logs(self) -> str:
        return "\n".join(Path(self.root, f).read_text()[-3000:] for f in ("head.log", "node2.log")
                         if Path(self.root, f).exists())

    def nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)

    def wait_nodes(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Ray node exited:\n{self.logs()}")
            try:
                if len(self.nodes()) >= n:
                    return
            except Exception:  # the dashboard is not up yet
                pass
            time.sleep(1)
        raise TimeoutError(f"{n} Ray node(s) not alive after {timeout}s:\n{self.logs()}")

    def job(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        command, *rest = args  # options before the entrypoint's `--`
        return subprocess.run([ray_cli(), "job", command, "--address", self.address, *rest], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        import psutil

        tree = []
        for p in self.procs:  # collected first: raylets' workers and job drivers are their descendants
            try:
                tree += psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in reversed(self.procs):  # each node's group: `ray start --block`, GCS, raylet, dashboard, workers
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:  # short: a node that outlives its SIGTERM by seconds is not stopping (teardown took 34 s at 30)
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs(tree, timeout=10)
        for proc in alive:
            proc.kill()


@pytest.fixture(scope="module")
def s3_store():
    """moto's S3 API on 127.0.0.1, for this module's jobs (which reach it through their runtime_env)."""
    with moto_s3(BUCKET) as env:
        yield env, s3_client(env)


@pytest.fixture(scope="module")
def cluster():
    root = tempfile.mkdtemp(prefix="lrc-", dir="/tmp")  # short: Ray's socket paths live under it
    c = TwoNodeCluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def runtime_env_json(s3_env: dict) -> str:
    """jobs/runtime_env.yaml (its excludes keep .venv and .git out of the upload) plus moto's endpoint and keys,
    as a user adds secrets at submit time."""
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    env["env_vars"] = {**env.get("env_vars", {}), **s3_env, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    return json.dumps(env)


def tiny_args(corpus, name: str, steps: int) -> list[str]:
    # Two workers x 1.5 CPUs on two 2-CPU nodes: Train's PACK placement cannot put both on one node, and each node
    # keeps 0.5 CPU for one of the two tokenize tasks (data_cpus=1).
    return ["jobs/pretrain_tiny.yaml", f"data.shards={corpus['shards']}", f"data.tokenizer={corpus['tokenizer']}",
            f"run.storage_path=s3://{BUCKET}/runs", f"run.name={name}", "data.seq_len=64", "data.tokenize_tasks=2",
            "model.hidden_size=64", "model.num_layers=2", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.warmup_steps=2", "train.eval_every=0", "train.sample_prompt=null", f"train.max_steps={steps}",
            "train.log_every=1", "train.checkpoint_every=0", "scaling.num_workers=2", "scaling.cpus_per_worker=1.5",
            "scaling.data_cpus=1", "train.record_samples=true"]


def submit(cluster, s3_env, submission_id: str, entry: list[str]) -> subprocess.CompletedProcess:
    return cluster.job("submit", "--submission-id", submission_id, "--working-dir", str(REPO),
                       "--runtime-env-json", runtime_env_json(s3_env), "--", "python", *entry)


def status(cluster, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(cluster.address).get_job_status(submission_id).value)


def checkpoints(client, run: str) -> list[str]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{run}/").get("Contents", [])]
    # checkpoint_<timestamp>/ folders; Ray Train also keeps a checkpoint_manager_snapshot.json beside them
    return sorted({k.split("/")[2] for k in keys if re.match(r"checkpoint_\d{4}-\d\d-\d\d_", k.split("/")[2])})


@pytest.fixture(scope="module")
def pretrained(cluster, s3_store, corpus):
    s3_env, client = s3_store
    out = submit(cluster, s3_env, "pretrain-a", ["jobs/pretrain.py", *tiny_args(corpus, "cluster-a", 4)])
    return {"out": out, "s3_env": s3_env, "client": client}


def test_pretrain_job_trains_on_both_nodes_into_s3(cluster, pretrained):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    out = pretrained["out"]
    assert out.returncode == 0, f"ray job submit failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert status(cluster, "pretrain-a") == "SUCCEEDED"
    logs = cluster.job("logs", "pretrain-a").stdout
    assert "[llmray] step 4/4" in logs and "trained    4 steps" in logs, logs[-3000:]

    # Which nodes the Train workers ran on, from Ray's own actor table (dead actors keep their node id).
    ray_job_id = JobSubmissionClient(cluster.address).get_job_info("pretrain-a").job_id
    workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker"),
                                                            ("job_id", "=", ray_job_id)], detail=True,
                          raise_on_missing_output=False)
    is_head = {n.node_id: n.is_head_node for n in cluster.nodes()}
    worker_nodes = {w.node_id for w in workers}
    assert len(workers) == 2 and len(worker_nodes) == 2, [(w.actor_id, w.node_id) for w in workers]
    assert sorted(is_head[n] for n in worker_nodes) == [False, True]  # one on the head, one on the second node
    # The stream's catalog is on the driver's node (the head), and with it Ray's AutoscalingCoordinator (which its Ray
    # Data executor creates, pinned to its node): a lost second node takes neither (the lost-node test below)
    (catalog,) = list_actors(address=cluster.address, filters=[("class_name", "=", "BlockCatalog"),
                                                               ("job_id", "=", ray_job_id)], raise_on_missing_output=False)
    coordinators = list_actors(address=cluster.address, filters=[("class_name", "=", "_AutoscalingCoordinatorActor")],
                               raise_on_missing_output=False)
    assert is_head[catalog.node_id] and coordinators and all(is_head[c.node_id] for c in coordinators), \
        ([(a.class_name, a.node_id) for a in [catalog, *coordinators]], is_head)

    ckpts = checkpoints(pretrained["client"], "cluster-a")
    assert ckpts, "no checkpoint in s3://llmray-cluster/runs/cluster-a"
    keys = [o["Key"] for o in pretrained["client"].list_objects_v2(
        Bucket=BUCKET, Prefix=f"runs/cluster-a/{ckpts[-1]}/").get("Contents", [])]
    assert any(k.endswith("done/rank-0.json") for k in keys) and any(k.endswith("done/rank-1.json") for k in keys)


def test_failing_job_is_failed_with_the_error_in_its_logs(cluster, s3_store, corpus):
    s3_env, _ = s3_store
    out = submit(cluster, s3_env, "pretrain-typo",
                 ["jobs/pretrain.py", *tiny_args(corpus, "cluster-typo", 2), "train.max_stpes=3"])
    assert out.returncode != 0
    assert status(cluster, "pretrain-typo") == "FAILED"
    logs = cluster.job("logs", "pretrain-typo").stdout
    assert "llmray: error: invalid recipe: train.max_stpes: unknown key" in logs, logs[-3000:]


def test_checkpoint_restores_in_later_jobs(cluster, pretrained, corpus, tmp_path):
    assert pretrained["out"].returncode == 0, "the pretraining job failed; see the test above"
    s3_env, client = pretrained["s3_env"], pretrained["client"]
    # Resubmitting the same run with more steps continues it from its S3 checkpoint, on both nodes again.
    out = submit(cluster, s3_env, "pretrain-a-more", ["jobs/pretrain.py", *tiny_args(corpus, "cluster-a", 6)])
    logs = cluster.job("logs", "pretrain-a-more").stdout
    assert out.returncode == 0, logs[-4000:]
    assert "continuing run cluster-a from its checkpoint at step 4" in logs, logs[-3000:]
    assert "[llmray] step 5/6" in logs and "[llmray] step 1/" not in logs, logs[-3000:]

    # Export, as a job, from the S3 checkpoint into S3: the Hugging Face folder serving would read.
    ckpt = f"s3://{BUCKET}/runs/cluster-a/{checkpoints(client, 'cluster-a')[-1]}"
    out = submit(cluster, s3_env, "export-a", ["jobs/export.py", ckpt, "--out", f"s3://{BUCKET}/exports/a"])
    assert out.returncode == 0, cluster.job("logs", "export-a").stdout[-4000:]
    exported = {o["Key"].rsplit("/", 1)[-1] for o in
                client.list_objects_v2(Bucket=BUCKET, Prefix="exports/a/").get("Contents", [])}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= exported, exported


def recorded(client, run: str) -> bool:
    """Ray Train has recorded one of the run's checkpoints (a folder still uploading, or one it never recorded,
    is not what a restarted group resumes from)."""
    try:
        body = client.get_object(Bucket=BUCKET, Key=f"runs/{run}/checkpoint_manager_snapshot.json")["Body"].read()
        return bool(json.loads(body)["checkpoint_results"])
    except (client.exceptions.NoSuchKey, ValueError, KeyError):
        return False


def run_losing_node_2(cluster, s3_env, client, run: str, overrides: list[str], corpus, then=None) -> str:
    """Submit a 6-step run of 2 workers, SIGKILL node 2 once Ray Train has recorded a checkpoint of it, call `then`
    (with the cluster one node short), wait for the job to end; its logs. Fails unless it SUCCEEDED."""
    import threading

    killed = []

    def kill_once_checkpointed():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not recorded(client, run):
            time.sleep(0.1)
        if recorded(client, run):
            cluster.kill_node(1)
            killed.append(time.monotonic())
            if then:
                then()

    killer = threading.Thread(target=kill_once_checkpointed, daemon=True)
    killer.start()
    # Ray Train asks for the group's workers again (the lost node is not yet known dead) and waits this long for their
    # placement before it tries again, or settles for what is left (its default, 60 s, would be most of the test). The
    # placement waits for the nodes' resources only, not for the workers to start: ready in under 0.4 s here whenever
    # they exist, so 5 s only cuts short the wait for a node that is gone.
    env = {**s3_env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"}
    # one tokenize task of 0.5 CPU: the head alone must hold it beside the 1.5-CPU worker
    entry = ["jobs/pretrain.py", *tiny_args(corpus, run, 6), "train.checkpoint_every=2", "scaling.max_failures=1",
             "data.tokenize_tasks=1", "scaling.data_cpus=0.5", *overrides]
    job = f"pretrain-{run}"
    try:
        out = cluster.job("submit", "--no-wait", "--submission-id", job, "--working-dir", str(REPO),
                          "--runtime-env-json", runtime_env_json(env), "--", "python", *entry)
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and status(cluster, job) in ("PENDING", "RUNNING"):
            time.sleep(1)
        killer.join()
        logs = cluster.job("logs", job).stdout
        assert killed, "the run finished before Ray Train recorded a checkpoint"
        assert status(cluster, job) == "SUCCEEDED", logs[-6000:]
        return logs
    finally:
        cluster.job("stop", job)


def test_a_lost_node_is_waited_for_and_its_replacement_goes_on_from_the_checkpoint(cluster, pretrained, corpus,
                                                                                   monkeypatch):
    """scaling.min_workers unset (a fixed group of 2): the second node SIGKILLed once a checkpoint is recorded. Ray
    Train keeps trying to place 2 workers (a placement that times out is retried, not counted against
    max_failures=1) while the cluster is one node short; a replacement node joins 8 s later, and the run resumes
    on 2 workers and trains cluster-a's samples."""
    from llmray.train.checkpoint import read_state

    s3_env, client = pretrained["s3_env"], pretrained["client"]
    joined = []

    def replace_later():
        time.sleep(8)  # past the first placement's 5-s timeout: the run waits rather than fails
        cluster.add_node("node2-replacement.log")
        joined.append(time.monotonic())

    run_losing_node_2(cluster, s3_env, client, "cluster-replaced", [], corpus, then=replace_later)
    assert joined
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    state = read_state(f"s3://{BUCKET}/runs/cluster-replaced/{checkpoints(client, 'cluster-replaced')[-1]}")
    reference = read_state(f"s3://{BUCKET}/runs/cluster-a/{checkpoints(client, 'cluster-a')[-1]}")
    (resume,) = state.resumes
    assert resume["world_size"] == 2 and resume["from_world_size"] == 2 and state.step == 6, state.resumes
    assert [s["samples"] for s in state.trace] == [s["samples"] for s in reference.trace[:6]]


def test_a_lost_node_mid_run_goes_on_from_its_checkpoint_on_what_is_left(cluster, pretrained, corpus, monkeypatch):
    """scaling.min_workers=1: the second node SIGKILLed (raylet, Train worker and all) once Ray Train has recorded a
    checkpoint of the run. The group restarts on the head alone, resumes from that checkpoint on 1 worker, and trains
    the samples of the uninterrupted 2-worker run cluster-a (the global batch does not depend on the world size).
    Last in this module: it leaves the cluster one node short."""
    from llmray.train.checkpoint import read_state

    s3_env, client = pretrained["s3_env"], pretrained["client"]
    logs = run_losing_node_2(cluster, s3_env, client, "cluster-lost", ["scaling.min_workers=1"], corpus)
    assert "re-partitioned from 2 to 1 ranks" in logs, logs[-3000:]

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    lost = read_state(f"s3://{BUCKET}/runs/cluster-lost/{checkpoints(client, 'cluster-lost')[-1]}")
    reference = read_state(f"s3://{BUCKET}/runs/cluster-a/{checkpoints(client, 'cluster-a')[-1]}")
    (resume,) = lost.resumes
    assert resume["world_size"] == 1 and resume["from_world_size"] == 2 and lost.step == 6
    assert [s["step"] for s in lost.trace] == list(range(1, 7))
    assert len(reference.trace) == 6, "cluster-a is extended to 6 steps by test_checkpoint_restores_in_later_jobs"
    # cluster-a trained 4 steps, then 2 more in a rerun (another lr schedule, so other losses); the samples of each
    # step are the stream's, whatever the schedule or the world size
    assert [s["samples"] for s in lost.trace] == [s["samples"] for s in reference.trace[:6]]
