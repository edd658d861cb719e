"""Preference tuning on the real spine (Ray Data stream of packed pairs, Ray Train, DeepSpeed ZeRO on CPU): DPO with
LoRA under ZeRO-2 against the base with its adapters off, and full DPO under ZeRO-3 against a frozen copy; both
learn to rank the chosen answers above the rejected ones, and report TRL's metrics."""

import json

import pytest
from helpers import arithmetic_chats

from llmray import metric_names as M
from llmray.recipe.load import load_recipe
from llmray.train.checkpoint import read_state
from llmray.train.trainer import fit

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """160 arithmetic questions: chosen the right sum, rejected a wrong one."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = []
    for q, a in arithmetic_chats(160):
        wrong = a["content"].replace("= ", "= 1", 1)
        rows.append({"prompt": [q], "chosen": [a], "rejected": [{"role": "assistant", "content": wrong}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("method,stage,reference", [("lora", 2, "adapters"), ("full", 3, "copy")])
def test_dpo_learns_to_prefer_the_chosen_answers(model_dir, pairs, ray_cluster, tmp_path, method, stage, reference):
    recipe = load_recipe("jobs/sft_tiny.yaml", [
        f"model.pretrained={model_dir}", f"data.conversations={pairs}", f"run.storage_path={tmp_path}",
        "run.name=dpo", "data.seq_len=128", "train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=10",
        "train.log_every=5", "train.eval_every=0", "train.checkpoint_every=10", "train.warmup_steps=1",
        "train.schedule=constant", f"train.lr={1e-2 if method == 'lora' else 1e-3}", f"train.zero_stage={stage}",
        f"finetune.method={method}", "finetune.lora.dropout=0.0", "preference.loss=dpo", "preference.beta=0.1"])
    assert recipe.reference == reference
    summary = fit(recipe)
    assert summary.steps == 10 and summary.conversations["documents"] == 160
    history = read_state(summary.checkpoint).history
    first, last = history[0], history[-1]
    assert all(name in last for name in M.PREFERENCE)
    assert last[M.LOSS] < first[M.LOSS] - 0.05, [h[M.LOSS] for h in history]
    assert last[M.REWARDS_MARGINS] > first[M.REWARDS_MARGINS] and last[M.REWARDS_ACCURACIES] >= 0.75, history
