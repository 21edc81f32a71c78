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


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype` on this CPU (the best of `repeats`).

    The denominator of CPU model-FLOPs utilisation: what this machine's matmul reaches, with the
    threads torch uses now."""
    import time

    g = torch.Generator().manual_seed(0)  # the global RNG stays untouched: training draws stay as they were
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
