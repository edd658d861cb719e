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
    image: picture                  # optional: the field holding each line's image (a vision-language model's task)

An image task (`image:` set) is a generate task (captions, visual questions) or a choice task (labels by their
log-likelihood after the image and the question). Its image is a path relative to the data file, an absolute path,
an `s3://` / `gs://` URI or a `data:` URI, read and decoded here (`data/images.py`, as training reads them). Its
prompt is a user message rendered with the chat template, as in training: the image where the prompt's `<image>`
is, else before the text. A generate task's target may hold a list of references (a caption task's captions):
BLEU, chrF, CIDEr, exact match and token F1 score against all of them.

A missing field, a label that is not among the choices, an empty file, a line that is not JSON, or an image that is
missing or corrupt is refused in one line naming the file, the line and the field.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmray.data import images
from llmray.data.vision import IMAGE_PLACEHOLDER
from llmray.errors import LlmrayError
from llmray.evals.metrics import MULTI_REFERENCE
from llmray.recipe.load import load_yaml_model
from llmray.recipe.schema import Strict

METRICS = {
    "perplexity": ("perplexity",),
    "generate": ("exact_match", "token_f1", "bleu", "chrf", "cider", "accuracy", "f1"),
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
    image: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _image_prompts_are_chats(cls, data):
        """An image goes in a user message (the chat template renders it, as in training): `chat` is true."""
        if isinstance(data, dict) and data.get("image") is not None:
            if data.get("chat") is False:
                raise ValueError("chat: an image task's prompt is a user message with the image (chat: true)")
            return {**data, "chat": True}
        return data

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
        if self.type == "perplexity" and self.image is not None:
            raise ValueError("image: a perplexity task scores text alone (image tasks: generate, choice)")
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
    prompt: str  # the text to score (perplexity) or the prompt to answer (with an image: its IMAGE_PLACEHOLDER)
    target: str | list[str] | None  # a generate task's references may be several
    image: bytes | None = None  # the image's bytes, checked


@dataclass
class Task:
    spec: TaskSpec
    name: str
    path: str
    examples: list[Example]

    @property
    def metric_names(self) -> list[str]:
        """The metrics it reports: the spec's, less those that compare one label when a line has several
        references."""
        if any(isinstance(e.target, list) for e in self.examples):
            return [m for m in self.spec.metric_names if m in MULTI_REFERENCE]
        return self.spec.metric_names


def load_task(path: str | Path) -> Task:
    path = Path(path)
    spec = load_yaml_model(path, "task", TaskSpec, TaskError)
    data = Path(spec.data) if Path(spec.data).is_absolute() else path.parent / spec.data
    if not data.is_file():
        raise TaskError(f"task {path}: data: {data} does not exist")
    fields = [f for _, f, _, _ in string.Formatter().parse(spec.prompt or "") if f]
    needed = [*([spec.input] if spec.prompt is None else fields), *([spec.target] if spec.target else []),
              *([spec.image] if spec.image else [])]
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
        for field in needed:
            if field not in obj:
                raise TaskError(f"{where}: field {field!r} is missing (task {path})")
        target = None if spec.target is None else _target(obj[spec.target], spec, f"{where}: field {spec.target!r}")
        if spec.type == "choice" and target not in spec.choices:
            raise TaskError(f"{where}: field {spec.target!r}: {target!r} is not among the choices "
                            f"{', '.join(spec.choices)} (task {path})")
        prompt = spec.prompt.format(**obj) if spec.prompt is not None else str(obj[spec.input])
        image = None
        if spec.image:
            try:
                image = images.image_bytes(obj[spec.image], str(data.parent))
            except ValueError as e:
                raise TaskError(f"{where}: field {spec.image!r}: {e} (task {path})") from None
            prompt = _with_placeholder(prompt, f"{where}: the prompt")
        examples.append(Example(lineno, prompt, target, image))
        if spec.limit and len(examples) >= spec.limit:
            break
    if not examples:
        raise TaskError(f"task {path}: data file {data} is empty")
    task = Task(spec, spec.name or path.stem, str(path), examples)
    asked = [m for m in spec.metrics or () if m not in task.metric_names]
    if asked:
        raise TaskError(f"task {path}: metrics: {', '.join(asked)} compare one label; lines of {data} hold several "
                        f"references in field {spec.target!r}")
    return task


def _target(value, spec: TaskSpec, where: str) -> str | list[str]:
    """The reference: a string (numbers read as text), or a generate task's list of references."""
    if not isinstance(value, list):
        return str(value)
    if spec.type != "generate" or not value or not all(isinstance(v, str) for v in value):
        raise TaskError(f"{where}: a list of references is for a generate task, and holds one string or more")
    return value


def _with_placeholder(prompt: str, where: str) -> str:
    """An image prompt with exactly one IMAGE_PLACEHOLDER: where the prompt puts it, else before the text."""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count > 1:
        raise TaskError(f"{where} holds {count} {IMAGE_PLACEHOLDER} placeholders; a line has one image")
    return prompt if count else IMAGE_PLACEHOLDER + prompt
