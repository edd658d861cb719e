"""`llmray data shard`: turn a pile of text files into Parquet shards (text, doc_id, source) of a target size.

Streams document by document: memory holds one row group, never the corpus. A shard is written under a
`.partial` name and renamed when complete; `_manifest.json`, written last, lists the finished set.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from llmray import storage
from llmray.errors import LlmrayError

SCHEMA = pa.schema([("text", pa.string()), ("doc_id", pa.string()), ("source", pa.string())])
MANIFEST = "_manifest.json"
DEFAULT_INCLUDE = ("*.txt", "*.md", "*.jsonl", "*.parquet")
ROW_GROUP_BYTES = 256 << 10  # the stream reads pieces of ~32-512 KB of text: a row group is what it reads for one


class ShardError(LlmrayError):
    """Input or output that cannot be sharded; the message names the path."""


@dataclass
class ShardReport:
    files_read: int = 0
    documents: int = 0
    empty_skipped: int = 0
    bytes_written: int = 0
    files_with_replaced_bytes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # files or lines skipped, with why
    shards: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{len(self.shards)} shards, {self.documents} documents, {self.bytes_written / 1e6:.1f} MB of text "
            f"from {self.files_read} files; {self.empty_skipped} empty documents skipped"
        ]
        if self.files_with_replaced_bytes:
            lines.append(f"{len(self.files_with_replaced_bytes)} files had undecodable bytes (replaced with U+FFFD), "
                         f"e.g. {self.files_with_replaced_bytes[0]}")
        lines += [f"skipped: {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"... and {len(self.problems) - 20} more skipped")
        return "\n".join(lines)


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "b": 1}
    t = text.strip().lower()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def _documents(fs, info, source: str, text_field: str, report: ShardReport) -> Iterator[tuple[str, str]]:
    """(doc_id, text) pairs of one input file."""
    name = info.path
    if name.endswith(".parquet"):
        try:
            pf = pq.ParquetFile(fs.open_input_file(name))
            if text_field not in pf.schema_arrow.names:
                report.problems.append(f"{source}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
                return
            row = 0
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    yield f"{source}#{row}", text or ""
                    row += 1
        except (pa.ArrowInvalid, OSError) as e:
            report.problems.append(f"{source}: not a readable Parquet file ({e})")
        return
    with fs.open_input_stream(name) as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in raw:
        report.files_with_replaced_bytes.append(source)
    if name.endswith(".jsonl"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                report.problems.append(f"{source}:{lineno}: not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                report.problems.append(f"{source}:{lineno}: no string field {text_field!r}")
                continue
            yield str(obj.get("id", f"{source}:{lineno}")), obj[text_field]
    else:
        yield source, text


class ShardWriter:
    """Writes rows into `shard-NNNNN.parquet` files of about `target_bytes` each, atomically."""

    def __init__(self, fs, out: str, target_bytes: int, report: ShardReport):
        self.fs, self.out, self.target, self.report = fs, out, target_bytes, report
        self.rows: dict[str, list] = {k: [] for k in SCHEMA.names}
        self.buffered = 0
        self.writer = None
        self.shard_bytes = self.shard_rows = 0

    def _paths(self) -> tuple[str, str]:
        final = storage.join(self.out, f"shard-{len(self.report.shards):05d}.parquet")
        return final, final + ".partial"

    def add(self, text: str, doc_id: str, source: str) -> None:
        for k, v in zip(SCHEMA.names, (text, doc_id, source)):
            self.rows[k].append(v)
        size = len(text.encode("utf-8", errors="replace"))
        self.buffered += size
        self.shard_bytes += size
        self.shard_rows += 1
        if self.buffered >= min(ROW_GROUP_BYTES, self.target):
            self._flush_rows()
        if self.shard_bytes >= self.target:
            self.close_shard()

    def _flush_rows(self) -> None:
        if not self.rows["text"]:
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.fs.open_output_stream(self._paths()[1]), SCHEMA, compression="zstd")
        self.writer.write_table(pa.table(self.rows, schema=SCHEMA))
        self.rows = {k: [] for k in SCHEMA.names}
        self.buffered = 0

    def close_shard(self) -> None:
        self._flush_rows()
        if self.writer is None:
            return
        self.writer.close()
        final, partial = self._paths()
        self.fs.move(partial, final)
        self.report.shards.append({"path": posixpath.basename(final), "rows": self.shard_rows, "bytes": self.shard_bytes})
        self.report.bytes_written += self.shard_bytes
        self.writer, self.shard_bytes, self.shard_rows = None, 0, 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        """The last shard finished when all went well; else the shard in progress dropped (finished ones stay)."""
        if kind is None:
            self.close_shard()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the shard in progress; finished shards stay."""
        if self.writer is not None:
            self.writer.close()
            self.fs.delete_file(self._paths()[1])
            self.writer = None


def shard_corpus(
    inputs: list[str],
    out: str,
    shard_size: str | int = "64MB",
    include: tuple[str, ...] = DEFAULT_INCLUDE,
    text_field: str = "text",
    overwrite: bool = False,
    exclude: tuple[str, ...] = (),
) -> ShardReport:
    target = parse_size(shard_size)
    if target <= 0:
        raise ShardError(f"--shard-size must be positive (got {shard_size})")
    files = []
    for inp in inputs:
        fs, path = storage.resolve(inp)
        try:
            found = storage.list_files(fs, path)
        except FileNotFoundError:
            raise ShardError(f"input {inp} does not exist") from None
        explicit = fs.get_file_info(path).type.name == "File"
        files += [(fs, f, inp if explicit else f.path) for f in found
                  if explicit or (any(fnmatch.fnmatch(f.base_name, p) for p in include)
                                  and not any(fnmatch.fnmatch(f.path, p) for p in exclude))]
    if not files:
        raise ShardError(f"no input files matching {', '.join(include)} under {', '.join(inputs)}")

    out_fs, out_path = storage.resolve(out)
    if storage.exists(out_fs, out_path):
        existing = [f for f in storage.list_files(out_fs, out_path)
                    if f.base_name.endswith(".parquet") or f.base_name == MANIFEST]
        if existing and not overwrite:
            raise ShardError(f"output {out} already holds shards; choose another folder or pass --overwrite")
        for f in existing:
            out_fs.delete_file(f.path)
    out_fs.create_dir(out_path, recursive=True)

    report = ShardReport()
    with ShardWriter(out_fs, out_path, target, report) as writer:
        for fs, info, source in files:
            report.files_read += 1
            for doc_id, text in _documents(fs, info, source, text_field, report):
                if not text.strip():
                    report.empty_skipped += 1
                    continue
                writer.add(text, doc_id, source)
                report.documents += 1
    if report.documents == 0:
        raise ShardError(f"empty corpus: no non-empty documents in {', '.join(inputs)}")
    write_manifest(out_fs, out_path, report)
    return report


def write_manifest(fs, out_path: str, report: ShardReport) -> None:
    """Written last: a folder without it is not a finished shard folder (`list_shards` refuses it)."""
    manifest = {"shards": report.shards, "documents": report.documents, "bytes": report.bytes_written,
                "schema": SCHEMA.names}
    with fs.open_output_stream(storage.join(out_path, MANIFEST)) as f:
        f.write(json.dumps(manifest, indent=1).encode())
