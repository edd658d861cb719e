"""Conversations for fine-tuning: OpenAI `messages`, Alpaca and ShareGPT JSONL in, one form out (a list of
{role, content} with roles system/user/assistant), written as Parquet shards the stream reads like any corpus (a
conversation per row, as JSON in the `text` column; its doc_id `file:line` decides whether it is held out).

Every line is checked (and rendered with the chat template) while the shards are written; a bad one is skipped,
counted and reported by file, line and field. The shards are written into a folder of the run (`data.shards`),
never next to the inputs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterator

from llmray import storage
from llmray.data.corpus import CorpusError, list_shards
from llmray.data.shard import ShardReport, ShardWriter, write_manifest
from llmray.data.template import chat_template
from llmray.errors import LlmrayError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant"}
SHARD_BYTES = 16 << 20
INPUTS_RECORD = "_conversations.json"  # which input files (and sizes) and format the shards were made from
FILE_SUFFIXES = (".jsonl", ".json")


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


def _turns(obj: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
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
        messages = _turns(obj, "messages", "role", "content", {r: r for r in ROLES})
    elif fmt == "sharegpt":
        messages = _turns(obj, "conversations", "from", "value", SHAREGPT_ROLES)
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


def conversation_files(paths: list[str]) -> list[tuple[str, int]]:
    """(path, size) of each input file: a file as given, a folder's *.jsonl / *.json files, in name order."""
    out = []
    for path in paths:
        fs, p = storage.resolve(path)
        info = fs.get_file_info(p)
        if info.type.name == "File":
            out.append((path, info.size))
            continue
        if info.type.name != "Directory":
            raise ChatDataError(f"data.conversations: {path} does not exist")
        found = sorted((f for f in storage.list_files(fs, p) if f.base_name.endswith(FILE_SUFFIXES)),
                       key=lambda f: f.path)
        if not found:
            raise ChatDataError(f"data.conversations: {path} holds no {' or '.join(FILE_SUFFIXES)} files")
        base = path.rstrip("/")
        out += [(storage.join(base, f.path[len(p.rstrip('/')) + 1:]), f.size) for f in found]
    return out


def read_conversations(path: str, fmt: str = "auto") -> Iterator[tuple[str, list[dict] | None, str | None]]:
    """(doc_id `path:line`, messages, None) for each good non-empty line of one JSONL file, and (doc_id, None, why)
    for each bad one. A file that is not UTF-8 or holds no line raises ChatDataError."""
    fs, p = storage.resolve(path)
    with fs.open_input_stream(p) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatDataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    file_format = None if fmt == "auto" else fmt
    seen = False
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        seen, where = True, f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, None, f"not valid JSON ({e.msg}, column {e.colno})"
            continue
        if file_format is None:  # the first object that shows one decides the file's format
            file_format = detect_format(obj) if isinstance(obj, dict) else None
            if file_format is None:
                yield where, None, ("not a known conversation format: expected a 'messages' list (OpenAI), a "
                                    "'conversations' list (ShareGPT) or 'instruction' (Alpaca); set data.format")
                continue
        try:
            yield where, normalize(obj, file_format), None
        except ValueError as e:
            yield where, None, f"{e} ({file_format} format)"
    if not seen:
        raise ChatDataError(f"{path}: empty file: no conversations")


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
    reused: bool = False

    def text(self) -> str:
        lines = [f"conversations: {self.documents} from {self.files} files in {self.shards} shards in {self.out}"
                 + (" (made earlier from the same files)" if self.reused else "")
                 + f"; {self.longer} longer than {self.seq_len} tokens (cut to it)"
                 + f"; {len(self.skipped)} lines skipped"]
        lines += [f"  skipped {why}" for why in self.skipped[:SHOWN_SKIPPED]]
        if len(self.skipped) > SHOWN_SKIPPED:
            lines.append(f"  ... and {len(self.skipped) - SHOWN_SKIPPED} more (all in {INPUTS_RECORD})")
        return "\n".join(lines)


SHOWN_SKIPPED = 10


def shard_conversations(inputs: str | list[str], out: str, tokenizer, seq_len: int, fmt: str = "auto") -> Conversion:
    """Write the conversations of `inputs` as shards into `out`, unless `out` already holds those of the same input
    files (same sizes), format, template and `seq_len`. Each conversation is encoded here as the stream will encode
    it (`encode_chat`), so a line the template refuses (a role it does not know, a rendering whose assistant turns
    cannot be located) is skipped and named like a malformed one, and those longer than `seq_len` are counted."""
    from llmray.data.template import encode_chat

    paths = [inputs] if isinstance(inputs, str) else list(inputs)
    files = conversation_files(paths)
    record = {"inputs": [list(f) for f in files], "format": fmt, "seq_len": seq_len,
              "template": chat_template(tokenizer)}
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
        for path, _ in files:
            report.files_read += 1
            for doc_id, messages, problem in read_conversations(path, fmt):
                if messages is not None:
                    try:
                        ids, _ = encode_chat(tokenizer, messages)
                    except Exception as e:  # jinja's TemplateError, what the template raises, or ours
                        problem = f"the chat template refused it: {e}"
                if problem is not None:
                    report.problems.append(f"{doc_id}: {problem}")
                    continue
                longer += len(ids) > seq_len
                writer.add(json.dumps(messages, ensure_ascii=False), doc_id, path)
                report.documents += 1
    if report.documents == 0:
        raise ChatDataError(f"data.conversations: no usable conversation in {', '.join(paths)}; "
                            + (f"first problem: {report.problems[0]}" if report.problems else "all files empty"))
    write_manifest(fs, out_path, report)
    conversion = Conversion(out, len(files), report.documents, len(report.shards), report.problems, longer, seq_len)
    with fs.open_output_stream(record_path) as f:
        f.write(json.dumps({"made_from": record, "conversion": {k: v for k, v in asdict(conversion).items()
                                                                 if k != "reused"}}).encode())
    return conversion
