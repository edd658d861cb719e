"""TORCH_CUDA_ARCH_LIST as DeepSpeed's JIT op builder can read it.

NVIDIA's PyTorch images for Hopper set `TORCH_CUDA_ARCH_LIST=9.0a` (the arch-specific target that wgmma needs).
DeepSpeed parses each entry's minor version as an integer, so `9.0a` fails every op it builds (FusedAdam, CPU Adam
for offload) with `invalid literal for int() with base 10: '0a'`. Its ops use no sm_90a instructions, so the plain
`9.0` target builds them for the same GPU.
"""

from __future__ import annotations

import os
import re
from typing import MutableMapping

VAR = "TORCH_CUDA_ARCH_LIST"
_ENTRY = re.compile(r"^(\d+)\.(\d+)[a-z]*(\+PTX)?$")  # 9.0, 9.0a, 10.0f, 8.6+PTX


def deepspeed_arch_list(value: str) -> str:
    """The list with each entry's arch-specific suffix (`a`, `f`) dropped, repeats removed, in order; entries
    that are not `X.Y` forms are kept as they are for PyTorch to judge."""
    out: list[str] = []
    for entry in value.replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        m = _ENTRY.match(entry)
        plain = f"{m[1]}.{m[2]}{m[3] or ''}" if m else entry
        if plain not in out:
            out.append(plain)
    return ";".join(out)


def fix_arch_list(env: MutableMapping[str, str] = os.environ) -> str | None:
    """Rewrite the variable in `env` where DeepSpeed could not read it; the old value, or None if it was fine."""
    old = env.get(VAR)
    if old is None:
        return None
    new = deepspeed_arch_list(old)
    if new == old:
        return None
    env[VAR] = new
    return old
