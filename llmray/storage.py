"""One way to reach files, local or in object storage (s3://, gs://), through pyarrow's filesystems.

A folder published to object storage carries the marker object UPLOADING while it is being written: a reader
(`download`) refuses a folder that still has it, so an interrupted upload never passes for a finished one.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import pyarrow.fs as pafs

from llmray.errors import LlmrayError

UPLOADING = ".llmray-uploading"


class StorageError(LlmrayError):
    pass


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it; local paths are made absolute."""
    path = str(path)
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        if isinstance(fs, pafs.S3FileSystem):
            fs = _s3_with_env_credentials(fs)
        return fs, inner
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def _s3_with_env_credentials(fs: pafs.S3FileSystem) -> pafs.S3FileSystem:
    """Credentials from the environment made explicit: pyarrow pickles explicit keys (and the endpoint) with the
    filesystem, so Ray workers on other nodes reach the same store as the driver without the same environment."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (key and secret):
        return fs  # instance roles or a credentials file: every node resolves its own
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return pafs.S3FileSystem(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"),
                             region=fs.region, endpoint_override=endpoint)


def credentials_env() -> dict[str, str]:
    """The driver's S3 settings (keys, endpoint, region), for processes Ray started before they were set."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


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


def download(uri: str, dest: str) -> str:
    """Copy a folder from object storage to the local folder `dest`; returns `dest`. Refuses a folder whose
    upload has not finished."""
    fs, path = resolve(uri)
    if exists(fs, join(path, UPLOADING)):
        raise StorageError(f"{uri} is incomplete: its upload has not finished (it still holds {UPLOADING})")
    os.makedirs(dest, exist_ok=True)
    pafs.copy_files(path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def upload(local: str, uri: str) -> None:
    """Copy the local folder `local` to `uri` (object storage, or a local path)."""
    fs, path = resolve(uri)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def publish(local: str, uri: str) -> None:
    """Replace the folder at `uri` with the local folder `local`, marked incomplete until every file is there:
    the marker goes first, then the old files go, the new ones are copied, and the marker is removed last."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    marker = join(path, UPLOADING)
    with fs.open_output_stream(marker) as f:
        f.write(b"an upload is in progress; this folder is incomplete until this file is gone\n")
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.path.rstrip("/") == marker:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)
    upload(local, uri)
    fs.delete_file(marker)
