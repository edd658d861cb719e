"""Output folders written whole or not at all: built beside the target under a hidden name, then renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmray.errors import LlmrayError


class OutputExistsError(LlmrayError):
    pass


def free_target(out: str | Path, overwrite: bool) -> Path:
    """The absolute target; refuses one that exists unless `overwrite` (checked before any slow work)."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another --out or pass --overwrite")
    return path


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A hidden folder beside `target` that replaces it when the block ends cleanly and is removed otherwise, so
    an interrupted write never looks like a finished one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield partial
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
