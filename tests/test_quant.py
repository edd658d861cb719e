"""Quantization for real: torchao fake quantization inside DeepSpeed ZeRO-3 workers launched by Ray Train, converted
to a real int8 model at export; post-training quantization of an exported model; every quantized folder reloads
with plain transformers, holds integer weights on disk, and carries a report whose figures it reproduces."""

import json
import shutil

import numpy as np
import pytest
import torch
from recipes import tiny
from safetensors import safe_open

from llmray.cli import main
from llmray.config import RecipeError
from llmray.eval import HeldOut, held_out_samples, perplexity
from llmray.train.checkpoint import read_state
from llmray.train.trainer import fit
from llmray.train.zero import deepspeed_config

COMMON = ["train.max_steps=16", "train.log_every=4", "train.checkpoint_every=0", "train.lr=1e-2",
          "data.val_fraction=0.2", "train.zero_stage=3"]
# Stated bounds: int8 keeps held-out perplexity within 2 % of the full-precision model; int4 weights within 25 %.
PPL_BOUND = {"int8-weight-only": 1.02, "int8-dynamic": 1.02, "int8-dynamic-int4": 1.25}


@pytest.fixture(scope="module")
def runs(corpus, ray_cluster, tmp_path_factory):
    """The same 16-step, 2-worker ZeRO-3 run twice: plain, and with int8-dynamic QAT. The plain one exported."""
    root = tmp_path_factory.mktemp("quant")
    plain = fit(tiny(corpus, root, "run.name=plain", *COMMON))
    qat = fit(tiny(corpus, root, "run.name=qat", "quant.method=qat", "quant.scheme=int8-dynamic", *COMMON))
    assert main(["export", plain.checkpoint, "--out", str(root / "plain-hf")]) == 0
    return {"root": root, "plain": plain, "qat": qat, "plain_hf": root / "plain-hf"}


def losses(summary):
    return np.array([h["loss"] for h in read_state(summary.checkpoint)["history"]])


def stored_dtypes(folder) -> dict[str, str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def check_folder(folder, report):
    """The folder reloads with plain transformers, its Linear layers are int8 on disk (lm_head kept in fp32), and
    the perplexity in its report is what the folder itself gives on the held-out samples."""
    from transformers import AutoModelForCausalLM

    dtypes = stored_dtypes(folder)
    assert dtypes["model.layers.0.mlp.up_proj._weight_qdata"] == "I8"
    assert dtypes["lm_head.weight"] == "F32" and dtypes["model.embed_tokens.weight"] == "F32"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ != "Parameter"  # a torchao tensor
    held = HeldOut(**json.loads((folder / "llmray_export.json").read_text())["held_out"])
    samples = held_out_samples(held, str(folder), report["held_out"]["samples"])
    assert perplexity(model, samples)["ppl"] == pytest.approx(report["after"]["ppl"], rel=1e-5)
    assert not list(folder.parent.glob(f".{folder.name}*"))  # no partial folder left behind


def test_qat_trains_under_zero3_and_exports_int8(runs, capsys):
    plain, qat = losses(runs["plain"]), losses(runs["qat"])
    assert qat[-1] < qat[0] - 0.5  # it learns with fake quantization in the loop
    assert np.abs(plain - qat).max() > 1e-4  # and the fake quantizers were in DeepSpeed's forward pass
    np.testing.assert_allclose(plain, qat, rtol=0.05)  # without changing what it learns
    out = runs["root"] / "qat-int8"
    assert main(["export", runs["qat"].checkpoint, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "qat int8-dynamic" in printed and "tokens/s" in printed and "quant_report.json" in printed
    report = json.loads((out / "quant_report.json").read_text())
    assert report["method"] == "qat" and report["scheme"] == "int8-dynamic"
    assert report["after"]["ppl"] <= report["before"]["ppl"] * PPL_BOUND["int8-dynamic"]
    assert report["size_ratio"] < 0.8 and report["after"]["tokens_per_s"] > 0
    check_folder(out, report)
    full = runs["root"] / "qat-fp32"
    assert main(["export", runs["qat"].checkpoint, "--out", str(full), "--full-precision"]) == 0
    assert "quantization_config" not in json.loads((full / "config.json").read_text())


@pytest.mark.parametrize("scheme", list(PPL_BOUND))
def test_ptq_keeps_perplexity_and_shrinks_weights(runs, scheme):
    out = runs["root"] / f"ptq-{scheme}"
    assert main(["quantize", str(runs["plain_hf"]), "--scheme", scheme, "--out", str(out)]) == 0
    report = json.loads((out / "quant_report.json").read_text())
    assert report["held_out"]["tokens"] >= 1000 and "0.2 held-out fraction" in report["held_out"]["what"]
    assert report["after"]["ppl"] <= report["before"]["ppl"] * PPL_BOUND[scheme]
    assert report["after"]["weights_bytes"] < report["before"]["weights_bytes"]
    check_folder(out, report)


def test_quantize_refuses_bad_input_and_writes_nothing(runs, corpus, tmp_path, capsys):
    bare = tmp_path / "bare"  # an export that names no held-out set
    shutil.copytree(runs["plain_hf"], bare)
    (bare / "llmray_export.json").unlink()
    out = tmp_path / "q"

    def refused(src, *args) -> str:
        capsys.readouterr()
        assert main(["quantize", str(src), "--out", str(out), *args]) == 2
        return capsys.readouterr().err

    err = refused(bare, "--scheme", "int3")
    assert "scheme: unknown scheme 'int3'; allowed: int8-weight-only, int8-dynamic, int8-dynamic-int4, " \
           "int4-weight-only" in err
    assert "int4-weight-only needs a CUDA GPU" in refused(bare, "--scheme", "int4-weight-only")
    assert "group_size: must be one of 32, 64, 128, 256" in refused(bare, "--scheme", "int8-dynamic-int4",
                                                                     "--group-size", "48")
    assert "names no held-out set to measure perplexity on; pass --eval-data" in refused(bare, "--scheme", "int8-dynamic")
    assert not out.exists() and not list(tmp_path.glob(".q*"))
    assert main(["quantize", str(bare), "--scheme", "int8-weight-only", "--out", str(out), "--eval-data",
                 corpus["shards"], "--seq-len", "64", "--eval-samples", "8"]) == 0
    report = json.loads((out / "quant_report.json").read_text())
    assert report["held_out"]["what"].startswith("all of") and report["held_out"]["samples"] == 8
    written = sorted(p.name for p in out.iterdir())
    assert "already exists" in refused(bare, "--scheme", "int8-dynamic")
    assert sorted(p.name for p in out.iterdir()) == written  # nothing already written is lost
    assert "already quantized" in refused(out, "--scheme", "int8-dynamic", "--overwrite")


def test_quant_recipe_errors_name_the_key(corpus, tmp_path):
    with pytest.raises(RecipeError, match="quant.scheme: unknown scheme 'int3'; allowed: int8-weight-only, "):
        tiny(corpus, tmp_path, "quant.method=qat", "quant.scheme=int3")
    with pytest.raises(RecipeError, match="quant.method=qat needs quant.scheme"):
        tiny(corpus, tmp_path, "quant.method=qat")
    with pytest.raises(RecipeError, match="quant.scheme=int4-weight-only needs scaling.use_gpu=true"):
        tiny(corpus, tmp_path, "quant.method=ptq", "quant.scheme=int4-weight-only")
    with pytest.raises(RecipeError, match="quant.method=ptq reports held-out perplexity"):
        tiny(corpus, tmp_path, "quant.method=ptq", "quant.scheme=int8-dynamic", "data.val_fraction=0")
    with pytest.raises(RecipeError, match="quant.zeropp .*runs on NCCL GPU clusters only"):
        tiny(corpus, tmp_path, "train.zero_stage=3", "quant.zeropp.quantized_weights=true")
    with pytest.raises(RecipeError, match="quant.zeropp needs train.zero_stage=3"):
        tiny(corpus, tmp_path, "scaling.use_gpu=true", "quant.zeropp.quantized_gradients=true")
    with pytest.raises(RecipeError, match="quant.zeropp.quantzed_weights: unknown key"):
        tiny(corpus, tmp_path, "quant.zeropp.quantzed_weights=true")
    gpu = tiny(corpus, tmp_path, "scaling.use_gpu=true", "train.zero_stage=3", "quant.zeropp.quantized_weights=true",
               "quant.zeropp.quantized_gradients=true", "quant.zeropp.hpz_partition_size=2")
    zero = deepspeed_config(gpu, "bf16")["zero_optimization"]
    assert zero["zero_quantized_weights"] and zero["zero_quantized_gradients"] and zero["zero_hpz_partition_size"] == 2


def test_qat_fake_quantizers_follow_the_scheme():
    """QAT simulates what the export will run: the fake-quantized forward is closer to the real int8 model's than
    the full-precision forward is."""
    from torchao.quantization import quantize_
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmray.config import QuantConfig
    from llmray.quant import prepare_qat, ptq_config

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 32))
    for scheme in ("int8-weight-only", "int8-dynamic", "int8-dynamic-int4"):
        quant = QuantConfig(method="qat", scheme=scheme)
        fake, real = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
        fake.load_state_dict(base.state_dict())
        real.load_state_dict(base.state_dict())
        assert prepare_qat(fake, quant) == 14  # 7 Linear layers per block; lm_head skipped
        quantize_(real, ptq_config(scheme, quant.group_size), filter_fn=lambda m, n: isinstance(m, torch.nn.Linear)
                  and n != "lm_head")
        with torch.no_grad():
            full, simulated, actual = (m(ids).logits for m in (base, fake, real))
        assert (simulated - actual).abs().mean() < 0.5 * (full - actual).abs().mean(), scheme
