"""Each quantization scheme's torchao configs: the post-training config that quantizes a trained model, and the
fake-quantizers that simulate it while training (QAT, `qat.py`).

A quantized model is a Hugging Face folder whose config.json carries transformers' `TorchAoConfig`, so
`AutoModelForCausalLM.from_pretrained` (and `llmray serve`) loads it as it is; `folder.py` writes such folders.
The scheme names are the recipe's (`recipe.schema.SCHEMES`); torch and torchao are imported on use.
"""

from __future__ import annotations

from llmray.errors import LlmrayError
from llmray.recipe.schema import GPU_ONLY_SCHEMES, SCHEMES


class QuantError(LlmrayError):
    pass


def check_scheme(scheme: str, on_gpu: bool) -> None:
    """The scheme's name was checked with the settings (QuantSettings); here, whether this machine can run it."""
    if scheme in GPU_ONLY_SCHEMES and not on_gpu:
        raise QuantError(f"scheme {scheme} needs a CUDA GPU ({SCHEMES[scheme]}); on CPU use int8-dynamic-int4 "
                         "for int4 weights, or int8-weight-only / int8-dynamic")


def ptq_config(scheme: str, group_size: int):
    """The torchao config that quantizes a trained model for inference."""
    import torch
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup, PerRow
    from torchao.quantization.quant_primitives import MappingType
    if scheme == "int8-weight-only":
        return Int8WeightOnlyConfig(granularity=PerRow())
    if scheme == "int8-dynamic":
        # Asymmetric activations: torchao's per-token fake quantizer has no symmetric mode, and QAT must match.
        return Int8DynamicActivationInt8WeightConfig(granularity=PerRow(), act_mapping_type=MappingType.ASYMMETRIC)
    if scheme == "int8-dynamic-int4":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    if scheme == "int4-weight-only":
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    raise QuantError(f"unknown scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")


def fake_quant_configs(scheme: str, group_size: int):
    """(activation, weight) fake-quantizers with the numerics of `ptq_config(scheme)`, for QAT."""
    import torch
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.quant_primitives import ZeroPointDomain
    if scheme == "int8-weight-only":
        return None, IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    if scheme == "int8-dynamic":
        return (IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True))
    if scheme == "int8-dynamic-int4":  # what torchao's QATConfig derives from Int8DynamicActivationIntxWeightConfig
        return (IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                IntxFakeQuantizeConfig(torch.int4, group_size=group_size, is_symmetric=True))
    if scheme == "int4-weight-only":  # tinygemm: asymmetric uint4, zero points in the float domain, bf16 scales
        return None, IntxFakeQuantizeConfig(torch.uint4, group_size=group_size, is_symmetric=False,
                                            zero_point_domain=ZeroPointDomain.FLOAT, scale_precision=torch.bfloat16)
    raise QuantError(f"unknown scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")


def linear_filter(skip: list[str]):
    """torchao filter: the nn.Linear layers not named by `skip` (read the way transformers reads
    `modules_to_not_convert`, so QAT and the converted model quantize the same layers)."""
    import torch
    from transformers.quantizers.quantizers_utils import should_convert_module

    def wanted(module: "torch.nn.Module", fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and should_convert_module(fqn, skip)

    return wanted


def torchao_hf_config(quant):
    """transformers' TorchAoConfig for `from_pretrained(..., quantization_config=...)`; it is saved in
    config.json, so the quantized folder reloads without llmray."""
    from transformers import TorchAoConfig

    return TorchAoConfig(ptq_config(quant.scheme, quant.group_size), modules_to_not_convert=list(quant.skip))
