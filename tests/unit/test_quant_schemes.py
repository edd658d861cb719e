"""Quantization checked without Ray: the quant recipe block's errors name the key, and QAT's fake quantizers
simulate what each scheme's real int8/int4 model computes."""

import pytest
import torch
from helpers import tiny

from llmray.recipe.schema import RecipeError
from llmray.train.zero import deepspeed_config


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

    from llmray.quantize.qat import prepare_qat
    from llmray.quantize.schemes import ptq_config
    from llmray.recipe.schema import QuantSettings

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 32))
    for scheme in ("int8-weight-only", "int8-dynamic", "int8-dynamic-int4"):
        quant = QuantSettings(method="qat", scheme=scheme)
        fake, real = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
        fake.load_state_dict(base.state_dict())
        real.load_state_dict(base.state_dict())
        assert prepare_qat(fake, quant) == 14  # 7 Linear layers per block; lm_head skipped
        quantize_(real, ptq_config(scheme, quant.group_size), filter_fn=lambda m, n: isinstance(m, torch.nn.Linear)
                  and n != "lm_head")
        with torch.no_grad():
            full, simulated, actual = (m(ids).logits for m in (base, fake, real))
        assert (simulated - actual).abs().mean() < 0.5 * (full - actual).abs().mean(), scheme
