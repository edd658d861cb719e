"""A sweep file: W&B's sweep format (method, metric, parameters, early_terminate, run_cap) whose parameter names are
recipe keys, plus an `llmray:` block (base recipe, budget, workers per trial, concurrency, storage).

Everything a trial could trip on is checked here, before Ray starts: parameter names against the recipe schema,
distributions against W&B's list, and every discrete combination against the recipe's own validation (so a batch
size that does not divide into workers x micro-batch is named up front, not found in trial 7).
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, Field, model_validator

from llmray import metric_names as M
from llmray.errors import LlmrayError
from llmray.recipe.load import (
    apply_overrides,
    load_yaml_model,
    read_recipe_file,
    recipe_from_dict,
    set_value,
    with_absolute_paths,
    with_pinned_names,
)
from llmray.recipe.schema import Recipe, RecipeError, Strict
from llmray.train.zero import deepspeed_config, resolve_precision


class SweepError(LlmrayError):
    pass


# Every distribution W&B's sweep format defines (docs: "Sweep configuration options").
WANDB_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                       "log_uniform_values", "q_log_uniform", "q_log_uniform_values", "inv_log_uniform",
                       "inv_log_uniform_values", "normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta")
# The ones with a Ray Tune search-space twin (and so an Optuna one for bayes).
SUPPORTED_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                           "log_uniform_values", "q_log_uniform", "q_log_uniform_values", "normal", "q_normal")
# Metrics a trial reports to Tune (and W&B) while it trains, and those only its end knows (when it quantizes).
METRICS = M.WHILE_TRAINING + M.AT_THE_END
CHECK_STORAGE = "/tmp/llmray-sweep-check"  # a placeholder run folder for recipes built only to be validated
# Sizes whose every drawn value must divide the batch arithmetic: only explicit values are accepted.
DISCRETE_ONLY = ("train.global_batch_size", "train.micro_batch_size", "scaling.num_workers")


class Param(Strict):
    value: Any = None
    values: list[Any] | None = None
    probabilities: list[float] | None = None
    distribution: str | None = None
    min: int | float | None = None  # an int stays an int: W&B reads int bounds as int_uniform
    max: int | float | None = None
    q: float | None = None
    mu: float | None = None
    sigma: float | None = None
    a: float | None = None
    b: float | None = None

    @model_validator(mode="after")
    def _kind(self) -> "Param":
        d = self.distribution
        if d is None:  # W&B infers it
            if self.values is not None:
                self.distribution = "categorical"
            elif self.value is not None:
                self.distribution = "constant"
            elif self.min is not None and self.max is not None:
                ints = isinstance(self.min, int) and isinstance(self.max, int)
                self.distribution = "int_uniform" if ints else "uniform"
            else:
                raise ValueError("needs `value`, `values`, or `distribution` with its bounds")
            return self
        if d not in WANDB_DISTRIBUTIONS:
            raise ValueError(f"distribution {d!r} is not one W&B defines ({', '.join(WANDB_DISTRIBUTIONS)})")
        if d not in SUPPORTED_DISTRIBUTIONS:
            raise ValueError(f"distribution {d!r} has no Ray Tune equivalent here; use one of "
                             f"{', '.join(SUPPORTED_DISTRIBUTIONS)}")
        need = {"categorical": ["values"], "constant": ["value"], "normal": ["mu", "sigma"],
                "q_normal": ["mu", "sigma"]}.get(d, ["min", "max"])
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"distribution {d} needs {', '.join(missing)}")
        if "min" in need and self.min >= self.max:
            raise ValueError(f"min={self.min} must be below max={self.max}")
        if d in ("log_uniform_values", "q_log_uniform_values") and self.min <= 0:
            raise ValueError(f"distribution {d} needs min > 0")
        return self

    def describe(self) -> str:
        d = self.distribution
        if d == "categorical":
            return f"one of {self.values}"
        if d == "constant":
            return f"= {self.value}"
        if d in ("normal", "q_normal"):
            return f"{d}(mu={self.mu}, sigma={self.sigma})"
        return f"{d} [{self.min}, {self.max}]" + (f" step {self.q}" if self.q else "")

    def candidates(self) -> list[Any]:
        """Values to validate the recipe with: every explicit value, or a range's two ends."""
        if self.distribution == "categorical":
            return list(self.values)
        if self.distribution == "constant":
            return [self.value]
        if self.distribution in ("normal", "q_normal"):
            return [self.mu]
        if self.distribution in ("log_uniform", "q_log_uniform"):  # W&B: min/max are natural-log exponents
            return [math.exp(self.min), math.exp(self.max)]
        if self.distribution == "int_uniform":
            return [int(self.min), int(self.max)]
        return [self.min, self.max]


class Metric(Strict):
    name: str = M.VAL_PPL
    goal: Literal["minimize", "maximize"] = "minimize"

    @property
    def mode(self) -> str:
        return "min" if self.goal == "minimize" else "max"


class EarlyTerminate(Strict):
    type: Literal["hyperband"]
    min_iter: int | None = Field(None, gt=0)  # in the budget's unit (steps or tokens)
    max_iter: int | None = Field(None, gt=0)
    s: int | None = Field(None, gt=0)
    eta: float = Field(3, gt=1)
    strict: bool = False

    @model_validator(mode="after")
    def _grace(self) -> "EarlyTerminate":
        if self.min_iter is None and (self.max_iter is None or self.s is None):
            raise ValueError("hyperband needs min_iter, or max_iter and s")
        return self

    @property
    def grace_period(self) -> int:
        return self.min_iter if self.min_iter is not None else max(1, int(self.max_iter / self.eta ** self.s))


class Budget(Strict):
    steps: int | None = Field(None, gt=0)
    tokens: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> "Budget":
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps or tokens")
        return self

    @property
    def unit(self) -> str:
        return "step" if self.steps is not None else "tokens"

    @property
    def amount(self) -> int:
        return self.steps if self.steps is not None else self.tokens


class LlmrayBlock(Strict):
    recipe: str  # the base recipe every trial starts from
    overrides: list[str] = Field(default_factory=list)  # key=value on top of it, before the swept keys
    budget: Budget
    workers: int | None = Field(None, ge=1)  # per trial (default: the recipe's scaling.num_workers)
    cpus_per_worker: float | Literal["auto"] | None = None
    gpus_per_worker: float | None = Field(None, gt=0)
    use_gpu: bool | None = None
    max_concurrent_trials: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # auto: as many trials as the cluster holds
    storage_path: str = "./sweeps"
    export_best: bool = True  # export the best trial's last checkpoint as a Hugging Face folder


class SweepSpec(Strict):
    # W&B's keys
    name: str
    project: str = "llmray"
    entity: str | None = None
    description: str | None = None
    method: Literal["grid", "random", "bayes"]
    metric: Metric = Field(default_factory=Metric)
    parameters: dict[str, Param]
    early_terminate: EarlyTerminate | None = None
    run_cap: int | None = Field(None, gt=0)
    # llmray's keys
    llmray: LlmrayBlock

    @model_validator(mode="after")
    def _method_needs(self) -> "SweepSpec":
        if not self.parameters:
            raise ValueError("parameters: at least one parameter must be swept")
        if self.method == "grid":
            for key, p in self.parameters.items():
                if p.distribution not in ("categorical", "constant"):
                    raise ValueError(f"parameters.{key}: grid search needs `values`, not distribution {p.distribution}")
        elif self.run_cap is None:
            raise ValueError(f"run_cap: method {self.method} draws trials until run_cap; set it")
        per_source = self.metric.name.startswith(M.per_source(M.VAL_LOSS, ""))
        if self.metric.name not in METRICS and not self.metric.name.startswith(M.EVAL_PREFIX) and not per_source:
            raise ValueError(f"metric.name: {self.metric.name!r} is not reported by trials ({', '.join(METRICS)}, "
                             "eval/<task>/<metric> of the recipe's eval tasks, or val_loss/<source> of its blend)")
        if self.early_terminate is not None and self.metric.name in M.AT_THE_END:
            raise ValueError(f"early_terminate: hyperband compares trials while they train, but {self.metric.name} "
                             f"is known only when a trial ends; use one of {', '.join(M.WHILE_TRAINING)}")
        for key in DISCRETE_ONLY:
            p = self.parameters.get(key)
            if p is not None and p.distribution not in ("categorical", "constant"):
                raise ValueError(f"parameters.{key}: use `values`; a distribution can draw sizes that do not "
                                 "divide the batch arithmetic")
        return self

    # ---- the W&B side ---------------------------------------------------------------------------------------

    def wandb_config(self) -> dict:
        """The sweep as W&B stores it (llmray's block left out), for the dashboard's sweep page."""
        return self.model_dump(mode="json", exclude={"llmray"}, exclude_none=True)

    # ---- recipes ----------------------------------------------------------------------------------------------

    def base_raw(self) -> dict:
        """The recipe file with the sweep's overrides, read in the driver: its local paths absolute, since each
        trial runs in its own folder, and its Hub names pinned, so every trial trains on the same commit."""
        raw = with_pinned_names(with_absolute_paths(apply_overrides(read_recipe_file(self.llmray.recipe),
                                                                    self.llmray.overrides)))
        scaling = raw.setdefault("scaling", {})
        for key, value in (("num_workers", self.llmray.workers), ("cpus_per_worker", self.llmray.cpus_per_worker),
                           ("gpus_per_worker", self.llmray.gpus_per_worker), ("use_gpu", self.llmray.use_gpu)):
            if value is not None:
                scaling[key] = value
        return raw

    def trial_recipe(self, params: dict[str, Any], storage_path: str, name: str, base: dict | None = None) -> Recipe:
        """The base recipe with this trial's values, its budget, and evaluation at every report when the metric
        needs it (Tune's schedulers compare trials on what each report carries)."""
        raw = copy.deepcopy(base) if base is not None else self.base_raw()
        # Ray Tune's W&B callback logs each trial; the recipe's own W&B run would be a second one.
        for key, value in {**params, "run.storage_path": storage_path, "run.name": name, "wandb.project": None}.items():
            set_value(raw, key.split("."), value)
        recipe = recipe_from_dict(raw)
        b = self.llmray.budget
        steps = b.steps if b.steps is not None else max(1, math.ceil(b.tokens / recipe.tokens_per_step))
        # The recipe's checkpoints stay: a trial cut off by an interruption continues from its last one.
        update = {"max_steps": steps}
        if self.metric.name.startswith("val_"):
            update["eval_every"] = recipe.train.log_every
        return recipe.model_copy(update={"train": recipe.train.model_copy(update=update)})

    def first_recipe(self) -> Recipe:
        """The recipe of the first combination (each range at its low end): what sizes a trial's resources."""
        params = {k: p.candidates()[0] for k, p in self.parameters.items()}
        return self.trial_recipe(params, CHECK_STORAGE, "check")

    def check(self) -> None:
        """Every swept name is a recipe key, and every discrete combination (ranges at both ends) makes a valid
        recipe; the first that does not is named with its values."""
        for key in self.parameters:
            _check_key(key)
        base = self.base_raw()
        if any(k.startswith("quant.") and k != "quant.method" for k in self.parameters):
            if base.get("quant", {}).get("method", "none") == "none" and "quant.method" not in self.parameters:
                raise SweepError("parameters sweep quant.* but the recipe's quant.method is none, so no trial would "
                                 "quantize; set quant.method (ptq or qat) in the recipe or llmray.overrides")
        keys = list(self.parameters)
        combos = itertools.product(*(self.parameters[k].candidates() for k in keys))
        for n, values in enumerate(combos):
            if n >= 10_000:
                break
            params = dict(zip(keys, values))
            try:
                recipe = self.trial_recipe(params, CHECK_STORAGE, "check", base=base)
                deepspeed_config(recipe, resolve_precision(recipe, bf16_supported=True))  # train.deepspeed agrees
            except RecipeError as e:
                shown = ", ".join(f"{k}={v}" for k, v in params.items())
                raise SweepError(f"parameters {shown}: {e}") from None
            if self.metric.name.startswith("quant_") and recipe.quant.method == "none":
                raise SweepError(f"metric.name={self.metric.name} needs quantized trials, but {params} has quant.method none")
            if self.metric.name.startswith("val_") and not (recipe.data.val_shards or recipe.data.val_fraction > 0):
                raise SweepError(f"metric.name={self.metric.name} needs a validation split: set data.val_fraction")
            if self.metric.name in M.RL_WHILE_TRAINING and recipe.rl is None:
                raise SweepError(f"metric.name={self.metric.name} is an RL run's; the recipe has no rl: block")
            if self.metric.name.startswith(M.EVAL_PREFIX):
                check_eval_metric(self.metric.name, recipe)
            check_source_metric(self.metric.name, recipe)

    def grid(self) -> list[dict[str, Any]]:
        """Grid search: every combination of values, in file order, capped at run_cap as W&B does."""
        keys = list(self.parameters)
        combos = [dict(zip(keys, v)) for v in itertools.product(*(self.parameters[k].candidates() for k in keys))]
        return combos[: self.run_cap] if self.run_cap else combos


def check_source_metric(name: str, recipe: Recipe) -> None:
    """val_loss/<source> must name a source of the recipe's blend (a single corpus reports only val_loss)."""
    prefix = M.per_source(M.VAL_LOSS, "")
    if not name.startswith(prefix):
        return
    sources = [s.name for s in recipe.data.sources or []]
    if name[len(prefix):] not in sources:
        raise SweepError(f"metric.name={name}: the recipe's data.sources have no source {name[len(prefix):]!r} "
                         f"(they have {', '.join(sources) or 'none: one corpus reports val_loss alone'})")


def check_eval_metric(name: str, recipe: Recipe) -> None:
    """eval/<task>/<metric> must name a task of the recipe's `eval.tasks` and one of that task's metrics."""
    from llmray.evals.tasks import load_task

    tasks = {t.name: t for t in (load_task(p) for p in recipe.eval.tasks)}
    task, _, metric = name[len(M.EVAL_PREFIX):].partition("/")
    if task not in tasks:
        raise SweepError(f"metric.name={name}: the recipe's eval.tasks have no task {task!r} "
                         f"(they have {', '.join(tasks) or 'none'})")
    allowed = tasks[task].metric_names + (["loss"] if tasks[task].spec.type == "perplexity" else [])
    if metric not in allowed:
        raise SweepError(f"metric.name={name}: task {task} reports {', '.join(allowed)}")


def _check_key(key: str) -> None:
    """`train.lr` must name a field of the recipe schema; below a free-form dict (model.extra) anything goes."""
    model: Any = Recipe
    for i, part in enumerate(key.split(".")):
        fields = getattr(model, "model_fields", None)
        if fields is None:  # a dict field: its keys are the user's
            return
        if part not in fields:
            where = ".".join(key.split(".")[:i]) or "the recipe"
            raise SweepError(f"parameters.{key}: {part!r} is not a key of {where} "
                             f"(keys: {', '.join(fields)})")
        annotation = fields[part].annotation
        # a section, or an optional one (`finetune: FinetuneSettings | None`)
        model = next((a for a in (annotation, *get_args(annotation))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None and i < len(key.split(".")) - 1:
            if fields[part].annotation in (dict, dict[str, Any]) or "dict" in str(fields[part].annotation):
                return
            raise SweepError(f"parameters.{key}: {'.'.join(key.split('.')[:i + 1])} is a value, not a section")


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    spec = load_yaml_model(path, "sweep file", SweepSpec, SweepError)
    recipe = Path(spec.llmray.recipe)
    if not recipe.is_absolute():  # relative to the sweep file's folder first, else to the working directory
        beside = path.parent / recipe
        spec.llmray.recipe = str((beside if beside.is_file() else recipe).resolve())
    spec.check()
    return spec
