"""Fine-tuning on the real spine (Ray Data stream, Ray Train, DeepSpeed ZeRO on CPU): LoRA under ZeRO-2 and full
fine-tuning under ZeRO-3 with 2 workers, exports (merged and adapter) that plain transformers / peft load, and the
killed-worker exact resume for a LoRA run."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import arithmetic_chats, kill_worker_when_checkpointed, losses

from llmray.config import load_recipe
from llmray.export import export
from llmray.train.checkpoint import TAG, read_state
from llmray.train.trainer import fit

pytestmark = pytest.mark.ray

STEPS = 12


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """240 conversations in the three formats, a file each."""
    root = tmp_path_factory.mktemp("chats")
    convs = arithmetic_chats(240)
    files = {
        "messages.jsonl": [{"messages": c} for c in convs[:80]],
        "alpaca.jsonl": [{"instruction": c[0]["content"], "output": c[1]["content"]} for c in convs[80:160]],
        "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": c[0]["content"]},
                                              {"from": "gpt", "value": c[1]["content"]}]} for c in convs[160:]],
    }
    for name, rows in files.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def sft(model_dir, chats, storage, name, *overrides):
    return load_recipe("jobs/sft_tiny.yaml", [
        f"model.pretrained={model_dir}", f"data.conversations={chats}", f"run.storage_path={storage}",
        f"run.name={name}", "data.seq_len=128", "train.micro_batch_size=4", "train.global_batch_size=16",
        f"train.max_steps={STEPS}", "train.log_every=3", "train.eval_every=0", "train.eval_batches=1",
        "train.checkpoint_every=6", "train.warmup_steps=1", "train.lr=1e-2", "train.schedule=constant",
        "finetune.lora.r=8", "finetune.lora.dropout=0.0", *overrides])


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def optimizer_elements(ckpt: str) -> int:
    """Elements of fp32 master weights the optimizer holds, summed over every rank's ZeRO-1/2 partition."""
    total = 0
    for f in sorted(Path(ckpt, TAG).glob("*optim_states.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        total += sum(t.numel() for t in state["single_partition_of_fp32_groups"])
    return total


@pytest.fixture(scope="module")
def lora_run(model_dir, chats, ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("lora")
    summary = fit(sft(model_dir, chats, storage, "ref", "train.record_samples=true"))
    return {"summary": summary, "storage": storage}


def test_lora_trains_only_the_adapters_and_exports_merged_and_adapter(model_dir, lora_run, tmp_path):
    from peft import PeftModel

    summary = lora_run["summary"]
    assert summary.steps == STEPS
    loss = losses(summary)
    assert loss[-1] < loss[0] - 0.3, f"the assistant-token loss did not fall: {loss}"
    assert (Path(summary.run_dir) / "conversations" / "_manifest.json").is_file()
    assert summary.conversations == {"documents": 240, "longer_than_seq_len": 0, "skipped_lines": 0}

    base = load(model_dir)
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    info = export(summary.checkpoint, str(merged_dir))
    assert info["finetune"] == "lora"
    merged = load(merged_dir)
    export(summary.checkpoint, str(adapter_dir), adapter=True)
    with_adapter = PeftModel.from_pretrained(load(model_dir), str(adapter_dir)).eval()
    n_lora = sum(p.numel() for n, p in with_adapter.named_parameters() if "lora_" in n)
    assert sorted(p.name for p in adapter_dir.iterdir() if p.name.startswith("adapter_")) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    # only the adapters trained: the optimizer holds them alone (ZeRO-2 pads each rank's partition a little)
    n_all = sum(p.numel() for p in base.parameters())
    assert n_lora <= optimizer_elements(summary.checkpoint) <= n_lora + 1024 < n_all // 10
    # the frozen base is untouched where LoRA does not reach; the merged projections moved
    b, m = base.state_dict(), merged.state_dict()
    assert torch.equal(b["model.embed_tokens.weight"], m["model.embed_tokens.weight"])
    assert not torch.allclose(b["model.layers.0.self_attn.q_proj.weight"], m["model.layers.0.self_attn.q_proj.weight"])
    # base + adapter (peft) computes what the merged folder computes
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method, stage", [("full", 3), ("lora", 3), ("full", 2)])
def test_full_and_lora_under_zero2_and_zero3(model_dir, chats, ray_cluster, tmp_path, method, stage):
    summary = fit(sft(model_dir, chats, tmp_path, "run", f"finetune.method={method}", f"train.zero_stage={stage}",
                      f"train.lr={3e-3 if method == 'full' else 1e-2}", "train.eval_every=6", "data.val_fraction=0.2",
                      "train.max_steps=6"))
    loss = losses(summary)
    assert summary.steps == 6 and loss[-1] < loss[0] - 0.2, loss
    assert summary.val_loss is not None and np.isfinite(summary.val_loss)
    export(summary.checkpoint, str(tmp_path / "out"))
    base, tuned = load(model_dir).state_dict(), load(tmp_path / "out").state_dict()
    assert base.keys() == tuned.keys()
    embeddings_moved = not torch.allclose(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])
    assert embeddings_moved == (method == "full")  # LoRA leaves everything but its targets as they were
    assert not torch.allclose(base["model.layers.1.mlp.down_proj.weight"], tuned["model.layers.1.mlp.down_proj.weight"])


def test_resuming_with_another_method_is_refused_naming_it(model_dir, chats, lora_run):
    from llmray.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="finetune: checkpoint .*'lora'.*recipe .*'full'"):
        fit(sft(model_dir, chats, lora_run["storage"], "ref", "train.record_samples=true", "finetune.method=full"))


def test_killed_lora_worker_resumes_exactly(model_dir, chats, lora_run, tmp_path):
    killed: list[int] = []
    killer = threading.Thread(target=kill_worker_when_checkpointed, args=(tmp_path / "killed", killed), daemon=True)
    killer.start()
    summary = fit(sft(model_dir, chats, tmp_path, "killed", "train.record_samples=true", "scaling.max_failures=1"))
    killer.join()
    assert killed, "no training worker was found to kill"
    state, ref = read_state(summary.checkpoint), read_state(lora_run["summary"].checkpoint)
    assert len(state.resumes) == 1 and state.resumes[0]["step"] == 6
    assert [s["samples"] for s in state.trace] == [s["samples"] for s in ref.trace]
    np.testing.assert_allclose([s["loss"] for s in state.trace], [s["loss"] for s in ref.trace], rtol=0, atol=1e-6)
