"""What a run prints: its progress lines (once each), the summary and any error. Ray's, Ray Data's, Ray Train's
and DeepSpeed's own INFO lines are kept out of the console unless the run is verbose (`llmray train --verbose`,
or LLMRAY_VERBOSE=1 in a job's environment); Ray still writes all of them to its session log files."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

VERBOSE_ENV = "LLMRAY_VERBOSE"


class DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Set in the driver's environment, so the workers and actors Ray starts from it inherit it."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def ray_log_level() -> int:
    return logging.INFO if verbose() else logging.WARNING


def drop_import_noise() -> None:
    """torchao is imported by transformers whenever a model is built, in every training worker. On CPU it warns once
    per CUDA-only kernel library it cannot load and that triton is missing, and torch warns about how torchao
    registers an enum: expected, not news. (A filter holds for its own logger only, so each is named.)"""
    logging.getLogger("torchao").addFilter(DropMessages("Failed to load"))
    logging.getLogger("torchao.kernel.intmm").addFilter(DropMessages("Detected no triton"))  # CPU has no triton
    logging.getLogger("torch.utils._pytree").addFilter(DropMessages("register_constant() on Enum subclasses"))
    # DeepSpeed, imported by transformers in a process without a GPU, says it will use the CPU: that is the point
    logging.getLogger("DeepSpeed").addFilter(DropMessages("Setting accelerator to CPU"))
    # bitsandbytes on CPU (a QLoRA base) looks for an optional faster 4-bit kernel package and works without it
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(DropMessages("Failed to load CPU gemm_4bit_forward"))


def worker_env() -> dict[str, str]:
    """Environment for Ray Train workers. Ray Train's print patch re-logs every print() of a worker, so each
    progress line reached the console twice; prints go to the console once without it."""
    return {VERBOSE_ENV: "1" if verbose() else "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "1" if verbose() else "0",
            **no_progress_bars()}


def no_progress_bars() -> dict[str, str]:
    """transformers draws a progress bar for every model it loads or saves (huggingface_hub's switch turns them
    off, read when transformers is imported): a bar per worker per run is noise unless verbose."""
    return {} if verbose() else {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}  # tqdm: DeepSpeed's


# One instance: a logger adds a filter it already holds only once, so repeated calls (a sweep runs many fits in
# one process) do not stack copies.
NO_PROGRESS_BAR_NOTICE = DropMessages("Progress bars disabled")


def quiet_here() -> None:
    """In this process (a driver, a Train worker, the stream's actor): Ray Data's per-execution INFO lines, its
    "progress bars disabled" warning, Ray Train's per-report dumps and torch's deprecation notices that DeepSpeed
    triggers, all off unless verbose."""
    if verbose():
        return
    import ray.data
    from ray.train.v2._internal.execution import context as train_context

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # training prints its own progress; Ray Data's bars flood the log
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data").addFilter(NO_PROGRESS_BAR_NOTICE)
    for handler in logging.getLogger("ray.data").handlers:
        handler.addFilter(NO_PROGRESS_BAR_NOTICE)
    # Ray Train's worker context logs each report ("Reporting training result ...") under its file's name.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # peft asks transformers the old name when it wraps a model for LoRA
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


@contextlib.contextmanager
def hush_stdout():
    """DeepSpeed prints (not logs) what it builds and which optional kernels it lacks; kept off the console."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
