"""The typed recipe: every section, key and default, declared once, and the checks across sections.

A wrong key or value fails on validation, naming the key, before Ray or any worker starts. Reading a recipe file
and applying `key=value` overrides is `load.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmray import storage
from llmray.errors import LlmrayError

# The quantization schemes a recipe (quant.scheme) or `llmray quantize --scheme` may name; which run on CPU is part
# of each name's contract. `llmray.quantize.schemes` maps each to its torchao configs.
SCHEMES = {
    "int8-weight-only": "int8 per-channel weights, activations in full precision (CPU and GPU)",
    "int8-dynamic": "int8 per-token activations quantized at run time + int8 per-channel weights (CPU and GPU)",
    "int8-dynamic-int4": "int8 per-token activations + int4 grouped weights, torchao's CPU/edge int4 (CPU and GPU)",
    "int4-weight-only": "int4 grouped weights, bf16 activations, tinygemm kernel (CUDA GPUs sm80+ only)",
}
GPU_ONLY_SCHEMES = ("int4-weight-only",)
INT4_GROUP_SIZES = (32, 64, 128, 256)


class RecipeError(LlmrayError):
    """A recipe that cannot run; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSettings(Strict):
    name: str = "pretrain"
    storage_path: str = "./runs"  # local folder or s3:// gs:// URI
    seed: int = 1234

    @property
    def folder(self) -> str:
        """The run's folder (absolute when local): its checkpoints, loss.png and summary.json."""
        root = self.storage_path
        if not storage.is_uri(root):
            root = os.path.abspath(os.path.expanduser(root))
        return storage.join(root, self.name)


SINGLE_SOURCE = "corpus"  # the source's name when a recipe gives data.shards


class SourceSettings(Strict):
    """One part of a blend: its own shards and its share of every stretch of global batches."""

    name: str = Field(min_length=1)
    shards: str  # folder or URI holding Parquet shards written by `llmray data shard`
    weight: float = 1.0  # relative; the sources' weights are normalised to sum to 1

    @model_validator(mode="after")
    def _positive(self) -> "SourceSettings":
        if not self.weight > 0:
            raise ValueError(f"source {self.name!r}: weight must be > 0 (got {self.weight})")
        return self


class DataSettings(Strict):
    # folder or URI holding the Parquet shards written by `llmray data shard` (one source); with data.conversations,
    # where their shards are written (default: the run folder's conversations/)
    shards: str | None = None
    sources: list[SourceSettings] | None = None  # a weighted blend of several shard folders, instead of `shards`
    val_shards: str | None = None  # held-out shard folder (one source); if unset, a fraction of documents is held out
    # chat/instruction JSONL or Parquet files or folders (fine-tuning): local, s3:// or hf://datasets/org/name[/path];
    # one path or a list
    conversations: str | list[str] | None = None
    format: Literal["auto", "messages", "alpaca", "sharegpt"] = "auto"  # of data.conversations; auto: per file
    # of a data.conversations folder, only this split's files, as the Hub names them (train/..., train-0000.parquet)
    split: str | None = None
    # the format's field -> the dataset's, where they differ: {instruction: question, output: answer} reads gsm8k
    # as Alpaca records
    columns: dict[str, str] = Field(default_factory=dict)
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    # a folder written by `llmray tokenizer train`, any HF tokenizer folder (local, s3://) or Hub id (org/name[@rev]);
    # default: model.pretrained's
    tokenizer: str | None = None
    seq_len: int = Field(256, gt=1)
    # each packed document attends only to itself: position ids restart at every document (and row), which
    # flash-attn runs as varlen attention and sdpa as a block mask (Llama 3's intra-document masking). Conversations
    # are always packed this way.
    document_masking: bool = False
    tokenize_tasks: int = Field(1, ge=1)  # tokenize tasks at once; each worker process loads the tokenizer once
    tokenize_batch_docs: int = Field(512, ge=1)
    prefetch_batches: int = Field(4, ge=1)
    max_epochs: int | None = Field(None, ge=1)  # None: cycle the corpus until max_steps; else no source starts
    # another epoch after this many (with a blend, the stream ends when the first source would)

    @model_validator(mode="after")
    def _one_corpus(self) -> "DataSettings":
        if self.conversations is None and (self.split is not None or self.columns):
            raise ValueError("data.split and data.columns select and rename the fields of data.conversations, "
                             "which is not set")
        if self.conversations is not None:
            if self.sources is not None or self.val_shards:
                raise ValueError("data.conversations is one corpus: it does not go with data.sources or "
                                 "data.val_shards (use data.val_fraction)")
            if not self.conversations:
                raise ValueError("data.conversations is empty")
            return self
        if (self.shards is None) == (self.sources is None):
            raise ValueError("set either data.shards (one corpus) or data.sources (a weighted blend), not both"
                             if self.shards else "data.shards or data.sources is required")
        if self.sources is not None:
            if not self.sources:
                raise ValueError("data.sources is empty")
            names = [s.name for s in self.sources]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"source {twice[0]!r} is named twice in data.sources")
            if self.val_shards:
                raise ValueError("data.val_shards holds out one corpus; with data.sources use data.val_fraction")
        return self

    @property
    def blend(self) -> list[SourceSettings]:
        """The sources, a single `shards` folder being one source of weight 1."""
        return self.sources if self.sources is not None else [SourceSettings(name=SINGLE_SOURCE, shards=self.shards)]


class ModelSettings(Strict):
    # a Hugging Face model: local folder, s3:// folder or Hub id (org/name[@rev]); else built from scratch
    pretrained: str | None = None
    arch: str = "llama"  # any transformers model_type
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = Field(512, gt=0)
    extra: dict[str, Any] = Field(default_factory=dict)  # passed to the transformers config as is

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelSettings":
        if self.pretrained is None and self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        return self


FLASH_ATTENTIONS = ("flash_attention_2", "flash_attention_3")


class KernelsSettings(Strict):
    """The fast paths of a training step. `auto` picks the fast one where it runs: on GPUs, with its library
    installed (resolved per worker by `llmray.train.kernels`)."""

    # transformers' attn_implementation; auto: flash_attention_2 on GPUs with flash-attn installed, else sdpa.
    # Packed documents (position ids restarting per document) take flash-attn's varlen path, or a block mask in sdpa.
    attention: Literal["auto", "sdpa", "flash_attention_2", "flash_attention_3", "eager"] = "auto"
    # torch.compile of each decoder block (regional: one block's graph, compiled once, serves them all); auto: on
    # GPUs with ZeRO 0-2 (ZeRO-3's parameter gathering breaks the compiled graphs)
    compile: bool | Literal["auto"] = "auto"
    # liger-kernel's Triton kernels (RMSNorm, RoPE, SwiGLU, and a linear cross-entropy that never materialises the
    # logits); auto: on GPUs with liger-kernel installed, unless the loss needs the logits (distillation)
    liger: bool | Literal["auto"] = "auto"
    # AdamW: torch_fused (torch.optim.AdamW(fused=True): one kernel, nothing to build), deepspeed_fused (DeepSpeed's
    # FusedAdam, JIT-built with nvcc), torch (for-each); auto: torch_fused. train.offload_optimizer uses DeepSpeed's
    # CPU Adam whatever this says.
    adam: Literal["auto", "torch_fused", "deepspeed_fused", "torch"] = "auto"


class TrainSettings(Strict):
    max_steps: int = Field(100, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    global_batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = Field(1.0, ge=0)  # 0 turns clipping off
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # recompute decoder blocks' activations in the backward instead of keeping them: true (every block), or N
    # (every Nth block: memory traded back for speed)
    activation_checkpointing: bool | int = False
    kernels: KernelsSettings = Field(default_factory=KernelsSettings)
    # raw DeepSpeed JSON (dict or path), merged last: it may add features, not contradict the recipe (train/zero.py)
    deepspeed: dict[str, Any] | str | None = None
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(50, ge=0)  # 0: no evaluation during training
    eval_batches: int = Field(4, gt=0)  # micro-batches per worker per evaluation
    checkpoint_every: int = Field(50, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    sample_prompt: str | None = "def "  # a generated sample printed at the end; None skips it
    sample_tokens: int = Field(48, ge=1)
    # Audit trail in the checkpoint state: every step's loss and the id (epoch, shard position, sample) of each
    # sample it trained on. For tests and data audits; it grows with the run.
    record_samples: bool = False

    @field_validator("deepspeed")
    @classmethod
    def _load_ds_json(cls, v):
        if isinstance(v, str):
            path = Path(v)
            if not path.is_file():
                raise ValueError(f"DeepSpeed JSON file {v} does not exist")
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"DeepSpeed JSON file {v} is not valid JSON: {e}") from None
        return v

    @field_validator("activation_checkpointing")
    @classmethod
    def _every_n_blocks(cls, v):
        if not isinstance(v, bool) and v < 1:
            raise ValueError(f"must be true, false, or N >= 1 (every Nth decoder block); got {v}")
        return v

    @property
    def recompute_every(self) -> int:
        """Every how many decoder blocks activations are recomputed (activation checkpointing); 0: none."""
        v = self.activation_checkpointing
        return int(v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> "TrainSettings":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage >= 1")
        return self


class ScalingSettings(Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | Literal["auto"] = "auto"
    gpus_per_worker: float = Field(1.0, gt=0)
    data_cpus: float | Literal["auto"] = "auto"  # CPUs kept free for the tokenize tasks
    max_failures: int = Field(0, ge=-1)  # worker-group failures recovered from the latest checkpoint (-1: always)
    # The fewest workers a run goes on with after losing some (Ray Train's elastic group, num_workers=(min, max)):
    # it resumes from its last checkpoint on what is left, and grows back when nodes return. Unset: a restarted
    # run waits for all num_workers (a replacement node).
    min_workers: int | None = Field(None, ge=1)


class ZeroPPSettings(Strict):
    """DeepSpeed ZeRO++ communication quantization (GPU clusters, ZeRO-3)."""

    quantized_weights: bool = False  # zero_quantized_weights: int8 all-gather of weights
    quantized_gradients: bool = False  # zero_quantized_gradients: int4 reduce-scatter of gradients
    hpz_partition_size: int = Field(1, ge=1)  # zero_hpz_partition_size: secondary partition, usually GPUs per node

    @property
    def enabled(self) -> bool:
        return self.quantized_weights or self.quantized_gradients or self.hpz_partition_size > 1


class QuantSettings(Strict):
    method: Literal["none", "ptq", "qat"] = "none"  # ptq: quantize the export; qat: fake-quantize while training
    scheme: str | None = None  # one of SCHEMES; required unless method is none
    group_size: int = 32  # int4 schemes: weights per scale
    # Linear layers left in full precision, as transformers' `modules_to_not_convert` reads them: a name prefix up
    # to a module boundary, a regex, or a suffix. Embeddings are never quantized (only nn.Linear layers are).
    skip: list[str] = Field(default_factory=lambda: ["lm_head"])
    zeropp: ZeroPPSettings = Field(default_factory=ZeroPPSettings)

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, v):
        if v is not None and v not in SCHEMES:
            raise ValueError(f"unknown scheme {v!r}; allowed: {', '.join(SCHEMES)}")
        return v

    @field_validator("group_size")
    @classmethod
    def _known_group(cls, v):
        if v not in INT4_GROUP_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, INT4_GROUP_SIZES))}")
        return v

    @model_validator(mode="after")
    def _scheme_with_method(self) -> "QuantSettings":
        if self.method != "none" and self.scheme is None:
            raise ValueError(f"quant.method={self.method} needs quant.scheme (one of {', '.join(SCHEMES)})")
        return self


class LoraSettings(Strict):
    """peft LoRA adapters: only these are trained; the base model stays frozen."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # module name suffixes, or every Linear


class QloraSettings(Strict):
    """QLoRA's frozen base: model.pretrained's Linear weights stored 4-bit by bitsandbytes (on CUDA, and on CPU),
    dequantized block by block in the training precision for each forward. Embeddings and the LM head stay full."""

    quant_type: Literal["nf4", "fp4"] = "nf4"  # NormalFloat4 (the QLoRA paper's) or plain 4-bit float
    double_quant: bool = True  # the per-block scales quantized too: ~0.4 bit per weight less


class FinetuneSettings(Strict):
    """Supervised fine-tuning of `model.pretrained`: every weight (full), LoRA adapters on a frozen base, or LoRA
    adapters on a frozen 4-bit base (qlora)."""

    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    qlora: QloraSettings = Field(default_factory=QloraSettings)  # the base's quantization, with method qlora

    @property
    def adapters(self) -> bool:
        """LoRA adapters train (lora, qlora), not the model's own weights."""
        return self.method in ("lora", "qlora")


class VisionSettings(Strict):
    """Image-text fine-tuning of a vision-language model.pretrained (any `AutoModelForImageTextToText` folder) on
    image conversations in data.conversations (`llmray.data.vision`)."""

    max_images: int = Field(1, gt=0)  # images a conversation may hold (room for them is in every row)
    # the vision encoder trains too; by default it is frozen and only the projector and the language model train
    # (in full, or LoRA on the language model with the projector trained in full)
    train_tower: bool = False
    # false: the language model is frozen too and the projector trains alone (LLaVA's stage 1, on captions)
    train_language_model: bool = True


class DistillSettings(Strict):
    """Knowledge distillation: the student trains on alpha * T^2 * KL(teacher || student) over temperature-softened
    next-token distributions plus (1 - alpha) * its LM loss. The teacher is frozen and shares the tokenizer."""

    teacher: str  # a Hugging Face causal-LM: local folder, s3:// folder or Hub id (org/name[@rev])
    alpha: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(2.0, gt=0)
    top_k: int | None = Field(None, gt=0)  # the KL over the teacher's k most likely tokens (bounds its memory)


PRUNE_METHODS = ("depth", "width", "magnitude", "wanda")
SPARSE_METHODS = ("magnitude", "wanda")


REFERENCE_FREE = ("simpo",)


class PreferenceSettings(Strict):
    """Preference tuning on data.conversations read as pairs (prompt, chosen, rejected)."""

    loss: Literal["dpo", "ipo", "simpo"] = "dpo"
    beta: float = Field(0.1, gt=0)  # how far the policy may move from the reference (SimPO: the reward's scale)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # dpo: the share of pairs assumed mislabelled (cDPO)
    # the chosen side's NLL (its completion tokens' mean) added with this weight (RPO; TRL's loss_type [sigmoid, sft]
    # with loss_weights [1, w]): keeps the chosen answers likely while the margin grows
    sft_weight: float = Field(0.0, ge=0.0)
    simpo_gamma: float = 0.5  # simpo: the target margin gamma
    # where the reference's log-probabilities come from: the base with the adapters off (LoRA/QLoRA: no second
    # copy); a frozen copy of model.pretrained (partitioned across the ranks under ZeRO-3, else on every rank);
    # precomputed once by a Ray Data pass before training (no reference held while training; cached in the run
    # folder, reused on resume); or none (reference-free losses). auto: adapters for LoRA/QLoRA, copy for full
    # fine-tuning, none for simpo
    reference: Literal["auto", "adapters", "copy", "precomputed", "none"] = "auto"




class RewardSettings(Strict):
    """One reward function of an RL run (`rl/rewards.py`); a completion's reward is the weighted sum of its
    functions' scores."""

    kind: Literal["exact_match", "numeric", "regex", "function"]
    # exact_match, numeric: the prompt record's field holding the right answer
    field: str = "answer"
    # regex: what a well-formed completion matches (re.search), scoring 1, else 0; exact_match, numeric: where in
    # the completion the answer is (its first group; default: exact_match the whole completion, numeric its last
    # number)
    pattern: str | None = None
    function: str | None = None  # function: "module:function" (signature in docs/rl.md)
    weight: float = 1.0
    name: str | None = None  # its metrics' name (rewards/<name>/mean); default: the kind, or the function's name

    @model_validator(mode="after")
    def _complete(self) -> "RewardSettings":
        import re

        if self.kind == "function" and (not self.function or ":" not in self.function):
            raise ValueError("a reward of kind function names it as function: module:function")
        if self.kind != "function" and self.function:
            raise ValueError(f"function: names a user reward; this reward is kind {self.kind}")
        if self.kind == "regex" and not self.pattern:
            raise ValueError("a reward of kind regex needs pattern: what a well-formed completion matches")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {e}") from None
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.function.rsplit(":", 1)[1] if self.kind == "function" else self.kind


class RolloutSettings(Strict):
    """Where an RL run's completions are generated: by llmray's serving engine (`serve/engine.py`), holding the
    policy's latest weights (synced and checked after every update)."""

    # colocated: an engine in each training worker, on its device, taking turns with training (its KV cache freed
    # after each generation); separate: `actors` Ray actors of their own (a GPU each with scaling.use_gpu)
    placement: Literal["colocated", "separate"] = "colocated"
    # llmray: the serving engine; vllm: vLLM (`objectives/vllm_rollout.py`), in separate actors with a GPU each, on
    # nodes where it is installed
    engine: Literal["llmray", "vllm"] = "llmray"
    actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(1.0, gt=0)
    max_batch_size: int = Field(64, ge=1)  # rows an engine decodes at once
    # the largest difference between the generator's and the trainer's log-probabilities of a fixed probe after a
    # sync; more stops the run. None: 1e-3 in fp32, 5e-2 in bf16
    parity_tolerance: float | None = Field(None, gt=0)


class RlSettings(Strict):
    """Online RL with verifiable rewards (GRPO and its variants) on data.conversations read as prompts: each
    prompt's `group_size` completions are scored by `rewards` and trained on their group-normalised advantages."""

    rewards: list[RewardSettings] = Field(min_length=1)
    group_size: int = 8  # completions per prompt
    max_completion_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # sample among the k most likely tokens (0: all), as TRL's and vLLM's top_k
    # how a step's per-token losses are averaged: dapo (over the step's tokens), grpo (per completion, then over
    # completions), bnpo (over the micro-batch's tokens), dr_grpo (over completions x max_completion_tokens)
    loss: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"  # the std advantages are divided by (none: Dr. GRPO)
    beta: float = Field(0.0, ge=0)  # the KL to the reference's weight; 0: no reference is held
    epsilon_low: float = Field(0.2, gt=0, lt=1)  # the ratio's clip: [1 - epsilon_low, 1 + epsilon_high]
    epsilon_high: float | None = Field(None, gt=0)  # None: epsilon_low (DAPO's clip-higher: e.g. 0.28)
    updates: int = Field(1, ge=1)  # optimizer steps on each batch of rollouts (TRL's num_iterations)
    # the KL's reference: the base with the adapters off (LoRA), a frozen copy of model.pretrained (partitioned
    # under ZeRO-3), or none; auto: none when beta is 0, else adapters for LoRA and copy for full fine-tuning
    reference: Literal["auto", "adapters", "copy", "none"] = "auto"
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)

    @property
    def required_fields(self) -> tuple[str, ...]:
        """The prompt records' fields the built-in rewards read (a record without one is skipped)."""
        return tuple(dict.fromkeys(r.field for r in self.rewards if r.kind in ("exact_match", "numeric")))

    @property
    def clip_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high


class PruneSettings(Strict):
    """Pruning of a trained model (`llmray prune`, or a recipe's `prune:` block: model.pretrained is pruned into the
    run folder before training, and the run is its recovery). Which keys a method takes, and the widths a model
    can take, are checked against the model (`llmray.prune.check_spec`)."""

    method: Literal["depth", "width", "magnitude", "wanda"]
    drop_layers: int | None = None  # depth: decoder layers removed
    hidden_size: int | None = None  # width: the targets (each optional; at least one below the model's)
    intermediate_size: int | None = None
    heads: int | None = None  # attention heads kept; with grouped-query attention, whole groups go
    sparsity: float | None = None  # magnitude/wanda: the share of decoder weights zeroed
    pattern: str | None = None  # magnitude/wanda: N:M instead (N kept in every M inputs), e.g. 2:4
    calibration_samples: int = Field(64, gt=0)  # held-out samples to rank on, and to measure on


class EvalSettings(Strict):
    """`llmray eval` task files run on the training ranks every `every` steps and at the end of the run; their
    figures are reported as eval/<task>/<metric> (progress line, summary, W&B, Tune)."""

    tasks: list[str] = Field(default_factory=list)
    every: int = Field(0, ge=0)  # 0: at the end only


class WandbSettings(Strict):
    """W&B logging of a training run by rank 0 (a sweep's trials are logged by Ray Tune instead)."""

    project: str | None = None  # None: no W&B run
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with WANDB_API_KEY, else offline


class Recipe(Strict):
    run: RunSettings = Field(default_factory=RunSettings)
    data: DataSettings
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    quant: QuantSettings = Field(default_factory=QuantSettings)
    finetune: FinetuneSettings | None = None  # absent: pretraining (or continued pretraining) of every weight
    eval: EvalSettings = Field(default_factory=EvalSettings)
    distill: DistillSettings | None = None  # absent: the LM loss alone
    preference: PreferenceSettings | None = None  # present: data.conversations are preference pairs
    rl: RlSettings | None = None  # present: data.conversations are prompts, trained on by online RL (GRPO)
    prune: PruneSettings | None = None  # absent: model.pretrained as it is
    vision: VisionSettings | None = None  # present: data.conversations are image conversations for a VLM
    wandb: WandbSettings = Field(default_factory=WandbSettings)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        t, s = self.train, self.scaling
        if self.data.tokenizer is None:
            if self.model.pretrained is None:
                raise ValueError("data.tokenizer: required key is missing (it defaults to model.pretrained's "
                                 "tokenizer only when a model.pretrained folder is given)")
            self.data.tokenizer = self.model.pretrained
        self._finetune_checks()
        self._prune_checks()
        per_step = t.micro_batch_size * s.num_workers
        if t.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                f"train.micro_batch_size * scaling.num_workers = {t.micro_batch_size} * {s.num_workers} = {per_step}"
            )
        self._elastic_checks()
        if self.model.pretrained is None and self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is larger than "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )
        if t.precision == "fp16" and not s.use_gpu:
            raise ValueError("train.precision=fp16 needs scaling.use_gpu=true (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
        self._quant_checks()
        self._kernel_checks()
        self._preference_checks()
        self._rl_checks()
        if self.vision is not None:
            self._tunes_on_conversations("vision", "its image conversations (OpenAI image_url parts, LLaVA records "
                                                   "with images, or image/text caption tables)")
            if not self.vision.train_language_model and self.finetune.method != "full":
                raise ValueError(f"vision.train_language_model=false trains the projector alone; finetune.method="
                                 f"{self.finetune.method} would put adapters on the language model (use full)")
        return self

    @property
    def reference(self) -> str:
        """Where a preference or RL run's reference log-probabilities come from ("none" without one); see
        PreferenceSettings.reference and RlSettings.reference."""
        if self.rl is not None:
            if self.rl.beta == 0:  # _rl_checks refuses a reference the loss would not read
                return "none"
            return self.rl.reference if self.rl.reference != "auto" else \
                "adapters" if self.trains_adapters else "copy"
        p = self.preference
        if p is None or p.loss in REFERENCE_FREE:  # _preference_checks refuses a reference these would not read
            return "none"
        if p.reference != "auto":
            return p.reference
        return "adapters" if self.trains_adapters else "copy"

    def _preference_checks(self) -> None:
        p = self.preference
        if p is None:
            return
        self._tunes_on_conversations("preference", "its pairs (prompt/chosen/rejected records)")
        if p.loss in REFERENCE_FREE and p.reference not in ("auto", "none"):
            raise ValueError(f"preference.loss={p.loss} is reference-free; preference.reference={p.reference} would "
                             "hold a reference it never reads (set it to none or auto)")
        if p.loss not in REFERENCE_FREE and p.reference == "none":
            raise ValueError(f"preference.loss={p.loss} measures the policy against a reference; "
                             "preference.reference=none turns it off (use adapters, copy, precomputed or auto, or loss "
                             "simpo)")
        if p.reference == "adapters" and not self.trains_adapters:
            raise ValueError("preference.reference=adapters is the base with the LoRA adapters off; finetune.method="
                             f"{self.finetune.method} trains no adapters (use copy)")
        if p.label_smoothing and p.loss != "dpo":
            raise ValueError(f"preference.label_smoothing applies to loss dpo, not {p.loss}")

    def _tunes_on_conversations(self, block: str, reads: str) -> None:
        """An objective that tunes model.pretrained on records of data.conversations, and is the run's only one."""
        if self.finetune is None:
            raise ValueError(f"{block} tunes a pretrained model: add a finetune: block (method full, lora or qlora)")
        if self.data.conversations is None:
            raise ValueError(f"{block} reads {reads} from data.conversations")
        if sum(x is not None for x in (self.preference, self.rl, self.distill)) > 1:
            raise ValueError("preference, rl and distill are each an objective; a run has one")
        if self.vision is not None and any(x is not None for x in (self.preference, self.rl, self.distill)):
            raise ValueError(f"{block} with vision is not built yet: image conversations train with the next-token "
                             "loss only")

    def _rl_checks(self) -> None:
        r = self.rl
        if r is None:
            return
        self._tunes_on_conversations("rl", "its prompts (a prompt or messages per record, plus the fields its "
                                           "rewards read)")
        if r.group_size < 2:
            raise ValueError(f"rl.group_size={r.group_size}: a completion's advantage is its reward against its "
                             "group's; a group of one always has advantage 0 and nothing is learned (use 2 or more)")
        if self.finetune.method == "qlora":
            raise ValueError("rl with finetune.method=qlora is not built yet: the generator would run an "
                             "unquantized base the trainer does not (use lora)")
        if r.beta == 0 and r.reference not in ("auto", "none"):
            raise ValueError(f"rl.reference={r.reference} is held for the KL term, which rl.beta=0 turns off "
                             "(set rl.beta > 0, or rl.reference to auto)")
        if r.beta > 0 and r.reference == "none":
            raise ValueError(f"rl.beta={r.beta} weighs a KL to a reference; rl.reference=none holds none")
        if r.reference == "adapters" and not self.trains_adapters:
            raise ValueError("rl.reference=adapters is the base with the LoRA adapters off; finetune.method="
                             f"{self.finetune.method} trains no adapters (use copy)")
        if self.train.max_steps % r.updates or self.train.checkpoint_every % r.updates:
            raise ValueError(f"rl.updates={r.updates} optimizer steps are taken on each batch of rollouts; "
                             "train.max_steps and train.checkpoint_every must be multiples of it")
        if r.rollout.placement == "colocated" and r.rollout.actors != 1:
            raise ValueError("rl.rollout.actors counts separate generator actors; with placement colocated each "
                             "training worker generates (set placement: separate)")
        if r.rollout.engine == "vllm" and (r.rollout.placement != "separate" or not self.scaling.use_gpu):
            raise ValueError("rl.rollout.engine=vllm generates in actors of its own, a GPU each: set "
                             "rl.rollout.placement: separate and scaling.use_gpu: true (engine llmray runs anywhere)")

    def _kernel_checks(self) -> None:
        k, gpu = self.train.kernels, self.scaling.use_gpu
        if k.attention in FLASH_ATTENTIONS and not gpu:
            raise ValueError(f"train.kernels.attention={k.attention} runs on GPUs only; use sdpa (or auto) on CPU")
        if k.liger is True:
            if not gpu:
                raise ValueError("train.kernels.liger=true: liger-kernel's Triton kernels run on GPUs only")
            if self.distill is not None:
                raise ValueError("train.kernels.liger=true never materialises the student's logits, which "
                                 "distillation's KL needs; set it to auto or false")
        if k.adam == "deepspeed_fused" and not gpu:
            raise ValueError("train.kernels.adam=deepspeed_fused is a CUDA op; use torch_fused (or auto) on CPU")

    def _finetune_checks(self) -> None:
        f = self.finetune
        if f is None:
            return
        if self.model.pretrained is None:
            raise ValueError("finetune needs model.pretrained: the Hugging Face folder to fine-tune")
        if f.method == "qlora" and self.train.zero_stage == 3:
            raise ValueError("finetune.method=qlora replicates its 4-bit base on every rank (it is a quarter of the "
                             "model's bf16 size); ZeRO-3 would partition the packed 4-bit weights, which export cannot "
                             "gather: use train.zero_stage=2 (the adapters and their optimizer states are sharded)")
        if f.adapters and self.quant.method == "qat":
            raise ValueError(f"quant.method=qat trains every Linear layer; with finetune.method={f.method} use "
                             "quant.method=ptq (quantize the merged export)")

    def _prune_checks(self) -> None:
        p = self.prune
        if p is None:
            return
        if self.model.pretrained is None:
            raise ValueError("prune needs model.pretrained: the exported Hugging Face folder to prune")
        if p.method in SPARSE_METHODS and self.trains_adapters:
            raise ValueError(f"prune.method={p.method} keeps the pruned weights at zero while training; LoRA "
                             "adapters would fill them in when merged; use finetune.method=full")
        if storage.is_uri(self.run.storage_path):
            raise ValueError("prune writes the pruned model into the run folder, which must be local or on a "
                             f"shared file system; run.storage_path is {self.run.storage_path}")

    def _quant_checks(self) -> None:
        q, s = self.quant, self.scaling
        if q.method != "none" and q.scheme in GPU_ONLY_SCHEMES and not s.use_gpu:
            raise ValueError(f"quant.scheme={q.scheme} needs scaling.use_gpu=true: {SCHEMES[q.scheme]}; "
                             "on CPU use int8-dynamic-int4 for int4 weights")
        if q.method != "none" and not (self.data.val_shards or self.data.val_fraction > 0):
            raise ValueError(f"quant.method={q.method} reports held-out perplexity before and after quantizing; "
                             "set data.val_fraction > 0 or data.val_shards")
        if q.zeropp.enabled:
            if not s.use_gpu:
                raise ValueError("quant.zeropp (DeepSpeed ZeRO++ quantized communication) runs on NCCL GPU clusters "
                                 "only; set scaling.use_gpu=true or remove quant.zeropp")
            if self.train.zero_stage != 3:
                raise ValueError("quant.zeropp needs train.zero_stage=3 (ZeRO++ quantizes ZeRO-3's collectives)")
            if q.zeropp.hpz_partition_size > 1 and s.num_workers % q.zeropp.hpz_partition_size:
                raise ValueError(f"quant.zeropp.hpz_partition_size={q.zeropp.hpz_partition_size} does not divide "
                                 f"scaling.num_workers={s.num_workers}")

    @property
    def documents(self) -> Literal["text", "conversations", "pairs", "prompts", "images"]:
        """What a document of the stream is: text; or a record of data.conversations, read as this recipe's objective
        reads them (a conversation, a preference pair, an RL prompt, an image conversation)."""
        if self.data.conversations is None:
            return "text"
        if self.vision is not None:
            return "images"
        return "prompts" if self.rl else "pairs" if self.preference else "conversations"

    @property
    def trains_adapters(self) -> bool:
        """LoRA adapters train on a frozen base (finetune.method lora or qlora), not the model's own weights."""
        return self.finetune is not None and self.finetune.adapters

    def _elastic_checks(self) -> None:
        t, s = self.train, self.scaling
        if s.min_workers is None:
            return
        if s.min_workers > s.num_workers:
            raise ValueError(f"scaling.min_workers={s.min_workers} is more than scaling.num_workers={s.num_workers}")
        if s.max_failures == 0:
            raise ValueError("scaling.min_workers: a run goes on with fewer workers only by recovering from the loss, "
                             "which scaling.max_failures=0 forbids (set it to how many losses to recover from, or -1)")
        # the global batch stays the same at every size the group may take; only the accumulation steps change
        uneven = [w for w in range(s.min_workers, s.num_workers + 1) if t.global_batch_size % (t.micro_batch_size * w)]
        if uneven:
            raise ValueError(
                f"scaling.min_workers={s.min_workers}: train.global_batch_size={t.global_batch_size} is not a multiple "
                f"of train.micro_batch_size={t.micro_batch_size} x {uneven[0]} workers, a size the run may shrink to")

    def at_world_size(self, workers: int) -> "Recipe":
        """This recipe on the worker group Ray Train started, which under scaling.min_workers may be smaller than
        scaling.num_workers: the same global batch in more accumulation steps."""
        if workers == self.scaling.num_workers:
            return self
        return self.model_copy(update={"scaling": self.scaling.model_copy(update={"num_workers": workers})})

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.scaling.num_workers)

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_len


def default(section: str, key: str) -> Any:
    """A recipe key's declared default (`default("data", "seq_len")`), for the CLI and other entry points."""
    field = Recipe.model_fields[section].annotation.model_fields[key]
    return field.get_default(call_default_factory=True)
