"""A recipe from its YAML file: read, `key=value` overrides applied, validated into the typed recipe
(`schema.py`), and its local paths made absolute for processes that start elsewhere. A file or value that cannot be
read fails here, naming the file or the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmray import hub, storage
from llmray.recipe.schema import QuantSettings, Recipe, RecipeError

# The recipe keys that name local files or folders (or URIs). A run's other processes (Train workers, Tune trials)
# need not share the driver's working directory, so the driver makes them absolute (`with_absolute_paths`).
PATH_KEYS = ("data.shards", "data.val_shards", "data.tokenizer", "data.conversations", "data.sources.*.shards",
             "model.pretrained", "distill.teacher", "eval.tasks")


def with_absolute_paths(raw: dict, root: Path | None = None) -> dict:
    """A copy of the raw recipe whose relative local paths that exist under `root` (default: the working
    directory) are absolute; URIs, absolute paths and paths that do not exist are left as they are."""
    root = root or Path.cwd()

    def fix(value, key: str):
        if not isinstance(value, str) or storage.is_uri(value) or os.path.isabs(value):
            return value
        path = root / value
        return str(path.resolve()) if path.exists() else value

    return map_keys(raw, PATH_KEYS, fix)


# The recipe keys that may name a model on the Hub (org/name[@rev]), and those that may name a Hub dataset's files
# (hf://datasets/org/name[@rev]/path).
MODEL_KEYS = ("model.pretrained", "distill.teacher", "data.tokenizer")
DATASET_KEYS = ("data.shards", "data.val_shards", "data.conversations", "data.sources.*.shards")


def with_pinned_names(raw: dict, earlier: dict | None = None) -> dict:
    """A copy of the raw recipe whose Hub names are fixed to the commit they name now (`org/name@<sha>`), so every
    worker and replica reads the same files however the branch moves; a name that cannot be resolved (unknown, or
    offline and not cached) raises hub.HubError naming the key. Where `earlier` (the recipe of a checkpoint being
    continued) pinned the same name, its commit is kept: a resumed run reads what it started on."""
    pins: dict[str, str] = {}
    before: list[tuple[str, str]] = []  # (key, value) of every name `earlier` holds, lists and sources included
    if earlier:
        map_keys(earlier, MODEL_KEYS + DATASET_KEYS, lambda value, key: before.append((key, value)) or value)

    def pin(value, key: str):
        if not isinstance(value, str):
            return value
        kept = [b for k, b in before if k == key and isinstance(b, str) and _same_name(value, b)]
        if kept:
            return kept[0]
        if value not in pins:
            pins[value] = hub.pinned_uri(value, key) if key in DATASET_KEYS else hub.pinned(value, key)
        return pins[value]

    return map_keys(map_keys(raw, MODEL_KEYS, pin), DATASET_KEYS, pin)


def _same_name(value: str, pinned: str) -> bool:
    """`org/name` (no revision given) and `org/name@<sha>`; also for hf:// dataset paths."""
    if hub.is_hub_uri(value) and hub.is_hub_uri(pinned):
        (repo, rev, path), (repo2, rev2, path2) = hub.parse_dataset_uri(value), hub.parse_dataset_uri(pinned)
        return rev is None and (repo, path) == (repo2, path2) and rev2 is not None
    if hub.is_hub_id(value) and hub.is_hub_id(pinned):
        (repo, rev), (repo2, rev2) = hub.split_id(value), hub.split_id(pinned)
        return rev is None and repo == repo2 and rev2 is not None
    return False


def map_keys(raw: dict, keys: tuple[str, ...], fn) -> dict:
    """A copy of the raw recipe with `fn(value, key)` applied to the value (or each value of a list) at each dotted
    key (`*` for every item of a list) that is set."""
    def walk(node, parts: list[str], key: str):
        if not parts:
            return [fn(v, key) for v in node] if isinstance(node, list) else fn(node, key)
        if not isinstance(node, (dict, list)):
            return node
        head, rest = parts[0], parts[1:]
        if head == "*":
            return [walk(item, rest, key) for item in node] if isinstance(node, list) else node
        if isinstance(node, dict) and node.get(head) is not None:
            return {**node, head: walk(node[head], rest, key)}
        return node

    for key in keys:
        raw = walk(raw, key.split("."), key)
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
