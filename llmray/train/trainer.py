"""The driver: check the inputs, decide where the run starts, budget CPUs, start the token stream, launch Ray
Train (each worker runs `worker.train_loop_per_worker`), summarise the run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llmray import hub, logs, storage
from llmray import metric_names as M
from llmray.cluster import ensure_ray
from llmray.data.catalog import CatalogActor
from llmray.data.chat import Conversion, shard_conversations
from llmray.data.pack import StreamSpec, first_rows
from llmray.data.pixels import load_processor
from llmray.data.split import split_sources
from llmray.data.tokenizer import load_tokenizer
from llmray.errors import LlmrayError
from llmray.evals.perplexity import perplexity
from llmray.model import lineage
from llmray.model.build import build_config, is_vision_language
from llmray.model.lora import check_qlora, check_targets
from llmray.objectives.distill import check_teacher
from llmray.objectives.reference import precompute
from llmray.objectives.rewards import Rewards
from llmray.objectives.rollout import start_generators
from llmray.recipe.load import recipe_from_dict, with_absolute_paths, with_pinned_names
from llmray.recipe.schema import Recipe, RecipeError
from llmray.train import checkpoint, resume
from llmray.train.downstream import training_tasks
from llmray.train.kernels import check_installed
from llmray.train.metrics import eval_by_task, per_source_val
from llmray.train.plot import plot_loss
from llmray.train.wandb_log import wandb_env
from llmray.train.worker import train_loop_per_worker
from llmray.train.zero import deepspeed_config, resolve_precision


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
    val_loss_per_source: dict[str, float] | None = None  # a blend's sources, each on its own held-out samples
    conversations: dict | None = None  # a fine-tune's data: conversations (or pairs) used, cut, lines skipped
    evals: dict[str, float] | None = None  # the recipe's eval tasks at the end: eval/<task>/<metric>
    rewards: dict | None = None  # an RL run's reward and accuracy at its first and last report

    def text(self) -> str:
        lines = [
            f"run        {self.run_dir}",
            f"model      {self.n_params / 1e6:.2f}M parameters",
            f"trained    {self.steps} steps, {self.tokens:,} tokens in {self.wall_s:.0f}s",
        ]
        if self.final_loss is not None:
            val = f"   validation {self.val_loss:.4f} (perplexity {self.val_ppl:.1f})" if self.val_loss is not None else ""
            lines.append(f"loss       {self.final_loss:.4f}{val}")
        for name, loss in (self.val_loss_per_source or {}).items():
            lines.append(f"  {name:<9}validation {loss:.4f} (perplexity {perplexity(loss):.1f})")
        if self.conversations:
            c = self.conversations
            lines.append(f"data       {c['documents']} {c.get('kind', 'conversations')}, {c['longer_than_seq_len']} cut "
                         f"to seq_len, {c['skipped_lines']} lines skipped")
        if self.rewards:
            r = self.rewards
            lines.append(f"reward     {r['first']:.3f} -> {r['last']:.3f} (first and last report)"
                         + (f", accuracy {100 * r['accuracy_first']:.1f}% -> {100 * r['accuracy_last']:.1f}%"
                            if r.get("accuracy_last") is not None else ""))
        for task, figures in eval_by_task(self.evals or {}).items():
            lines.append(f"eval       {task}: " + ", ".join(f"{m} {v:.4f}" for m, v in figures.items()))
        if self.tokens_per_s:
            lines.append(f"throughput {self.tokens_per_s:,.0f} tokens/s (last window)")
        lines += [f"checkpoint {self.checkpoint}", f"loss plot  {self.plot}"]
        if self.sample is not None:
            lines.append(f"sample     {self.sample!r}")
        return "\n".join(lines)


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # read by Ray Train's controller


def check_inputs(recipe: Recipe) -> tuple[StreamSpec, list[tuple[str, float, StreamSpec]], int]:
    """Everything that can be checked before a worker starts: sources, shards, tokenizer, model shape. Returns the
    training stream's spec (CPUs not yet budgeted), each source's (name, weight, validation samples' spec) when it
    holds documents out, and the vocabulary."""
    deepspeed_config(recipe, resolve_precision(recipe, bf16_supported=True))  # train.deepspeed agrees with the recipe
    d = recipe.data
    splits = split_sources(d)
    common = dict(tokenizer=d.tokenizer, seq_len=d.seq_len, seed=recipe.run.seed, batch_docs=d.tokenize_batch_docs,
                  documents=recipe.documents, max_images=recipe.vision.max_images if recipe.vision else 0,
                  document_masking=d.document_masking)
    train_spec = StreamSpec.of([(s.name, s.weight, s.train) for s in splits], max_epochs=d.max_epochs,
                               tasks=d.tokenize_tasks, **common)
    val_specs = []
    for s, source in zip(splits, train_spec.sources):
        if s.held_out is None:
            continue
        if s.held_out.location == s.train.location:  # the same shards and pieces, the other documents: not re-listed
            held = dataclasses.replace(source, weight=1.0, documents=s.held_out, first_piece=0)
            val_specs.append((s.name, source.weight, StreamSpec((held,), **common)))
        else:
            val_specs.append((s.name, source.weight, StreamSpec.of([(s.name, 1.0, s.held_out)], **common)))
    vocab = len(load_tokenizer(d.tokenizer))
    config = build_config(recipe.model, vocab)
    if recipe.vision is not None and not is_vision_language(config):
        raise RecipeError(f"vision: model.pretrained {recipe.model.pretrained} is a {config.model_type} model, not a "
                          "vision-language one (its config has no vision_config)")
    text = config.get_text_config()  # a vision-language model's language model; a text model's own config
    if recipe.model.pretrained is not None and text.vocab_size < vocab:
        raise RecipeError(f"model.pretrained {recipe.model.pretrained} has {text.vocab_size} token embeddings, "
                          f"fewer than the {vocab} tokens of data.tokenizer {d.tokenizer}")
    if recipe.trains_adapters:
        check_targets(config, recipe.finetune.lora)
    if recipe.finetune is not None and recipe.finetune.method == "qlora":
        check_qlora()
    check_installed(recipe)
    if recipe.distill is not None:
        check_teacher(recipe.distill, config.vocab_size)
    if recipe.rl is not None:
        Rewards(recipe.rl.rewards)  # a user function that does not import is named here
        val_specs = []  # held-out prompts are not trained on; the recipe's eval tasks measure the policy
    positions = getattr(text, "max_position_embeddings", None)
    if positions is not None and d.seq_len > positions:
        raise RecipeError(f"data.seq_len={d.seq_len} is larger than the model's {positions} positions")
    return train_spec, val_specs, vocab


def describe_sources(spec: StreamSpec) -> str:
    """`3 shards (48 pieces)`, or for a blend `web 0.70: 3 shards (48 pieces), code 0.30: ...`."""
    parts = [f"{len(s.shards)} shards ({len(s.pieces)} pieces)" for s in spec.sources]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(f"{s.name} {s.weight:.2f}: {p}" for s, p in zip(spec.sources, parts))


def cpu_budget(recipe: Recipe, cluster_cpus: float) -> tuple[float, float]:
    """(CPUs per Train worker, CPUs per tokenize task). Data gets its share first: workers that take every
    CPU leave the tokenize tasks pending and the run waits forever for its first batch."""
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
    return per_worker, data / recipe.data.tokenize_tasks


def absolute_paths(recipe: Recipe) -> Recipe:
    """Local paths made absolute: Train workers and tokenize tasks do not start in the driver's folder."""
    return recipe_from_dict(with_absolute_paths(recipe.model_dump(mode="json")))


def pinned_names(recipe: Recipe, resume_from: str | None = None, fresh: bool = False) -> Recipe:
    """Hub names fixed to the commit they name now, before Ray starts: a name that is unknown, or offline and not
    cached, stops the run here in one line. A continued run keeps the commits its checkpoint was trained on."""
    earlier = None if fresh else resume.earlier_recipe(recipe, resume_from)
    return recipe_from_dict(with_pinned_names(recipe.model_dump(mode="json"), earlier))


def hub_env(recipe: Recipe) -> dict[str, str]:
    """What the workers need to reach the Hub as the driver does (token, endpoint, offline switch, cache place);
    and where the run's storage is shared by every node (object storage, or several nodes on one file system), the
    run's Hub models published there once, for the workers to read instead of each node downloading them."""
    env = hub.env()
    names = [n for n in (recipe.model.pretrained, recipe.distill.teacher if recipe.distill else None)
             if n and hub.is_hub_id(n)]
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if names and (storage.is_uri(recipe.run.storage_path) or nodes > 1):
        mirrors = storage.mirror_hub_models(names, recipe.run.storage_path)
        print(f"[llmray] {', '.join(names)} published once into {recipe.run.storage_path}: the workers read "
              "it there", flush=True)
        env[storage.MIRRORS_ENV] = json.dumps(mirrors)
    return env


def with_conversation_shards(recipe: Recipe) -> tuple[Recipe, Conversion | None]:
    """A recipe with data.conversations reads them from shards written into data.shards (default: the run
    folder's conversations/), made here once and reused while the input files are unchanged."""
    d = recipe.data
    if d.conversations is None:
        return recipe, None
    out = d.shards or storage.join(recipe.run.folder, "conversations")
    conversion = shard_conversations(d.conversations, out, load_tokenizer(d.tokenizer), d.seq_len, d.format, d.split,
                                     d.columns, recipe.documents,
                                     recipe.rl.required_fields if recipe.rl else (),
                                     recipe.vision.max_images if recipe.vision else 0,
                                     load_processor(d.tokenizer) if recipe.vision else None)
    print("[llmray] " + conversion.text(), flush=True)
    return recipe.model_copy(update={"data": d.model_copy(update={"shards": out})}), conversion


def with_precomputed_reference(recipe: Recipe, train_spec: StreamSpec, val_specs: list, cpus_per_worker: float
                               ) -> tuple[StreamSpec, list]:
    """The streams with the reference's log-probabilities attached, computed first (or found cached in the run
    folder) by a Ray Data pass whose actors take the resources the Train workers will have once it is done."""
    s = recipe.scaling
    specs = precompute(
        [train_spec] + [spec for _, _, spec in val_specs], recipe.run.folder, recipe.model.pretrained,
        resolve_precision(recipe, bf16_supported=True), actors=s.num_workers, cpus_per_actor=cpus_per_worker,
        gpus_per_actor=s.gpus_per_worker if s.use_gpu else 0, batch_rows=recipe.train.micro_batch_size, env=hub.env())
    return specs[0], [(name, weight, spec) for (name, weight, _), spec in zip(val_specs, specs[1:])]


def check_pruned(recipe: Recipe) -> None:
    """Training never prunes: a recipe's `prune:` block is resolved before `fit` (its model.pretrained is the
    pruned copy, whose lineage records the block). Refused otherwise, rather than training the unpruned model."""
    if recipe.prune is None:
        return
    made = lineage.read(recipe.model.pretrained).get("prune", {})
    if made.get("spec") != recipe.prune.model_dump():
        raise RecipeError(f"prune: model.pretrained {recipe.model.pretrained} is not the model this prune: block "
                          "makes; resolve the block first (llmray.prune.recover.with_pruned_model, as `llmray train`, "
                          "`llmray finetune` and `llmray tune` do)")


def fit(recipe: Recipe, resume_from: str | None = None, fresh: bool = False, callbacks: list | None = None,
        cpus_available: float | None = None) -> Summary:
    """Train `recipe` on the Ray cluster. `callbacks`: Ray Train callbacks for the run (a sweep passes
    TuneReportCallback); `cpus_available`: the CPUs this run may budget from (default: the whole cluster's)."""
    if resume_from and not storage.is_uri(resume_from):
        resume_from = os.path.abspath(resume_from)
    recipe = pinned_names(absolute_paths(recipe), resume_from, fresh)
    check_pruned(recipe)
    if recipe.model.pretrained is not None:  # a missing or unreadable folder is named before anything else
        build_config(recipe.model, 0)
    recipe, conversion = with_conversation_shards(recipe)
    train_spec, val_specs, vocab = check_inputs(recipe)
    eval_tasks = training_tasks(recipe.eval.tasks, recipe.vision is not None)  # read and checked here, once
    resume_from, start = resume.plan(recipe, vocab, resume_from, fresh)
    ensure_ray()
    logs.quiet_here()
    # Ray Train's preemption watcher (an actor holding the workers' handles, which Ray warns of at every start with
    # an error line) feeds ray.train.get_preemption_info(), which llmray does not read. Set to 1 to have it.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    generators = start_generators(recipe) if recipe.rl is not None else None
    generator_cpus = len(generators.actors) * recipe.rl.rollout.cpus_per_actor if generators else 0.0
    per_worker, per_task = cpu_budget(recipe, (cpus_available or ray.cluster_resources().get("CPU", 1)) - generator_cpus)
    train_spec = dataclasses.replace(train_spec, cpus_per_task=per_task)
    if recipe.reference == "precomputed":
        train_spec, val_specs = with_precomputed_reference(recipe, train_spec, val_specs, per_worker)

    d, t, s = recipe.data, recipe.train, recipe.scaling
    validation = []  # (source, weight, samples in the object store)
    for name, weight, spec in val_specs:
        val = first_rows(spec, t.eval_batches * t.micro_batch_size * s.num_workers)
        if len(val["input_ids"]) < s.num_workers:
            print(f"[llmray] warning: the validation split of {name} holds {len(val['input_ids'])} samples of {d.seq_len} "
                  "tokens; it will not be validated on (raise data.val_fraction or set data.val_shards)")
        else:
            validation.append((name, weight, ray.put(val)))
    # tokenizing begins while the workers start. The catalog runs on the driver's node (the head under `ray job
    # submit`), whose loss ends the job anyway: a lost worker node must not take it along, nor Ray's
    # AutoscalingCoordinator, which the catalog's Ray Data executor creates on its own node with hard affinity (so
    # it cannot be restarted elsewhere) and which Ray Train's elastic group asks before it restarts on fewer workers.
    # Hard affinity: a soft one was seen placing the catalog on the other node of the test cluster.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    catalog = CatalogActor.options(runtime_env={"env_vars": hub.env()}, scheduling_strategy=here).remote(
        train_spec, horizon_rows=t.max_steps * t.global_batch_size, expected_start=start)

    resources = {"CPU": per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    env = {"DS_ACCELERATOR": "cuda" if s.use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false", **logs.worker_env()}
    env.update(hub_env(recipe))
    if recipe.wandb.project:
        env.update(wandb_env())
    run_fs, run_root = storage.resolve(recipe.run.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"recipe": recipe.model_dump(mode="json"), "catalog": catalog, "val": validation,
                           "eval_tasks": eval_tasks, "generators": generators,
                           "resume_from": _as_ray_checkpoint(resume_from) if resume_from else None},
        scaling_config=ScalingConfig(num_workers=(s.min_workers, s.num_workers) if s.min_workers else s.num_workers,
                                     use_gpu=s.use_gpu, resources_per_worker=resources),
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
            logging_config=LoggingConfig(log_level=logging.getLevelName(logs.ray_log_level())),
        ),
    )
    print(f"[llmray] training {recipe.run.name}: {s.num_workers} workers x {per_worker:g} CPU"
          f"{' + ' + format(s.gpus_per_worker, 'g') + ' GPU' if s.use_gpu else ''}, ZeRO-{t.zero_stage}, "
          f"{describe_sources(train_spec)}, tokenize tasks {d.tokenize_tasks} x {per_task:g} CPU", flush=True)
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        said = worker_said(e)
        if said is None and isinstance(getattr(e, "controller_failure", None), OSError):
            # Ray Train records its checkpoints in a file beside them; storage failing there stops the controller
            said = checkpoint.CheckpointUploadError(
                f"Ray Train could not record the run's checkpoints in {recipe.run.folder}: "
                f"{str(e.controller_failure).strip().splitlines()[-1]}. The checkpoints written before are intact; "
                "rerun to continue from the latest")
        if said is None:
            raise
        raise said from None  # what the worker said, in one line, not Ray's dump of each rank's traceback
    finally:
        ray.kill(catalog)
        if generators:
            generators.kill()
    wall = time.perf_counter() - started
    return summarize(recipe, result, wall, conversion)


def worker_said(error: Exception) -> LlmrayError | None:
    """The llmray error a training worker stopped on (a checkpoint that could not be written, ...), if one did."""
    for failure in getattr(error, "worker_failures", {}).values():
        while failure is not None:
            if isinstance(failure, LlmrayError):
                return failure
            failure = failure.__cause__
    return None


def reward_summary(history: list[dict]) -> dict | None:
    """An RL run's reward (and accuracy, where a correctness reward gives one) at its first and last report."""
    rl = [h for h in history if M.REWARD in h]
    if not rl:
        return None
    out = {"first": rl[0][M.REWARD], "last": rl[-1][M.REWARD]}
    if rl[-1].get(M.ACCURACY) == rl[-1].get(M.ACCURACY):  # not NaN
        out.update(accuracy_first=rl[0][M.ACCURACY], accuracy_last=rl[-1][M.ACCURACY])
    return out


def _as_ray_checkpoint(uri: str) -> ray.train.Checkpoint:
    fs, path = storage.resolve(uri)
    return ray.train.Checkpoint(path, filesystem=fs)


def summarize(recipe: Recipe, result, wall: float, conversion: Conversion | None = None) -> Summary:
    """Write loss.png and summary.json into the run folder (local or object store)."""
    metrics = result.metrics or {}
    history: list[dict] = []
    n_params = 0
    run = recipe.run.folder
    ckpt_path = None
    if result.checkpoint is not None:
        ckpt_path = storage.join(run, posixpath.basename(result.checkpoint.path.rstrip("/")))
        state = checkpoint.read_state(ckpt_path)
        history, n_params = state.history, state.n_params
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
        run_dir=run, checkpoint=ckpt_path, steps=metrics.get(M.STEP, 0), tokens=metrics.get(M.TOKENS, 0),
        n_params=n_params, wall_s=wall, final_loss=metrics.get(M.LOSS), val_loss=metrics.get(M.VAL_LOSS),
        val_ppl=metrics.get(M.VAL_PPL), tokens_per_s=metrics.get(M.TOKENS_PER_S), plot=plot_path,
        sample=metrics.get(M.SAMPLE), val_loss_per_source=per_source_val(metrics) or None,
        evals={k: v for k, v in metrics.items() if k.startswith(M.EVAL_PREFIX)} or None,
        conversations=None if conversion is None else {
            "documents": conversion.documents, "longer_than_seq_len": conversion.longer,
            "skipped_lines": len(conversion.skipped), "kind": conversion.what},
        rewards=reward_summary(history),
    )
    with run_fs.open_output_stream(storage.join(run_dir, "summary.json")) as f:
        f.write(json.dumps(asdict(summary), indent=1).encode())
    return summary
