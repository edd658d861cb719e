"""Image-text conversations for vision-language fine-tuning, in the forms people have, detected per file from its
first record:

- `openai`: OpenAI chat `messages` whose content may be a list of parts, `{"type": "text", "text": ...}` and
  `{"type": "image_url", "image_url": {"url": ...}}` (a `data:` URI, a path relative to the file, `s3://`);
- `llava`: LLaVA / LLaMA-Factory records, `messages` (role/content) or `conversations` (from/value) with `<image>`
  placeholders in the text, plus an `images` list (LLaVA's own `image`: one) naming one image per placeholder;
- `caption`: a caption table, an `image` and its `text` (or `caption`): the user turn is the image, the assistant's
  the caption.

One form out: {"messages": [{role, content}] with IMAGE_PLACEHOLDER where each image goes, "images": [base64 of
each image's bytes, in placeholder order]}, stored as JSON in a shard's `text` column like a conversation, so the
shards hold the images and the stream reads no other storage. A record whose placeholders and images do not
match in number, or holds an image missing from storage or corrupt, or more than the row's `max_images`, or video
or audio (LLaMA-Factory's `videos`, `audios`; OpenAI parts other than text and image_url), is a bad record, skipped
and named by file, line and field.
"""

from __future__ import annotations

from llmray.data import images
from llmray.data.chat import ROLES, SHAREGPT_ROLES, read_turns

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a message's text (LLaVA's and LLaMA-Factory's token)
CAPTION_KEYS = ("text", "caption")
# LLaMA-Factory's fields for other media: a record holding them is refused, not trained on without them
UNREAD_MEDIA = ("videos", "video", "audios", "audio")


def detect_vision_format(obj: dict) -> str | None:
    if not isinstance(obj, dict):
        return None
    if ("messages" in obj or "conversations" in obj) and ("images" in obj or "image" in obj):
        return "llava"
    if "messages" in obj:
        return "openai"
    if "image" in obj and any(k in obj for k in CAPTION_KEYS):
        return "caption"
    return None


def normalize_vision(obj: dict, fmt: str, base: str, max_images: int) -> dict:
    """The image conversation of one record in format `fmt`, its images read (relative paths from `base`, the
    folder of its file) and checked; ValueError naming the field when it is malformed."""
    for key in UNREAD_MEDIA:
        if key in obj:
            raise ValueError(f"field {key!r}: only images are read, not video or audio (the conversation would be "
                             "trained on without them)")
    if fmt == "openai":
        messages, refs = _openai(obj)
    elif fmt == "llava":
        messages, refs = _llava(obj)
    elif fmt == "caption":
        key = next(k for k in CAPTION_KEYS if k in obj)
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise ValueError(f"field {key!r} must be a non-empty string")
        messages, refs = [{"role": "user", "content": IMAGE_PLACEHOLDER},
                          {"role": "assistant", "content": obj[key]}], [("image", obj["image"])]
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to learn from")
    if any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] == "assistant"):
        raise ValueError(f"an assistant message holds {IMAGE_PLACEHOLDER}: images go in user turns")
    if len(refs) > max_images:
        raise ValueError(f"{len(refs)} images, more than vision.max_images={max_images} a row holds")
    out = []
    for field, ref in refs:
        try:
            out.append(images.to_text(images.image_bytes(ref, base)))
        except ValueError as e:
            raise ValueError(f"field {field!r}: {e}") from None
    return {"messages": messages, "images": out}


def _openai(obj: dict) -> tuple[list[dict], list[tuple[str, object]]]:
    turns = obj.get("messages")
    if not isinstance(turns, list) or not turns:
        raise ValueError("field 'messages' must be a non-empty list")
    messages, refs = [], []
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise ValueError(f"field '{where}.role' must be one of {', '.join(ROLES)}")
        content = turn.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    refs.append((f"{at}.image_url", url))
                    parts.append(IMAGE_PLACEHOLDER)
                else:
                    raise ValueError(f"field {at!r} must be a text or image_url part")
            text = "".join(parts)
        else:
            raise ValueError(f"field '{where}.content' must be a string or a list of parts")
        if IMAGE_PLACEHOLDER in text and isinstance(content, str):
            raise ValueError(f"field '{where}.content' holds {IMAGE_PLACEHOLDER} as text; images are image_url parts")
        messages.append({"role": turn["role"], "content": text})
    return messages, refs


def _llava(obj: dict) -> tuple[list[dict], list[tuple[str, object]]]:
    if "messages" in obj:
        messages = read_turns(obj, "messages", "role", "content", {r: r for r in ROLES})
    else:
        messages = read_turns(obj, "conversations", "from", "value", SHAREGPT_ROLES)
    field = "images" if "images" in obj else "image"
    listed = obj[field] if field == "images" else [obj[field]]
    if not isinstance(listed, list):
        raise ValueError("field 'images' must be a list")
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != len(listed):
        raise ValueError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(listed)} images in field {field!r}")
    return messages, [(f"{field}[{i}]" if field == "images" else field, ref) for i, ref in enumerate(listed)]
