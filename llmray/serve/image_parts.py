"""A chat request's image parts into the Pillow images the model's processor takes, within the app's limits.

Where an image may come from: a `data:` URI (base64), always; a local path (or `file://` URL), an `s3://` or a
`gs://` URI only under one of the app's `allowed_image_paths` (none by default); nothing else (an `http(s)://` URL
is not fetched). Each image is read (at most one byte past `max_image_bytes`) and decoded here, with the decoder
fine-tuning uses (`data/images.py`). A refusal names its part (`messages[1].content[2].image_url: ...`), which the
app answers with a 400.
"""

from __future__ import annotations

import os
import posixpath

from llmray import storage
from llmray.data import images
from llmray.data.vision import IMAGE_PLACEHOLDER

OBJECT_STORAGE = ("s3", "gs")  # URI schemes an allowed prefix may name


class ImageRefused(ValueError):
    """An image part this request may not have; `where` names it (`messages[i].content[j].image_url`)."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}")
        self.where = where


def load_images(urls: list[tuple[str, str]], max_images: int, max_bytes: int, max_pixels: int,
                allowed: list[str]) -> list:
    """The RGB images of `urls`, (where, url) pairs in the request's order; ImageRefused for the first that may
    not be read: past `max_images`, from a place not `allowed`, over `max_bytes` or `max_pixels`, or undecodable."""
    if len(urls) > max_images:
        raise ImageRefused(urls[max_images][0], f"the request has {len(urls)} images, more than "
                                                f"max_images_per_request={max_images}")
    return [_load(where, url, max_bytes, max_pixels, allowed) for where, url in urls]


def _load(where: str, url: str, max_bytes: int, max_pixels: int, allowed: list[str]):
    try:
        if url.startswith("data:"):
            data = images.from_data_uri(url)
        else:
            data = images.read(allowed_location(url, allowed), "/", max_bytes)
        if len(data) > max_bytes:
            raise ValueError(f"the image is over max_image_bytes ({max_bytes:,} bytes)")
        return images.decode(data, max_pixels)
    except ValueError as e:
        raise ImageRefused(where, str(e)) from None


def allowed_location(url: str, allowed: list[str]) -> str:
    """The local path or object-storage URI `url` names (`..` and, locally, links resolved), if it lies under one
    of the `allowed` prefixes (each a folder: /data/img allows /data/img/a.png, not /data/img2/a.png);
    ValueError otherwise."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if storage.is_uri(url):
        scheme, _, rest = url.partition("://")
        if scheme not in OBJECT_STORAGE:
            raise ValueError(f"{scheme}:// image URLs are not fetched here; send the image as a data: URI")
        place = f"{scheme}://{posixpath.normpath(rest)}"
    elif os.path.isabs(url):
        place = os.path.realpath(url)
    else:
        raise ValueError("an image URL must be a data: URI, an absolute path or an s3:// or gs:// URI")
    if not any(_under(place, prefix) for prefix in allowed):
        raise ValueError("images are read from paths and object storage only under the app's allowed_image_paths, "
                         "and this one is not under them; send the image as a data: URI")
    return place


def _under(place: str, prefix: str) -> bool:
    if storage.is_uri(prefix):
        scheme, _, rest = prefix.partition("://")
        prefix = f"{scheme}://{posixpath.normpath(rest)}"
    else:
        prefix = os.path.realpath(prefix)
    return place == prefix or place.startswith(prefix.rstrip("/") + "/")


def refuse_image_tokens(texts: list[tuple[str, str]], image_token: str | None) -> None:
    """ImageRefused for the first of `texts`, (where, text) pairs, that holds an image's placeholder or the model's
    image token: its processor would take it for an image."""
    tokens = {t for t in (IMAGE_PLACEHOLDER, image_token) if t}
    for where, text in texts:
        if any(t in text for t in tokens):
            raise ImageRefused(where, f"holds {' or '.join(sorted(tokens))}, which stands for an image here; send "
                                      "images as image_url parts")
