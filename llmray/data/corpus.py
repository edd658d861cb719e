"""Finding and checking the shards a run reads, before any worker starts."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from llmray import storage
from llmray.data.shard import MANIFEST
from llmray.errors import LlmrayError


class CorpusError(LlmrayError):
    """Shards that cannot be read; the message names the file."""


@dataclass(frozen=True)
class Shard:
    path: str  # full path or URI, readable by storage.resolve
    rows: int
    row_groups: tuple[tuple[int, int], ...] = ()  # (rows, uncompressed bytes) of each Parquet row group


def list_shards(location: str, text_column: str = "text") -> list[Shard]:
    """The Parquet shards under `location`, in a fixed order, each checked to open and hold `text_column`."""
    fs, path = storage.resolve(location)
    if not storage.exists(fs, path):
        raise CorpusError(f"shard folder {location} does not exist")
    files = [f for f in storage.list_files(fs, path) if f.base_name.endswith(".parquet")]
    manifest = storage.join(path, MANIFEST)
    if storage.exists(fs, manifest):
        with fs.open_input_stream(manifest) as f:
            listed = [s["path"] for s in json.loads(f.read())["shards"]]
        by_name = {f.base_name: f for f in files}
        missing = [n for n in listed if n not in by_name]
        if missing:
            raise CorpusError(f"shard {storage.join(location, missing[0])} is listed in {MANIFEST} but missing")
        files = [by_name[n] for n in listed]
    if not files:
        raise CorpusError(f"no .parquet shards in {location}")
    shards = []
    for f in files:
        uri = _uri(location, path, f.path)
        try:
            meta = pq.read_metadata(fs.open_input_file(f.path))
            names = meta.schema.to_arrow_schema().names
        except (pa.ArrowInvalid, OSError) as e:
            raise CorpusError(f"shard {uri} is corrupt or not Parquet ({e})") from None
        if text_column not in names:
            raise CorpusError(f"shard {uri} has no {text_column!r} column (columns: {names})")
        groups = tuple((meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups))
        shards.append(Shard(uri, meta.num_rows, groups))
    if sum(s.rows for s in shards) == 0:
        raise CorpusError(f"empty corpus: the shards in {location} hold no documents")
    return shards


def _uri(location: str, resolved: str, found: str) -> str:
    """A found file named under the user's location (its scheme kept), so workers on any node resolve the same file
    (a Hub dataset read from this node's cache, offline, is named by its hf:// path, not the cache's)."""
    if not storage.is_uri(location):
        return found
    inside = storage.inside(found, resolved)
    return storage.join(location.rstrip("/"), inside) if inside else location
