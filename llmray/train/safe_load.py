"""Checkpoint reads that never unpickle arbitrary objects.

DeepSpeed reads its `.pt` files with `torch.load(weights_only=False)`, which runs any pickled code a tampered
checkpoint holds. Inside `weights_only_loads()` every `torch.load` is forced to `weights_only=True`, with only
the few plain-data DeepSpeed classes its checkpoints contain allow-listed.
"""

from __future__ import annotations

import functools
import pickle
from contextlib import contextmanager

import torch

from llmray.errors import LlmrayError


class UnsafeCheckpointError(LlmrayError):
    pass


def _deepspeed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads():
    original = torch.load
    allowed = _deepspeed_globals()

    @functools.wraps(original)
    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            reason = str(e).split("\n\n")[-1].strip().splitlines()[0] if str(e) else ""
            raise UnsafeCheckpointError(f"{f} holds objects other than tensors and plain data; refusing to unpickle "
                                        f"it ({reason})") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
