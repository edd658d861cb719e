"""Which documents a run trains on and which it holds out, decided in one place.

A recipe holds out either separate shards (`data.val_shards`, every document of them) or a fraction of its own
documents (`data.val_fraction`): those whose doc_id hashes into the first buckets. The same function answers for
the training stream, the validation samples, an export's lineage and `llmray quantize`'s measurement.
"""

from __future__ import annotations

import posixpath
import zlib
from dataclasses import dataclass
from typing import Literal

from llmray import storage
from llmray.recipe.schema import DataSettings, Recipe, default

VAL_BUCKETS = 10_000


def is_val_doc(doc_id: str, fraction: float) -> bool:
    return zlib.crc32(doc_id.encode()) % VAL_BUCKETS < fraction * VAL_BUCKETS


@dataclass(frozen=True)
class Documents:
    """The documents of the shards at `location`: all of them, or those outside ("train") or inside ("val") the
    held-out `val_fraction`."""

    location: str
    part: Literal["all", "train", "val"] = "all"
    val_fraction: float = 0.0

    def wants(self, doc_id: str) -> bool:
        return self.part == "all" or is_val_doc(doc_id, self.val_fraction) == (self.part == "val")

    def row_id(self, path: str, row: int) -> str:
        """The doc_id of row `row` of a shard without a doc_id column: the file's path inside `location`, and the
        row. Where the files are kept (a copy, the Hub, a cache) does not move a document in or out of the split."""
        return f"{storage.inside(path, self.location) or posixpath.basename(path)}#{row}"


@dataclass(frozen=True)
class HeldOut:
    """Held-out text as a measurement needs it: where from (`shards` whole when val_fraction is 0, else their
    `val_fraction` bucket), cut into `seq_len`-token samples in the run's `seed` order. Stored in an export's
    llmray_export.json so a later measurement uses the run's own validation samples."""

    shards: str
    val_fraction: float = 0.0
    seq_len: int = default("data", "seq_len")
    seed: int = default("run", "seed")

    @property
    def documents(self) -> Documents:
        return Documents(self.shards, "val" if self.val_fraction > 0 else "all", self.val_fraction)

    @classmethod
    def of_recipe(cls, recipe: Recipe) -> "HeldOut | None":
        """The held-out set an export records for later measurement: the recipe's first source's (the whole corpus
        when the recipe has one); None when it holds nothing out."""
        val = split_sources(recipe.data)[0].held_out
        if val is None:
            return None
        return cls(val.location, val.val_fraction if val.part == "val" else 0.0, recipe.data.seq_len, recipe.run.seed)

    def describe(self) -> str:
        part = f"the {self.val_fraction:g} held-out fraction of" if self.val_fraction else "all of"
        return f"{part} {self.shards}, {self.seq_len}-token samples"


@dataclass(frozen=True)
class SourceSplit:
    """One source of a recipe's blend: its weight, the documents it trains on and those it validates on."""

    name: str
    weight: float
    train: Documents
    held_out: Documents | None  # None: no held-out set


def split_sources(data: DataSettings) -> list[SourceSplit]:
    """Each source's training and held-out documents (a recipe with data.shards is one source)."""
    out = []
    for source in data.blend:
        if data.val_shards:
            train, val = Documents(source.shards), Documents(data.val_shards)
        elif data.val_fraction > 0:
            train = Documents(source.shards, "train", data.val_fraction)
            val = Documents(source.shards, "val", data.val_fraction)
        else:
            train, val = Documents(source.shards), None
        out.append(SourceSplit(source.name, source.weight, train, val))
    return out
