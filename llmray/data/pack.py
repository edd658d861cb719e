"""Tokenize and pack: a piece's documents in, its `seq_len` rows out; a block is its pieces' rows shuffled together
(`plan.py` says which pieces).

Each piece is packed on its own: its documents tokenized, EOS after each, cut into `seq_len` rows (what is left
under one row at its end is dropped). A row's id is (epoch, piece, k): its piece's global id and its place in that
piece's packing, so a sample can be traced and counted across epochs, world sizes and resumes.

Plain Python with no Ray in it: Ray Data runs `pack_run` as tasks (`stream.py`), a run of a block's pieces per
task; `first_samples` and a profiler call `Packer` directly.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow.parquet as pq

from llmray import hub, storage
from llmray.data.pixels import ROW_INPUTS
from llmray.data.plan import IMAGE_PIECE_ROWS, Source, block_pieces, block_row_order, plan_sources
from llmray.data.split import Documents
from llmray.data.template import IGNORE_INDEX

# the columns of a row the model takes (labels and position ids only for conversations and pairs; sequence ids only
# for pairs: they say which tokens belong to which side of which pair; reference log-probabilities only for pairs
# whose reference was precomputed; the image inputs only for image conversations, `pixels.ROW_INPUTS`); a row also
# carries its id: source, epoch, piece, sample
MODEL_INPUTS = ("input_ids", "labels", "position_ids", "sequence_ids", "reference_logps", *ROW_INPUTS)
PACKED = MODEL_INPUTS[:4]  # what packing makes (sequence ids only when numbered)


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the stream's content and order, and the resources that make it."""

    sources: tuple[Source, ...]
    tokenizer: str
    seq_len: int
    seed: int
    batch_docs: int
    tasks: int = 1  # tokenize tasks at once (data.tokenize_tasks)
    cpus_per_task: float = 1.0
    max_epochs: int | None = None  # each source stops before starting epoch max_epochs; None: endless
    # what a document is: text; a conversation (JSON messages: rows carry labels and position ids); a preference
    # pair (JSON prompt/chosen/rejected: rows also carry sequence ids); an RL prompt (JSON prompt and fields: a row
    # is one prompt, `prompt_rows`); an image conversation (JSON messages and images: a row is one conversation with
    # its pixels, `pixels.image_rows`)
    documents: Literal["text", "conversations", "pairs", "prompts", "images"] = "text"
    max_images: int = 0  # image conversations: the images a row has room for (vision.max_images)
    document_masking: bool = False  # text rows carry position ids restarting at each document (data.document_masking)
    # pairs: each source's precomputed reference log-probabilities (a Parquet file of `reference_sums`, one per
    # source; objectives/reference.py writes them), which rows then carry as `reference_logps`
    reference: tuple[str, ...] | None = None

    @classmethod
    def of(cls, parts: list[tuple[str, float, Documents]], tokenizer: str, seq_len: int, seed: int, batch_docs: int,
           **resources) -> "StreamSpec":
        """The spec of a blend of (name, weight, documents) parts, planned from their shards' metadata."""
        per_row = IMAGE_PIECE_ROWS if resources.get("documents") == "images" else None
        return cls(plan_sources(parts, seq_len, per_row), tokenizer, seq_len, seed, batch_docs, **resources)

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]


@functools.lru_cache(maxsize=4)
def _tokenizers(path: str, chat: bool, stamp: float | None) -> tuple:
    """(Rust tokenizer, EOS id, transformers tokenizer or None) of `path`, loaded once per process and per version of
    its tokenizer.json (`stamp`): a worker process keeps them from one tokenize task to the next."""
    from llmray.data.tokenizer import load_fast, load_tokenizer

    backend, eos = load_fast(path)
    return backend, eos, load_tokenizer(path) if chat else None  # chat templates need the transformers tokenizer


def tokenizer_stamp(path: str) -> float | None:
    """When a local tokenizer folder's tokenizer.json last changed (None for a name or a URI)."""
    try:
        return os.stat(os.path.join(path, "tokenizer.json")).st_mtime
    except OSError:
        return None


class Packer:
    """Packs pieces and blocks of the spec's sources, with its process's tokenizer (`_tokenizers`)."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.backend, eos, self.hf = _tokenizers(spec.tokenizer, spec.documents != "text",
                                                 tokenizer_stamp(spec.tokenizer))
        self.eos = np.array([eos], dtype=np.int32)
        self.files: dict[str, pq.ParquetFile] = {}

    def _file(self, path: str) -> pq.ParquetFile:
        if path not in self.files:
            if len(self.files) > 64:
                self.files.clear()
            fs, p = storage.resolve(path)
            self.files[path] = pq.ParquetFile(fs.open_input_file(p))
        return self.files[path]

    def _texts(self, source: Source, piece: np.ndarray) -> list[str]:
        shard, start, stop = (int(x) for x in piece)
        path = source.shards[shard]
        pf = self._file(path)
        docs = source.documents
        columns = ["text", "doc_id"] if "doc_id" in pf.schema_arrow.names and docs.part != "all" else ["text"]
        groups, first, row = [], None, 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > start and row < stop:
                groups.append(g)
                first = row if first is None else first
            row += n
        table = pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)
        texts = table.column("text").to_pylist()
        if docs.part != "all":
            ids = table.column("doc_id").to_pylist() if "doc_id" in columns else \
                [docs.row_id(path, start + i) for i in range(len(texts))]
            texts = [t for t, d in zip(texts, ids) if docs.wants(d)]
        return [t for t in texts if t]

    def piece(self, source: Source, piece: np.ndarray) -> dict[str, np.ndarray]:
        """The piece's documents tokenized and packed into (n, seq_len) int32 rows: {"input_ids"}, or for
        conversations also "labels" and "position_ids" (`chat_rows`)."""
        texts = self._texts(source, piece)
        if self.spec.documents == "conversations":
            return chat_rows(self.hf, [json.loads(t) for t in texts], self.spec.seq_len)
        if self.spec.documents == "pairs":
            return pair_rows(self.hf, [json.loads(t) for t in texts], self.spec.seq_len)
        if self.spec.documents == "prompts":
            return prompt_rows(self.hf, [json.loads(t) for t in texts], self.spec.seq_len)
        if self.spec.documents == "images":
            from llmray.data.pixels import image_rows, load_processor

            return image_rows(load_processor(self.spec.tokenizer), [json.loads(t) for t in texts], self.spec.seq_len,
                              self.spec.max_images)
        seq_len, flat = self.spec.seq_len, []
        for i in range(0, len(texts), self.spec.batch_docs):
            for enc in self.backend.encode_batch_fast(texts[i:i + self.spec.batch_docs], add_special_tokens=False):
                flat.append(np.asarray(enc.ids, dtype=np.int32))
                flat.append(self.eos)
        ids = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int32)
        n = len(ids) // seq_len
        rows = {"input_ids": ids[:n * seq_len].reshape(n, seq_len)}
        if self.spec.document_masking:
            rows["position_ids"] = document_positions([len(a) for a in flat[::2]], seq_len, n)
        return rows

    def piece_rows(self, index: int, epoch: int, piece: int) -> dict[str, np.ndarray]:
        """Piece `piece` of source `index` packed, with each row's ids, in packing order."""
        source = self.spec.sources[index]
        packed = self.piece(source, source.pieces[piece])
        n = len(packed["input_ids"])
        if self.spec.reference is not None:
            packed["reference_logps"] = reference_column(packed["sequence_ids"],
                                                         reference_sums(self.spec.reference[index]), piece)
        return {**packed, "source": np.full(n, index, dtype=np.int32),
                "epoch": np.full(n, epoch, dtype=np.int32),
                "piece": np.full(n, source.first_piece + piece, dtype=np.int64),
                "sample": np.arange(n, dtype=np.int64)}

    def run_rows(self, index: int, epoch: int, block: int, first: int = 0, count: int | None = None) \
            -> dict[str, np.ndarray]:
        """The rows of `count` pieces (all: None) of a block from its `first`, each piece packed on its own,
        concatenated in block order (not shuffled)."""
        pieces = block_pieces(self.spec.sources[index], index, self.spec.seed, epoch, block)
        parts = [self.piece_rows(index, epoch, int(p))
                 for p in pieces[first:None if count is None else first + count]]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def block(self, index: int, epoch: int, block: int) -> dict[str, np.ndarray]:
        """Block `block` of epoch `epoch` of source `index`: its pieces' rows, in block order, shuffled together.
        The stream makes the same rows in the same order, from runs of pieces packed by Ray Data (`stream.py`)."""
        rows = self.run_rows(index, epoch, block)
        return {k: v[block_row_order(self.spec.seed, index, epoch, block, len(v))] for k, v in rows.items()}


def pack_run(item: dict, spec: StreamSpec) -> dict[str, np.ndarray]:
    """A Ray Data task: one (source, epoch, block, first, count) item in, that run of the block's pieces packed
    out, one output block per item."""
    return Packer(spec).run_rows(*(int(item[k][0]) for k in ("source", "epoch", "block", "first", "count")))


def tokenize_env(spec: StreamSpec) -> dict[str, str]:
    """A tokenize worker's environment: the tokenizer's thread pool gets the CPUs its task was budgeted, no more (it
    would steal from training). Set when the process starts, before the tokenizer starts its pool. With the Hub
    settings of the process that starts them (the catalog actor, started with the driver's), for hf:// shards and a
    tokenizer named by its Hub id."""
    return {**hub.env(), "TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(max(1, int(spec.cpus_per_task)))}


def document_positions(doc_lengths: list[int], seq_len: int, n_rows: int) -> np.ndarray:
    """(n_rows, seq_len) position ids of documents packed back to back, each followed by its EOS: counting from 0
    at each document's first token and again at each row's (a document split over rows is a new sequence in each,
    so no position exceeds seq_len)."""
    starts = np.cumsum([0] + [n + 1 for n in doc_lengths[:-1]])  # + 1: the EOS after each document
    token = np.arange(n_rows * seq_len)
    doc_start = starts[np.searchsorted(starts, token, side="right") - 1] if len(starts) else token
    return (token - np.maximum(doc_start, token // seq_len * seq_len)).astype(np.int32).reshape(n_rows, seq_len)


def first_rows(spec: StreamSpec, n: int, index: int = 0) -> dict[str, np.ndarray]:
    """The model inputs (input_ids, and labels and position_ids for conversations) of the first `n` rows of source
    `index`'s epoch 0 (fewer if it holds fewer), exactly as the stream orders them, made here without Ray: a run's
    fixed validation set."""
    packer, parts, have = Packer(spec), [], 0
    for block in range(spec.sources[index].n_blocks):
        rows = packer.block(index, 0, block)
        parts.append({k: rows[k] for k in MODEL_INPUTS if k in rows})
        have += len(rows["input_ids"])
        if have >= n:
            break
    if not parts:
        return {"input_ids": np.zeros((0, spec.seq_len), dtype=np.int32)}
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}


def first_samples(spec: StreamSpec, n: int, index: int = 0) -> np.ndarray:
    """The token ids of `first_rows`: what `llmray quantize` measures perplexity on."""
    return first_rows(spec, n, index)["input_ids"]


def chat_rows(tokenizer, conversations: list[list[dict]], seq_len: int) -> dict[str, np.ndarray]:
    """Conversations packed whole into (n, seq_len) rows (`pack_whole`), one longer than a row cut to it. Labels
    are the token where the assistant wrote it and IGNORE_INDEX elsewhere (the prompt, padding, each
    conversation's first token). A conversation left with no assistant token after the cut is dropped."""
    from llmray.data.template import encode_chat

    units = []
    for messages in conversations:
        ids, mask = encode_chat(tokenizer, messages)
        ids, mask = ids[:seq_len], mask[:seq_len]
        labels = _labels(ids, mask)
        if not (labels == IGNORE_INDEX).all():
            units.append([(ids, labels)])
    return pack_whole(units, seq_len, _pad(tokenizer))


def pair_rows(tokenizer, pairs: list[dict], seq_len: int) -> dict[str, np.ndarray]:
    """Preference pairs packed whole into (n, seq_len) rows (`pack_whole`): each pair's chosen side (prompt +
    completion) then its rejected side, as two sequences that attend only to themselves, labelled on their
    completions; `sequence_ids` numbers them in their row, 2k+1 the chosen and 2k+2 the rejected side of the
    row's k-th pair (0 for padding), which is how the loss pairs their log-probabilities. A pair longer than a row
    (refused when the shards were written) is dropped."""
    from llmray.data.template import encode_completion

    units = []
    for pair in pairs:
        sides = []
        for key in ("chosen", "rejected"):
            ids, mask = encode_completion(tokenizer, pair["prompt"], pair[key])
            sides.append((ids, _labels(ids, mask)))
        if sum(len(ids) for ids, _ in sides) <= seq_len:
            units.append(sides)
    return pack_whole(units, seq_len, _pad(tokenizer), numbered=True)


def prompt_rows(tokenizer, records: list[dict], seq_len: int) -> dict[str, np.ndarray]:
    """RL prompts, one per row, not packed (each is answered on its own): "input_ids" (n, seq_len) the prompt
    rendered with the generation prompt, padded after its "prompt_length" tokens; "fields" (n,) the JSON of the
    record's other fields, for the rewards. A prompt longer than a row (refused when the shards were written) is
    dropped."""
    from llmray.data.template import encode_prompt

    pad = _pad(tokenizer)
    ids, lengths, fields = [], [], []
    for record in records:
        tokens = encode_prompt(tokenizer, record["prompt"])
        if len(tokens) > seq_len:
            continue
        ids.append(np.array(tokens + [pad] * (seq_len - len(tokens)), dtype=np.int32))
        lengths.append(len(tokens))
        fields.append(json.dumps(record["fields"], ensure_ascii=False))
    if not ids:
        return {"input_ids": np.zeros((0, seq_len), dtype=np.int32), "prompt_length": np.zeros(0, dtype=np.int32),
                "fields": np.zeros(0, dtype=object)}
    return {"input_ids": np.stack(ids), "prompt_length": np.array(lengths, dtype=np.int32),
            "fields": np.array(fields, dtype=object)}


def _labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
    labels[:1] = IGNORE_INDEX  # would be predicted from the previous sequence's last token
    return labels


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pack_whole(units: list[list[tuple[np.ndarray, np.ndarray]]], seq_len: int, pad: int, numbered: bool = False
               ) -> dict[str, np.ndarray]:
    """Units of (ids, labels) sequences packed into (n, seq_len) rows in order, a unit whole in one row: one that
    does not fit in what is left of a row starts the next (the rest is padding). Position ids restart at 0 for
    each sequence and for the padding, which is how transformers keeps packed sequences from attending to each
    other (`find_packed_sequence_indices`). `numbered`: also `sequence_ids`, each sequence's number in its row
    (1, 2, ... in order; 0 for padding)."""
    keys = PACKED if numbered else PACKED[:3]
    rows: dict[str, list] = {k: [] for k in keys}
    row: dict[str, list] = {k: [] for k in keys}

    def close_row() -> None:
        used = sum(len(part) for part in row["input_ids"])
        if not used:
            return
        left = seq_len - used
        if left:
            row["input_ids"].append(np.full(left, pad, dtype=np.int32))
            row["labels"].append(np.full(left, IGNORE_INDEX, dtype=np.int32))
            row["position_ids"].append(np.arange(left, dtype=np.int32))
            if numbered:
                row["sequence_ids"].append(np.zeros(left, dtype=np.int32))
        for k in keys:
            rows[k].append(np.concatenate(row[k]))
            row[k] = []

    for unit in units:
        if sum(len(part) for part in row["input_ids"]) + sum(len(ids) for ids, _ in unit) > seq_len:
            close_row()
        for ids, labels in unit:
            if numbered:
                row["sequence_ids"].append(np.full(len(ids), len(row["input_ids"]) + 1, dtype=np.int32))
            row["input_ids"].append(ids)
            row["labels"].append(labels)
            row["position_ids"].append(np.arange(len(ids), dtype=np.int32))
    close_row()
    if not rows["input_ids"]:
        return {k: np.zeros((0, seq_len), dtype=np.int32) for k in keys}
    return {k: np.stack(v) for k, v in rows.items()}


@functools.lru_cache(maxsize=4)
def reference_sums(path: str) -> dict[tuple[int, int], np.ndarray]:
    """A source's precomputed reference log-probabilities, read once per process: (piece, sample) of a packed row
    -> the sum over each of its sequences' completion tokens, in sequence-id order (1, 2, ...)."""
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        table = pq.read_table(f)
    return {(int(piece), int(sample)): np.asarray(sums, dtype=np.float32) for piece, sample, sums in
            zip(table.column("piece").to_pylist(), table.column("sample").to_pylist(), table.column("sums").to_pylist())}


def reference_column(sequence_ids: np.ndarray, sums: dict[tuple[int, int], np.ndarray], piece: int) -> np.ndarray:
    """(n, seq_len) float32: each sequence's reference sum at its first token, 0 elsewhere, so that the loss's
    per-sequence sums (`objectives.preference.pair_sums`) read it back exactly as if the reference had run."""
    out = np.zeros(sequence_ids.shape, dtype=np.float32)
    for sample, ids in enumerate(sequence_ids):
        try:
            row = sums[(piece, sample)]
        except KeyError:
            raise RuntimeError(f"the precomputed reference log-probabilities hold no row {sample} of piece {piece}: "
                               "the cache does not match the data (delete the run's reference/ folder)") from None
        starts = np.flatnonzero(np.diff(ids, prepend=0) != 0)
        starts = starts[ids[starts] > 0]
        if len(starts) != len(row):
            raise RuntimeError(f"piece {piece} row {sample} packs {len(starts)} sequences, its precomputed reference "
                               f"{len(row)}: the cache does not match the data (delete the run's reference/ folder)")
        out[sample, starts] = row[ids[starts] - 1]
    return out
