"""Image conversations into model rows with the model's own processor, in the stream's tokenize tasks (CPU).

A row is one conversation, not packed: "input_ids" and "labels" (the assistant's tokens only) padded to `seq_len`,
"pixel_values" (max_images, *image shape) its images as the processor prepared them, zero after its "image_count".
Why not packed: the processor expands each placeholder into the image's tokens, the model scatters the image
features into them in order, and a row cut through an image breaks that; a packed row would also need
per-document attention over image tokens, which the VLM forwards of transformers do not take. An image row's
tokens are mostly the image's, so padding costs little of the text a row could hold.

The assistant's tokens are located as for text (`template.encode_chat`) on the conversation before expansion,
then carried over to the expanded ids by aligning the two (the expansion only inserts tokens where a placeholder
was).
"""

from __future__ import annotations

import difflib
import functools
import io

import numpy as np

from llmray.data import images
from llmray.data.template import IGNORE_INDEX, encode_chat
from llmray.data.vision import IMAGE_PLACEHOLDER


@functools.lru_cache(maxsize=2)
def load_processor(path: str):
    """The model folder's processor (tokenizer, image processor, placeholder expansion), once per process."""
    from transformers import AutoProcessor

    from llmray import hub, storage

    return AutoProcessor.from_pretrained(storage.local_folder(path, "data.tokenizer", hub.TOKENIZER_FILES))


def image_rows(processor, records: list[dict], seq_len: int, max_images: int) -> dict[str, np.ndarray]:
    """The rows of `records` (`vision.normalize_vision`'s form), one each; a record whose expanded tokens exceed
    `seq_len`, or with no assistant token, is dropped."""
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids_rows, label_rows, pixel_rows, counts = [], [], [], []
    shape = None
    for record in records:
        messages = with_image_token(processor, record)
        ids, labels, pixels = encode_image_chat(processor, messages, [images.from_text(t) for t in record["images"]])
        if len(ids) > seq_len or (labels == IGNORE_INDEX).all():
            continue
        if pixels is not None:
            shape = pixels.shape[1:]
        ids_rows.append(np.concatenate([ids, np.full(seq_len - len(ids), pad, dtype=np.int32)]))
        label_rows.append(np.concatenate([labels, np.full(seq_len - len(ids), IGNORE_INDEX, dtype=np.int32)]))
        pixel_rows.append(pixels)
        counts.append(0 if pixels is None else len(pixels))
    if shape is None:  # no image in this run of rows: the processor's shape for one
        shape = image_shape(processor)
    pixel_values = np.zeros((len(ids_rows), max_images, *shape), dtype=np.float32)
    for row, pixels in enumerate(pixel_rows):
        if pixels is not None:
            pixel_values[row, :len(pixels)] = pixels
    if not ids_rows:
        return {"input_ids": np.zeros((0, seq_len), dtype=np.int32), "labels": np.zeros((0, seq_len), dtype=np.int32),
                "pixel_values": pixel_values, "image_count": np.zeros(0, dtype=np.int32)}
    return {"input_ids": np.stack(ids_rows), "labels": np.stack(label_rows), "pixel_values": pixel_values,
            "image_count": np.array(counts, dtype=np.int32)}


def with_image_token(processor, record: dict) -> list[dict]:
    """The record's messages with each `<image>` placeholder written as the processor's own image token."""
    token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
    return [{"role": m["role"], "content": m["content"].replace(IMAGE_PLACEHOLDER, token)} for m in record["messages"]]


def encode_image_chat(processor, messages: list[dict], pictures: list[bytes]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(expanded token ids, labels on the assistant's tokens, pixel values (n_images, ...) or None)."""
    ids, mask = encode_chat(processor.tokenizer, messages)
    if not pictures:
        expanded, pixels = ids, None
    else:
        from llmray.data.template import render

        expanded, pixels = expand(processor, render(processor.tokenizer, messages), pictures)
        mask = carried_mask(ids, mask, expanded)
    labels = np.where(mask, expanded, IGNORE_INDEX).astype(np.int32)
    labels[:1] = IGNORE_INDEX
    return expanded, labels, pixels


def expand(processor, text: str, pictures: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(the token ids of a rendered `text` with each image token expanded into its image's tokens, the images' pixel
    values (n_images, ...) as the processor prepared them): the processor run on the text and the decoded images."""
    out = processor(text=[text], images=[images.decode(p) for p in pictures], add_special_tokens=False,
                    return_tensors="np")
    expanded = np.asarray(out["input_ids"][0], dtype=np.int32)
    pixels = np.asarray(out["pixel_values"], dtype=np.float32).reshape(len(pictures), -1, *out["pixel_values"].shape[-3:])
    return expanded, pixels[:, 0] if pixels.shape[1] == 1 else pixels


def expanded_length(processor, record: dict) -> int | None:
    """The tokens `record` takes once each placeholder is expanded, from its text and its images' sizes (read from
    their headers, not decoded), as the processor counts them for vLLM (`_get_num_multimodal_tokens`); None for a
    processor that does not say."""
    count = getattr(processor, "_get_num_multimodal_tokens", None)
    if count is None:
        return None
    from PIL import Image

    text = len(encode_chat(processor.tokenizer, with_image_token(processor, record))[0])
    sizes = []
    for data in record["images"]:
        with Image.open(io.BytesIO(images.from_text(data))) as img:
            sizes.append((img.height, img.width))
    if not sizes:
        return text
    per_image = count(image_sizes=sizes).num_image_tokens
    return text + sum(n - 1 for n in per_image)  # each placeholder token becomes n


def carried_mask(ids: np.ndarray, mask: np.ndarray, expanded: np.ndarray) -> np.ndarray:
    """`mask` over `ids` carried to `expanded` (the same tokens with image tokens inserted): matched tokens keep
    theirs, inserted ones are False."""
    out = np.zeros(len(expanded), dtype=bool)
    matcher = difflib.SequenceMatcher(None, ids.tolist(), expanded.tolist(), autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        out[b:b + size] = mask[a:a + size]
    return out


def image_shape(processor) -> tuple[int, ...]:
    """The shape of one prepared image: the processor run on a blank one."""
    from PIL import Image

    out = processor.image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="np")
    return tuple(np.asarray(out["pixel_values"]).shape[-3:])
