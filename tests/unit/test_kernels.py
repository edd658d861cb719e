"""The training step's fast paths without Ray: `auto` resolves to the fast path only where it runs, a kernel asked
for by name without its library is refused naming the key, activation checkpointing recomputes exactly the blocks
asked for and leaves the gradients as they were, and the AdamW the recipe picks is the one DeepSpeed is told."""

import numpy as np
import pytest
import torch
from test_config import recipe

from llmray.recipe.schema import RecipeError
from llmray.train import kernels as fast
from llmray.train.zero import deepspeed_config


def test_auto_is_the_fast_path_on_gpus_only(monkeypatch):
    monkeypatch.setattr(fast, "installed", lambda package: True)  # as on a GPU node with every extra installed
    monkeypatch.setattr(fast, "flash_runs_here", lambda precision: precision == "bf16")  # an Ampere+ GPU
    monkeypatch.setattr(fast, "liger_model_types", lambda: {"llama", "mistral"})  # liger's table, in short
    cpu = fast.resolve(recipe(), on_gpu=False, precision="fp32")
    assert (cpu.attention, cpu.liger, cpu.compile, cpu.adam, cpu.recompute_every) == (
        "sdpa", False, False, "torch_fused", 0)
    gpu = fast.resolve(recipe("scaling.use_gpu=true"), on_gpu=True, precision="bf16")
    assert (gpu.attention, gpu.liger, gpu.compile) == ("flash_attention_2", True, True)
    fp32 = fast.resolve(recipe("scaling.use_gpu=true"), on_gpu=True, precision="fp32")
    assert fp32.attention == "sdpa"  # flash-attn has no fp32 kernels
    zero3 = fast.resolve(recipe("scaling.use_gpu=true", "train.zero_stage=3"), on_gpu=True, precision="bf16")
    assert not zero3.compile  # ZeRO-3's gathering hooks break compiled graphs
    distill = fast.resolve(recipe("scaling.use_gpu=true", "distill.teacher=/t"), on_gpu=True, precision="bf16")
    assert not distill.liger  # the KL needs the student's logits
    gpt2 = recipe("scaling.use_gpu=true", "model.arch=gpt2")
    assert not fast.resolve(gpt2, on_gpu=True, precision="bf16").liger  # an architecture liger does not patch
    with pytest.raises(RecipeError, match="train.kernels.liger=true: liger-kernel has no kernels for model type 'gpt2'"):
        fast.resolve(recipe("scaling.use_gpu=true", "model.arch=gpt2", "train.kernels.liger=true"), on_gpu=True,
                     precision="bf16")
    monkeypatch.setattr(fast, "installed", lambda package: False)
    bare = fast.resolve(recipe("scaling.use_gpu=true"), on_gpu=True, precision="bf16")
    assert (bare.attention, bare.liger) == ("sdpa", False)
    explicit = fast.resolve(recipe("train.kernels.compile=false", "train.kernels.attention=eager",
                                   "train.activation_checkpointing=3"), on_gpu=True, precision="bf16")
    assert (explicit.attention, explicit.compile, explicit.recompute_every) == ("eager", False, 3)
    with pytest.raises(RecipeError, match=r"attention=flash_attention_2 needs bf16 or fp16 .*trains in fp32"):
        fast.resolve(recipe("scaling.use_gpu=true", "train.kernels.attention=flash_attention_2",
                            "train.precision=fp32"), on_gpu=True, precision="fp32")


def test_a_kernel_asked_for_without_its_library_is_refused(monkeypatch):
    monkeypatch.setattr(fast, "installed", lambda package: False)
    with pytest.raises(RecipeError, match=r"train\.kernels\.attention=flash_attention_2 needs the flash_attn package"):
        fast.check_installed(recipe("scaling.use_gpu=true", "train.kernels.attention=flash_attention_2"))
    with pytest.raises(RecipeError, match=r"train\.kernels\.liger=true needs the liger_kernel package.*pip install "
                                          r"liger-kernel"):
        fast.check_installed(recipe("scaling.use_gpu=true", "train.kernels.liger=true"))
    fast.check_installed(recipe("scaling.use_gpu=true"))  # auto falls back instead


@pytest.mark.parametrize("overrides, message", [
    (["train.kernels.attention=flash_attention_2"], "runs on GPUs only; use sdpa"),
    (["train.kernels.liger=true"], "liger-kernel's Triton kernels run on GPUs only"),
    (["scaling.use_gpu=true", "train.kernels.liger=true", "distill.teacher=/t"], "distillation's KL needs"),
    (["train.kernels.adam=deepspeed_fused"], "is a CUDA op"),
    (["train.activation_checkpointing=0"], r"train\.activation_checkpointing: .*N >= 1"),
    (["train.kernels.attention=flash"], r"train\.kernels\.attention"),
])
def test_kernel_choices_that_cannot_run_are_refused(overrides, message):
    with pytest.raises(RecipeError, match=message):
        recipe(*overrides)


def tiny_llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def grads_and_attention_calls(model) -> tuple[dict, list[int]]:
    calls = [0] * len(fast.decoder_blocks(model))
    for i, block in enumerate(fast.decoder_blocks(model)):
        block.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, calls


def test_activation_checkpointing_recomputes_every_nth_block_with_the_same_gradients():
    plain = fast.Kernels("sdpa", liger=False, compile=False, adam="torch", recompute_every=0)
    reference, calls = grads_and_attention_calls(tiny_llama())
    assert calls == [1, 1, 1, 1]
    for every, recomputed in [(1, [2, 2, 2, 2]), (2, [2, 1, 2, 1])]:
        model = tiny_llama()
        fast.apply(model, plain.__class__(**{**plain.__dict__, "recompute_every": every}), adapters=False)
        grads, calls = grads_and_attention_calls(model)
        assert calls == recomputed  # a checkpointed block's attention runs again in the backward
        for name, g in reference.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_the_attention_implementation_is_set_and_computes_the_same():
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    losses = {}
    for attention in ("eager", "sdpa"):
        model = tiny_llama(2)
        fast.apply(model, fast.Kernels(attention, False, False, "torch", 0), adapters=False)
        assert model.config._attn_implementation == attention
        losses[attention] = model(input_ids=ids, labels=ids).loss.item()
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-5)


def test_the_adamw_picked_is_the_one_deepspeed_builds():
    params = {a: deepspeed_config(recipe(f"train.kernels.adam={a}"), "fp32")["optimizer"]["params"]
              for a in ("auto", "torch")}
    assert params["auto"]["torch_adam"] and params["auto"]["fused"]  # torch.optim.AdamW(fused=True)
    assert params["torch"]["torch_adam"] and not params["torch"]["fused"]
    gpu = deepspeed_config(recipe("scaling.use_gpu=true", "train.kernels.adam=deepspeed_fused"), "bf16")
    assert "torch_adam" not in gpu["optimizer"]["params"]  # DeepSpeed's own FusedAdam


def test_a_cpu_run_does_not_build_deepspeeds_shared_memory_all_reduce():
    """DeepSpeed's process group on the CPU builds that op (35 s of g++ on a fresh machine) for its inference engine;
    training on gloo never calls it, so the worker's device choice turns it off."""
    from deepspeed.comm.torch import build_shm_op

    from llmray.train.deepspeed_engine import device_for

    assert device_for(use_gpu=False).type == "cpu"
    assert build_shm_op() is None


def test_eval_tasks_on_compiled_blocks_compile_nothing_and_score_as_the_plain_model(tmp_path, monkeypatch):
    """A generate task changes shape at every forward; on compiled blocks each shape would be a compile. The tasks
    run eagerly on DeepSpeed's engine: no graph is compiled, and the figures are the uncompiled model's."""
    import json

    import deepspeed
    import torch.distributed as dist
    from helpers import colour_tokenizer, free_port, tiny_llama
    from torch._dynamo.utils import counters

    from llmray.evals.backends import LocalModel
    from llmray.evals.score import answer, score
    from llmray.evals.tasks import load_task
    from llmray.train.deepspeed_engine import device_for
    from llmray.train.downstream import evaluate_tasks

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"q": f"a {c} square?", "a": c}) + "\n"
                                              for c in ("red", "blue", "green")))
    (tmp_path / "g.yaml").write_text("type: generate\ndata: d.jsonl\ninput: q\ntarget: a\nmax_new_tokens: 4\n")
    (tmp_path / "p.yaml").write_text("type: perplexity\ndata: d.jsonl\ninput: q\n")
    tasks = [load_task(tmp_path / "g.yaml"), load_task(tmp_path / "p.yaml")]
    tok = colour_tokenizer()
    plain = tiny_llama(len(tok))
    expected = {t.name: score(t, answer(LocalModel(plain, tok, torch.device("cpu")), t)) for t in tasks}
    compiled = tiny_llama(len(tok))
    for block in fast.decoder_blocks(compiled):
        block.compile()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    device = device_for(use_gpu=False)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        engine, *_ = deepspeed.initialize(model=compiled, config={"train_micro_batch_size_per_gpu": 1, "optimizer": {
            "type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
        counters.clear()
        figures = evaluate_tasks(engine, tok, tasks, device, zero3=False)
    finally:
        dist.destroy_process_group()
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    assert engine.module.training  # handed back to training
    for t in tasks:
        for metric, value in expected[t.name].items():
            if metric not in ("examples", "tokens"):
                assert figures[f"eval/{t.name}/{metric}"] == pytest.approx(value), (t.name, metric)


@pytest.mark.parametrize("value, fixed", [
    ("9.0a", "9.0"),  # NVIDIA's Hopper images
    ("8.0;8.6;9.0a+PTX", "8.0;8.6;9.0+PTX"),
    ("9.0 9.0a 10.0f", "9.0;10.0"),
    ("8.0;9.0", None),  # readable already: left alone
])
def test_the_cuda_arch_list_is_made_readable_for_deepspeeds_op_builder(value, fixed):
    from llmray.cuda_arch import VAR, fix_arch_list

    env = {VAR: value}
    assert fix_arch_list(env) == (value if fixed else None)
    assert env[VAR] == (fixed or value)
    if fixed:  # what DeepSpeed's builder does with each entry (op_builder/builder.py, compute_capability_args)
        for entry in env[VAR].split(";"):
            major, minor = entry.split(".")
            int(major), int(minor.split("+")[0])
    assert fix_arch_list({}) is None


def test_flat_rows_give_the_loss_of_the_rows_one_by_one():
    """Flash attention reads packed position ids only in a batch of one: the rows go in as one, with the same loss."""
    from llmray.data.pack import document_positions
    from llmray.train.batch import model_inputs

    model = tiny_llama(2).eval()
    ids = np.random.default_rng(3).integers(0, 300, (3, 16)).astype(np.int32)
    batch = {"input_ids": ids, "position_ids": document_positions([5, 12, 9, 14], 16, 3)}
    rows, flat = model_inputs(batch, torch.device("cpu")), model_inputs(batch, torch.device("cpu"), flat=True)
    assert flat["input_ids"].shape == (1, 48) and flat["position_ids"].shape == (1, 48)
    with torch.no_grad():
        assert model(**flat).loss.item() == pytest.approx(model(**rows).loss.item(), rel=1e-5)
    plain = model_inputs({"input_ids": ids}, torch.device("cpu"), flat=True)
    assert plain["input_ids"].shape == (3, 16)  # rows without position ids stay rows


def test_a_universal_restore_puts_adams_step_beside_its_parameter():
    from llmray.train.resume import steps_beside_their_parameters

    param = torch.nn.Parameter(torch.zeros(4, device="meta"))
    opt = torch.optim.AdamW([param])
    opt.state[param] = {"step": torch.tensor(7.0), "exp_avg": torch.zeros(4, device="meta")}  # as DeepSpeed loads it
    steps_beside_their_parameters(opt)
    assert opt.state[param]["step"].device.type == "meta"
