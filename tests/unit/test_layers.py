"""The package's layering, read from its imports (`ast`, lazy imports inside functions included) and held to the
order the README's module map states: each package imports only its own modules and the layers below it.

Training reaches compression through three narrow hooks only: QAT preparation, holding a pruned model's zeros
(below), and the distillation objective (objectives/, a layer below training). RL's rollouts reach the serving
engine through one more."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "llmray"

# Bottom to top. A layer's packages (a folder of llmray/, or a module at its root) import their own modules and
# lower layers only; the ground floor's shared utilities may also import each other.
LAYERS = [
    ("ground", ["__init__", "errors", "storage", "hub", "outdir", "cluster", "cuda_arch", "logs", "metric_names",
                "ranks", "recipe"]),
    ("data", ["data"]),
    ("model", ["model"]),
    ("evaluation, objectives", ["evals", "objectives"]),
    ("training", ["train"]),
    ("serving, quantization", ["serve", "quantize"]),
    ("export", ["export"]),
    ("pruning", ["prune"]),
    ("sweeps", ["sweep"]),
    ("command", ["cli"]),
]
# module of a higher layer -> the layer that may import it. Each must itself stand below that layer (checked).
# RL's rollouts (objectives/rollout.py) generate on the serving engine.
HOOKS = {"llmray.quantize.qat": "training", "llmray.prune.sparse": "training",
         "llmray.serve.engine": "evaluation, objectives", "llmray.serve.sampling": "evaluation, objectives"}


def layer_of_package(package: str) -> str:
    for name, packages in LAYERS:
        if package in packages:
            return name
    raise AssertionError(f"llmray/{package} is in no layer of tests/unit/test_layers.py: place it")


def rank(layer: str) -> int:
    return [name for name, _ in LAYERS].index(layer)


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package's __init__ under its package's name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def package_of(module: str) -> str:
    """The folder of llmray/ (or module at its root) that `module` belongs to; llmray's own __init__ is `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The llmray modules `path` imports (`from llmray.x import y` counts as llmray.x.y when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("llmray.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llmray":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m != "llmray"}


def may_import(importer: str, imported: str) -> bool:
    mine, theirs = package_of(importer), package_of(imported)
    if mine == theirs:
        return True
    a, b = rank(layer_of_package(mine)), rank(layer_of_package(theirs))
    return b < a or (a == b == 0)


def test_every_package_imports_only_from_the_layers_below_it():
    known = modules()
    wrong = [f"{m} imports {i} ({layer_of_package(package_of(m))} -> {layer_of_package(package_of(i))})"
             for m, path in known.items() for i in sorted(imports(path, known))
             if not may_import(m, i) and HOOKS.get(i) != layer_of_package(package_of(m))]
    assert not wrong, "imports that run up or sideways:\n" + "\n".join(wrong)


@pytest.mark.parametrize("hook, layer", HOOKS.items())
def test_a_hook_into_a_lower_layer_stands_below_it(hook, layer):
    """What a hook brings with it, outside its own package, comes from below the layer it serves."""
    known = modules()
    seen, todo = set(), [hook]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [i for i in imports(known[m], known) if package_of(i) == package_of(hook)]
        for i in imports(known[m], known):
            if package_of(i) != package_of(hook):
                assert rank(layer_of_package(package_of(i))) < rank(layer), f"hook {hook} brings {i} via {m}"


def table(path: Path, heading: str) -> list[list[str]]:
    """The rows of the markdown table under `heading` in `path`, as cells (header and rule left out)."""
    text = path.read_text()
    section = text[text.index(heading) + len(heading):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    return rows[2:]


def named_packages(cell: str) -> list[str]:
    """`recipe/`, `errors.py` and the like in a table cell, as package names."""
    return [name for name, _ in re.findall(r"`(\w+)(/|\.py)`", cell)]


def stated_layers(rows: list[list[str]]) -> dict[str, str]:
    """package -> layer from a table whose first column is the layer (a blank cell carries the one above)."""
    out, layer = {}, None
    for cells in rows:
        layer = cells[0] or layer
        out.update({package: layer for package in named_packages(cells[1])})
    return out


def test_the_readme_and_the_architecture_page_state_these_layers():
    stated = {package: layer for layer, packages in LAYERS for package in packages if package != "__init__"}
    assert stated_layers(table(ROOT / "README.md", "## Module map")) == stated
    assert stated_layers(table(ROOT / "docs" / "architecture.md", "## Layers")) == stated
    assert set(stated) | {"__init__"} == {package_of(m) for m in modules()}, "a package is missing from LAYERS"


def test_the_architecture_page_lists_every_module():
    listed = {m for cells in table(ROOT / "docs" / "architecture.md", "## Every module")
              for m in re.findall(r"`([\w/]+\.py)`", cells[0])}
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert sorted(files - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - files) == [], "docs/architecture.md lists modules that do not exist"
