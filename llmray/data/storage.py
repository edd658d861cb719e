"""One way to reach files, local or in object storage (s3://, gs://), through pyarrow's filesystems."""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it; local paths are made absolute."""
    path = str(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else str(Path(base, *parts))


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """Every file under `path` (or `path` itself), sorted by path so the order never depends on the store."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [info]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((f for f in found if f.type == pafs.FileType.File), key=lambda f: f.path)
