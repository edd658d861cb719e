"""One way to reach files, local, in object storage (s3://, gs://) or in a Hub dataset (hf://datasets/...), through
pyarrow's filesystems; and a model folder named any of these ways (or by Hub id) as a local folder.

A folder published to object storage carries the marker object UPLOADING while it is being written: a reader
(`download`) refuses a folder that still has it, so an interrupted upload never passes for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path

import pyarrow.fs as pafs

from llmray import hub
from llmray.errors import LlmrayError

UPLOADING = ".llmray-uploading"
CACHE_ENV = "LLMRAY_CACHE"  # where object-storage model folders are copied on each node (default ~/.cache/llmray)
MIRRORS_ENV = "LLMRAY_HUB_MIRRORS"  # {pinned Hub id: its copy in the run's shared storage}, set for a run's workers


class StorageError(LlmrayError):
    pass


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it; local paths are made absolute."""
    path = str(path)
    if hub.is_hub_uri(path):
        return hub.dataset_filesystem(path)
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


def inside(path: str, base: str) -> str:
    """`path`'s place under the folder `base` (`sub/file`); "" when it is `base` itself or not under it. What names a
    file the same wherever its folder is kept (a copy, object storage, the Hub, a cache)."""
    base = base.rstrip("/")
    return path[len(base) + 1:] if path.startswith(base + "/") else ""


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


def local_folder(name: str, what: str, patterns: list[str] | None = None) -> str:
    """A model or tokenizer named by a local folder, an object-storage folder or a Hub id (`org/name[@rev]`), as a
    local folder: downloaded once per node. `what` names the setting in errors ("model.pretrained"); `patterns`
    limits a Hub download to the files that match (e.g. hub.TOKENIZER_FILES)."""
    name = str(name)
    name = json.loads(os.environ.get(MIRRORS_ENV) or "{}").get(name, name)
    if is_uri(name):
        return copied(name)
    if hub.is_hub_id(name):
        return hub.snapshot(name, what, patterns=patterns)
    return name


def copied(uri: str) -> str:
    """An object-storage folder copied into llmray's cache on this node, once per version of its files (a folder
    rewritten in place gets a fresh copy); the node's other processes wait for the first one's copy."""
    from filelock import FileLock

    fs, path = resolve(uri)
    if not exists(fs, path):
        raise StorageError(f"{uri} does not exist")
    files = [(f.path, f.size, f.mtime_ns) for f in list_files(fs, path)]
    if not files:
        raise StorageError(f"{uri} holds no files")
    version = hashlib.sha256(repr((uri, files)).encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llmray", "folders")
    target = root / f"{uri.split('://', 1)[1].strip('/').replace('/', '--')}-{version}"
    done = target / ".complete"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not done.is_file():
            download(uri, str(target))
            done.touch()
    return str(target)


def mirror_hub_models(names: list[str], root: str) -> dict[str, str]:
    """Each pinned Hub model (`org/name@<sha>`) published once into `root` (storage every node reaches: object
    storage, or the shared file system a multi-node run keeps its checkpoints on), so the workers read it there
    instead of each node downloading it from the Hub; {name: its folder}, what MIRRORS_ENV carries to them."""
    out = {}
    for name in names:
        repo, sha = hub.split_id(name)
        uri = join(root, "hub", "models--" + repo.replace("/", "--"), sha)
        fs, path = resolve(uri)
        if not exists(fs, join(path, "config.json")) or exists(fs, join(path, UPLOADING)):
            publish(hub.snapshot(name, "model"), uri)
        out[name] = uri
    return out
