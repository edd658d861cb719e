"""The model: any `transformers` causal-LM config built from scratch (Llama-style by default), or a Hugging Face
model (a local or s3:// folder, or a Hub id) to continue training, a vision-language one included (its config has a
`vision_config`: loaded as `AutoModelForImageTextToText`); and a folder loaded for inference."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig

from llmray import hub, storage
from llmray.errors import LlmrayError
from llmray.recipe.schema import ModelSettings


class ModelError(LlmrayError):
    pass


# where a vision-language model keeps its vision encoder and its projector, by the names transformers' models give
# them (LLaVA, Idefics3/SmolVLM, Gemma 3; Qwen2-VL's projector, `merger`, is inside its tower, `visual`, and trains
# with the projectors, not frozen with the tower)
TOWER_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "mm_projector", "merger")


# models whose forward takes pixel values per row, (rows, images, C, H, W), padding images all zero (their
# processors return them so); the others (LLaVA, ...) take every row's images in one list, (images, C, H, W)
PIXELS_PER_ROW = ("idefics2", "idefics3", "smolvlm")
# transformers 5 swaps Hub kernels (the `kernels` package's, downloaded from the Hub) into a model that loads onto a
# GPU, in inference mode, unless told not to. llmray picks its kernels itself (train.kernels), serves through CUDA
# graphs it checks against eager, and runs on clusters that cannot reach the Hub.
NO_HUB_KERNELS = {"use_kernels": False}


def is_vision_language(config: PretrainedConfig) -> bool:
    return getattr(config, "vision_config", None) is not None


def model_class(config: PretrainedConfig):
    """The transformers auto class a config's model loads with: image-text-to-text for a VLM, else causal LM."""
    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


def model_class_of(folder: str):
    """`model_class` of the model in a local folder, from its config."""
    return model_class(AutoConfig.from_pretrained(folder))


def vision_parts(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(qualified names of the vision tower's modules, of the projector's): the first module named as each."""
    found: dict[str, list[str]] = {"tower": [], "projector": []}
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        for part, names in (("tower", TOWER_NAMES), ("projector", PROJECTOR_NAMES)):
            if last in names and not any(name.startswith(f + ".") for f in found[part]):
                found[part].append(name)
    return found["tower"], found["projector"]


def freeze_tower(model: torch.nn.Module) -> int:
    """The vision tower's weights frozen (requires_grad False), but a projector inside it (Qwen2-VL's merger);
    returns how many."""
    towers, projectors = vision_parts(model)
    if not towers:
        raise ModelError(f"no vision tower (a module named {', '.join(TOWER_NAMES)}) in {type(model).__name__}")
    from llmray.model.flops import weights_in

    keep = tuple(f"{name}." for name in projectors)
    frozen_weights = 0
    for name in towers:
        for inner, p in model.get_submodule(name).named_parameters():
            if not f"{name}.{inner}".startswith(keep):
                p.requires_grad_(False)
                frozen_weights += weights_in(p)  # a ZeRO-3 partitioned parameter holds none here
    return frozen_weights


def freeze_language_model(model: torch.nn.Module) -> int:
    """Every weight but the vision tower's and the projector's frozen (LLaVA's stage 1: the projector learns to
    speak the language model's language); returns how many."""
    from llmray.model.flops import weights_in

    towers, projectors = vision_parts(model)
    keep = tuple(f"{name}." for name in towers + projectors)
    frozen_weights = 0
    for name, p in model.named_parameters():
        if not name.startswith(keep):
            p.requires_grad_(False)
            frozen_weights += weights_in(p)
    return frozen_weights


def pretrained_folder(name: str, config_only: bool = False) -> str:
    """model.pretrained as a local folder on this node (downloaded once per node); `config_only`: its config and
    tokenizer files, not its weights (what the driver needs)."""
    folder = storage.local_folder(name, "model.pretrained", hub.TOKENIZER_FILES if config_only else None)
    if not Path(folder).is_dir():
        raise ModelError(f"model.pretrained: folder {name} does not exist")
    return folder


def build_config(cfg: ModelSettings, vocab_size: int) -> PretrainedConfig:
    if cfg.pretrained is not None:
        folder = pretrained_folder(cfg.pretrained, config_only=True)
        try:
            return AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ModelError(f"model.pretrained: {cfg.pretrained} is not a Hugging Face model folder "
                             f"({str(e).splitlines()[0]})") from None
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
    )
    kwargs.update(cfg.extra)
    try:
        return AutoConfig.for_model(cfg.arch, **kwargs)
    except ValueError as e:
        raise ModelError(f"model.arch={cfg.arch!r}: {e}") from None


def build_model(cfg: ModelSettings, vocab_size: int, dtype: torch.dtype = torch.float32, quantization_config=None,
                device: torch.device | None = None) -> torch.nn.Module:
    """The recipe's model: built from its config, or loaded from model.pretrained (quantized as it loads, onto
    `device`, with a `quantization_config`)."""
    config = build_config(cfg, vocab_size)
    if cfg.pretrained is not None:
        quantized = {} if quantization_config is None else {"quantization_config": quantization_config,
                                                             "device_map": {"": device}}
        model = model_class(config).from_pretrained(pretrained_folder(cfg.pretrained), dtype=dtype, **quantized,
                                                     **NO_HUB_KERNELS)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ModelError(f"model.pretrained has {model.get_input_embeddings().num_embeddings} embeddings, "
                             f"fewer than the tokenizer's {vocab_size} tokens")
        return model
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # built partitioned, each module initialised as it is gathered
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    # Built without torch's default inits, then initialised as under ZeRO-3: on CPU the seed draws the same weights
    # whether or not the model is partitioned (on GPUs zero.Init initialises on the GPU, with CUDA's generator), and a
    # big model skips an init it would overwrite.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.init_weights()
    return model


def frozen(name: str, what: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A model held fixed beside the one training (a distillation teacher, a preference reference copy): loaded
    (a Hub id or s3:// folder once per node) in the training's precision onto this rank's device, in eval mode,
    with no gradients."""
    folder = storage.local_folder(name, what)
    model = model_class_of(folder).from_pretrained(folder, dtype=dtype, **NO_HUB_KERNELS).to(device).eval()
    model.requires_grad_(False)
    return model


def frozen_dtype(precision: str) -> torch.dtype:
    """The dtype a frozen model beside a run of `precision` (fp32, bf16, fp16) is held in: bf16 in a bf16 run, else
    fp32, whichever way the reference is held (the training loop gives the objective's copy bf16 only when the
    engine runs bf16)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def image_tensors(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A forward's image inputs (numpy arrays, `pixels.left_padded_inputs`') as it takes them: on `device`, the pixel
    values in the model's `dtype` (bf16 on a GPU), the others (grids, token types, masks) as they are."""
    out = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def inference_device(device: str | None = None) -> torch.device:
    """The device a model is measured or served on: as asked, else the GPU when there is one."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_for_inference(folder: str, device: torch.device, quantization_config=None) -> torch.nn.Module:
    """A Hugging Face folder loaded for generation: bf16 on a GPU (tinygemm int4 takes bf16 activations), fp32 on
    CPU. On a GPU the weights load (and quantize) straight onto it: GPU packings must be made there."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
    if device.type == "cuda":
        kwargs["device_map"] = str(device)
    return model_class_of(folder).from_pretrained(folder, dtype=dtype, **kwargs, **NO_HUB_KERNELS).to(device).eval()
