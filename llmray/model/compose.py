"""A vision-language model composed LLaVA's way: a vision encoder folder (CLIP or SigLIP vision model, with its image
processor) and a language model folder (any causal LM, one llmray pretrained included, with its tokenizer), joined
by a new, randomly initialised projector, written as one LLaVA folder that `AutoModelForImageTextToText` and
`AutoProcessor` load and `llmray finetune` trains:

- stage 1, the projector alone on captions: `vision.train_language_model: false` (and the tower frozen, the
  default), `finetune.method: full`;
- stage 2, the projector and the language model on instructions: the stage-1 export as model.pretrained, full or
  LoRA.

The tokenizer gains `<image>` as a special token when it lacks it (the LM's embeddings grow by one row).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmray.data.vision import IMAGE_PLACEHOLDER as IMAGE_TOKEN  # the placeholder the processor expands
from llmray.errors import LlmrayError


class ComposeError(LlmrayError):
    pass


def compose_llava(vision: str, language: str, out: str, overwrite: bool = False, seed: int = 0) -> dict:
    """Write the LLaVA folder `out` (whole or not at all) from the two folders; returns what it holds."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from llmray import storage
    from llmray.data.template import CHATML
    from llmray.outdir import free_target, staged

    target = free_target(out, overwrite)
    vision_dir = storage.local_folder(vision, "--vision")
    language_dir = storage.local_folder(language, "--language-model")
    vision_config = AutoConfig.from_pretrained(vision_dir)
    vision_config = getattr(vision_config, "vision_config", None) or vision_config  # a whole CLIP/SigLIP folder
    if vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ComposeError(f"--vision {vision}: a {vision_config.model_type} model; a CLIP or SigLIP vision "
                           "encoder is needed")
    tokenizer = AutoTokenizer.from_pretrained(language_dir)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    lm = AutoModelForCausalLM.from_pretrained(language_dir, dtype=torch.float32)
    if lm.get_input_embeddings().num_embeddings < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer))
    encoder = AutoModel.from_pretrained(vision_dir, dtype=torch.float32)
    encoder = encoder.vision_model if hasattr(encoder, "text_model") else encoder  # a whole CLIP/SigLIP: its tower
    has_cls = vision_config.model_type == "clip_vision_model"  # SigLIP has no CLS token to drop
    config = LlavaConfig(
        vision_config=vision_config, text_config=lm.config, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        # LLaVA-1.5's choice: the penultimate layer's patch features (the last one on a one-layer tower)
        vision_feature_layer=-2 if vision_config.num_hidden_layers > 1 else -1,
        vision_feature_select_strategy="default" if has_cls else "full")
    torch.manual_seed(seed)  # the new projector's initialisation
    model = LlavaForConditionalGeneration(config).eval()
    tower = model.model.vision_tower
    _load(tower.vision_model if hasattr(tower, "vision_model") else tower,
          getattr(encoder, "vision_model", encoder).state_dict(), "--vision")
    _load(model.model.language_model, lm.get_decoder().state_dict(), "--language-model")
    model.lm_head.weight.data.copy_(lm.get_output_embeddings().weight.data)
    processor = LlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(vision_dir), tokenizer=tokenizer,
                               patch_size=vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=1 if has_cls else 0, image_token=IMAGE_TOKEN,
                               chat_template=tokenizer.chat_template or CHATML)
    with staged(target) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        files = sorted(p.name for p in Path(folder).iterdir())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    return {"out": target, "files": files, "projector_parameters": projector,
            "image_tokens": (vision_config.image_size // vision_config.patch_size) ** 2}


def _load(module: torch.nn.Module, weights: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ComposeError(f"{what}: its weights do not fit the composed model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
