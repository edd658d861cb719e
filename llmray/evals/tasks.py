"""An eval task: a small YAML naming a JSONL file and its fields, read and checked before anything runs.

    name: sentiment                 # default: the file's name
    data: sentiment.jsonl           # relative to the YAML's folder, or absolute
    type: choice                    # perplexity | generate | choice
    input: review                   # the field holding the text (perplexity) or filling the prompt
    prompt: "Review: {review}\\nSentiment:"   # optional: a format string over the line's fields
    target: label                   # the reference answer's field (generate, choice)
    choices: [positive, negative]   # choice: the labels compared by log-likelihood
    chat: false                     # true: the prompt is a user message rendered with the chat template
    metrics: [accuracy, f1]         # default: all the type's
    max_new_tokens: 32              # generate
    limit: null                     # only the first N examples

A missing field, a label that is not among the choices, an empty file or a line that is not JSON is refused in one
line naming the file, the line and the field.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmray.errors import LlmrayError
from llmray.recipe.load import load_yaml_model
from llmray.recipe.schema import Strict

METRICS = {
    "perplexity": ("perplexity",),
    "generate": ("exact_match", "token_f1", "bleu", "chrf", "accuracy", "f1"),
    "choice": ("accuracy", "f1"),
}


class TaskError(LlmrayError):
    """A task file or data line that cannot be evaluated; the message names the file, line and field."""


class TaskSpec(Strict):
    name: str | None = None
    data: str
    type: Literal["perplexity", "generate", "choice"]
    input: str = "text"
    prompt: str | None = None
    target: str | None = None
    choices: list[str] | None = None
    chat: bool = False
    metrics: list[str] | None = None
    max_new_tokens: int = Field(32, gt=0)
    limit: int | None = Field(None, gt=0)

    @field_validator("choices", mode="before")
    @classmethod
    def _labels_as_text(cls, v):
        if isinstance(v, list):
            if any(isinstance(c, bool) for c in v):
                raise ValueError("YAML reads unquoted yes/no/true/false as booleans: quote the labels")
            return [str(c) if isinstance(c, (int, float)) else c for c in v]
        return v

    @model_validator(mode="after")
    def _fits_its_type(self) -> "TaskSpec":
        if self.type != "perplexity" and self.target is None:
            raise ValueError(f"target: a {self.type} task needs the field holding the reference answer")
        if self.type == "choice" and not self.choices:
            raise ValueError("choices: a choice task needs its labels")
        unknown = [m for m in self.metrics or () if m not in METRICS[self.type]]
        if unknown:
            raise ValueError(f"metrics: {', '.join(unknown)} not available for a {self.type} task "
                             f"(it has {', '.join(METRICS[self.type])})")
        return self

    @property
    def metric_names(self) -> list[str]:
        return list(self.metrics or METRICS[self.type])


@dataclass
class Example:
    line: int
    prompt: str  # the text to score (perplexity) or the prompt to answer
    target: str | None


@dataclass
class Task:
    spec: TaskSpec
    name: str
    path: str
    examples: list[Example]


def load_task(path: str | Path) -> Task:
    path = Path(path)
    spec = load_yaml_model(path, "task", TaskSpec, TaskError)
    data = Path(spec.data) if Path(spec.data).is_absolute() else path.parent / spec.data
    if not data.is_file():
        raise TaskError(f"task {path}: data: {data} does not exist")
    fields = [f for _, f, _, _ in string.Formatter().parse(spec.prompt or "") if f]
    examples = []
    for lineno, line in enumerate(data.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{data}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{where}: a line must hold a JSON object")
        for field in [spec.input, *fields, *([spec.target] if spec.target else [])]:
            if field not in obj:
                raise TaskError(f"{where}: field {field!r} is missing (task {path})")
        target = None if spec.target is None else str(obj[spec.target])
        if spec.type == "choice" and target not in spec.choices:
            raise TaskError(f"{where}: field {spec.target!r}: {target!r} is not among the choices "
                            f"{', '.join(spec.choices)} (task {path})")
        prompt = spec.prompt.format(**obj) if spec.prompt else str(obj[spec.input])
        examples.append(Example(lineno, prompt, target))
        if spec.limit and len(examples) >= spec.limit:
            break
    if not examples:
        raise TaskError(f"task {path}: data file {data} is empty")
    return Task(spec, spec.name or path.stem, str(path), examples)
