"""Verifiable rewards: each completion scored by the recipe's reward functions (`rl.rewards`), their weighted sum its
reward.

Built in:
- exact_match: the answer (the whole completion, or `pattern`'s first group) equals the record's `field` after
  normalisation (case, surrounding space and punctuation, runs of spaces);
- numeric: the answer's number (the last in the completion, or `pattern`'s first group) equals the field's, within
  1e-6 relative (commas, `$` and a trailing `.` ignored; "1/2" read as 0.5);
- regex: 1 when the completion matches `pattern` (a format reward), else 0.

A user function, `function: module:function`, has TRL's signature:

    def reward(prompts: list[str], completions: list[str], **fields) -> list[float | None]

`prompts` the rendered prompts, `completions` their generated texts, and each field of the prompt records as a
list (`answer=[...]`), one entry per completion. None means "not mine to score", as in TRL: the total sums the
functions that scored, and a completion no function scored is left out of its group's baseline (advantage 0). A
function that raises is called again on each completion alone; a completion whose call raises scores 0 and is
counted (`rewards/<name>/errors`), and the run goes on.
"""

from __future__ import annotations

import importlib
import math
import re
import string
from dataclasses import dataclass
from typing import Callable

import numpy as np

from llmray.recipe.schema import RecipeError, RewardSettings

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def normalize_answer(text: str) -> str:
    """Lower case, runs of white space as one space, surrounding space and punctuation gone."""
    return " ".join(str(text).lower().split()).strip(string.punctuation + " ")


def parse_number(text) -> float | None:
    if isinstance(text, (int, float)):
        return float(text)
    cleaned = str(text).strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        if "/" in cleaned:
            num, den = cleaned.split("/", 1)
            return float(num) / float(den)
        return float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _answer(completion: str, pattern: re.Pattern | None) -> str | None:
    if pattern is None:
        return completion
    found = pattern.search(completion)
    return None if found is None else (found.group(1) if pattern.groups else found.group(0))


def exact_match(cfg: RewardSettings) -> Callable:
    pattern = re.compile(cfg.pattern, re.DOTALL) if cfg.pattern else None

    def score(prompts, completions, **fields):
        out = []
        for completion, expected in zip(completions, fields[cfg.field]):
            answer = _answer(completion, pattern)
            out.append(float(answer is not None and normalize_answer(answer) == normalize_answer(expected)))
        return out

    return score


def numeric(cfg: RewardSettings) -> Callable:
    pattern = re.compile(cfg.pattern, re.DOTALL) if cfg.pattern else None

    def score(prompts, completions, **fields):
        out = []
        for completion, expected in zip(completions, fields[cfg.field]):
            if pattern is None:
                numbers = NUMBER.findall(completion)
                answer = numbers[-1] if numbers else None
            else:
                answer = _answer(completion, pattern)
            got, want = parse_number(answer) if answer is not None else None, parse_number(expected)
            out.append(float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6,
                                                                                      abs_tol=1e-9)))
        return out

    return score


def regex(cfg: RewardSettings) -> Callable:
    pattern = re.compile(cfg.pattern, re.DOTALL)

    def score(prompts, completions, **fields):
        return [float(pattern.search(c) is not None) for c in completions]

    return score


def user_function(cfg: RewardSettings, where: str) -> Callable:
    """The function `module:function` names, imported here; RecipeError naming the recipe key when it cannot be."""
    module_name, _, attr = cfg.function.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or what the module raises as it imports
        raise RecipeError(f"{where}.function: cannot import module {module_name!r} ({type(e).__name__}: {e}); it "
                          "must be importable on every node (installed, or in the job's working_dir)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RecipeError(f"{where}.function: module {module_name!r} has no function {attr!r}")
    return fn


BUILT_IN = {"exact_match": exact_match, "numeric": numeric, "regex": regex}


@dataclass
class Scores:
    """A batch's rewards: the weighted total per completion, each function's scores, and each function's errors."""

    total: np.ndarray  # (n,); NaN where no function scored
    by_function: dict[str, np.ndarray]  # name -> (n,) unweighted scores, NaN where it returned None
    errors: dict[str, int]  # name -> completions whose scoring raised
    first_error: dict[str, str]  # name -> what the first one raised, for the log


class Rewards:
    """The recipe's reward functions, loaded once (user functions imported) so a typo fails before training."""

    def __init__(self, settings: list[RewardSettings]):
        self.settings = settings
        self.functions = [BUILT_IN[r.kind](r) if r.kind != "function" else user_function(r, f"rl.rewards[{i}]")
                          for i, r in enumerate(settings)]
        labels = [r.label for r in settings]
        self.names = [label if labels.count(label) == 1 else f"{label}_{i}" for i, label in enumerate(labels)]

    def score(self, prompts: list[str], completions: list[str], fields: list[dict]) -> Scores:
        columns = {key: [f.get(key) for f in fields] for key in dict.fromkeys(k for f in fields for k in f)}
        by_function, errors, first_error = {}, {}, {}
        for name, fn in zip(self.names, self.functions):
            scores, failed, why = _call(fn, prompts, completions, columns)
            by_function[name], errors[name] = scores, failed
            if why:
                first_error[name] = why
        scored = np.stack(list(by_function.values()))
        weights = np.array([cfg.weight for cfg in self.settings])[:, None]
        total = np.nansum(scored * weights, axis=0)
        total[np.isnan(scored).all(axis=0)] = np.nan
        return Scores(total, by_function, errors, first_error)


def _call(fn: Callable, prompts: list[str], completions: list[str], columns: dict[str, list]
          ) -> tuple[np.ndarray, int, str | None]:
    """(scores, completions that raised, the first error) of one function: called on the whole batch, and on each
    completion alone when that raises (or returns the wrong count)."""
    try:
        got = list(fn(prompts=prompts, completions=completions, **columns))
        if len(got) == len(completions):
            return np.array([_number(v) for v in got]), 0, None
        why = f"returned {len(got)} scores for {len(completions)} completions"
    except Exception as e:  # noqa: BLE001 - a user's reward must not end the run
        why = f"{type(e).__name__}: {e}"
    scores, failed, first = np.zeros(len(completions)), 0, None
    for i in range(len(completions)):
        try:
            (value,) = fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                          **{k: v[i:i + 1] for k, v in columns.items()})
            scores[i] = _number(value)
        except Exception as e:  # noqa: BLE001
            failed += 1
            first = first or f"{type(e).__name__}: {e}"
    return scores, failed, first or (why if failed else None)


def _number(value) -> float:
    """A score: None (and NaN) is NaN, "not scored"."""
    return float("nan") if value is None else float(value)
