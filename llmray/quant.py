"""Quantization with torchao: fake-quantized training (QAT) and real quantized models (PTQ, and QAT's convert).

Each recipe scheme maps to one torchao post-training config and to the fake-quantizers that simulate it while
training. A quantized model is a Hugging Face folder whose config.json carries transformers' `TorchAoConfig`, so
`AutoModelForCausalLM.from_pretrained` (and `llmray serve`) loads it as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmray.config import GPU_ONLY_SCHEMES, QUANT_SCHEMES, QuantConfig
from llmray.errors import LlmrayError


class QuantError(LlmrayError):
    pass


def check_scheme(scheme: str, on_gpu: bool) -> None:
    """The scheme's name was checked with the settings (QuantConfig); here, whether this machine can run it."""
    if scheme in GPU_ONLY_SCHEMES and not on_gpu:
        raise QuantError(f"scheme {scheme} needs a CUDA GPU ({QUANT_SCHEMES[scheme]}); on CPU use int8-dynamic-int4 "
                         "for int4 weights, or int8-weight-only / int8-dynamic")


def ptq_config(scheme: str, group_size: int):
    """The torchao config that quantizes a trained model for inference."""
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
    raise QuantError(f"unknown scheme {scheme!r}; allowed: {', '.join(QUANT_SCHEMES)}")


def fake_quant_configs(scheme: str, group_size: int):
    """(activation, weight) fake-quantizers with the numerics of `ptq_config(scheme)`, for QAT."""
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
    raise QuantError(f"unknown scheme {scheme!r}; allowed: {', '.join(QUANT_SCHEMES)}")


def linear_filter(skip: list[str]):
    """torchao filter: the nn.Linear layers not named by `skip` (read the way transformers reads
    `modules_to_not_convert`, so QAT and the converted model quantize the same layers)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    def wanted(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and should_convert_module(fqn, skip)

    return wanted


def prepare_qat(model: torch.nn.Module, quant: QuantConfig) -> int:
    """Swap the chosen Linear layers for torchao's FakeQuantizedLinear (same parameters, same state-dict keys, so
    DeepSpeed partitions and checkpoints them as before). Returns how many layers were swapped."""
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


def torchao_hf_config(quant: QuantConfig):
    """transformers' TorchAoConfig for `from_pretrained(..., quantization_config=...)`; it is saved in
    config.json, so the quantized folder reloads without llmray."""
    from transformers import TorchAoConfig

    return TorchAoConfig(ptq_config(quant.scheme, quant.group_size), modules_to_not_convert=list(quant.skip))


REPORT_FILE = "quant_report.json"


def _load(folder: str, device: torch.device, quant: QuantConfig | None = None):
    from transformers import AutoModelForCausalLM

    # tinygemm int4 takes bf16 activations on the GPU; everything else is measured in the precision it trained in.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"quantization_config": torchao_hf_config(quant)} if quant is not None else {}
    if device.type == "cuda":  # weights are quantized where they load, and GPU packings must be made on the GPU
        kwargs["device_map"] = str(device)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()


def held_out_of(folder: str):
    """The held-out set an exported folder names (the training run's validation split), if it names one."""
    from llmray.eval import HeldOut
    from llmray.export import EXPORT_INFO

    info_path = Path(folder, EXPORT_INFO)
    held = json.loads(info_path.read_text()).get("held_out") if info_path.is_file() else None
    return HeldOut(**held) if held else None


def quantize_folder(src: str, out: str, quant: QuantConfig, held_out=None, eval_samples: int = 64,
                    overwrite: bool = False, device: str | None = None, method: str = "ptq") -> dict:
    """Quantize the Hugging Face folder `src` into `out` (whole, or not at all) and measure both on the same
    held-out samples: perplexity, weights on disk, greedy tokens/s. The report is printed by the caller and saved
    as `out/quant_report.json`."""
    from transformers import AutoConfig, AutoTokenizer

    from llmray.eval import generation_speeds, held_out_samples, perplexity, weights_bytes
    from llmray.outdir import free_target, staged

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_scheme(quant.scheme, dev.type == "cuda")
    if not Path(src, "config.json").is_file():
        raise QuantError(f"{src} is not a Hugging Face model folder (no config.json); export a checkpoint first")
    if getattr(AutoConfig.from_pretrained(src), "quantization_config", None):
        raise QuantError(f"{src} is already quantized; quantize the full-precision export")
    target = free_target(out, overwrite)
    held_out = held_out or held_out_of(src)
    if held_out is None:
        raise QuantError(f"{src} names no held-out set to measure perplexity on; pass --eval-data SHARD_FOLDER")
    samples = held_out_samples(held_out, src, eval_samples)
    with staged(target) as partial:
        model = _load(src, dev, quant)
        model.save_pretrained(partial, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(partial)
        _carry_export_info(src, partial, {"method": method, "scheme": quant.scheme, "group_size": quant.group_size,
                                          "skip": quant.skip})
        del model
        # Measured: the source, and what was written, loaded back as users will load it.
        models = [_load(src, dev), _load(str(partial), dev)]
        before, after = ({**perplexity(m, samples), "weights_bytes": weights_bytes(folder)}
                         for m, folder in zip(models, (src, partial)))
        for figures, speed in zip((before, after), generation_speeds(models, samples)):
            figures.update(speed)
        del models
        report = {
            "method": method, "scheme": quant.scheme, "group_size": quant.group_size if "int4" in quant.scheme else None,
            "skip": quant.skip, "source": str(Path(src).resolve()), "out": str(target), "device": str(dev),
            "held_out": {"what": held_out.describe(), "samples": len(samples), "tokens": before["tokens"]},
            "before": before, "after": after,
            "ppl_delta": after["ppl"] - before["ppl"], "ppl_ratio": after["ppl"] / before["ppl"],
            "size_ratio": after["weights_bytes"] / before["weights_bytes"],
            "speed_ratio": after["tokens_per_s"] / before["tokens_per_s"],
            "versions": _versions(),
        }
        Path(partial, REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


def _carry_export_info(src: str, dest: Path, quant: dict) -> None:
    from llmray.export import EXPORT_INFO

    path = Path(src, EXPORT_INFO)
    info = json.loads(path.read_text()) if path.is_file() else {}
    Path(dest, EXPORT_INFO).write_text(json.dumps({**info, "quant": quant}, indent=1))


def _versions() -> dict:
    import torchao
    import transformers

    return {"torch": torch.__version__, "torchao": torchao.__version__, "transformers": transformers.__version__}


def report_text(r: dict) -> str:
    b, a = r["before"], r["after"]
    return "\n".join([
        f"{r['method']} {r['scheme']} on {r['device']}, measured on {r['held_out']['tokens']:,} held-out tokens "
        f"({r['held_out']['what']}):",
        f"  perplexity  {b['ppl']:10.3f} -> {a['ppl']:10.3f}   ({r['ppl_delta']:+.3f}, x{r['ppl_ratio']:.4f})",
        f"  weights     {b['weights_bytes'] / 1e6:9.2f}M -> {a['weights_bytes'] / 1e6:9.2f}M  (x{r['size_ratio']:.3f})",
        f"  tokens/s    {b['tokens_per_s']:10.1f} -> {a['tokens_per_s']:10.1f}   (x{r['speed_ratio']:.3f}, greedy, "
        f"batch 1, {a['threads']} threads)",
        f"  report: {r['out']}/{REPORT_FILE}",
    ])
