"""Models and datasets by their Hugging Face Hub names, as every fine-tuning tool takes them.

A model is `org/name` or `org/name@revision` wherever a model folder is taken; a dataset file or folder is
`hf://datasets/org/name[@revision]/path`. Both resolve through huggingface_hub: models into its cache (one download
per node: a lock keeps a node's workers from listing and fetching the same snapshot side by side), datasets through
its file system (`HfFileSystem`), or from the cache when offline.

The driver pins every name to the commit it resolves to before Ray starts (`org/name@<sha>`), which checks it early
and makes every worker, replica and resumed run read the same files even if the branch moves.

Offline (`HF_HUB_OFFLINE=1`) only the cache is read; a name with nothing cached stops in one line naming it and
HF_HUB_OFFLINE.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmray.errors import LlmrayError

# What a process reaching the Hub needs of the driver's environment: token, endpoint, offline switch, cache place.
ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
       "HF_HUB_CACHE", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_DISABLE_XET")
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.\-]+))?$")
SCHEME = "hf://"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# The files a tokenizer (and a model's config) is made of: what the driver fetches of a model it does not run.
TOKENIZER_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class HubError(LlmrayError):
    """A Hub name that cannot be resolved; the message names it and what to do."""


def env() -> dict[str, str]:
    """The Hub settings of this process, for the workers, tasks and replicas Ray starts elsewhere."""
    return {k: os.environ[k] for k in ENV if os.environ.get(k)}


def offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_hub_id(name) -> bool:
    """`org/name[@rev]` that is not a local path (one that exists, or is written as a path: ./x, /x, ~/x)."""
    name = str(name)
    if "://" in name or name.startswith((".", "/", "~")) or os.path.exists(name):
        return False
    return HUB_ID.match(name) is not None


def split_id(name: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`)."""
    m = HUB_ID.match(name)
    return m["repo"], m["revision"]


def display_name(name: str) -> str:
    """A model's name for people and clients: a Hub id without its revision, else the folder's name."""
    return split_id(name)[0] if is_hub_id(name) else os.path.basename(str(name).rstrip("/"))


# huggingface_hub reads these settings once, when it is imported; they are read here at each call, so a process
# that set them later (a test, a driver handing them on) reaches the Hub and the cache they name.
def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache() -> str:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def snapshot(name: str, what: str, repo_type: str = "model", patterns: list[str] | None = None) -> str:
    """The local snapshot folder of Hub id `name` (its files matching `patterns`, default all), downloaded into
    this node's Hub cache unless it is there. `what` names the setting in errors, e.g. "model.pretrained"."""
    from filelock import FileLock
    from huggingface_hub import snapshot_download

    repo, revision = split_id(name)
    locks = Path(hub_cache(), ".locks")
    locks.mkdir(parents=True, exist_ok=True)
    with _errors(name, what, repo_type), FileLock(str(locks / f"llmray-{repo_type}-{repo.replace('/', '--')}.lock")):
        return snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=patterns,
                                 local_files_only=offline(), cache_dir=hub_cache(), endpoint=endpoint())


def pinned(name: str, what: str, repo_type: str = "model") -> str:
    """A Hub id fixed to the commit it names now (`org/name@<sha>`), read from the Hub (or, offline, from the
    cache) without downloading its files; anything that is not a Hub id as it is."""
    if not is_hub_id(name):
        return name
    repo, revision = split_id(name)
    if revision and COMMIT.match(revision):
        return name
    if offline():
        return f"{repo}@{Path(snapshot(name, what, repo_type, patterns=[])).name}"
    with _errors(name, what, repo_type):
        return f"{repo}@{api().repo_info(repo, repo_type=repo_type, revision=revision).sha}"


class _errors:
    """huggingface_hub's exceptions as one line naming the setting, the id and what to do."""

    def __init__(self, name: str, what: str, repo_type: str):
        self.name, self.what, self.repo_type = name, what, repo_type

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            return False
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        name, what, repo = self.name, self.what, split_id(self.name)[0]
        kind_word = "dataset" if self.repo_type == "dataset" else "model"
        if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)) and offline():
            raise HubError(f"{what}: {name} is not in the Hugging Face cache ({hub_cache()}) and HF_HUB_OFFLINE=1 "
                           f"forbids downloading it: download it once with HF_HUB_OFFLINE unset (`hf download "
                           f"{repo}{' --repo-type dataset' if self.repo_type == 'dataset' else ''}`), or name a local "
                           "folder") from None
        if isinstance(error, GatedRepoError):
            raise HubError(f"{what}: {name} is a gated {kind_word} on {endpoint()}: accept its terms there and set "
                           "HF_TOKEN") from None
        if isinstance(error, RevisionNotFoundError):
            raise HubError(f"{what}: {name}: no such revision on {endpoint()}") from None
        if isinstance(error, RepositoryNotFoundError):
            raise HubError(f"{what}: {name} is neither a local folder nor a {kind_word} on {endpoint()} (a private "
                           "one needs HF_TOKEN)") from None
        if isinstance(error, (LocalEntryNotFoundError, HTTPError)) and not isinstance(error, HfHubHTTPError):
            raise HubError(f"{what}: {name} could not be reached at {endpoint()} and is not in the Hugging Face "
                           f"cache ({hub_cache()}); with no network, download it where there is one, or set "
                           "HF_HUB_OFFLINE=1 to read the cache alone") from None
        if isinstance(error, HfHubHTTPError):
            raise HubError(f"{what}: {name}: {endpoint()} answered {str(error).splitlines()[0]}") from None
        return False


# ---- datasets: hf://datasets/org/name[@rev]/path ----

DATASET_URI = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.*))?$")


def is_hub_uri(path) -> bool:
    return str(path).startswith(SCHEME)


def parse_dataset_uri(uri: str) -> tuple[str, str | None, str]:
    """`hf://datasets/org/name@rev/sub/file` -> (`org/name`, `rev`, `sub/file`); the error says the form."""
    m = DATASET_URI.match(str(uri))
    if m is None:
        raise HubError(f"{uri}: a Hub dataset is written hf://datasets/org/name[@revision][/path]")
    return m["repo"], m["revision"], (m["path"] or "").strip("/")


def pinned_uri(uri: str, what: str) -> str:
    """An hf:// dataset path fixed to the commit its revision names now; anything else as it is."""
    if not is_hub_uri(uri):
        return uri
    repo, revision, path = parse_dataset_uri(uri)
    name = pinned(f"{repo}@{revision}" if revision else repo, what, "dataset")
    return f"{SCHEME}datasets/{name}" + (f"/{path}" if path else "")


def dataset_filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for an hf:// dataset path: the Hub's file system online (files are
    read in ranges, never downloaded whole), the cached snapshot offline."""
    import pyarrow.fs as pafs

    repo, revision, path = parse_dataset_uri(uri)
    if offline():
        folder = snapshot(f"{repo}@{revision}" if revision else repo, uri, "dataset")
        return pafs.LocalFileSystem(), str(Path(folder, path)) if path else folder
    from huggingface_hub import HfFileSystem

    inner = f"datasets/{repo}" + (f"@{revision}" if revision else "") + (f"/{path}" if path else "")
    return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem(endpoint=endpoint()))), inner
