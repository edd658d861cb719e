"""Image conversations into model rows with the model's own processor, in the stream's tokenize tasks (CPU).

A row is one conversation, not packed: "input_ids" and "labels" (the assistant's tokens only) padded to `seq_len`,
"image_count", and what the processor returned for its images that the model's forward takes (`ImageLayout`):
"pixel_values" (max_images, *image shape) zero after its images; or one list of entries, the row's own first and
"pixel_count" of them: for a processor that returns them flat over the images' patches (Qwen2-VL's dynamic
resolution) (seq_len * patches a token, patch size), for one that gives an image as many crops as its size asks
(Idefics3's / SmolVLM's image splitting, Gemma 3's pan-and-scan) (max_images * most crops, C, H, W) with each crop's
`PER_CROP_INPUTS`; each image's entry of `PER_IMAGE_INPUTS` (Qwen2-VL's patch grid); `PER_TOKEN_INPUTS` (Gemma 3's
token types, Qwen2-VL's multimodal token types), a value a token like the ids.
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
import weakref
from dataclasses import dataclass

import numpy as np

from llmray.data import images
from llmray.data.template import IGNORE_INDEX, encode_chat
from llmray.data.vision import IMAGE_PLACEHOLDER


@functools.lru_cache(maxsize=2)
def load_processor(path: str):
    """The model folder's processor (tokenizer, image processor, placeholder expansion), once per process."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    from llmray import hub, storage

    folder = storage.local_folder(path, "data.tokenizer", hub.TOKENIZER_FILES)
    try:
        return AutoProcessor.from_pretrained(folder)
    except ImportError:
        if is_torchvision_available():
            raise
        return image_only_processor(folder)


def image_only_processor(folder: str):
    """The folder's processor built without its video processor, which needs torchvision (Qwen2-VL's and its kin's
    need one; llmray passes images only): on a machine without torchvision. It keeps its class's name, so what a
    checkpoint saves of it loads as the model's own processor where torchvision is."""
    import json
    import os

    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    saved = os.path.join(folder, "processor_config.json")  # a checkpoint's processor folder holds no model config
    if os.path.exists(saved):
        with open(saved) as f:
            name = json.load(f)["processor_class"]
    else:
        name = PROCESSOR_MAPPING_NAMES[AutoConfig.from_pretrained(folder).model_type]
    base = getattr(transformers, name)

    def check_argument_for_proper_class(self, name, argument):
        return None if name == "video_processor" and argument is None else base.check_argument_for_proper_class(
            self, name, argument)

    def save_pretrained(self, save_directory, **kwargs):  # its parts, and its class for AutoProcessor
        self.image_processor.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(save_directory)
        with open(os.path.join(save_directory, "processor_config.json"), "w") as f:
            json.dump({"processor_class": name}, f)

    image_only = type(base.__name__, (base,), {"check_argument_for_proper_class": check_argument_for_proper_class,
                                               "save_pretrained": save_pretrained})
    return image_only(image_processor=AutoImageProcessor.from_pretrained(folder),
                      tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None)


# What a processor returns for images, besides the pixel values, that a forward takes, by how a row holds it.
# an entry an image, (max_images, ...): Qwen2-VL's (t, h, w) patch grid, LLaVA-NeXT's image size (which crops of the
# image's slot are its own: the forward drops the others)
PER_IMAGE_INPUTS = ("image_grid_thw", "image_sizes")
# a value a token, (seq_len,), 0 on text and padding: Gemma 3's token_type_ids (its image tokens attend to each other
# both ways), Qwen2-VL's mm_token_type_ids (which tokens its M-RoPE positions as image)
PER_TOKEN_INPUTS = ("token_type_ids", "mm_token_type_ids")
# a value a pixel of each crop, (crops, H, W), beside pixel values held as the row's crops in one list: Idefics3's
# (SmolVLM's) pixel_attention_mask, which pixels of a crop are the image's (its processor pads the crops of a batch
# to one size)
PER_CROP_INPUTS = ("pixel_attention_mask",)
# the columns of an image row the model's inputs come from (`train/batch.py`)
ROW_INPUTS = ("pixel_values", "image_count", "pixel_count", *PER_IMAGE_INPUTS, *PER_TOKEN_INPUTS, *PER_CROP_INPUTS)


@dataclass(frozen=True)
class ImageLayout:
    """How rows hold a processor's image inputs: found by running it once on a blank image (`image_layout`), so a
    run of rows without images has the same columns and shapes as one with."""

    # one image's pixel values (C, H, W), or (crops, C, H, W) with room for the most crops an image can have
    # (LLaVA-NeXT's: its base view and the tiles of its largest grid); flat: one patch's (patch size,); with
    # `crops_per_image`: one crop's (C, H, W)
    pixels: tuple[int, ...]
    flat: bool  # pixel values flat over the images' patches (Qwen2-VL), not one fixed shape an image
    patches_per_token: int  # flat: the patches of one image token (Qwen2-VL: merge_size ** 2), which bounds a row's
    per_image: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, one image's shape, dtype) of PER_IMAGE_INPUTS
    per_token: tuple[str, ...]  # the PER_TOKEN_INPUTS the processor returns
    # the tokens the expansion adds to an image's beyond those `_get_num_multimodal_tokens` counts (Gemma 3's begin and
    # end of image and the line breaks around them)
    tokens_around: int = 0
    # > 0: the processor returns the row's crops in one list, an image as many crops as its size gives, at most this
    # many (Idefics3 / SmolVLM: its tiles and a global view; Gemma 3's pan-and-scan: the image and its crops)
    crops_per_image: int = 0
    per_crop: tuple[str, ...] = ()  # the PER_CROP_INPUTS the processor returns

    @property
    def listed(self) -> bool:
        """A row's pixel values are one list of entries (patches or crops), the row's own "pixel_count" first."""
        return self.flat or self.crops_per_image > 0


def image_rows(processor, records: list[dict], seq_len: int, max_images: int) -> dict[str, np.ndarray]:
    """The rows of `records` (`vision.normalize_vision`'s form), one each; a record whose expanded tokens exceed
    `seq_len`, or with no assistant token, is dropped."""
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    layout = image_layout(processor)
    kept = []
    for record in records:
        messages = with_image_token(processor, record)
        ids, labels, inputs = encode_image_chat(processor, messages, [images.from_text(t) for t in record["images"]])
        if len(ids) > seq_len or (labels == IGNORE_INDEX).all():
            continue
        kept.append((ids, labels, inputs, len(record["images"])))
    n = len(kept)
    out = {"input_ids": np.full((n, seq_len), pad, dtype=np.int32),
           "labels": np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32),
           "image_count": np.array([k[3] for k in kept], dtype=np.int32).reshape(n)}
    if layout.flat:
        out["pixel_values"] = np.zeros((n, seq_len * layout.patches_per_token, *layout.pixels), dtype=np.float32)
    elif layout.crops_per_image:
        crops = max_images * layout.crops_per_image
        out["pixel_values"] = np.zeros((n, crops, *layout.pixels), dtype=np.float32)
        out.update({name: np.zeros((n, crops, *layout.pixels[1:]), dtype=bool) for name in layout.per_crop})
    else:
        out["pixel_values"] = np.zeros((n, max_images, *layout.pixels), dtype=np.float32)
    if layout.listed:
        out["pixel_count"] = np.zeros(n, dtype=np.int32)
    for name, shape, dtype in layout.per_image:
        out[name] = np.zeros((n, max_images, *shape), dtype=dtype)
    for name in layout.per_token:
        out[name] = np.zeros((n, seq_len), dtype=np.int32)
    for row, (ids, labels, inputs, _) in enumerate(kept):
        out["input_ids"][row, :len(ids)] = ids
        out["labels"][row, :len(ids)] = labels
        if inputs is None:
            continue
        pixels = inputs["pixel_values"]
        out["pixel_values"][row][tuple(slice(0, size) for size in pixels.shape)] = pixels  # fewer crops: zero after
        if layout.listed:
            out["pixel_count"][row] = len(pixels)
        for name in layout.per_crop:
            out[name][row, :len(inputs[name])] = inputs[name]
        for name, _, _ in layout.per_image:
            out[name][row, :len(inputs[name])] = inputs[name]
        for name in layout.per_token:
            out[name][row, :len(ids)] = inputs[name]
    return out


# the tokens a model's own chat template writes around its image token, which its processor does not add (Qwen2-VL,
# Qwen2.5-VL: <|vision_start|><|image_pad|><|vision_end|>), applied when its tokenizer holds them
IMAGE_TOKEN_AROUND = {"<|image_pad|>": ("<|vision_start|>", "<|vision_end|>")}


def with_image_token(processor, record: dict) -> list[dict]:
    """The record's messages with each `<image>` placeholder written as the processor's own image token (with the
    tokens the model's chat template puts around it, `IMAGE_TOKEN_AROUND`)."""
    token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
    around = IMAGE_TOKEN_AROUND.get(token)
    if around and all(t in processor.tokenizer.get_vocab() for t in around):
        token = f"{around[0]}{token}{around[1]}"
    return [{"role": m["role"], "content": m["content"].replace(IMAGE_PLACEHOLDER, token)} for m in record["messages"]]


def encode_image_chat(processor, messages: list[dict], pictures: list[bytes]
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]:
    """(expanded token ids, labels on the assistant's tokens, the image inputs (`expand`) or None without images)."""
    ids, mask = encode_chat(processor.tokenizer, messages)
    if not pictures:
        expanded, inputs = ids, None
    else:
        from llmray.data.template import render

        expanded, inputs = expand(processor, render(processor.tokenizer, messages), pictures)
        mask = carried_mask(ids, mask, expanded)
    labels = np.where(mask, expanded, IGNORE_INDEX).astype(np.int32)
    labels[:1] = IGNORE_INDEX
    return expanded, labels, inputs


def expand(processor, text: str, pictures: list) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(the token ids of a rendered `text` with each image token expanded into its image's tokens, the image inputs
    of the forward as the processor prepared them): "pixel_values" (n_images, ...), or flat over the images' patches
    (patches, patch size) for Qwen2-VL's kind, or the crops of all the images in one list (crops, C, H, W) with their
    PER_CROP_INPUTS for Idefics3's, and those of PER_IMAGE_INPUTS (n_images, ...) and PER_TOKEN_INPUTS (a value a
    token) it returns. `pictures`: encoded images (bytes), or Pillow images already decoded (serving's)."""
    decoded = [images.decode(p) if isinstance(p, bytes) else p for p in pictures]
    out = processor(text=[text], images=decoded, add_special_tokens=False, return_tensors="np")
    expanded = np.asarray(out["input_ids"][0], dtype=np.int32)
    pixels = np.asarray(out["pixel_values"], dtype=np.float32)
    if all(name in out for name in PER_CROP_INPUTS):  # the row's crops in one list, (crops, C, H, W): Idefics3's
        pixels = pixels[0]
    elif pixels.ndim == 4 and len(pixels) > len(pictures):  # more crops than images, in one list: pan-and-scan's
        pass
    elif pixels.ndim > 2:  # one shape an image, the processor's leading axes (batch, image, crop) folded
        pixels = pixels.reshape(len(pictures), -1, *pixels.shape[-3:])
        pixels = pixels[:, 0] if pixels.shape[1] == 1 else pixels
    inputs = {"pixel_values": pixels}
    inputs.update({name: np.asarray(out[name][0], dtype=bool) for name in PER_CROP_INPUTS if name in out})
    inputs.update({name: np.asarray(out[name]) for name in PER_IMAGE_INPUTS if name in out})
    inputs.update({name: np.asarray(out[name][0], dtype=np.int32) for name in PER_TOKEN_INPUTS if name in out})
    return expanded, inputs


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
    if image_layout(processor).crops_per_image > 1:  # the tokens around a cropped image's depend on its crops
        return text + sum(cropped_image_tokens(processor, size) - 1 for size in sizes)
    per_image = count(image_sizes=sizes).num_image_tokens
    # each placeholder token becomes n, and the tokens the processor writes around them (Gemma 3's)
    return text + sum(n - 1 + image_layout(processor).tokens_around for n in per_image)


_CROPPED_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # processor -> {(height, width): tokens}


def cropped_image_tokens(processor, size: tuple[int, int]) -> int:
    """The tokens an image of `size` (height, width) expands into with a processor that crops images (Idefics3's
    split: its tiles' tokens, each tile's `<row_i_col_j>`, the line breaks between rows, its global view; Gemma 3's
    pan-and-scan: its crops' tokens and the words that introduce them): the expansion of a blank image of that size,
    once a size."""
    known = _CROPPED_TOKENS.setdefault(processor, {})
    if size not in known:
        token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        known[size] = len(expand(processor, token, [_blank(size[1], size[0])])[0])
    return known[size]


def carried_mask(ids: np.ndarray, mask: np.ndarray, expanded: np.ndarray) -> np.ndarray:
    """`mask` over `ids` carried to `expanded` (the same tokens with image tokens inserted): matched tokens keep
    theirs, inserted ones are False."""
    out = np.zeros(len(expanded), dtype=bool)
    matcher = difflib.SequenceMatcher(None, ids.tolist(), expanded.tolist(), autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        out[b:b + size] = mask[a:a + size]
    return out


# by the processor itself, held weakly: keyed by id(), a processor freed (load_processor keeps two) and another made
# at its address would be given the first one's layout
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def image_layout(processor) -> ImageLayout:
    """How rows hold `processor`'s image inputs: the processor run once (while it lives) on a blank image."""
    if processor not in _LAYOUTS:
        token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        ids, inputs = expand(processor, token, [_blank(32, 32)])
        pixels = inputs["pixel_values"]
        flat = pixels.ndim == 2
        grids = getattr(processor.image_processor, "image_grid_pinpoints", None)
        if pixels.ndim == 5 and grids:  # crops an image: the most, from an image the size of each grid
            crops = max(len(expand(processor, token, [_blank(w, h)])[1]["pixel_values"][0]) for h, w in grids)
            pixels = np.zeros((1, crops, *pixels.shape[2:]), dtype=pixels.dtype)
        most_crops = _most_crops(processor, token)
        per_token = 1
        if flat:
            token_id = processor.tokenizer.convert_tokens_to_ids(token)
            per_token = len(pixels) // max(1, int((ids == token_id).sum()))
        count = getattr(processor, "_get_num_multimodal_tokens", None)
        around = len(ids) - count(image_sizes=[(32, 32)]).num_image_tokens[0] if count is not None else 0
        _LAYOUTS[processor] = ImageLayout(
            pixels=tuple(pixels.shape[1:]), flat=flat, patches_per_token=per_token,
            per_image=tuple((name, tuple(inputs[name].shape[1:]), inputs[name].dtype.str) for name in PER_IMAGE_INPUTS
                            if name in inputs),
            per_token=tuple(name for name in PER_TOKEN_INPUTS if name in inputs), tokens_around=around,
            crops_per_image=most_crops or int(any(name in inputs for name in PER_CROP_INPUTS)),
            per_crop=tuple(name for name in PER_CROP_INPUTS if name in inputs))
    return _LAYOUTS[processor]


def _most_crops(processor, token: str) -> int:
    """The most crops the processor makes of one image, returned in one list with the other images' (0: it does not
    crop): Idefics3's image splitting (an image of its largest size: the most tiles, and the global view), Gemma 3's
    pan-and-scan (its most crops and the image; a call's option in transformers, not saved with the folder, so on
    only for a processor whose `images_kwargs` were set in this process)."""
    settings = processor.image_processor
    if getattr(settings, "do_image_splitting", False):
        edge = getattr(getattr(settings, "size", None), "longest_edge", None) or 32
        return len(expand(processor, token, [_blank(edge, edge)])[1]["pixel_values"])
    calls = getattr(processor, "images_kwargs", {})  # its call's defaults: Gemma 3 pans and scans only when set there
    if calls.get("do_pan_and_scan"):
        return calls["pan_and_scan_max_num_crops"] + 1
    return 0


def _blank(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return out.getvalue()


def left_padded_inputs(rows: list[tuple[int, dict[str, np.ndarray] | None]], width: int, per_row: bool
                       ) -> dict[str, np.ndarray]:
    """The image inputs of one forward of rows left-padded to `width` (inference: evaluation's and serving's), each
    row given as (its token count, its `expand` inputs, or None for a row without images): every row's pixel values
    in row order in one array (LLaVA, Gemma 3; LLaVA-NeXT's crops zero-padded to the most; Qwen2-VL's patches) with
    their PER_IMAGE_INPUTS, or with `per_row` (`build.PIXELS_PER_ROW`: Idefics3) as (rows, most images or crops, ...)
    with their PER_CROP_INPUTS, the slots after a row's own zero (which the model drops); the PER_TOKEN_INPUTS as rows,
    0 on padding and on rows without images. {} when no row has an image."""
    held = [inputs for _, inputs in rows if inputs is not None]
    if not held:
        return {}
    if per_row:  # and their PER_CROP_INPUTS likewise
        most = max(len(h["pixel_values"]) for h in held)
        out = {name: np.zeros((len(rows), most, *held[0][name].shape[1:]), dtype=held[0][name].dtype)
               for name in ("pixel_values", *PER_CROP_INPUTS) if name in held[0]}
        for i, (_, inputs) in enumerate(rows):
            for name in out if inputs is not None else ():
                out[name][i, :len(inputs[name])] = inputs[name]
    else:
        out = {"pixel_values": concatenate_padded([h["pixel_values"] for h in held])}
    out.update({name: np.concatenate([h[name] for h in held]) for name in PER_IMAGE_INPUTS if name in held[0]})
    for name in PER_TOKEN_INPUTS:
        if name in held[0]:
            out[name] = np.zeros((len(rows), width), dtype=np.int64)
            for i, (length, inputs) in enumerate(rows):
                if inputs is not None:
                    out[name][i, width - length:] = inputs[name]
    return out


def concatenate_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays concatenated on their first axis, each zero-padded at the end of its other axes to the largest (images
    of different crop counts: LLaVA-NeXT's, whose forward drops the padding crops by the images' sizes)."""
    shape = np.max([a.shape[1:] for a in arrays], axis=0)
    out = np.zeros((sum(len(a) for a in arrays), *shape), dtype=arrays[0].dtype)
    start = 0
    for a in arrays:
        out[(slice(start, start + len(a)), *(slice(0, n) for n in a.shape[1:]))] = a
        start += len(a)
    return out
