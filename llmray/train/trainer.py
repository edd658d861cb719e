"""The driver: check the inputs, budget CPUs, start the token stream, launch Ray Train, summarise the run."""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from llmray.config import Recipe, RecipeError, recipe_from_dict
from llmray.data import storage
from llmray.data.corpus import list_shards
from llmray.data.pack import StreamCursor
from llmray.data.stream import RankStream, StreamCoordinator, StreamSpec, open_session, take_samples
from llmray.data.tokenizer import load_tokenizer
from llmray.model import build_config
from llmray.train import checkpoint
from llmray.train.plot import plot_loss
from llmray.train.wandb_log import WandbSink, wandb_env

REPORT_MIN_INTERVAL_S = 2.5  # Ray Train's controller polls workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)


@dataclass
class Summary:
    run_dir: str
    checkpoint: str | None
    steps: int
    tokens: int
    n_params: int
    wall_s: float
    final_loss: float | None
    val_loss: float | None
    val_ppl: float | None
    tokens_per_s: float | None
    plot: str | None
    sample: str | None

    def text(self) -> str:
        lines = [
            f"run        {self.run_dir}",
            f"model      {self.n_params / 1e6:.2f}M parameters",
            f"trained    {self.steps} steps, {self.tokens:,} tokens in {self.wall_s:.0f}s",
        ]
        if self.final_loss is not None:
            val = f"   validation {self.val_loss:.4f} (perplexity {self.val_ppl:.1f})" if self.val_loss is not None else ""
            lines.append(f"loss       {self.final_loss:.4f}{val}")
        if self.tokens_per_s:
            lines.append(f"throughput {self.tokens_per_s:,.0f} tokens/s (last window)")
        lines += [f"checkpoint {self.checkpoint}", f"loss plot  {self.plot}"]
        if self.sample is not None:
            lines.append(f"sample     {self.sample!r}")
        return "\n".join(lines)


def check_inputs(recipe: Recipe) -> tuple[list[str], list[str] | None, int]:
    """Everything that can be checked before a worker starts: shards, tokenizer, model shape."""
    shards = [s.path for s in list_shards(recipe.data.shards)]
    val_shards = [s.path for s in list_shards(recipe.data.val_shards)] if recipe.data.val_shards else None
    vocab = len(load_tokenizer(recipe.data.tokenizer))
    config = build_config(recipe.model, vocab)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and recipe.data.seq_len > positions:
        raise RecipeError(f"data.seq_len={recipe.data.seq_len} is larger than the model's {positions} positions")
    return shards, val_shards, vocab


def cpu_budget(recipe: Recipe, cluster_cpus: float) -> tuple[float, float]:
    """(CPUs per Train worker, CPUs per tokenize actor). Data gets its share first: workers that take every
    CPU leave the tokenize actors pending and the run waits forever for its first batch."""
    s = recipe.scaling
    data = s.data_cpus if s.data_cpus != "auto" else max(1.0, round(0.1 * cluster_cpus))
    if s.cpus_per_worker != "auto":
        per_worker = float(s.cpus_per_worker)
    else:
        per_worker = max(0.25, (cluster_cpus - data) / s.num_workers)
        per_worker = min(per_worker, 8.0) if s.use_gpu else per_worker
    if per_worker * s.num_workers + data > cluster_cpus + 1e-9 and not s.use_gpu:
        raise RecipeError(
            f"scaling asks for {s.num_workers} workers x {per_worker} CPUs + {data} data CPUs, "
            f"but the cluster has {cluster_cpus:g} CPUs")
    return per_worker, data / recipe.data.tokenize_actors


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start a local one."""
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            # a fresh local cluster needs no token; Ray 2.60 otherwise turns token auth on and its CLI refuses us
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(log_to_driver=True)


def train_loop_per_worker(config: dict) -> None:
    """What Ray Train runs on each worker: find the checkpoint to resume (this run's latest after a failure or
    a rerun, else `--resume-from`), start the stream at its cursor, train."""
    import torch
    import torch.distributed as dist

    from llmray.train import loop

    recipe = recipe_from_dict(config["recipe"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    val = ray.get(config["val"][0]) if config["val"] else None

    class RaySink:
        """Checkpoints and evaluations always go to Ray Train (Tune's schedulers compare trials on them); plain
        metrics at most every REPORT_MIN_INTERVAL_S. Ray Train keeps one pending result per worker and its
        controller collects it every couple of seconds, so a second report inside that interval blocks the
        training step until then. Rank 0 decides, for all."""

        last = 0.0

        def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
            if checkpoint_dir is None and "val_loss" not in metrics:  # every rank evaluates at the same steps
                due = torch.tensor([time.monotonic() - self.last >= REPORT_MIN_INTERVAL_S], dtype=torch.int32,
                                   device="cuda" if dist.get_backend() == "nccl" else "cpu")
                dist.broadcast(due, src=0)
                if not due.item():
                    return
            self.last = time.monotonic()
            ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=ckpt)

    resume = ray.train.get_checkpoint()
    if resume is None:
        resume = config.get("resume_from")  # a ray.train.Checkpoint carrying the driver's filesystem
    with tempfile.TemporaryDirectory(prefix="llmray-resume-") as tmp:
        start = None
        if resume is not None:
            resume.to_directory(tmp)
            cursor = checkpoint.read_state(tmp).get("cursor")  # the loop verifies the whole checkpoint
            start = StreamCursor(**cursor) if cursor else None
        # One stream session per worker group: a restarted group gets a new one, and the stream restarts at its cursor.
        session = [uuid.uuid4().hex if rank == 0 else None]
        dist.broadcast_object_list(session, src=0)
        open_session(config["coordinator"], world, recipe.train.micro_batch_size, start, session[0])
        stream = RankStream(config["coordinator"], session[0], rank, recipe.data.prefetch_batches)
        sink = WandbSink(RaySink(), recipe, rank)
        loop.train(recipe, stream, val, sink, resume_dir=tmp if resume is not None else None)
        sink.finish()


def resume_point(recipe: Recipe, vocab: int, resume_from: str | None, fresh: bool) -> str | None:
    """Decide, before any worker starts, where the run begins; returns the checkpoint given by `--resume-from`.

    A run whose folder already holds checkpoints continues from the latest (Ray Train restores it on its own);
    `fresh` refuses such a run rather than overwrite it.
    """
    run = run_uri(recipe)
    existing = checkpoint.list_checkpoints(run)
    wanted = recipe.model_dump(mode="json")
    if existing and (fresh or resume_from):
        step, latest = existing[-1]
        raise checkpoint.CheckpointError(
            f"run {recipe.run.name!r} already has {len(existing)} checkpoint(s) in {run} (latest: step {step}); "
            f"{'--fresh' if fresh else '--resume-from'} never overwrites a run: choose another run.name, or remove "
            "that folder, or drop the flag to continue it")
    if resume_from:
        state = checkpoint.verify(resume_from)
        checkpoint.check_compatible(state, wanted, vocab, resume_from)
        print(f"[llmray] starting {recipe.run.name} from {resume_from} (step {state['step']})", flush=True)
        return resume_from
    if existing:
        step, latest = existing[-1]
        checkpoint.check_compatible(checkpoint.read_state(latest), wanted, vocab, latest)
        print(f"[llmray] continuing run {recipe.run.name} from its checkpoint at step {step} ({latest})", flush=True)
    return None


def absolute_paths(recipe: Recipe) -> Recipe:
    """Local paths made absolute: Train workers and data actors do not start in the driver's folder."""
    def fix(p: str | None) -> str | None:
        return p if p is None or storage.is_uri(p) or not os.path.exists(p) else os.path.abspath(p)

    d, m = recipe.data, recipe.model
    return recipe.model_copy(update={
        "data": d.model_copy(update={"shards": fix(d.shards), "val_shards": fix(d.val_shards),
                                     "tokenizer": fix(d.tokenizer)}),
        "model": m.model_copy(update={"pretrained": fix(m.pretrained)}),
    })


def fit(recipe: Recipe, resume_from: str | None = None, fresh: bool = False, callbacks: list | None = None,
        cpus_available: float | None = None) -> Summary:
    """Train `recipe` on the Ray cluster. `callbacks`: Ray Train callbacks for the run (a sweep passes
    TuneReportCallback); `cpus_available`: the CPUs this run may budget from (default: the whole cluster's)."""
    recipe = absolute_paths(recipe)
    shards, val_shards, vocab = check_inputs(recipe)
    if resume_from and not storage.is_uri(resume_from):
        resume_from = os.path.abspath(resume_from)
    resume_from = resume_point(recipe, vocab, resume_from, fresh)
    ensure_ray()
    per_worker, per_actor = cpu_budget(recipe, cpus_available or ray.cluster_resources().get("CPU", 1))
    d = recipe.data
    common = dict(tokenizer=d.tokenizer, seq_len=d.seq_len, seed=recipe.run.seed, batch_docs=d.tokenize_batch_docs,
                  actors=d.tokenize_actors, cpus_per_actor=per_actor)
    if val_shards:
        train_spec = StreamSpec(shards=tuple(shards), split="all", max_epochs=d.max_epochs, **common)
        val_spec = StreamSpec(shards=tuple(val_shards), split="all", **common)
    else:
        train_spec = StreamSpec(shards=tuple(shards), split="train", val_fraction=d.val_fraction,
                                max_epochs=d.max_epochs, **common)
        val_spec = StreamSpec(shards=tuple(shards), split="val", val_fraction=d.val_fraction, **common)

    t, s = recipe.train, recipe.scaling
    val_ref = None
    if t.eval_every or d.val_shards or d.val_fraction > 0:
        n_val = t.eval_batches * t.micro_batch_size * s.num_workers
        val = take_samples(val_spec, n_val) if (d.val_shards or d.val_fraction > 0) else None
        if val is not None and len(val) < s.num_workers:
            print(f"[llmray] warning: the validation split holds {len(val)} samples of {d.seq_len} tokens; "
                  "no validation will run (raise data.val_fraction or set data.val_shards)")
            val = None
        val_ref = [ray.put(val)] if val is not None else None
    coordinator = StreamCoordinator.remote(train_spec)

    resources = {"CPU": per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    env = {"DS_ACCELERATOR": "cuda" if s.use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false"}
    if recipe.wandb.project:
        env.update(wandb_env())
    run_fs, run_root = storage.resolve(recipe.run.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"recipe": recipe.model_dump(mode="json"), "coordinator": coordinator, "val": val_ref,
                           "resume_from": _as_ray_checkpoint(resume_from) if resume_from else None},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=recipe.run.name,
            # The filesystem is resolved here and shipped to the workers, so an endpoint or credentials set in
            # the driver's environment (AWS_ENDPOINT_URL, ...) reach the workers too.
            storage_path=run_root,
            storage_filesystem=run_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=s.max_failures),
            worker_runtime_env={"env_vars": env},
            callbacks=callbacks or None,
        ),
    )
    print(f"[llmray] training {recipe.run.name}: {s.num_workers} workers x {per_worker:g} CPU"
          f"{' + ' + format(s.gpus_per_worker, 'g') + ' GPU' if s.use_gpu else ''}, ZeRO-{t.zero_stage}, "
          f"{len(shards)} shards, tokenize actors {d.tokenize_actors} x {per_actor:g} CPU", flush=True)
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    ray.kill(coordinator)
    return summarize(recipe, result, wall)


def _as_ray_checkpoint(uri: str) -> ray.train.Checkpoint:
    fs, path = storage.resolve(uri)
    return ray.train.Checkpoint(path, filesystem=fs)


def _storage_path(path: str) -> str:
    return path if storage.is_uri(path) else os.path.abspath(os.path.expanduser(path))


def run_uri(recipe: Recipe) -> str:
    return storage.join(_storage_path(recipe.run.storage_path), recipe.run.name)


def summarize(recipe: Recipe, result, wall: float) -> Summary:
    """Write loss.png and summary.json into the run folder (local or object store)."""
    metrics = result.metrics or {}
    history: list[dict] = []
    n_params = 0
    run = run_uri(recipe)
    ckpt_path = None
    if result.checkpoint is not None:
        ckpt_path = storage.join(run, posixpath.basename(result.checkpoint.path.rstrip("/")))
        state = checkpoint.read_state(ckpt_path)
        history, n_params = state["history"], state.get("n_params", 0)
    run_fs, run_dir = storage.resolve(run)
    plot_path = None
    if history:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "loss.png")
            plot_loss(history, local, f"{recipe.run.name}: ZeRO-{recipe.train.zero_stage}, "
                                      f"{recipe.scaling.num_workers} workers")
            plot_path = storage.join(run, "loss.png")
            with open(local, "rb") as src, run_fs.open_output_stream(storage.join(run_dir, "loss.png")) as dst:
                dst.write(src.read())
    summary = Summary(
        run_dir=run, checkpoint=ckpt_path, steps=metrics.get("step", 0), tokens=metrics.get("tokens", 0),
        n_params=n_params, wall_s=wall, final_loss=metrics.get("loss"), val_loss=metrics.get("val_loss"),
        val_ppl=metrics.get("val_ppl"), tokens_per_s=metrics.get("tokens_per_s"), plot=plot_path,
        sample=metrics.get("sample"),
    )
    with run_fs.open_output_stream(storage.join(run_dir, "summary.json")) as f:
        f.write(json.dumps(asdict(summary), indent=1).encode())
    return summary
