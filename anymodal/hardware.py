"""What this machine runs fast, decided at run time (never in a recipe)."""

from __future__ import annotations

import torch

BF16_MIN_SPEEDUP = 1.3
"""bfloat16 counts as native for a workload when it runs at least this many times faster than float32 here."""

_bf16_speedup: dict[str, float] = {}


def bf16_speedup(workload: str = "matmul") -> float:
    """Measured ratio of this CPU's bfloat16 to float32 rate (once per process and workload): `matmul` (the
    transformers: 512^3 matmuls) or `conv` (the image tokenizers: 3x3 convolutions of 64 channels at 32x32).

    The two differ by machine: an AMX Xeon runs both 4-5x faster in bfloat16; an AMD Zen 5 (AVX512-BF16)
    runs matmuls 4.5x faster but these convolutions no faster; CPUs that emulate bfloat16 run both slower.
    A measurement rather than a feature flag: flags name instructions, not speed."""
    if workload not in ("matmul", "conv"):
        raise ValueError(f"workload={workload!r} must be 'matmul' or 'conv'")
    if workload not in _bf16_speedup:
        rate = matmul_rate if workload == "matmul" else conv_rate
        _bf16_speedup[workload] = rate(torch.bfloat16) / rate(torch.float32)
    return _bf16_speedup[workload]


def native_bf16(workload: str = "matmul") -> bool:
    """Whether bfloat16 runs `workload` on native units here: a CUDA device with bf16, or a CPU whose measured
    bfloat16 rate beats float32 by `BF16_MIN_SPEEDUP` (`bf16_speedup`)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bf16_speedup(workload) >= BF16_MIN_SPEEDUP


def resolve_precision(precision: str, workload: str = "matmul") -> str | None:
    """`auto` -> bf16-mixed where bfloat16 runs `workload` natively, else None (keep the recipe's); anything
    else as given."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16(workload) else None


def _best_time(fn, repeats: int, max_seconds: float = 1.0) -> float:
    """The shortest of up to `repeats` timed calls of `fn` after a warm-up call, stopping once the calls have
    taken `max_seconds` in all (a CPU that emulates bfloat16 takes about a second for one 1024^3 matmul)."""
    import time

    start = time.perf_counter()
    fn()  # warm-up
    spent, times = time.perf_counter() - start, []
    while len(times) < repeats and not (times and spent > max_seconds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return min(times)


def conv_rate(dtype: torch.dtype = torch.float32, channels: int = 64, size: int = 32, batch: int = 8,
              repeats: int = 3) -> float:
    """Measured FLOP/s of a 3x3 convolution (batch, channels, size, size) in `dtype` on this CPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(dtype)
    w = torch.randn(channels, channels, 3, 3, generator=g).to(dtype)
    best = _best_time(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeats)
    return 2 * batch * channels * channels * 9 * size * size / best


def matmul_rate(dtype: torch.dtype = torch.float32, n: int | None = None, repeats: int = 5,
                device: str | torch.device = "cpu") -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype` on `device` (the best of `repeats`).

    The denominator of model-FLOPs utilisation: what this machine's matmul reaches, with the threads torch
    uses now on a CPU (n = 1024), or on a CUDA device (n = 8192: dense, where datasheets count 2:4 sparsity)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator().manual_seed(0)  # the global RNG stays untouched: training draws stay as they were
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    if device.type != "cuda":
        return 2 * n**3 / _best_time(lambda: a @ b, repeats)

    def product() -> None:
        a @ b
        torch.cuda.synchronize(device)

    product()
    return 2 * n**3 / _best_time(product, repeats)
