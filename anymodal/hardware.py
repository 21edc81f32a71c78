"""What this machine runs fast, decided at run time (never in a recipe)."""

from __future__ import annotations

import torch


def native_bf16() -> bool:
    """Whether bfloat16 convolutions run on native units here: a CUDA device, or a CPU with AMX tiles.

    CPUs without them emulate bfloat16 and run it several times slower than float32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def resolve_precision(precision: str) -> str | None:
    """`auto` -> bf16-mixed with native bfloat16, else None (keep the recipe's); anything else as given."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16() else None
