"""Outputs written whole or not at all, locally and in a real S3 API (moto): a published folder replaces the old
one entirely, a reader refuses one whose upload has not finished, a taken target is refused without --overwrite,
and a failed write leaves what was there."""

import json
import os
from pathlib import Path

import pytest

from llmray import storage
from llmray.outdir import OutputExistsError, free_target, staged


def folder(root: Path, files: dict) -> str:
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return str(root)


def test_publish_replaces_the_folder_and_download_refuses_an_unfinished_upload(s3, tmp_path):
    target = f"{s3}/model"
    storage.publish(folder(tmp_path / "old", {"config.json": "{}", "stale.bin": "x"}), target)
    storage.publish(folder(tmp_path / "new", {"config.json": '{"v": 2}'}), target)
    got = storage.download(target, str(tmp_path / "got"))
    assert os.listdir(got) == ["config.json"]  # the old folder's other files are gone, and no marker is left
    assert json.loads(Path(got, "config.json").read_text()) == {"v": 2}
    fs, path = storage.resolve(target)
    with fs.open_output_stream(storage.join(path, storage.UPLOADING)) as f:  # as an upload killed midway leaves it
        f.write(b"")
    with pytest.raises(storage.StorageError, match=f"{target} is incomplete"):
        storage.download(target, str(tmp_path / "again"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_staged_output_is_whole_or_not_at_all(where, s3, tmp_path):
    out = f"{s3}/out" if where == "s3" else str(tmp_path / "out")
    target = free_target(out, overwrite=False)
    with staged(target) as partial:
        (partial / "weights.bin").write_text("one")
    with pytest.raises(OutputExistsError, match="already exists"):
        free_target(out, overwrite=False)
    target = free_target(out, overwrite=True)
    with pytest.raises(RuntimeError), staged(target) as partial:
        (partial / "weights.bin").write_text("two")
        raise RuntimeError("killed while writing")
    local = storage.download(target, str(tmp_path / "got")) if where == "s3" else target
    assert os.listdir(local) == ["weights.bin"] and Path(local, "weights.bin").read_text() == "one"
