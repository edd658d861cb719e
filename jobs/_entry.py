"""What every jobs/*.py entry point shares: run one `llmray` command and exit with its status.

The folder above jobs/ goes first on sys.path, so the llmray shipped with the job (`ray job submit --working-dir .`)
is the code that runs, even where a node also has a pip-installed llmray (that one then only supplies the
dependencies). Errors are printed by llmray.cli (one line for bad input) and the exit status is nonzero, which
`ray job submit` / `ray job status` report as FAILED.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(command: list[str]) -> None:
    from llmray.cli import main

    sys.exit(main(command))
