"""Fine-tuning on the real spine (Ray Data stream, Ray Train, DeepSpeed ZeRO on CPU): LoRA under ZeRO-2 and full
fine-tuning under ZeRO-3 with 2 workers, exports (merged and adapter) that plain transformers / peft load, and the
killed-worker exact resume for a LoRA run; QLoRA over a 4-bit bitsandbytes base, resumed and exported alike."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import arithmetic_chats, assert_resumed_exactly, fit_with_a_worker_killed, losses

from llmray.export.folder import export
from llmray.recipe.load import load_recipe
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
    assert summary.conversations == {"documents": 240, "longer_than_seq_len": 0, "skipped_lines": 0, "kind": "conversations"}

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
    merged_matches_adapter(base, merged, with_adapter)


def merged_matches_adapter(base, merged, with_adapter) -> None:
    """The frozen base is untouched where LoRA does not reach, the merged projections moved, and base + adapter
    folder (peft) computes what the merged folder computes."""
    b, m = base.state_dict(), merged.state_dict()
    assert torch.equal(b["model.embed_tokens.weight"], m["model.embed_tokens.weight"])
    assert not torch.allclose(b["model.layers.0.self_attn.q_proj.weight"], m["model.layers.0.self_attn.q_proj.weight"])
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
    summary = fit_with_a_worker_killed(sft(model_dir, chats, tmp_path, "killed", "train.record_samples=true",
                                           "scaling.max_failures=1"))
    assert_resumed_exactly(read_state(summary.checkpoint), read_state(lora_run["summary"].checkpoint), step=6)


def test_base_and_two_adapters_served_side_by_side_in_one_batch(model_dir, lora_run, tmp_path):
    """`llmray serve BASE --adapter a=... --adapter b=...`: three model ids, concurrent requests batched together
    (peft mixed-adapter batches), each answering as plain peft / transformers would."""
    import asyncio

    import httpx
    import openai
    from helpers import free_port
    from peft import PeftModel
    from ray import serve
    from safetensors.torch import load_file, save_file

    from llmray.data.template import render, stop_token_ids
    from llmray.serve.app import build_app

    first, second = tmp_path / "a", tmp_path / "b"
    export(lora_run["summary"].checkpoint, str(first), adapter=True)
    shutil.copytree(first, second)  # a second adapter: the first with its LoRA B matrices negated
    weights = load_file(second / "adapter_model.safetensors")
    save_file({k: -v if "lora_B" in k else v for k, v in weights.items()}, second / "adapter_model.safetensors")

    messages = [{"role": "user", "content": "What is 3 + 4?"}]

    def expected(adapter):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = load(model_dir) if adapter is None else PeftModel.from_pretrained(load(model_dir), str(adapter))
        ids = tok(render(tok, messages, add_generation_prompt=True), return_tensors="pt",
                  add_special_tokens=False).input_ids
        out = model.eval().generate(input_ids=ids, max_new_tokens=10, do_sample=False,
                                    eos_token_id=stop_token_ids(tok), pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    want = {"base": expected(None), "a": expected(first), "b": expected(second)}
    assert len(set(want.values())) == 3, "the three models must answer differently for the test to mean anything"

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": [{"path": str(model_dir), "name": "base",
                                     "adapters": {"a": str(first), "b": str(second)}}], "batch_wait_ms": 200},
                        ray_actor_options={"num_cpus": 1}), name="llmray", route_prefix="/")
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)

        async def ask_all():
            return await asyncio.gather(*[client.chat.completions.create(
                model=m, messages=messages, max_tokens=10, temperature=0) for m in ("base", "a", "b", "a")])

        answers = asyncio.run(ask_all())
        got = [r.choices[0].message.content for r in answers]
        assert got == [want["base"], want["a"], want["b"], want["a"]]
        listed = {m["id"]: m.get("parent") for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]}
        assert listed == {"base": None, "a": "base", "b": "base"}
        stats = httpx.get(f"http://127.0.0.1:{port}/healthz").json()["models"]["base"]
        assert stats["largest_batch"] >= 2, "the adapters' requests were not batched together"
    finally:
        serve.shutdown()


# ---- QLoRA: LoRA adapters over a 4-bit (bitsandbytes NF4) frozen base, on CPU -----------------------------------

def qlora(model_dir, chats, storage, name, *overrides):
    return sft(model_dir, chats, storage, name, "finetune.method=qlora", "train.record_samples=true", *overrides)


def test_qlora_trains_adapters_over_a_4bit_base_resumes_exactly_and_exports_merged(model_dir, chats, ray_cluster,
                                                                                     tmp_path):
    from peft import PeftModel

    ref = fit(qlora(model_dir, chats, tmp_path, "ref"))
    loss = losses(ref)
    assert ref.steps == STEPS and loss[-1] < loss[0] - 0.3, f"the assistant-token loss did not fall: {loss}"
    module = torch.load(Path(ref.checkpoint, TAG, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)["module"]
    q = module["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert q.dtype == torch.uint8 and q.numel() == 64 * 64 // 2, "the base is not stored 4-bit"
    base = load(model_dir)
    n_lora = sum(v.numel() for k, v in module.items() if "lora_" in k)
    assert n_lora <= optimizer_elements(ref.checkpoint) <= n_lora + 1024 < sum(p.numel() for p in base.parameters()) // 10

    again = fit_with_a_worker_killed(qlora(model_dir, chats, tmp_path, "killed", "scaling.max_failures=1"))
    assert_resumed_exactly(read_state(again.checkpoint), read_state(ref.checkpoint), step=6)

    info = export(ref.checkpoint, str(tmp_path / "merged"))
    assert info["finetune"] == "qlora"
    merged = load(tmp_path / "merged")
    export(ref.checkpoint, str(tmp_path / "adapter"), adapter=True)
    merged_matches_adapter(base, merged, PeftModel.from_pretrained(load(model_dir), str(tmp_path / "adapter")).eval())
