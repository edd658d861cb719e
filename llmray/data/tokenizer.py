"""Tokenizers: train a byte-level BPE on shards (`llmray tokenizer train`), or load any HF tokenizer (a local or
s3:// folder, or a Hub id)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmray import hub, storage
from llmray.data.corpus import list_shards
from llmray.data.template import CHAT_TOKENS, CHATML
from llmray.errors import LlmrayError

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", *CHAT_TOKENS]


class TokenizerError(LlmrayError):
    pass


def iter_texts(location: str, batch_docs: int = 1024) -> Iterator[list[str]]:
    for shard in list_shards(location):
        fs, path = storage.resolve(shard.path)
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(columns=["text"], batch_size=batch_docs):
            yield batch.column(0).to_pylist()


DEFAULT_VOCAB_SIZE = 8000  # `llmray tokenizer train` without --vocab-size


def train_tokenizer(shards: str, vocab_size: int, out: str, max_docs: int | None = None):
    """Byte-level BPE (GPT-2 style, no unknown tokens) with `<|endoftext|>` as BOS/EOS and the ChatML turn markers
    as special tokens, saved for AutoTokenizer with CHATML as its chat template."""
    if vocab_size < 300:
        raise TokenizerError(f"--vocab-size must be at least 300 (256 bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts() -> Iterator[str]:
        seen = 0
        for batch in iter_texts(shards):
            for t in batch:
                if max_docs is not None and seen >= max_docs:
                    return
                seen += 1
                yield t

    tok.train_from_iterator(texts(), trainer=trainer)
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[0],
                                 pad_token=SPECIAL_TOKENS[1])
    hf.chat_template = CHATML
    hf.save_pretrained(out)
    return hf


def load_tokenizer(name_or_path: str):
    """A tokenizer from a local or s3:// folder or a Hub id (its tokenizer files, downloaded once per node); the
    error names the path when it is not there."""
    if not Path(name_or_path).exists() and name_or_path.startswith((".", "/", "~")):
        raise TokenizerError(f"tokenizer {name_or_path} does not exist")
    from transformers import AutoTokenizer

    folder = storage.local_folder(name_or_path, "data.tokenizer", hub.TOKENIZER_FILES)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"tokenizer {name_or_path} could not be loaded: {str(e).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise TokenizerError(f"tokenizer {name_or_path} has no EOS token; documents could not be separated")
    return tok


# Tokenizer classes whose folder's tokenizer.json is the whole tokenizer (what `train_tokenizer` writes); others
# (e.g. sentencepiece-based ones that transformers rebuilds on load) go through transformers.
PLAIN_FAST_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_fast(name_or_path: str) -> tuple[Tokenizer, int]:
    """(the Rust tokenizer, its EOS id), for the stream's tokenize tasks. Read straight from tokenizer.json when
    that is the whole tokenizer: importing transformers (and torch) costs each actor ~2 s of start-up."""
    folder = Path(storage.local_folder(name_or_path, "data.tokenizer", hub.TOKENIZER_FILES))
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if config.get("tokenizer_class") in PLAIN_FAST_CLASSES and eos:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            eos_id = tok.token_to_id(eos)
            if eos_id is not None:
                return tok, eos_id
    except (OSError, ValueError):
        pass
    hf = load_tokenizer(name_or_path)
    return hf.backend_tokenizer, hf.eos_token_id
