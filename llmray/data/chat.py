"""Conversations for fine-tuning: OpenAI `messages`, Alpaca and ShareGPT records (JSONL or Parquet, local, in object
storage or a Hub dataset) in, one form out (a list of {role, content} with roles system/user/assistant), written as
Parquet shards the stream reads like any corpus (a conversation per row, as JSON in the `text` column; its doc_id,
`file:line` or `file#row` with the file's path inside its input, decides whether it is held out).

Every line is checked (and rendered with the chat template) while the shards are written; a bad one is skipped,
counted and reported by file, line and field. The shards are written into a folder of the run (`data.shards`),
never next to the inputs.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from llmray import storage
from llmray.data.corpus import CorpusError, list_shards
from llmray.data.pairs import detect_pair_format, normalize_pair
from llmray.data.prompts import detect_prompt_format, normalize_prompt
from llmray.data.shard import ShardReport, ShardWriter, write_manifest
from llmray.data.template import chat_template
from llmray.errors import LlmrayError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant"}
SHARD_BYTES = 16 << 20
# what a record of data.conversations is, by the recipe's objective: a conversation (SFT), a preference pair
# (preference:) or a prompt (rl:); and what the messages call one
# an image conversation (vision:, `vision.py`)
KINDS = {"conversations": "conversation", "pairs": "preference pair", "prompts": "prompt", "images": "image conversation"}
INPUTS_RECORD = "_conversations.json"  # which input files (and sizes) and format the shards were made from
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class ChatDataError(LlmrayError):
    """A conversation file or line that cannot be read; the message names the file, line and field."""


def detect_format(obj: dict) -> str | None:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj:
        return "alpaca"
    return None


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} must be a string (got {type(value).__name__})")
    return value


def read_turns(obj: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    """The turns of `obj[key]` as messages (roles mapped through `roles`); ValueError naming the field at fault."""
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field {key!r} must be a non-empty list")
    out = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"field {where!r} must be an object")
        role = turn.get(role_key)
        if role not in roles:
            raise ValueError(f"field '{where}.{role_key}': {role!r} is not one of {', '.join(roles)}")
        out.append({"role": roles[role], "content": _text(turn.get(text_key), f"{where}.{text_key}")})
    return out


def normalize(obj, fmt: str) -> list[dict]:
    """The conversation of one JSON object in format `fmt`; ValueError naming the field when it is malformed."""
    if not isinstance(obj, dict):
        raise ValueError("a line must hold a JSON object")
    if fmt == "messages":
        messages = read_turns(obj, "messages", "role", "content", {r: r for r in ROLES})
    elif fmt == "sharegpt":
        messages = read_turns(obj, "conversations", "from", "value", SHAREGPT_ROLES)
    elif fmt == "alpaca":
        prompt = _text(obj.get("instruction"), "instruction")
        extra = _text(obj.get("input", ""), "input")
        messages = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt},
                    {"role": "assistant", "content": _text(obj.get("output"), "output")}]
        if obj.get("system"):
            messages.insert(0, {"role": "system", "content": _text(obj["system"], "system")})
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to learn from")
    return messages


def conversation_files(paths: list[str], split: str | None = None) -> list[tuple[str, str, int]]:
    """(path, name, size) of each input file: a file as given, a folder's *.jsonl / *.json / *.parquet files in name
    order (with `split`, only that split's: `in_split`). `name` is the file's path within its input (a file's own
    name), what doc ids are made of, so a dataset read from another place (a copy, the Hub) holds out the same."""
    out = []
    for path in paths:
        fs, p = storage.resolve(path)
        info = fs.get_file_info(p)
        if info.type.name == "File":
            out.append((path, posixpath.basename(path.rstrip("/")), info.size))
            continue
        if info.type.name != "Directory":
            raise ChatDataError(f"data.conversations: {path} does not exist")
        found = sorted(((storage.inside(f.path, p), f) for f in storage.list_files(fs, p)
                        if f.base_name.endswith(FILE_SUFFIXES)), key=lambda nf: nf[0])
        if split is not None:
            found = [(n, f) for n, f in found if in_split(n, split)]
        if not found:
            raise ChatDataError(f"data.conversations: {path} holds no {' or '.join(FILE_SUFFIXES)} files"
                                + (f" of split {split!r} (data.split)" if split is not None else ""))
        out += [(storage.join(path.rstrip("/"), name), name, f.size) for name, f in found]
    return out


def in_split(name: str, split: str) -> bool:
    """Whether the file at `name` (a path inside a dataset folder) belongs to `split`, as the Hub names split files:
    a folder of that name (`train/...`), or a file name starting with it (`train-00000-of-00002.parquet`,
    `data/test.jsonl`; not `train_sft-...`, another split)."""
    *folders, file = name.split("/")
    return split in folders or re.match(rf"{re.escape(split)}(?:[-. ]|\d|$)", file) is not None


def read_conversations(path: str, fmt: str = "auto", name: str | None = None, columns: dict[str, str] | None = None,
                       kind: str = "conversations", required: tuple[str, ...] = (), max_images: int = 0
                       ) -> Iterator[tuple[str, list[dict] | dict | None, str | None]]:
    """(doc_id, messages, None) for each good record of one JSONL or Parquet file, and (doc_id, None, why) for each
    bad one; a doc_id is `name:line` (JSONL) or `name#row` (Parquet), `name` defaulting to `path`. `columns` maps
    a format's field to the dataset's (`{"messages": "conversation"}`). `kind` (KINDS): "pairs" reads preference
    pairs (`data.pairs`), "prompts" RL prompts (`data.prompts`; `required`: the fields its rewards read), each good
    record yielding its normalized form; "images" image conversations (`vision.py`; `max_images`: the most a record
    may hold). A file that is not UTF-8 or holds no record raises ChatDataError, as does a file of one kind read as
    another."""
    from llmray.data.vision import detect_vision_format, normalize_vision

    name = path if name is None else name
    rename = {theirs: ours for ours, theirs in (columns or {}).items()}
    detectors = {"conversations": detect_format, "pairs": detect_pair_format, "prompts": detect_prompt_format,
                 "images": detect_vision_format}
    detect = detectors[kind]
    file_format = None if fmt == "auto" or kind != "conversations" else fmt
    seen = False
    for where, obj, problem in _records(path, name):
        seen = True
        if problem is not None:
            yield where, None, problem
            continue
        if rename and isinstance(obj, dict):
            obj = {rename.get(k, k): v for k, v in obj.items()}
        if file_format is None:  # the first object that shows one decides the file's format
            file_format = detect(obj) if isinstance(obj, dict) else None
            # a pair also has a prompt: it is a prompt file's wrong kind only if it is no prompt record
            if file_format is None or (kind == "prompts" and detect_pair_format(obj)) or \
                    (kind == "conversations" and detect_vision_format(obj) not in (None, "openai")):
                # (any record with a `prompt` reads as a prompt: TRL's prompt/completion records are not named one)
                found = next((k for k, d in detectors.items() if k not in (kind, "prompts") and isinstance(obj, dict)
                              and d(obj) and (k != "conversations" or kind != "images")), None)
                if found is not None:
                    raise ChatDataError(_wrong_kind(path, obj, kind, found))
            if file_format is None:
                fields = f" (fields: {', '.join(map(str, obj))})" if isinstance(obj, dict) else ""
                yield where, None, (f"not a known {KINDS[kind]} format: expected " + EXPECTED[kind] + fields
                                    + ("; set data.format" if kind == "conversations" else "")
                                    + ", or data.columns to map fields")
                continue
        try:
            if kind == "prompts":
                yield where, normalize_prompt(obj, file_format, required), None
            elif kind == "images":  # relative image paths are read from the file's folder
                yield where, normalize_vision(obj, file_format, posixpath.dirname(path), max_images), None
            else:
                yield where, (normalize_pair if kind == "pairs" else normalize)(obj, file_format), None
        except ValueError as e:
            # a prompt file's records may each be a string or messages: its detected format says nothing of a line
            yield where, None, str(e) if kind == "prompts" else f"{e} ({file_format} format)"
    if not seen:
        raise ChatDataError(f"{path}: empty file: no {KINDS[kind]}s")


EXPECTED = {"conversations": "a 'messages' list (OpenAI), a 'conversations' list (ShareGPT) or 'instruction' (Alpaca)",
            "pairs": "a preference pair: 'prompt', 'chosen' and 'rejected', or 'chosen' and 'rejected'",
            "prompts": "a 'prompt' (a string or messages) or a 'messages' list, beside the fields the rewards read",
            "images": "'messages' with image_url parts (OpenAI), 'messages' or 'conversations' with 'images' (LLaVA), "
                      "or 'image' and 'text' (a caption table)"}
READ_BY = {"conversations": "a recipe without a preference: or rl: block (supervised fine-tuning)",
           "pairs": "a recipe's preference: block (DPO, IPO, SimPO)", "prompts": "a recipe's rl: block (GRPO)",
           "images": "a recipe's vision: block (image-text fine-tuning)"}


def _wrong_kind(path: str, obj: dict, kind: str, found: str) -> str:
    fields = ", ".join(map(str, obj))
    return (f"data.conversations: {path} holds {KINDS[found]}s (fields: {fields}), not {KINDS[kind]}s: {READ_BY[found]} "
            f"reads them; this recipe reads {KINDS[kind]}s ({READ_BY[kind]})")


def _records(path: str, name: str) -> Iterator[tuple[str, object, str | None]]:
    """(doc_id, object, None) of each record of a JSONL or Parquet file, (doc_id, None, why) of an unreadable one."""
    fs, p = storage.resolve(path)
    if path.endswith(".parquet"):
        try:
            pf = pq.ParquetFile(fs.open_input_file(p))
            row = 0
            for batch in pf.iter_batches(batch_size=1024):
                for obj in batch.to_pylist():
                    yield f"{name}#{row}", obj, None
                    row += 1
        except (pa.ArrowInvalid, OSError) as e:
            raise ChatDataError(f"{path}: not a readable Parquet file ({e})") from None
        return
    with fs.open_input_stream(p) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatDataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{name}:{lineno}", json.loads(line), None
        except json.JSONDecodeError as e:
            yield f"{name}:{lineno}", None, f"not valid JSON ({e.msg}, column {e.colno})"


def _pair_length(tokenizer, pair: dict) -> int:
    """The tokens a pair takes in a row: its chosen and its rejected side, each prompt + completion."""
    from llmray.data.template import encode_completion

    return sum(len(encode_completion(tokenizer, pair["prompt"], pair[k])[0]) for k in ("chosen", "rejected"))


def _prompt_length(tokenizer, record: dict) -> int:
    """The tokens a prompt takes, rendered with the generation prompt the policy answers after."""
    from llmray.data.template import encode_prompt

    return len(encode_prompt(tokenizer, record["prompt"]))


def _conversation_length(tokenizer, messages: list[dict]) -> int:
    from llmray.data.template import encode_chat

    return len(encode_chat(tokenizer, messages)[0])


def _image_conversation_length(tokenizer, record: dict) -> int:
    """The tokens of its text, each image one placeholder token: fewer than the row takes once the processor
    expands the placeholders (a row over `seq_len` then is dropped where it is made, `pixels.image_rows`)."""
    return _conversation_length(tokenizer, record["messages"])


RECORD_LENGTH = {"conversations": _conversation_length, "pairs": _pair_length, "prompts": _prompt_length,
                 "images": _image_conversation_length}


@dataclass
class Conversion:
    """What `shard_conversations` made: shards of `documents` conversations; the lines it skipped, with why; how
    many conversations are longer than `seq_len` tokens (training sees their first `seq_len` tokens)."""

    out: str
    files: int
    documents: int
    shards: int
    skipped: list[str] = field(default_factory=list)
    longer: int = 0
    seq_len: int = 0
    kind: str = "conversations"  # KINDS
    reused: bool = False

    @property
    def what(self) -> str:
        """What its records are, in the plural: conversations, preference pairs, prompts."""
        return KINDS[self.kind] + "s"

    def text(self) -> str:
        lines = [f"{self.what}: {self.documents} from {self.files} files in {self.shards} shards in {self.out}"
                 + (" (made earlier from the same files)" if self.reused else "")
                 + (f"; {self.longer} longer than {self.seq_len} tokens (cut to it)" if self.kind == "conversations"
                    else "")
                 + f"; {len(self.skipped)} lines skipped"]
        lines += [f"  skipped {why}" for why in self.skipped[:SHOWN_SKIPPED]]
        if len(self.skipped) > SHOWN_SKIPPED:
            lines.append(f"  ... and {len(self.skipped) - SHOWN_SKIPPED} more (all in {INPUTS_RECORD})")
        return "\n".join(lines)


SHOWN_SKIPPED = 10


def shard_conversations(inputs: str | list[str], out: str, tokenizer, seq_len: int, fmt: str = "auto",
                        split: str | None = None, columns: dict[str, str] | None = None,
                        kind: str = "conversations", required: tuple[str, ...] = (), max_images: int = 0,
                        processor=None) -> Conversion:
    """Write the conversations of `inputs` as shards into `out`, unless `out` already holds those of the same input
    files (same sizes), format, template and `seq_len`. Each conversation is encoded here as the stream will encode
    it (`encode_chat`), so a line the template refuses (a role it does not know, a rendering whose assistant turns
    cannot be located) is skipped and named like a malformed one, and those longer than `seq_len` are counted. A pair
or a prompt longer than `seq_len` is skipped (trained on whole or not at all). `kind`, `required`: see
`read_conversations`. An image conversation longer than `seq_len` is skipped (a row is never cut through an image):
its length with its images expanded when the model's `processor` can say it (`pixels.expanded_length`), else its
text's alone."""
    paths = [inputs] if isinstance(inputs, str) else list(inputs)
    files = conversation_files(paths, split)
    record = {"inputs": [list(f) for f in files], "format": fmt, "columns": columns or {}, "seq_len": seq_len,
              "template": chat_template(tokenizer), "kind": kind,
              "required": list(required), "max_images": max_images}
    fs, out_path = storage.resolve(out)
    record_path = storage.join(out_path, INPUTS_RECORD)
    if storage.exists(fs, record_path):
        with fs.open_input_stream(record_path) as f:
            made = json.loads(f.read())
        try:
            if made.get("made_from") == record:
                list_shards(out)
                return Conversion(**made["conversion"], reused=True)
        except CorpusError:
            pass  # an interrupted conversion: made again below
    if storage.exists(fs, out_path):
        for f in storage.list_files(fs, out_path):
            fs.delete_file(f.path)
    fs.create_dir(out_path, recursive=True)
    report = ShardReport()
    longer = 0
    with ShardWriter(fs, out_path, SHARD_BYTES, report) as writer:
        for path, name, _ in files:
            report.files_read += 1
            for doc_id, messages, problem in read_conversations(path, fmt, name, columns, kind, required, max_images):
                if messages is not None:
                    try:
                        length = RECORD_LENGTH[kind](tokenizer, messages)
                        if kind == "images" and processor is not None:
                            from llmray.data.pixels import expanded_length

                            length = expanded_length(processor, messages) or length
                    except Exception as e:  # jinja's TemplateError, what the template raises, or ours
                        problem = f"the chat template refused it: {e}"
                if problem is None and kind != "conversations" and length > seq_len:
                    takes = {"pairs": "chosen and rejected take", "prompts": "the prompt takes",
                             "images": "with its images it takes" if processor is not None else "its text takes"}
                    problem = f"over the length: {takes[kind]} {length} tokens, data.seq_len is {seq_len}"
                if problem is not None:  # named by the file's full path, which the user can open
                    report.problems.append(f"{path}{doc_id[len(name):]}: {problem}")
                    continue
                longer += length > seq_len
                writer.add(json.dumps(messages, ensure_ascii=False), doc_id, path)
                report.documents += 1
    if report.documents == 0:
        raise ChatDataError(f"data.conversations: no usable {KINDS[kind]} in "
                            f"{', '.join(paths)}; "
                            + (f"first problem: {report.problems[0]}" if report.problems else "all files empty"))
    write_manifest(fs, out_path, report)
    conversion = Conversion(out, len(files), report.documents, len(report.shards), report.problems, longer, seq_len,
                            kind)
    with fs.open_output_stream(record_path) as f:
        f.write(json.dumps({"made_from": record, "conversion": {k: v for k, v in asdict(conversion).items()
                                                                 if k != "reused"}}).encode())
    return conversion
