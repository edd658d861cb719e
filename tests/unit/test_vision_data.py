"""Image-text conversations: the three formats read as one form (images from data: URIs, paths relative to the file,
s3://, Parquet bytes), bad lines skipped and named by file and line, the processor's rows (image tokens expanded,
loss on the assistant's tokens only, pixels with the row) and their forward through a tiny LLaVA."""

import json
import re

import numpy as np
import pytest
from helpers import colour_png, data_uri, s3_client, tiny_idefics3, tiny_vlm

from llmray.data import images
from llmray.data.chat import read_conversations, shard_conversations
from llmray.data.pixels import encode_image_chat, image_rows, load_processor
from llmray.data.template import IGNORE_INDEX
from llmray.data.vision import IMAGE_PLACEHOLDER

RED, BLUE = colour_png("red"), colour_png("blue", seed=1)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return str(tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny"))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def colour_records(with_text: bool = False) -> list[dict]:
    """Two image conversations, RED's and BLUE's, asked their colour; and one without an image when `with_text`."""
    records = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                             {"role": "assistant", "content": f"It is {c}."}], "images": [images.to_text(png)]}
               for c, png in (("red", RED), ("blue", BLUE))]
    if with_text:
        records.append({"messages": [{"role": "user", "content": "Describe it."},
                                     {"role": "assistant", "content": "a red square"}], "images": []})
    return records


def read(path, max_images=2):
    return list(read_conversations(str(path), kind="images", max_images=max_images))


def test_three_formats_read_as_the_same_image_conversation(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(RED)
    question, answer = "What colour is the square?", "It is red."
    openai = write_jsonl(tmp_path / "openai.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(RED)}},
                                                   {"type": "text", "text": question}]},
                      {"role": "assistant", "content": answer}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/red.png"}},
                                                   {"type": "text", "text": question}]},
                      {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}])
    llava = write_jsonl(tmp_path / "llava.jsonl", [
        {"messages": [{"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": answer}],
         "images": ["img/red.png"]},
        {"conversations": [{"from": "human", "value": f"<image>{question}"}, {"from": "gpt", "value": answer}],
         "image": str(tmp_path / "img" / "red.png")}])
    captions = write_jsonl(tmp_path / "captions.jsonl", [{"image": "img/red.png", "text": "a red square"}])
    want = {"messages": [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}{question}"},
                         {"role": "assistant", "content": answer}], "images": [images.to_text(RED)]}
    got = read(openai) + read(llava)
    assert [problem for _, _, problem in got] == [None] * 4
    assert all(record == want for _, record, _ in got)
    assert [doc for doc, _, _ in got] == [f"{openai}:1", f"{openai}:2", f"{llava}:1", f"{llava}:2"]
    ((_, caption, _),) = read(captions)
    assert caption == {"messages": [{"role": "user", "content": IMAGE_PLACEHOLDER},
                                    {"role": "assistant", "content": "a red square"}], "images": [images.to_text(RED)]}


def test_a_caption_table_in_parquet_holds_the_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"image": [{"bytes": RED, "path": None}], "caption": ["a red square"]}), path)
    ((doc, record, problem),) = read(path)
    assert problem is None and doc == f"{path}#0" and images.from_text(record["images"][0]) == RED


def test_images_in_object_storage_are_read(tmp_path, s3):
    import os

    s3_client(dict(os.environ)).put_object(Bucket="llmray", Key="img/blue.png", Body=BLUE)
    path = write_jsonl(tmp_path / "llava.jsonl", [
        {"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "blue"}],
         "images": ["s3://llmray/img/blue.png"]}])
    ((_, record, problem),) = read(path)
    assert problem is None and images.from_text(record["images"][0]) == BLUE


@pytest.mark.parametrize("row, problem", [
    ({"messages": [{"role": "user", "content": "<image><image>two?"}, {"role": "assistant", "content": "no"}],
      "images": ["red.png"]}, "2 <image> placeholders for 1 images in field 'images' (llava format)"),
    ({"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "no"}],
      "images": ["gone.png"]}, "field 'images[0]': image {dir}/gone.png is missing (llava format)"),
    ({"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "no"}],
      "images": ["corrupt.png"]}, "field 'images[0]': unreadable or corrupt image"),
    ({"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "no"}],
      "images": ["truncated.png"]}, "field 'images[0]': unreadable or corrupt image"),
    ({"messages": [{"role": "user", "content": "<image><image><image>?"}, {"role": "assistant", "content": "no"}],
      "images": ["red.png"] * 3}, "3 images, more than vision.max_images=2 a row holds (llava format)"),
    ({"messages": [{"role": "user", "content": "<image>?"}], "images": ["red.png"]},
     "no assistant message: nothing to learn from (llava format)"),
    ({"messages": [{"role": "user", "content": "<video>what happens?"}, {"role": "assistant", "content": "no"}],
      "videos": ["clip.mp4"]}, "field 'videos': only images are read, not video or audio"),
    ('{"messages": [', "not valid JSON"),
])
def test_a_bad_line_is_skipped_counted_and_named_by_file_and_line(tmp_path, vlm, row, problem):
    from transformers import AutoTokenizer

    (tmp_path / "red.png").write_bytes(RED)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "truncated.png").write_bytes(RED[:len(RED) // 2])
    good = {"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "red"}],
            "images": ["red.png"]}
    path = write_jsonl(tmp_path / "chats.jsonl", [good, row, good])
    made = shard_conversations(str(path), str(tmp_path / "shards"), AutoTokenizer.from_pretrained(vlm), 64,
                               kind="images", max_images=2)
    assert made.documents == 2 and len(made.skipped) == 1
    assert made.skipped[0].startswith(f"{path}:2: " + problem.format(dir=tmp_path)), made.skipped[0]


def test_rows_expand_the_image_and_train_on_the_answer_only(vlm):
    processor = load_processor(vlm)
    record = {"messages": [{"role": "user", "content": "<image>What colour is the square?"},
                           {"role": "assistant", "content": "It is red."}], "images": [images.to_text(RED)]}
    text_only = {"messages": [{"role": "user", "content": "Describe the image."},
                              {"role": "assistant", "content": "a blue square"}], "images": []}
    rows = image_rows(processor, [record, text_only], seq_len=64, max_images=2)
    assert rows["input_ids"].shape == (2, 64) and rows["pixel_values"].shape == (2, 2, 3, 16, 16)
    assert rows["image_count"].tolist() == [1, 0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (rows["input_ids"][0] == image_id).sum() == 4  # (16 / 8)^2 patches, CLS dropped
    assert not rows["pixel_values"][1].any() and rows["pixel_values"][0, 0].any() and not rows["pixel_values"][0, 1].any()
    for row, answer in ((0, "It is red."), (1, "a blue square")):
        labels = rows["labels"][row]
        taught = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
        assert taught.startswith(answer) and "<image>" not in taught and "colour" not in taught
    # too long once the image is expanded: dropped, not cut through the image
    assert len(image_rows(processor, [record], seq_len=12, max_images=1)["input_ids"]) == 0


def test_image_rows_go_through_the_model_and_the_pixels_matter(vlm):
    import torch
    from transformers import AutoModelForImageTextToText

    from llmray.train.batch import model_inputs

    processor = load_processor(vlm)
    model = AutoModelForImageTextToText.from_pretrained(vlm).eval()
    records = colour_records()
    rows = image_rows(processor, records, seq_len=48, max_images=1)
    inputs = model_inputs(rows, torch.device("cpu"))
    assert inputs["pixel_values"].shape == (2, 3, 16, 16)
    with torch.no_grad():
        loss = model(**inputs).loss
        swapped = model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(0)}).loss
    assert torch.isfinite(loss) and not torch.isclose(loss, swapped)


def test_the_mask_is_carried_over_the_expansion(vlm):
    processor = load_processor(vlm)
    messages = [{"role": "user", "content": "<image>a"}, {"role": "assistant", "content": "It is red."},
                {"role": "user", "content": "<image>b"}, {"role": "assistant", "content": "It is blue."}]
    ids, labels, inputs = encode_image_chat(processor, messages, [RED, BLUE])
    assert inputs["pixel_values"].shape == (2, 3, 16, 16)
    taught = processor.tokenizer.decode(np.where(labels != IGNORE_INDEX, ids, processor.tokenizer.pad_token_id),
                                        skip_special_tokens=False).replace("<pad>", "|")
    assert "It is red." in taught and "It is blue." in taught and "<image>" not in taught


@pytest.mark.parametrize("override, message", [
    ("vision.max_image=2", "vision.max_image: unknown key"),
    ("vision.max_images=0", "vision.max_images"),
    ("finetune=null", "vision tunes a pretrained model: add a finetune: block"),
    ("preference={loss: simpo}", "preference with vision is not built yet"),
])
def test_a_wrong_vision_recipe_names_the_key(override, message):
    from llmray.recipe.load import load_recipe
    from llmray.recipe.schema import RecipeError

    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe("jobs/vision_tiny.yaml", [override])


def test_a_text_model_with_a_vision_block_is_refused_before_ray(tmp_path, vlm):
    from helpers import tiny_llama

    from llmray.recipe.load import load_recipe
    from llmray.recipe.schema import RecipeError
    from llmray.train.trainer import check_inputs

    folder = tmp_path / "llama"
    tiny_llama(320).save_pretrained(folder)
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": str(tmp_path / "red.png"), "text": "a red square"}) + "\n")
    (tmp_path / "red.png").write_bytes(RED)
    r = load_recipe("jobs/vision_tiny.yaml", [f"model.pretrained={folder}", f"data.tokenizer={vlm}",
                                              f"data.shards={tmp_path / 'shards'}", f"data.conversations={tmp_path / 'c.jsonl'}"])
    shard_conversations(r.data.conversations, r.data.shards, load_processor(vlm).tokenizer, 64, kind="images",
                        max_images=1)
    with pytest.raises(RecipeError, match="is a llama model, not a vision-language one"):
        check_inputs(r)


def test_a_conversation_too_long_with_its_images_expanded_is_skipped_and_named(tmp_path, vlm):
    from llmray.data.pixels import expanded_length

    processor = load_processor(vlm)
    record = {"messages": [{"role": "user", "content": "<image>What colour is the square?"},
                           {"role": "assistant", "content": "It is red."}], "images": [images.to_text(RED)]}
    ids, _, _ = encode_image_chat(processor, [{**m} for m in record["messages"]], [RED])
    assert expanded_length(processor, record) == len(ids)  # the processor's count, before any image is prepared
    (tmp_path / "red.png").write_bytes(RED)
    short = {"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "red"}],
             "images": ["red.png"]}
    path = write_jsonl(tmp_path / "chats.jsonl", [{**record, "images": ["red.png"]}, short])
    made = shard_conversations(str(path), str(tmp_path / "shards"), processor.tokenizer, len(ids) - 1,
                               kind="images", max_images=1, processor=processor)
    assert made.documents == 1 and len(made.skipped) == 1
    assert made.skipped[0] == (f"{path}:1: over the length: with its images it takes {len(ids)} tokens, "
                               f"data.seq_len is {len(ids) - 1}")


def test_an_idefics3_takes_its_pixels_per_row(tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from llmray.model.build import PIXELS_PER_ROW
    from llmray.train.batch import model_inputs

    folder = str(tiny_idefics3(tmp_path / "idefics3"))
    processor = load_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert model.config.model_type in PIXELS_PER_ROW
    records = colour_records(with_text=True)
    rows = image_rows(processor, records, seq_len=64, max_images=2)
    assert rows["image_count"].tolist() == [1, 1, 0]
    inputs = model_inputs(rows, torch.device("cpu"), pixels_per_row=True)
    assert inputs["pixel_values"].shape == (3, 2, 3, 32, 32)  # zero slots: dropped by the model
    with torch.no_grad():
        loss = model(**inputs).loss
        swapped = model(**{**inputs, "pixel_values": inputs["pixel_values"][[1, 0, 2]]}).loss
    assert torch.isfinite(loss) and not torch.isclose(loss, swapped)


def test_image_records_read_as_text_conversations_point_to_the_vision_block(tmp_path):
    from llmray.data.chat import ChatDataError

    (tmp_path / "red.png").write_bytes(RED)
    path = write_jsonl(tmp_path / "llava.jsonl", [
        {"conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "red"}],
         "images": ["red.png"]}])
    with pytest.raises(ChatDataError, match=r"holds image conversations .* vision: block \(image-text fine-tuning\) reads"):
        list(read_conversations(str(path)))


def test_a_gemma3_row_carries_its_token_types_and_its_image_tokens_attend_both_ways(tmp_path):
    """Gemma 3: `<start_of_image>` expands to the image's soft tokens between its begin and end tokens, and the row
    carries the processor's `token_type_ids` (1 on the soft tokens), which the forward takes to let an image's tokens
    attend to each other both ways: the loss differs without them, and with the images swapped."""
    import torch
    from helpers import tiny_gemma3
    from transformers import AutoModelForImageTextToText

    from llmray.train.batch import model_inputs

    folder = str(tiny_gemma3(tmp_path / "gemma3"))
    processor = load_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    records = colour_records(with_text=True)
    rows = image_rows(processor, records, seq_len=48, max_images=1)
    soft = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert rows["image_count"].tolist() == [1, 1, 0] and rows["pixel_values"].shape == (3, 1, 3, 16, 16)
    assert ((rows["input_ids"] == soft).sum(1) == [4, 4, 0]).all()
    np.testing.assert_array_equal(rows["token_type_ids"], (rows["input_ids"] == soft).astype(np.int32))
    for row, answer in ((0, "It is red."), (1, "It is blue.")):
        labels = rows["labels"][row]
        assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]).startswith(answer)
    # the length check counts the begin/end-of-image tokens and line breaks the expansion adds to the soft tokens
    from llmray.data.pixels import expanded_length, with_image_token

    ids, _, _ = encode_image_chat(processor, with_image_token(processor, records[0]), [RED])
    assert expanded_length(processor, records[0]) == len(ids)
    inputs = model_inputs(rows, torch.device("cpu"))
    assert inputs["pixel_values"].shape == (2, 3, 16, 16) and inputs["token_type_ids"].shape == (3, 48)
    with torch.no_grad():
        out = model(**inputs)
        causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
        swapped = model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(0)}).logits
    assert torch.isfinite(out.loss) and (out.logits[:2] - swapped[:2]).abs().max() > 1e-2  # each row its own image
    # the first image token sees the image's later tokens only when the token types are given
    first = int(np.flatnonzero(rows["input_ids"][0] == soft)[0])
    assert torch.equal(out.logits[0, :first], causal[0, :first])
    assert (out.logits[0, first] - causal[0, first]).abs().max() > 1e-3


def rgb_png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def qwen2_vl_records() -> list[dict]:
    """A 16x16 red image (4 image tokens), a 32x16 blue one (8), and a conversation without an image."""
    def record(png: bytes | None, answer: str) -> dict:
        return {"messages": [{"role": "user", "content": "<image>What colour?" if png else "Describe it."},
                             {"role": "assistant", "content": answer}], "images": [images.to_text(png)] if png else []}
    return [record(rgb_png(16, 16, (220, 30, 30)), "It is red."), record(rgb_png(32, 16, (30, 40, 220)), "It is blue."),
            record(None, "a red square")]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen2_vl(tmp_path_factory, request):
    """A tiny Qwen2-VL, and a Qwen2.5-VL (the same processor inputs; a windowed tower)."""
    import helpers

    folder = getattr(helpers, f"tiny_{request.param}")(tmp_path_factory.mktemp(request.param) / "tiny")
    return folder, load_processor(str(folder))


def test_qwen2_vl_rows_of_two_image_sizes_carry_their_patches_grids_and_token_types(qwen2_vl):
    """Qwen2-VL's dynamic resolution: an image's patches and tokens are its size's. Each row holds its images' patches
    (the first `pixel_count` of a row sized seq_len x patches a token), each image's (t, h, w) grid and the token
    types; the batch gives the forward every row's patches and grids in order, and each row's logits are those of
    plain transformers on the processor's own inputs for that conversation alone (so pixels, grids and the M-RoPE
    positions the model computes from them are each row's own)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from llmray.data.pixels import image_layout, with_image_token
    from llmray.data.template import render
    from llmray.train.batch import model_inputs

    folder, processor = qwen2_vl
    layout = image_layout(processor)
    assert layout.flat and layout.patches_per_token == 4 and layout.pixels == (3 * 2 * 4 * 4,)
    records = qwen2_vl_records()
    rows = image_rows(processor, records, seq_len=64, max_images=2)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert rows["image_count"].tolist() == [1, 1, 0]
    assert rows["image_grid_thw"].tolist() == [[[1, 4, 4], [0, 0, 0]], [[1, 4, 8], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]]
    assert rows["pixel_count"].tolist() == [16, 32, 0] and rows["pixel_values"].shape == (3, 64 * 4, 96)
    assert ((rows["input_ids"] == pad).sum(1) == [4, 8, 0]).all()
    np.testing.assert_array_equal(rows["mm_token_type_ids"], (rows["input_ids"] == pad).astype(np.int32))
    text = processor.tokenizer.decode(rows["input_ids"][1])
    assert "<|vision_start|>" + "<|image_pad|>" * 8 + "<|vision_end|>What colour?" in text  # as Qwen's template has it

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = model_inputs(rows, torch.device("cpu"))
    assert inputs["pixel_values"].shape == (48, 96) and inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    with torch.no_grad():
        batch = model(**inputs).logits
        for row, record in enumerate(records):
            text = render(processor.tokenizer, with_image_token(processor, record))
            pictures = [images.decode(images.from_text(t)) for t in record["images"]]
            alone = processor(text=[text], images=pictures or None, add_special_tokens=False, return_tensors="pt")
            n = alone["input_ids"].shape[1]
            np.testing.assert_array_equal(rows["input_ids"][row, :n], alone["input_ids"][0].numpy())
            logits = model(**{k: v for k, v in alone.items() if k != "attention_mask"}).logits
            torch.testing.assert_close(batch[row, :n], logits[0], rtol=1e-4, atol=1e-4)


def test_a_qwen2_vl_learns_from_rows_of_two_image_sizes(qwen2_vl):
    """Trained on its rows (two image sizes and a text-only row in each batch) through `model_inputs`, the tower frozen
    as `llmray finetune` freezes it, a tiny Qwen2-VL's loss falls and its merger (the projector, inside the tower's
    module) trains."""
    import torch
    from transformers import AutoModelForImageTextToText

    from llmray.model.build import freeze_tower
    from llmray.train.batch import model_inputs

    folder, processor = qwen2_vl
    model = AutoModelForImageTextToText.from_pretrained(folder).train()
    freeze_tower(model)  # the tower's patch embedding and blocks; its merger (the projector) trains
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("model.visual.") and ".merger." not in n for n in trained)
    assert any(".visual.merger." in n for n in trained)
    merger = {n: p.detach().clone() for n, p in model.named_parameters() if ".merger." in n}
    inputs = model_inputs(image_rows(processor, qwen2_vl_records(), seq_len=64, max_images=1), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert any(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in merger.items())


def assert_each_row_is_its_conversation_alone(model, processor, rows: dict, records: list[dict], inputs: dict) -> None:
    """Each row's logits in the batch (`inputs`, made of `rows`) equal plain transformers' on the processor's own
    inputs for its conversation alone, its ids are the processor's, and its length with its images expanded is
    counted before any image is decoded (`pixels.expanded_length`)."""
    import torch

    from llmray.data.pixels import expanded_length, with_image_token
    from llmray.data.template import render

    with torch.no_grad():
        batch = model(**inputs).logits
        for row, record in enumerate(records):
            text = render(processor.tokenizer, with_image_token(processor, record))
            pictures = [images.decode(images.from_text(t)) for t in record["images"]]
            alone = processor(text=[text], images=[pictures], add_special_tokens=False, return_tensors="pt")
            n = alone["input_ids"].shape[1]
            np.testing.assert_array_equal(rows["input_ids"][row, :n], alone["input_ids"][0].numpy())
            assert expanded_length(processor, record) == n
            logits = model(**{k: v for k, v in alone.items() if k != "attention_mask"}).logits
            torch.testing.assert_close(batch[row, :n], logits[0], rtol=1e-4, atol=1e-4)


def test_llava_next_rows_hold_images_of_different_crop_counts_with_their_sizes(tmp_path):
    """LLaVA-NeXT: an image is its base view plus the crops of the grid its shape picks (16x16 and 32x16 px: 3 views,
    32x32: 5), its tokens likewise. A row's image slot has room for the most crops, zero after its own, and the row
    carries each image's `image_sizes`, by which the forward drops the padding crops: each row's logits in a batch of
    both equal plain transformers' on the processor's own inputs for that conversation alone."""
    import torch
    from helpers import tiny_llava_next
    from transformers import AutoModelForImageTextToText

    from llmray.data.pixels import image_layout
    from llmray.train.batch import model_inputs

    folder = str(tiny_llava_next(tmp_path / "llava-next"))
    processor = load_processor(folder)
    assert image_layout(processor).pixels == (5, 3, 16, 16)
    records = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                             {"role": "assistant", "content": f"It is {c}."}], "images": [images.to_text(rgb_png(*size))]}
               for c, size in (("red", (16, 16, (220, 30, 30))), ("blue", (32, 32, (30, 40, 220))))]
    rows = image_rows(processor, records, seq_len=64, max_images=1)
    assert rows["pixel_values"].shape == (2, 1, 5, 3, 16, 16) and rows["image_sizes"].tolist() == [[[16, 16]], [[32, 32]]]
    assert rows["pixel_values"][0, 0, :3].any() and not rows["pixel_values"][0, 0, 3:].any()
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = model_inputs(rows, torch.device("cpu"))
    assert inputs["pixel_values"].shape == (2, 5, 3, 16, 16) and inputs["image_sizes"].tolist() == [[16, 16], [32, 32]]
    assert_each_row_is_its_conversation_alone(model, processor, rows, records, inputs)


def test_idefics3_rows_hold_the_crops_of_split_images_with_their_masks(tmp_path):
    """SmolVLM's image splitting (a tiny Idefics3's): an image is its 32 px tiles and a global view, a 64x32 image 3
    crops, a 32x32 one 5 and a 16x16 one 5, each tile's tokens after its `<row_i_col_j>`. A row holds its images'
    crops in one list with each crop's `pixel_attention_mask`, room for max_images times the most crops an image has;
    each row's logits in a batch of rows of one and two images equal plain transformers' on the processor's own
    inputs for that conversation alone, and its expanded length is counted before any image is decoded."""
    import torch
    from helpers import tiny_idefics3_split
    from transformers import AutoModelForImageTextToText

    from llmray.data.pixels import image_layout
    from llmray.train.batch import model_inputs

    folder = str(tiny_idefics3_split(tmp_path / "idefics3"))
    processor = load_processor(folder)
    assert image_layout(processor).crops_per_image == 5 and image_layout(processor).pixels == (3, 32, 32)
    pngs = {"red": rgb_png(64, 32, (220, 30, 30)), "blue": rgb_png(32, 32, (30, 40, 220)),
            "green": rgb_png(16, 16, (30, 200, 40))}
    records = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                             {"role": "assistant", "content": "It is red."}], "images": [images.to_text(pngs["red"])]},
               {"messages": [{"role": "user", "content": "<image> and <image>: what colours?"},
                             {"role": "assistant", "content": "blue and green."}],
                "images": [images.to_text(pngs["blue"]), images.to_text(pngs["green"])]}]
    rows = image_rows(processor, records, seq_len=256, max_images=2)
    assert rows["pixel_values"].shape == (2, 10, 3, 32, 32) and rows["pixel_attention_mask"].shape == (2, 10, 32, 32)
    assert [int(r.any(axis=(1, 2, 3)).sum()) for r in rows["pixel_values"]] == [3, 10]
    assert rows["pixel_attention_mask"][0, :3].all() and not rows["pixel_attention_mask"][0, 3:].any()
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = model_inputs(rows, torch.device("cpu"), pixels_per_row=True)
    assert inputs["pixel_attention_mask"].shape == (2, 10, 32, 32)
    assert_each_row_is_its_conversation_alone(model, processor, rows, records, inputs)


def test_gemma3_rows_hold_the_pan_and_scan_crops_of_their_images(tmp_path):
    """Gemma 3's pan-and-scan (transformers' option of a processor call, here its processor's own defaults): a 64x16
    image is its view and 4 crops of at least 8 px (each introduced in the text), a 16x16 one its view alone. A row
    holds its images' views in one list, the row's own first (`pixel_count`), room for max_images times the most;
    each row's logits in a batch equal plain transformers' on the processor's inputs for that conversation alone, and
    its expanded length is counted before any image is decoded."""
    import torch
    from helpers import tiny_gemma3
    from transformers import AutoModelForImageTextToText

    from llmray.data.pixels import image_layout
    from llmray.train.batch import model_inputs

    folder = str(tiny_gemma3(tmp_path / "gemma3"))
    processor = load_processor(folder)
    processor.images_kwargs = {**processor.images_kwargs, "do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8}
    assert image_layout(processor).crops_per_image == 5 and image_layout(processor).pixels == (3, 16, 16)
    records = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                             {"role": "assistant", "content": f"It is {c}."}], "images": [images.to_text(png)]}
               for c, png in (("red", rgb_png(64, 16, (220, 30, 30))), ("blue", rgb_png(16, 16, (30, 40, 220))))]
    rows = image_rows(processor, records, seq_len=256, max_images=1)
    assert rows["pixel_values"].shape == (2, 5, 3, 16, 16) and rows["pixel_count"].tolist() == [5, 1]
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = model_inputs(rows, torch.device("cpu"))
    assert inputs["pixel_values"].shape == (6, 3, 16, 16)
    assert_each_row_is_its_conversation_alone(model, processor, rows, records, inputs)
