"""Training on a CUDA device: tokens/s and model-FLOPs utilisation (MFU), FlexAttention against SDPA, bf16
autocast against fp32, at the tiny recipe's size and at the size of the 1b recipes.

Each configuration is `benchmarks/train_throughput.py`'s step (images encoded on the fly, forward, backward,
clipping, AdamW, EMA), run in this process one after the other:

- `shapes`: recipes/models/transfusion-shapes.yaml as it is (dim 128, 4 layers, 16 rows of 256 tokens) in fp32
  SDPA, bf16 SDPA and bf16 flex; recipes/models/chameleon-shapes.yaml in bf16 SDPA and flex.
- `1b`: the decoder of recipes/models/*-1b.yaml (dim 2048, 22 layers, GQA 32/4), 8 rows of 2048 tokens, 96 px
  shapes images (144 latent patches each), bf16, SDPA (the rule made dense) and flex (BlockMask), without
  activation checkpointing.

MFU = tokens/s x training FLOPs per token (anymodal.flops: dense attention, the PaLM convention) / peak, with
two peaks: this device's measured dense bf16 matmul rate (`anymodal.hardware.matmul_rate`, 8192^3, what
MFUMonitor divides by) and Lightning's datasheet figure where it names the chip (Hopper's counts 2:4 sparsity).

    python benchmarks/cuda_throughput.py            # writes benchmarks/results/cuda_throughput.json
    python benchmarks/cuda_throughput.py --quick    # 1 + 2 steps, the shapes sizes only, no file
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine, run_one  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (label, spec overrides)
    ("shapes continuous fp32 sdpa", {"path": "continuous", "attention": "sdpa", "precision": "32"}),
    ("shapes continuous bf16 sdpa", {"path": "continuous", "attention": "sdpa", "precision": "bf16"}),
    ("shapes continuous bf16 flex", {"path": "continuous", "attention": "flex", "precision": "bf16"}),
    ("shapes discrete bf16 sdpa", {"path": "discrete", "attention": "sdpa", "precision": "bf16"}),
    ("shapes discrete bf16 flex", {"path": "discrete", "attention": "flex", "precision": "bf16"}),
    ("1b continuous bf16 sdpa", {"path": "continuous", "attention": "sdpa", "precision": "bf16", "size": "1b",
                                 "seq_len": 2048, "batch_size": 8, "image_size": 96}),
    ("1b continuous bf16 flex", {"path": "continuous", "attention": "flex", "precision": "bf16", "size": "1b",
                                 "seq_len": 2048, "batch_size": 8, "image_size": 96}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compilation happens here)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 2 steps, the shapes sizes only, no file")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/cuda_throughput.json)")
    ns = parser.parse_args()

    import torch
    from lightning.fabric.utilities.throughput import get_available_flops
    from rich.console import Console
    from rich.table import Table

    from anymodal.hardware import matmul_rate

    if not torch.cuda.is_available():
        raise SystemExit("cuda_throughput.py needs a CUDA device; benchmarks/train_throughput.py measures CPUs")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps, warmup = (2, 1) if ns.quick else (ns.steps, ns.warmup)
    peak = matmul_rate(torch.bfloat16, device="cuda")
    datasheet = get_available_flops(torch.device("cuda"), torch.bfloat16)
    info = {**machine(torch.get_num_threads(), "cuda"), "measured_bf16_matmul_flops": peak,
            "datasheet_bf16_flops": datasheet, "cuda": torch.version.cuda}
    results, started = [], time.perf_counter()
    out = None if ns.quick and ns.out is None else Path(ns.out or ROOT / "benchmarks/results/cuda_throughput.json")

    def write(ratios: dict) -> None:  # after every configuration: a run cut short keeps what it measured
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"benchmark": "cuda_throughput", "date": datetime.now(timezone.utc).isoformat(),
                                       "machine": info, "total_s": time.perf_counter() - started, "ratios": ratios,
                                       "results": results}, indent=1))

    for label, overrides in CONFIGS:
        if ns.quick and overrides.get("size"):
            continue
        spec = {"mode": "train", "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(),
                "device": "cuda", "batch_size": None, **overrides}
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        r = run_one(spec)
        r["label"], r["wall_s"] = label, time.perf_counter() - t0
        r["mfu_measured_peak"] = r["tokens_per_s"] * r["train_flops_per_token"] / peak
        r["mfu_datasheet"] = r["tokens_per_s"] * r["train_flops_per_token"] / datasheet if datasheet else None
        results.append(r)
        print(f"{label:30s} {r['tokens_per_s']:10.0f} tok/s  MFU {r['mfu_measured_peak']:.3f}  "
              f"({r['wall_s']:.0f} s with compilation)", file=sys.stderr, flush=True)
        write({})

    table = Table(title=f"training on {info['gpu']} ({steps} steps after {warmup}; measured bf16 peak "
                        f"{peak / 1e12:.0f} TFLOP/s)")
    for col in ("configuration", "B x T", "params", "tokens/s", "ms/step", "MFU (measured)", "MFU (datasheet)",
                "GPU MiB", "loss first -> last"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for r in results:
        table.add_row(r["label"], f"{r['batch_size']} x {r['seq_len']}", f"{r['params'] / 1e6:.1f}M",
                      f"{r['tokens_per_s']:.0f}", f"{r['step_ms_median']:.1f}", f"{r['mfu_measured_peak']:.3f}",
                      "-" if r["mfu_datasheet"] is None else f"{r['mfu_datasheet']:.3f}",
                      f"{r['cuda_max_allocated_mib']:.0f}", f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}")
    Console(width=160).print(table)
    ratios, by = {}, {r["label"]: r for r in results}
    for a, b in (("shapes continuous bf16 sdpa", "shapes continuous fp32 sdpa"),
                 ("shapes continuous bf16 flex", "shapes continuous bf16 sdpa"),
                 ("shapes discrete bf16 flex", "shapes discrete bf16 sdpa"),
                 ("1b continuous bf16 flex", "1b continuous bf16 sdpa")):
        if a in by and b in by:
            ratios[f"{a} / {b}"] = by[a]["tokens_per_s"] / by[b]["tokens_per_s"]
            print(f"tokens/s {a} / {b}: {ratios[f'{a} / {b}']:.2f}", file=sys.stderr)
    if out is None:
        return
    write(ratios)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
