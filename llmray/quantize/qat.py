"""Quantization-aware training's one hook into training: the recipe's Linear layers swapped for torchao's
fake-quantized ones before DeepSpeed wraps the model, with the numerics of the scheme the export will use."""

from __future__ import annotations

from llmray.quantize.schemes import QuantError, fake_quant_configs, linear_filter


def prepare_qat(model, quant) -> int:
    """Swap the chosen Linear layers for torchao's FakeQuantizedLinear (same parameters, same state-dict keys, so
    DeepSpeed partitions and checkpoints them as before). `quant`: the recipe's QuantSettings. Returns how many
    layers were swapped."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig
    act, weight = fake_quant_configs(quant.scheme, quant.group_size)
    wanted = linear_filter(quant.skip)
    n = sum(1 for name, m in model.named_modules() if wanted(m, name))
    if n == 0:
        raise QuantError(f"quant.skip={quant.skip} leaves no Linear layer to quantize")
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"), filter_fn=wanted)
    swapped = sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    assert swapped == n, f"QAT prepared {swapped} of {n} layers"
    return n
