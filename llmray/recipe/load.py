"""A recipe from its YAML file: read, `key=value` overrides applied, validated into the typed recipe
(`schema.py`), and its local paths made absolute for processes that start elsewhere. A file or value that cannot be
read fails here, naming the file or the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmray import storage
from llmray.recipe.schema import QuantSettings, Recipe, RecipeError

# The recipe keys that name local files or folders (or URIs). A run's other processes (Train workers, Tune trials)
# need not share the driver's working directory, so the driver makes them absolute (`with_absolute_paths`).
PATH_KEYS = ("data.shards", "data.val_shards", "data.tokenizer", "data.conversations", "data.sources.*.shards",
             "model.pretrained", "distill.teacher", "eval.tasks")


def with_absolute_paths(raw: dict, root: Path | None = None) -> dict:
    """A copy of the raw recipe whose relative local paths that exist under `root` (default: the working
    directory) are absolute; URIs, absolute paths and paths that do not exist are left as they are."""
    root = root or Path.cwd()

    def fix(value):
        if isinstance(value, list):
            return [fix(v) for v in value]
        if not isinstance(value, str) or storage.is_uri(value) or os.path.isabs(value):
            return value
        path = root / value
        return str(path.resolve()) if path.exists() else value

    def walk(node, parts: list[str]):
        if not parts or not isinstance(node, (dict, list)):
            return fix(node) if not parts else node
        head, rest = parts[0], parts[1:]
        if head == "*":
            return [walk(item, rest) for item in node] if isinstance(node, list) else node
        if isinstance(node, dict) and node.get(head) is not None:
            return {**node, head: walk(node[head], rest)}
        return node

    for key in PATH_KEYS:
        raw = walk(raw, key.split("."))
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {text!r} is not of the form key=value")
    return key.split("."), yaml.safe_load(raw) if raw != "" else None


def set_value(raw: dict, path: list[str], value: Any) -> dict:
    """raw[path[0]][path[1]]... = value, creating sections on the way."""
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        set_value(raw, path, value)
    return raw


def describe_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = f" (got {e['input']!r})" if key and not isinstance(e.get("input"), dict) else ""
            lines.append(f"{key}: {msg}{got}" if key else msg)
    return "; ".join(lines)


def recipe_from_dict(raw: dict) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"invalid recipe: {describe_validation_error(e)}") from None


def quant_settings(raw: dict) -> QuantSettings:
    """Quantization settings outside a recipe (`llmray quantize`), validated the same way."""
    try:
        return QuantSettings.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"invalid quantization settings: {describe_validation_error(e)}") from None


def read_yaml_mapping(path: str | Path, what: str, error: type[Exception] = RecipeError) -> dict:
    """A YAML file's top-level mapping; a missing file, bad YAML or a non-mapping raises `error` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{what} {path} must hold a mapping at the top level")
    return raw


def load_yaml_model(path: str | Path, what: str, model: type[BaseModel], error: type[Exception]):
    """A YAML file validated as `model`; any problem raises `error` naming the file (and the key)."""
    raw = read_yaml_mapping(path, what, error)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise error(f"{what} {path}: {describe_validation_error(e)}") from None


def read_recipe_file(path: str | Path) -> dict:
    """The recipe file's mapping, unvalidated (a sweep fills in its swept keys before validating)."""
    return read_yaml_mapping(path, "recipe file")


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    raw = read_recipe_file(path) if path is not None else {}
    return recipe_from_dict(apply_overrides(raw, list(overrides)))
