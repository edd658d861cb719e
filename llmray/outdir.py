"""Output folders written whole or not at all, locally or in object storage.

Local: built beside the target under a hidden name, then renamed into place. Object storage: built in a local
scratch folder, then published with an in-progress marker that is removed last (`storage.publish`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmray import storage
from llmray.errors import LlmrayError


class OutputExistsError(LlmrayError):
    pass


def free_target(out: str | Path, overwrite: bool) -> str:
    """The target, absolute when local; refuses one that exists unless `overwrite` (checked before slow work)."""
    out = str(out)
    if storage.is_uri(out):
        fs, path = storage.resolve(out)
        taken = storage.exists(fs, path)
        target = out.rstrip("/")
    else:
        target = str(Path(out).expanduser().resolve())
        taken = os.path.exists(target)
    if taken and not overwrite:
        raise OutputExistsError(f"{target} already exists; choose another --out or pass --overwrite")
    return target


@contextmanager
def staged(target: str) -> Iterator[Path]:
    """A local folder to write into; when the block ends cleanly it replaces `target` (a rename, or a published
    upload), otherwise it is removed, so an interrupted write never looks like a finished one."""
    if storage.is_uri(target):
        with tempfile.TemporaryDirectory(prefix="llmray-out-") as scratch:
            yield Path(scratch)
            storage.publish(scratch, target)
        return
    dest = Path(target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield partial
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
