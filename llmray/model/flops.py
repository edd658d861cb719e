"""A model's size and the FLOPs arithmetic that MFU is reported from."""

from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig


def weights_in(p: torch.Tensor) -> int:
    """The weights a parameter holds: a 4-bit bitsandbytes parameter packs two per byte, its shape is the packing's;
    a ZeRO-3 partitioned one holds none here, its whole size is `ds_numel`."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        return math.prod(state.shape)
    return getattr(p, "ds_numel", p.numel())


def count_params(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    n = sum(weights_in(p) for p in model.parameters())
    if exclude_embeddings:
        n -= weights_in(model.get_input_embeddings().weight)
    return n


def flops_per_token(config: PretrainedConfig, n_params_non_embedding: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus 12·L·H·T for attention scores
    (Kaplan et al. 2020; PaLM appendix B). The LM head counts as a weight matrix."""
    text = config.get_text_config()  # a vision-language model's language model
    layers, hidden = text.num_hidden_layers, text.hidden_size
    return 6.0 * n_params_non_embedding + 12.0 * layers * hidden * seq_len


# Dense bf16 peak of common training GPUs, in FLOP/s (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12, "V100": 125e12,
}


def peak_flops(device_name: str) -> float | None:
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in device_name.upper():
            return PEAK_BF16_FLOPS[key]
    return None
