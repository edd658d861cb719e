"""QLoRA on a vision-language model, without Ray: the model DeepSpeed is handed (`deepspeed_engine.model_to_train`)
has its language model's Linear layers 4-bit (bitsandbytes, on CPU) under LoRA adapters, the vision tower unquantized
and frozen, the projector unquantized and trained in full; a few optimizer steps on an image conversation lower its
loss; export's QLoRA path (the full-precision base, the checkpoint's adapters and projector, merged) gives a plain
transformers model that answers as the trained one did, less the 4-bit rounding."""

import pytest
import torch
from helpers import colour_png, tiny_vlm

from llmray.recipe.load import load_recipe

bnb = pytest.importorskip("bitsandbytes")


def test_a_qlora_vlm_quantizes_the_language_model_alone_trains_the_projector_and_exports_merged(tmp_path):
    from transformers import AutoModelForImageTextToText

    from llmray.data.pixels import encode_image_chat, load_processor
    from llmray.export.folder import full_precision_base, load_adapters
    from llmray.model.lora import with_lora
    from llmray.train.deepspeed_engine import model_to_train

    base = tiny_vlm(tmp_path / "vlm")
    recipe = load_recipe("jobs/vision_tiny.yaml", [f"model.pretrained={base}", f"data.conversations={tmp_path}",
                                                   "finetune.method=qlora", "finetune.lora.dropout=0.0"])
    processor = load_processor(str(base))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs faster so on a busy 2-core machine
    try:
        torch.manual_seed(0)
        model = model_to_train(recipe, len(processor.tokenizer), torch.device("cpu"), "fp32", {}, announce=False)
        four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert four_bit and all(".language_model." in n for n in four_bit), sorted(four_bit)
        assert {n.removesuffix(".base_layer") for n in four_bit} == {
            n for n, m in model.named_modules() if hasattr(m, "lora_A")}, "every 4-bit layer carries an adapter"
        assert len(four_bit) == 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
        training = {n for n, p in model.named_parameters() if p.requires_grad}
        assert training and all("lora_" in n or ".modules_to_save." in n for n in training), sorted(training)
        assert any("multi_modal_projector.modules_to_save." in n for n in training), "the projector does not train"
        assert not any("vision_tower" in n for n in training), "the vision tower trains"

        ids, labels, inputs = encode_image_chat(processor, [
            {"role": "user", "content": "<image>What colour is the square?"},
            {"role": "assistant", "content": "It is red."}], [colour_png("red", seed=0)])
        batch = {"input_ids": torch.tensor(ids[None], dtype=torch.long),
                 "labels": torch.tensor(labels[None], dtype=torch.long), "pixel_values": torch.from_numpy(inputs["pixel_values"])}
        tower = {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(8):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 1.0, losses
        assert all(torch.equal(p, tower[n]) for n, p in model.named_parameters() if "vision_tower" in n)
        model.eval()
        with torch.no_grad():
            trained = model(**batch).loss.item()

        # export's QLoRA path, on the state the checkpoint holds (its 4-bit base left for the full-precision one)
        exported = with_lora(full_precision_base(recipe, str(tmp_path)), recipe.finetune.lora)
        load_adapters(exported, {k: v.detach() for k, v in model.state_dict().items()}, str(tmp_path))
        exported.merge_and_unload().save_pretrained(tmp_path / "out")
        plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()  # no llmray, no peft
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
        trained_projector = {n.split("modules_to_save.default.")[-1]: p for n, p in model.named_parameters()
                             if "multi_modal_projector.modules_to_save." in n}
        for name, p in plain.model.multi_modal_projector.named_parameters():
            assert torch.equal(p, trained_projector[name]), f"the trained projector's {name} was not exported"
        with torch.no_grad():
            merged = plain(**batch).loss.item()
        print(f"answer loss {losses[0]:.3f} -> {trained:.3f} (4-bit base), {merged:.3f} (merged export)")
        assert merged == pytest.approx(trained, abs=0.1) and merged < losses[0] - 1.0
    finally:
        torch.set_num_threads(threads)
