"""One image reference in, its checked bytes out: a `data:` URI, a path relative to the file that names it, an
absolute path, an `s3://` / `gs://` URI, or the bytes themselves (a Parquet image column, as Hugging Face datasets
store it: {"bytes", "path"}).

Every image is opened and decoded here, while the shards are written, so an image missing from storage or one that
is corrupt is a bad line named by file and line, not a failed tokenize task later. The bytes are kept as they came
(JPEG stays JPEG); the stream decodes them again where the processor runs.
"""

from __future__ import annotations

import base64
import binascii
import io
import posixpath

from llmray import storage

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # larger is refused as a decompression bomb (Pillow's own check is a warning)


def image_bytes(ref, base: str) -> bytes:
    """The bytes `ref` names, decoded once to check them; ValueError saying what is wrong (missing, corrupt).
    `base`: the folder (local or URI) of the file that holds the reference, what a relative path is read from."""
    if isinstance(ref, dict):  # a Hugging Face datasets Image: bytes, else a path
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray)):
        data = bytes(ref)
    elif isinstance(ref, str) and ref:
        data = from_data_uri(ref) if ref.startswith("data:") else read(ref, base)
    else:
        raise ValueError(f"not an image reference (got {type(ref).__name__})")
    check(data)
    return data


def from_data_uri(uri: str) -> bytes:
    """The bytes of a base64 `data:` URI; ValueError when it is not one."""
    head, sep, payload = uri.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ValueError("a data: URI must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise ValueError(f"a data: URI's base64 is corrupt ({e})") from None


def read(path: str, base: str, max_bytes: int | None = None) -> bytes:
    """The bytes of the image at `path` (relative: to `base`); with `max_bytes`, at most max_bytes + 1 of them,
    enough for the caller to tell that the file is larger without reading it all."""
    full = path if storage.is_uri(path) or posixpath.isabs(path) else storage.join(base, path)
    fs, p = storage.resolve(full)
    try:
        with fs.open_input_stream(p) as f:
            return f.read() if max_bytes is None else f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ValueError(f"image {full} is missing") from None
    except OSError as e:
        raise ValueError(f"image {full} cannot be read ({str(e).splitlines()[0]})") from None


def check(data: bytes) -> None:
    """Decode the image fully: a truncated or corrupt file fails here (Pillow's `verify` misses truncation)."""
    decode(data)


def decode(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS):
    """The RGB Pillow image of `data`; ValueError when it is not a decodable image or has more than `max_pixels`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise ValueError(f"image of {img.width}x{img.height} pixels is over {max_pixels:,}")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # Pillow's plugins raise all three on bad data
        raise ValueError(f"unreadable or corrupt image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def data_uri(data: bytes) -> str:
    """Image bytes as a `data:` URI (base64), its media type read from the image (what an OpenAI image_url part
    carries)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        kind = Image.MIME.get(img.format or "", "application/octet-stream")
    return f"data:{kind};base64,{to_text(data)}"


def to_text(data: bytes) -> str:
    """Image bytes as the text a shard's JSON holds (base64)."""
    return base64.b64encode(data).decode("ascii")


def from_text(text: str) -> bytes:
    return base64.b64decode(text)
