"""Preference tuning on the real spine (Ray Data stream of packed pairs, Ray Train, DeepSpeed ZeRO on CPU): DPO with
LoRA under ZeRO-2 against the base with its adapters off, and full DPO under ZeRO-3 against a frozen copy; both
learn to rank the chosen answers above the rejected ones (held-out ones too) and report TRL's metrics; a worker
SIGKILLed after the first checkpoint resumes with the same pairs and the same losses."""

import json

import pytest
from helpers import arithmetic_chats, assert_resumed_exactly, fit_with_a_worker_killed

from llmray import metric_names as M
from llmray.recipe.load import load_recipe
from llmray.train.checkpoint import read_state
from llmray.train.trainer import absolute_paths, check_inputs, fit, with_conversation_shards, with_precomputed_reference

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


def dpo(model_dir, pairs, storage, name, method="lora", stage=2, *overrides):
    return load_recipe("jobs/sft_tiny.yaml", [
        f"model.pretrained={model_dir}", f"data.conversations={pairs}", f"run.storage_path={storage}",
        f"run.name={name}", "data.seq_len=128", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.max_steps=10", "train.log_every=5", "train.eval_every=0", "train.checkpoint_every=5",
        "train.warmup_steps=1", "train.schedule=constant", f"train.lr={1e-2 if method == 'lora' else 1e-3}",
        f"train.zero_stage={stage}", f"finetune.method={method}", "finetune.lora.dropout=0.0", "preference.loss=dpo",
        "preference.beta=0.1", *overrides])


@pytest.fixture(scope="module")
def lora_dpo(model_dir, pairs, ray_cluster, tmp_path_factory):
    recipe = dpo(model_dir, pairs, tmp_path_factory.mktemp("dpo"), "ref", "lora", 2, "train.record_samples=true")
    assert recipe.reference == "adapters"
    return fit(recipe)


def learned(summary) -> None:
    """The run ranked the chosen answers first, more at its end than at its start, on its pairs and held-out ones."""
    assert summary.steps == 10 and summary.conversations == {"documents": 160, "longer_than_seq_len": 0, "skipped_lines": 0,
                                                              "kind": "preference pairs"}
    history = read_state(summary.checkpoint).history
    first, last = history[0], history[-1]
    assert all(name in last for name in M.PREFERENCE)
    assert last[M.LOSS] < first[M.LOSS] - 0.05, [h[M.LOSS] for h in history]
    assert last[M.REWARDS_MARGINS] > first[M.REWARDS_MARGINS] and last[M.REWARDS_ACCURACIES] >= 0.75, history
    # the held-out pairs (data.val_fraction), measured by the same objective at the end
    assert last[M.validation(M.REWARDS_ACCURACIES)] >= 0.75 and last[M.validation(M.REWARDS_MARGINS)] > 0, last


def test_lora_dpo_against_the_base_with_its_adapters_off(lora_dpo):
    learned(lora_dpo)


def test_full_dpo_under_zero3_against_a_frozen_copy(model_dir, pairs, ray_cluster, tmp_path):
    recipe = dpo(model_dir, pairs, tmp_path, "full", "full", 3)
    assert recipe.reference == "copy"
    learned(fit(recipe))


def test_killed_worker_resumes_with_the_same_pairs_and_losses(model_dir, pairs, lora_dpo, tmp_path):
    summary = fit_with_a_worker_killed(dpo(model_dir, pairs, tmp_path, "killed", "lora", 2, "train.record_samples=true",
                                           "scaling.max_failures=1"))
    assert_resumed_exactly(read_state(summary.checkpoint), read_state(lora_dpo.checkpoint), step=5)


def test_a_precomputed_reference_trains_as_the_adapters_off_and_is_reused_on_resume(model_dir, pairs, lora_dpo,
                                                                                     tmp_path, capfd):
    """The Ray Data pass's reference log-probabilities are the LoRA base's own (the policy at step 0): the run's
    losses and rewards are those of the adapters-off run, to float rounding. A continued run reads them back."""
    recipe = dpo(model_dir, pairs, tmp_path, "pre", "lora", 2, "preference.reference=precomputed")
    summary = fit(recipe)
    cached = sorted((tmp_path / "pre" / "reference").glob("*.parquet"))
    assert len(cached) == 2  # the training pairs and the held-out ones
    ours, theirs = read_state(summary.checkpoint).history, read_state(lora_dpo.checkpoint).history
    for a, b in zip(ours, theirs, strict=True):
        for name in (M.LOSS, M.REWARDS_MARGINS, M.REWARDS_ACCURACIES, M.validation(M.REWARDS_MARGINS)):
            if name in b:
                assert abs(a[name] - b[name]) < 1e-4, (name, a, b)
    # what a continued run does before its workers start (`fit`'s own steps, without training again): the
    # conversation shards are found made from the same files, and the cache is read back, not recomputed
    written = {p: p.stat().st_mtime_ns for p in cached}
    capfd.readouterr()
    again, _ = with_conversation_shards(absolute_paths(recipe))
    train_spec, val_specs, _ = check_inputs(again)
    train_spec, val_specs = with_precomputed_reference(again, train_spec, val_specs, 0.5)
    assert "reference log-probabilities: reusing" in capfd.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in cached} == written
    assert sorted(train_spec.reference + val_specs[0][2].reference) == [str(p) for p in cached]
