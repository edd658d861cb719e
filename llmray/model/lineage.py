"""Where an exported folder came from: `llmray_export.json` beside its weights (the checkpoint, step, tokens,
dtype, the run's held-out set and, once quantized, the scheme). Written by `llmray export`, carried forward by
`llmray quantize`, read when a folder is measured."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from llmray import metric_names as M
from llmray.data.split import HeldOut

EXPORT_INFO = "llmray_export.json"


def read(folder: str | Path) -> dict:
    path = Path(folder, EXPORT_INFO)
    return json.loads(path.read_text()) if path.is_file() else {}


def write(folder: str | Path, info: dict) -> None:
    Path(folder, EXPORT_INFO).write_text(json.dumps(info, indent=1))


def record_export(held_out: HeldOut | None, **facts) -> dict:
    """The lineage of a fresh export: `facts` (checkpoint, step, ...) and the run's held-out set."""
    return {**facts, "held_out": asdict(held_out) if held_out is not None else {}}


def figures(history: list[dict]) -> dict:
    """What a run measured, as of its checkpoint: the latest training loss, validation loss and perplexity, and
    each eval task's figures, each with the step it was measured at."""
    out = {}
    for entry in history:
        for key, value in entry.items():
            if key in (M.LOSS, M.VAL_LOSS, M.VAL_PPL) or key.startswith(M.EVAL_PREFIX):
                out[key] = {"value": value, "step": entry.get(M.STEP)}
    return out


def carry(src: str | Path, dest: str | Path, step: str, facts: dict) -> None:
    """A compressed copy's lineage: the source's, plus what this step (quant, prune) did."""
    write(dest, {**read(src), step: facts})


def input_report(src: str | Path) -> dict | None:
    """The report of the step that made `src` (its *_report.json: a prune or quantize report), named in the next
    step's report, so a chain of steps states each one's input and figures."""
    for path in sorted(Path(src).glob("*_report.json")):
        report = json.loads(path.read_text())
        return {"file": str(path.resolve()), **{k: report[k] for k in ("method", "scheme", "ppl_ratio", "size_ratio")
                                                if k in report}}
    return None


def recorded_held_out(folder: str | Path) -> HeldOut | None:
    """The held-out set an exported folder names (its training run's validation split), if it names one."""
    held = read(folder).get("held_out")
    return HeldOut(**held) if held else None
