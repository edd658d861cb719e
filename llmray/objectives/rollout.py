"""Rollouts for online RL on llmray's own serving engine (`serve/engine.py`), holding the policy's latest weights.

Two placements (rl.rollout.placement):
- colocated: each training worker holds a `Generator` on its own device and takes turns with training: it
  generates its ranks' completions, lets its KV cache go, then training runs;
- separate: `rl.rollout.actors` Ray actors (`GeneratorActor`, a GPU each with scaling.use_gpu), made by the driver
  and restarted by Ray if one dies; each rank generates on actor `rank % actors`. With rl.rollout.engine vllm
  they are `vllm_rollout.VllmGeneratorActor`s, the same interface over vLLM.

Weight sync after every update (`Rollouts.sync`): whole weights gathered from the ZeRO partitions, or for LoRA only the
adapters (A, B and scale per layer), which the generator merges into its copy of the base. Each sync is checked:
the generator's log-probabilities of a fixed probe must equal the trainer's within rl.rollout.parity_tolerance,
or the run stops saying so. A generator that restarted (its version behind) is synced again before it generates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray
import torch
import torch.distributed as dist

from llmray.serve.engine import Engine, Rollout
from llmray.serve.sampling import Sampling

ACTOR_ATTEMPTS = 30  # calls to a generator actor, a second apart, while Ray restarts it
PROBE_TOKENS = 32  # the parity check's fixed sequence: token ids 1..32 of the vocabulary, the same on every run


class WeightSyncError(RuntimeError):
    pass


@dataclass
class WeightUpdate:
    """What a generator loads: the policy after `version` optimizer steps. `full`: every weight by its name in the
    transformers model; `lora`: per adapted layer, (A, B, scale) to merge into the base weight."""

    version: int
    full: dict[str, torch.Tensor] | None = None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None


class Generator:
    """An engine over model.pretrained's weights that loads each update and generates a batch of completions."""

    def __init__(self, model: str, tokenizer: str, max_batch_size: int, device: str | None = None):
        """`model`, `tokenizer`: model.pretrained and data.tokenizer as the recipe names them (found on this node)."""
        from llmray import storage

        self.engine = Engine(storage.local_folder(model, "model.pretrained"), max_batch_size, 0.0, device,
                             tokenizer=storage.local_folder(tokenizer, "data.tokenizer"))
        self.version = -1  # the base model, before any update
        self.base: dict[str, torch.Tensor] = {}  # LoRA: each adapted layer's base weight, merged into afresh

    def get_version(self) -> int:
        return self.version

    @torch.no_grad()
    def load(self, update: WeightUpdate) -> int:
        params = dict(self.engine.model.named_parameters())
        if update.full is not None:
            missing = [name for name in params if name not in update.full]
            if missing:
                raise WeightSyncError(f"the weight update lacks {len(missing)} of the generator's weights "
                                      f"(first: {missing[0]})")
            for name, param in params.items():
                param.copy_(update.full[name])
        for name, (a, b, scale) in (update.lora or {}).items():
            weight = params[f"{name}.weight"]
            if name not in self.base:
                self.base[name] = weight.detach().clone()
            weight.copy_(merged(self.base[name], a, b, scale).to(weight.device))
        self.version = update.version
        return self.version

    def generate(self, prompts: list[list[int]], samplings: list[Sampling]) -> list[Rollout]:
        return self.engine.generate(prompts, samplings)

    def release(self) -> None:
        self.engine.release()

    @torch.no_grad()
    def probe(self) -> list[float]:
        """Log-probabilities of the probe's tokens 2.. given those before (at temperature 1)."""
        ids = probe_ids(self.engine.model.config.vocab_size).to(self.engine.device)
        logits = self.engine.model(input_ids=ids, use_cache=False).logits.float()
        return probe_logps(logits, ids).tolist()


GeneratorActor = ray.remote(max_restarts=-1)(Generator)


@ray.remote(num_cpus=0)
class UpdateBoard:
    """The last weight update's object ref, for any rank to reload a restarted generator with. Rank 0 puts the update
    in the object store; a ref handed to the other ranks outside Ray (torch.distributed) would have no known owner
    and could not be passed to an actor, so it travels through this actor's calls, which Ray tracks."""

    def __init__(self):
        self.version, self.boxed = -1, [None]

    def put(self, version: int, boxed: list) -> None:  # boxed: [ref], so Ray keeps the ref rather than its value
        self.version, self.boxed = version, boxed

    def get(self) -> tuple[int, list]:
        return self.version, self.boxed


@dataclass
class Generators:
    """rl.rollout.placement separate: the generator actors and the board of their last update, made by the driver
    so they outlive a restarted worker group."""

    actors: list
    board: ray.actor.ActorHandle

    def kill(self) -> None:
        for actor in (*self.actors, self.board):
            ray.kill(actor)


def start_generators(recipe) -> Generators | None:
    """rl.rollout.placement separate: the generator actors (a GPU each with scaling.use_gpu); colocated: None (each
    training worker makes its own)."""
    from llmray import hub

    r, s = recipe.rl.rollout, recipe.scaling
    if r.placement != "separate":
        return None
    options = {"num_cpus": r.cpus_per_actor, "runtime_env": {"env_vars": hub.env()}}
    if s.use_gpu:
        options["num_gpus"] = r.gpus_per_actor
    if r.engine == "vllm":
        from llmray.objectives.vllm_rollout import VllmGeneratorActor as actor_class
    else:
        actor_class = GeneratorActor
    actors = [actor_class.options(**options).remote(recipe.model.pretrained, recipe.data.tokenizer, r.max_batch_size,
                                                    "cuda" if s.use_gpu else "cpu")
              for _ in range(r.actors)]
    try:  # one that cannot start (no vllm on its node) says so here, not as a dead actor mid-run
        ray.get([a.get_version.remote() for a in actors])
    except ray.exceptions.RayActorError as e:
        raise RuntimeError(f"a generator actor did not start: {str(e).strip().splitlines()[-1]}") from None
    return Generators(actors, UpdateBoard.remote())


def merged(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """A LoRA-adapted layer's weight: its base plus B @ A x scale, summed in fp32, in the base's dtype and device."""
    delta = (b.to(torch.float32) @ a.to(torch.float32)) * scale
    return (base.float() + delta.to(base.device)).to(base.dtype)


def probe_ids(vocab_size: int) -> torch.Tensor:
    return (torch.arange(PROBE_TOKENS) % (vocab_size - 1) + 1).unsqueeze(0)


def probe_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0].cpu()


def seed_of(run_seed: int, epoch: int, piece: int, sample: int, completion: int) -> int:
    """A completion's sampling seed: fixed by the run's seed and the prompt's id, so a resumed run (on any world
    size) draws the completions an uninterrupted one would."""
    return int(np.random.SeedSequence([run_seed, epoch, piece, sample, completion]).generate_state(1)[0])


# ---- the trainer's side ------------------------------------------------------------------------------------------


def gathered(engine, params: list[torch.nn.Parameter]):
    """Under ZeRO-3, the parameters gathered whole on every rank while open (a collective); else as they are."""
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def weight_update(engine, adapters: bool, version: int) -> WeightUpdate:
    """The policy's weights for the generators, on every rank (gathering is a collective under ZeRO-3), on the CPU
    when they travel to actors."""
    model = engine.module
    if not adapters:
        params = dict(model.named_parameters())
        with gathered(engine, list(params.values())):
            return WeightUpdate(version, full={n: p.detach().clone() for n, p in params.items()})
    from peft.tuners.lora import LoraLayer

    layers = {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    params = [p for m in layers.values() for p in (*m.lora_A["default"].parameters(), *m.lora_B["default"].parameters())]
    with gathered(engine, params):
        return WeightUpdate(version, lora={
            name: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
                   float(m.scaling["default"])) for name, m in layers.items()})


@torch.no_grad()
def trainer_probe(engine) -> list[float]:
    """The probe's log-probabilities under the trainer's policy, in eval mode (every rank: a forward under ZeRO-3 is
    collective)."""
    model = engine.module
    ids = probe_ids(model.config.vocab_size).to(next(model.parameters()).device)
    training = model.training
    model.eval()  # no dropout: the generator has none
    try:
        return probe_logps(model(input_ids=ids).logits.float(), ids).tolist()
    finally:
        model.train(training)


class Rollouts:
    """This rank's generator, local or an actor: synced, checked, asked for completions, with the time each took."""

    def __init__(self, recipe, rank: int, device: torch.device, tolerance: float, generators: Generators | None = None):
        self.recipe, self.rank, self.tolerance = recipe, rank, tolerance
        self.adapters = recipe.trains_adapters
        self.generators = generators
        if generators:
            self.local, self.actor = None, generators.actors[rank % len(generators.actors)]
        else:
            self.local = Generator(recipe.model.pretrained, recipe.data.tokenizer, recipe.rl.rollout.max_batch_size,
                                   str(device))
        self.version = -1
        self.parity = float("nan")  # the last check's largest difference
        self.retries = 0  # calls to a lost actor tried again

    def sync(self, engine, version: int) -> float:
        """The policy after `version` steps into the generators, checked; returns the seconds it took."""
        started = time.perf_counter()
        update = weight_update(engine, self.adapters, version)
        if self.local is not None:
            self.local.load(update)
        else:
            if self.rank == 0:
                update = WeightUpdate(version, *(None if v is None else _to_cpu(v) for v in (update.full, update.lora)))
                ref = ray.put(update)
                for actor in self.generators.actors:
                    self._on_actor(actor, lambda a: a.load.remote(ref))
                ray.get(self.generators.board.put.remote(version, [ref]))
            dist.barrier()  # the board holds this update before any rank may reload an actor from it
        self.version = version
        self.check(engine)
        return time.perf_counter() - started

    def check(self, engine) -> None:
        mine = trainer_probe(engine)
        if self.local is not None:
            theirs = self.local.probe()
        else:
            self.current()
            theirs = self._on_actor(self.actor, lambda a: a.probe.remote())
        self.parity = float(np.max(np.abs(np.array(mine) - np.array(theirs))))
        if not self.parity <= self.tolerance:
            raise WeightSyncError(
                f"weight sync check failed at step {self.version}: the generator's log-probabilities of the probe "
                f"differ from the trainer's by up to {self.parity:.3g} (rl.rollout.parity_tolerance "
                f"{self.tolerance:g}); the generator is not running the weights being trained")

    def generate(self, prompts: list[list[int]], samplings: list[Sampling]) -> list[Rollout]:
        if self.local is not None:
            try:
                return self.local.generate(prompts, samplings)
            finally:
                self.local.release()
        for attempt in range(ACTOR_ATTEMPTS):  # lost mid-generation: Ray restarts it, `current` reloads the weights
            self.current()
            try:
                return ray.get(self.actor.generate.remote(prompts, samplings))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if attempt == ACTOR_ATTEMPTS - 1:
                    raise
                self.retries += 1
        raise AssertionError("unreachable")

    def current(self) -> None:
        """This rank's actor holding the last update: one that restarted since (Ray restarts a lost actor with the
        base model's weights) is given it again."""
        if self._on_actor(self.actor, lambda a: a.get_version.remote()) != self.version:
            version, (ref,) = ray.get(self.generators.board.get.remote())
            assert version == self.version, (version, self.version)  # sync's barrier: rank 0 posted it first
            self._on_actor(self.actor, lambda a: a.load.remote(ref))
            print(f"[llmray] a generator actor restarted: the weights of step {self.version} reloaded into it",
                  flush=True)

    def _on_actor(self, actor, call):
        """`call(actor)`'s result, tried again while Ray restarts the actor."""
        for attempt in range(ACTOR_ATTEMPTS):
            try:
                return ray.get(call(actor))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if attempt == ACTOR_ATTEMPTS - 1:
                    raise
                if attempt == 0:
                    print("[llmray] a generator actor was lost; waiting for Ray to restart it", flush=True)
                self.retries += 1
                time.sleep(1.0)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value
