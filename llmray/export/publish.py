"""`llmray export --push-to-hub org/name`: an exported folder (merged weights or a LoRA adapter, quantized or
pruned ones too) published as a Hub model repository, with a model card written from the folder's lineage: what
trained it, on what, with which recipe, and what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from llmray import hub, storage
from llmray import metric_names as M
from llmray.errors import LlmrayError
from llmray.model import lineage

CARD = "README.md"


class PublishError(LlmrayError):
    pass


def model_card(info: dict, repo_id: str, reports: dict[str, dict] | None = None) -> str:
    """The model card (README.md, with the Hub's metadata block) of a folder whose lineage is `info`; `reports`:
    the folder's *_report.json files (quantize, prune), by name."""
    recipe = info.get("recipe") or {}
    model, data, finetune = recipe.get("model") or {}, recipe.get("data") or {}, recipe.get("finetune") or {}
    base = model.get("pretrained")
    base_id = hub.split_id(base)[0] if base and hub.is_hub_id(base) else None
    datasets = sorted({hub.parse_dataset_uri(p)[0] for p in _data_paths(data) if hub.is_hub_uri(p)})
    adapter = bool(info.get("adapter_only"))
    meta = {"library_name": "peft" if adapter else "transformers", "pipeline_tag": "text-generation",
            "tags": ["llmray"] + ([finetune["method"]] if finetune.get("method") else [])}
    if base_id:
        meta["base_model"] = base_id
    if datasets:
        meta["datasets"] = datasets
    how = {"full": "full fine-tuning", "lora": "LoRA fine-tuning", "qlora": "QLoRA fine-tuning"}.get(
        finetune.get("method"), "pretraining")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {repo_id}", "",
             f"{'A LoRA adapter' if adapter else 'A causal language model'} made by {how} with "
             f"llmray (Ray Train + DeepSpeed ZeRO-{info.get('zero_stage')}, "
             f"{info.get('world_size')} workers)" + (f" from [{base_id}](https://huggingface.co/{base_id})"
                                                       if base_id else f" from {base}" if base else "")
             + f", on {', '.join(_data_paths(data)) or 'its recipe data'}.", "",
             "| | |", "|---|---|",
             f"| steps | {info.get('step')} |", f"| tokens | {info.get('tokens'):,} |" if info.get("tokens") else None,
             f"| parameters | {info['parameters'] / 1e6:.2f}M |" if info.get("parameters") else None,
             f"| dtype | {info.get('dtype')} |",
             f"| commit of the base | {hub.split_id(base)[1]} |" if base_id else None]
    figures = info.get("figures") or {}
    if figures or reports:
        held = info.get("held_out") or {}
        where = f" (held out: {held.get('shards')}, fraction {held.get('val_fraction')})" if held else ""
        lines += ["", "## Evaluation", "", f"Measured during training{where}:", "", "| metric | value | step |",
                  "|---|---|---|"]
        lines += [f"| {_metric_name(k)} | {_fmt(v['value'])} | {v.get('step')} |" for k, v in figures.items()]
        for name, report in (reports or {}).items():
            shown = {k: report[k] for k in ("method", "scheme", "ppl_before", "ppl_after", "ppl_ratio", "size_ratio")
                     if k in report}
            lines += ["", f"`{name}`: " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items())]
    lines += ["", "## Use", "", "```python"]
    if adapter:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
    lines += ["```", "", f"or serve it: `llmray serve {repo_id}`."]
    if recipe:
        lines += ["", "## Recipe", "", "The recipe that trained it (`llmray finetune recipe.yaml` or `llmray train`):",
                  "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```"]
    lines += ["", f"Source checkpoint: `{info.get('checkpoint')}`."]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _data_paths(data: dict) -> list[str]:
    paths = data.get("conversations") or data.get("shards")
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    return paths + [s["shards"] for s in data.get("sources") or [] if s.get("shards")]


def _metric_name(key: str) -> str:
    return {M.LOSS: "training loss", M.VAL_LOSS: "validation loss", M.VAL_PPL: "validation perplexity"}.get(
        key, key.removeprefix(M.EVAL_PREFIX).replace("/", " "))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def push(folder: str, repo_id: str, private: bool = False) -> str:
    """Publish the exported `folder` (local or s3://) to the Hub repository `repo_id` (created if it does not
    exist), its model card added; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    if not hub.HUB_ID.match(repo_id) or "@" in repo_id:
        raise PublishError(f"--push-to-hub {repo_id!r}: a Hub repository is named org/name")
    local = Path(storage.local_folder(folder, "--push-to-hub"))
    info = lineage.read(local)
    reports = {p.name: json.loads(p.read_text()) for p in sorted(local.glob("*_report.json"))}
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != CARD)
    operations = [CommitOperationAdd(str(p.relative_to(local)), str(p)) for p in files]
    operations.append(CommitOperationAdd(CARD, model_card(info, repo_id, reports).encode()))
    api = hub.api()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, operations=operations,
                                   commit_message=f"llmray export: step {info.get('step')} of "
                                                  f"{info.get('checkpoint')}")
    except HfHubHTTPError as e:
        raise PublishError(f"--push-to-hub {repo_id}: {hub.endpoint()} refused the upload "
                           f"({str(e).splitlines()[0]}); a write token goes in HF_TOKEN") from None
    return commit.commit_url
