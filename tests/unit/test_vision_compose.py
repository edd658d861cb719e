"""LLaVA composition: a CLIP vision encoder folder and a language model folder joined by a new projector into one
folder plain transformers loads, the two models' weights carried over unchanged, `<image>` added to the tokenizer;
stage 1's freezing leaves the projector alone to train."""

import pytest
import torch
from helpers import colour_png, colour_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(1)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=16, patch_size=8))
    encoder.save_pretrained(root / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(root / "clip")
    tokenizer = colour_tokenizer()
    lm = tiny_llama(len(tokenizer))
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    return {"root": root, "encoder": encoder, "lm": lm, "vocab": len(tokenizer)}


def test_a_vision_encoder_and_a_language_model_compose_into_a_llava_folder(parts, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llmray.model.compose import compose_llava

    made = compose_llava(str(parts["root"] / "clip"), str(parts["root"] / "lm"), str(tmp_path / "llava"))
    assert made["image_tokens"] == 4 and made["projector_parameters"] > 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert len(processor.tokenizer) == parts["vocab"] + 1  # <image> added
    assert model.get_input_embeddings().num_embeddings == parts["vocab"] + 1
    tower = model.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in parts["encoder"].state_dict().items())
    decoder = model.model.language_model.state_dict()
    for k, v in parts["lm"].model.state_dict().items():
        assert torch.equal(decoder[k][:len(v)], v), k  # the embeddings' new row aside
    assert model.config.vision_feature_layer == -2  # LLaVA-1.5's penultimate layer

    import io

    from PIL import Image

    image = Image.open(io.BytesIO(colour_png("red"))).convert("RGB")
    inputs = processor(text=["<|im_start|>user\n<image>What colour?<|im_end|>\n"], images=[image], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 4
    with torch.no_grad():
        assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)

    from llmray.cli import main

    before = (tmp_path / "llava" / "model.safetensors").read_bytes()
    assert main(["vision", "compose", "--vision", str(parts["root"] / "clip"), "--language-model",
                 str(parts["root"] / "lm"), "--out", str(tmp_path / "llava")]) == 2  # exists: refused in one line
    assert (tmp_path / "llava" / "model.safetensors").read_bytes() == before
    assert "exists" in capsys.readouterr().err


def test_stage_one_trains_the_projector_alone(parts, tmp_path):
    from transformers import AutoModelForImageTextToText

    from llmray.model.build import freeze_language_model, freeze_tower
    from llmray.model.compose import compose_llava

    compose_llava(str(parts["root"] / "clip"), str(parts["root"] / "lm"), str(tmp_path / "llava"))
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava")
    freeze_tower(model)
    freeze_language_model(model)
    training = {n for n, p in model.named_parameters() if p.requires_grad}
    assert training and all(".multi_modal_projector." in f".{n}" for n in training)
