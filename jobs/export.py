"""A checkpoint (local or s3://) into a Hugging Face folder, as a job on the cluster:

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/export.py s3://bucket/runs/NAME/checkpoint_... --out s3://bucket/exports/NAME

Same arguments as `llmray export`. The job's driver runs on one node (the head by default), so a local --out
lands on that node's disk only; an --out URI (s3://, gs://) is written locally first, then uploaded whole, which
is what Serve replicas on any node can read (serve/config.yaml takes s3:// model paths).
"""

import sys
import tempfile

from _entry import run


def with_out(argv: list[str], out: str) -> list[str]:
    """argv with its --out value replaced (either `--out X` or `--out=X`)."""
    args = list(argv)
    for i, a in enumerate(args):
        if a.startswith("--out="):
            args[i] = f"--out={out}"
        elif a == "--out" and i + 1 < len(args):
            args[i + 1] = out
    return args


def main(argv: list[str]) -> None:
    from llmray.cli import build_parser
    from llmray.data import storage

    out = build_parser().parse_args(["export", *argv]).out  # also answers --help and usage errors
    if not storage.is_uri(out):
        run(["export", *argv])
    from llmray.cli import main as cli

    fs, target = storage.resolve(out)
    if storage.exists(fs, target) and "--overwrite" not in argv:
        print(f"llmray: error: {out} already exists; pass --overwrite to replace it", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="llmray-export-") as tmp:
        code = cli(["export", *with_out(argv, f"{tmp}/model")])
        if code:
            sys.exit(code)
        if storage.exists(fs, target):
            fs.delete_dir(target)
        storage.upload(f"{tmp}/model", out)
    print(f"uploaded the export to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
