"""Training-speed levers of the demo recipes, each against the recipe's own step in the same script.

For `recipes/models/transfusion-shapes.yaml` and `recipes/models/chameleon-shapes.yaml` (at their size and
sequence length, untrained image tokenizers of the recipes' shapes: speed does not depend on the weights),
one training step as `anymodal fit` runs it (images encoded on the fly, forward, backward, clipping, AdamW
or, where the lever says so, Muon + AdamW, EMA), with one lever changed at a time:

- `batch B`: rows per step (tokens per step grow, per-op overhead is shared);
- `fused adamw`: `torch.optim.AdamW(fused=True)` instead of the per-parameter loop;
- `bf16 autocast`: `torch.autocast("cpu", torch.bfloat16)` over the forward (what Lightning's `bf16-mixed` does);
- `compile`: `torch.compile` of the decoder and of a VQ-VAE's encode, as `UnifiedSystem(compile=True)` trains
  (compile time reported apart; `eager encode`: the decoder only);
- `muon`: `optimizer: muon` (anymodal.systems.optim: Muon on the decoder blocks' matrices, batched per shape),
  and the same with the library's per-matrix `torch.optim.Muon` loop.

Each configuration runs in a fresh interpreter. Reported: tokens/s and its ratio to the recipe's step on the
same path, the step split into forward (the image tokenizer's encoding timed apart), backward, optimizer
(clip, AdamW, EMA), and the machine.

    .venv/bin/python benchmarks/levers.py                  # writes benchmarks/results/levers.json
    .venv/bin/python benchmarks/levers.py --quick          # a smoke run (1 + 2 steps), no file
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_throughput", Path(__file__).with_name("train_throughput.py"))
tt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tt)

# Every row packs its rows in stream order (pack_pool 0, as all rows before 2026-12-07 were measured) unless it
# names a pack_pool: the training default is now a pool of 32 (the last row).
LEVERS = {
    "recipe": {},
    "fused adamw": {"fused": True},
    "bf16 autocast": {"bf16": True},
    "batch 16": {"batch_size": 16},
    "batch 32": {"batch_size": 32},
    "batch 32 + bf16 + fused": {"batch_size": 32, "bf16": True, "fused": True},
    "compile": {"compile": True},
    "batch 16 + bf16": {"batch_size": 16, "bf16": True},
    "bf16 + compile": {"bf16": True, "compile": True},
    "batch 16 + bf16 + compile": {"batch_size": 16, "bf16": True, "compile": True},
    # the model's shape at the demo's precision (16 rows + bf16 + compile): attention on a packed 256-token row
    # is about half of that step, so fewer heads and shorter rows are the levers left on it
    "16 rows + bf16 + compile, 2 heads": {"batch_size": 16, "bf16": True, "compile": True,
                                           "arch": {"n_heads": 2, "n_kv_heads": 1}},
    "21 rows x 192 + bf16 + compile": {"batch_size": 21, "seq_len": 192, "bf16": True, "compile": True},
    "16 rows + bf16 + compile, mlp 768": {"batch_size": 16, "bf16": True, "compile": True,
                                          "arch": {"mlp_hidden": 768}},
    # the optimizer: Muon on the decoder blocks' matrices, at the demo's setting (the recipe's rows)
    "bf16 + compile + muon": {"bf16": True, "compile": True, "optimizer": "muon"},
    "bf16 + compile + muon (library loop)": {"bf16": True, "compile": True, "optimizer": "muon", "library_muon": True},
    "bf16 + compile + muon, eager encode": {"bf16": True, "compile": True, "optimizer": "muon", "eager_encode": True},
    # the demo's step with SDPA's kernel for its dense mask, where `auto` runs matmuls in bf16 training on a CPU
    "bf16 + compile + muon, SDPA attention": {"bf16": True, "compile": True, "optimizer": "muon",
                                              "arch": {"attention": "sdpa"}},
    "fp32 + compile + muon, matmul attention": {"compile": True, "optimizer": "muon", "arch": {"attention": "matmul"}},
    "fp32 + compile + muon": {"compile": True, "optimizer": "muon"},
    # rows filled best-fit from 32 held documents (UnifiedDataModule's pack_pool) instead of in stream order
    "bf16 + compile + muon, pack pool 32": {"bf16": True, "compile": True, "optimizer": "muon", "pack_pool": 32},
}


def run_one(spec: dict) -> dict:
    """Time one configuration: {path, steps, warmup, threads, batch_size?, fused?, bf16?, compile?, optimizer?, library_muon?}."""
    import torch
    import yaml

    from anymodal.batch import DOCUMENT
    from anymodal.data.shapes import ShapesWorld
    from anymodal.data.stream import PackedBatches
    from anymodal.hardware import matmul_rate
    from anymodal.systems.optim import GroupedMuon, build_optimizer
    from anymodal.systems.unified import UnifiedSystem

    torch.set_num_threads(spec["threads"])
    recipe = yaml.safe_load(tt.RECIPES[spec["path"]].read_text())
    model_args, data_args = dict(recipe["model"]["init_args"]), dict(recipe["data"]["init_args"])
    batch_size = spec.get("batch_size") or data_args["batch_size"]
    seq_len = spec.get("seq_len") or data_args["seq_len"]
    with tempfile.TemporaryDirectory() as tmp:
        folder, _ = tt.image_tokenizer(spec["path"], Path(tmp))
        model_args.update(text_tokenizer=str(tt.TEXT_TOKENIZER), image_tokenizer=str(folder))
        if spec.get("arch"):
            model_args["arch"] = spec["arch"]
        model_args["compile"] = bool(spec.get("compile"))  # the decoder, and a VQ-VAE's encode, as training does
        torch.manual_seed(0)
        system = UnifiedSystem(**model_args)
        system.configure_model()
    hp = system.hparams
    compile_s = 0.0
    # the optimizer first: it takes the decoder's own parameter names, which compiling wraps (_orig_mod)
    if spec.get("optimizer"):
        opt = build_optimizer(spec["optimizer"], system.model, system.param_groups(), hp.lr, tuple(hp.betas),
                              hp.weight_decay, torch.optim.Muon if spec.get("library_muon") else GroupedMuon)
    else:
        opt = torch.optim.AdamW(system.param_groups(), lr=hp.lr, betas=tuple(hp.betas),
                                **({"fused": True} if spec.get("fused") else {}))
    if spec.get("eager_encode") and system._compiled:
        system._compiled = (system._compiled[0], None)
    sources = [ShapesWorld(**s["init_args"]) for s in data_args["sources"]]
    stream = PackedBatches(sources, system.encoder, seq_len, batch_size, None,
                           data_args.get("drop_text", 0.1), data_args.get("drop_image", 0.1), seed=0,
                           pool=spec.get("pack_pool", 0))
    n = spec["warmup"] + spec["steps"]
    t0 = time.perf_counter()
    batches = list(itertools.islice(iter(stream), n))
    data_ms = 1e3 * (time.perf_counter() - t0) / n
    system.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(spec.get("bf16")))

    def step(batch) -> tuple[float, float, float, float]:
        a = time.perf_counter()
        with autocast:
            losses = system.compute_losses(batch)
        b = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses.total.backward()
        c = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(system.model.parameters(), recipe["trainer"].get("gradient_clip_val", 1.0))
        opt.step()
        system.ema.update(system.model)
        d = time.perf_counter()
        return b - a, c - b, d - c, float(losses.total.detach())

    for i, batch in enumerate(batches[:spec["warmup"]]):
        t = time.perf_counter()
        step(batch)
        if i == 0:
            compile_s = time.perf_counter() - t
    parts = [step(b) for b in batches[spec["warmup"]:]]
    steps = [sum(p[:3]) for p in parts]
    encode = []  # the image tokenizer's share of the forward, timed apart
    for b in batches[spec["warmup"]:]:
        t = time.perf_counter()
        with autocast:
            system.encode_images(b)
        encode.append(time.perf_counter() - t)
    tokens = batch_size * seq_len
    documents = sum(int(b.spans[..., 2][b.spans[..., 0] == DOCUMENT].sum()) for b in batches[spec["warmup"]:])
    return {**spec, "batch_size": batch_size, "seq_len": seq_len, "size": hp.size,
            "tokens_per_s": tokens * len(steps) / sum(steps),
            "document_tokens_per_s": documents / sum(steps),  # padding at the end of rows left out
            "step_ms": 1e3 * statistics.median(steps),
            "forward_ms": 1e3 * statistics.median(p[0] for p in parts),
            "encode_ms": 1e3 * statistics.median(encode),
            "backward_ms": 1e3 * statistics.median(p[1] for p in parts),
            "optimizer_ms": 1e3 * statistics.median(p[2] for p in parts), "data_ms": data_ms,
            "first_step_s": compile_s, "loss_last": parts[-1][3],
            "fp32_matmul_gflops": matmul_rate(torch.float32) / 1e9,
            "bf16_matmul_gflops": matmul_rate(torch.bfloat16) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--paths", nargs="+", default=["continuous", "discrete"], choices=["continuous", "discrete"])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS), metavar="LEVER",
                        help=f"levers to run (default: all): {', '.join(LEVERS)}")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 warm-up + 2 steps")
    parser.add_argument("--out", default=None, help="default benchmarks/results/levers.json (--quick: none)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker is not None:
        print(json.dumps(run_one(json.loads(ns.worker))))
        return

    import torch
    from rich.console import Console
    from rich.table import Table

    threads = ns.threads or torch.get_num_threads()
    steps, warmup = (2, 1) if ns.quick else (ns.steps, ns.warmup)
    info = tt.machine(threads, "cpu")
    info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                              if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    levers = ["recipe"] + [k for k in ns.levers if k != "recipe"]
    results, started = [], time.perf_counter()
    for path in ns.paths:
        for name in levers:
            r = tt.spawn({"path": path, "lever": name, "steps": steps, "warmup": warmup, "threads": threads,
                          **LEVERS[name]}, __file__)
            results.append(r)
            print(f"{path:10s} {name:24s} {r['tokens_per_s']:8.0f} tok/s {r['step_ms']:7.1f} ms/step", file=sys.stderr)
    info["load_average_after"] = list(os.getloadavg())
    base = {r["path"]: r["tokens_per_s"] for r in results if r["lever"] == "recipe"}
    for r in results:
        r["speedup"] = r["tokens_per_s"] / base[r["path"]]
    table = Table(title=f"training levers (cpu, {threads} threads, {steps} steps after {warmup}; "
                        f"{info['cpu_model']})")
    for col in ("path", "lever", "B x T", "tokens/s", "x recipe", "unpadded/s", "ms/step", "fwd", "(encode)", "bwd",
                "opt", "data ms"):
        table.add_column(col, justify="left" if col in ("path", "lever") else "right")
    for r in results:
        table.add_row(r["path"], r["lever"], f"{r['batch_size']} x {r['seq_len']}", f"{r['tokens_per_s']:.0f}",
                      f"{r['speedup']:.2f}", f"{r['document_tokens_per_s']:.0f}", f"{r['step_ms']:.0f}",
                      f"{r['forward_ms']:.0f}", f"{r['encode_ms']:.0f}",
                      f"{r['backward_ms']:.0f}", f"{r['optimizer_ms']:.0f}", f"{r['data_ms']:.0f}")
    console = Console(width=140)
    console.print(table)
    if ns.quick and ns.out is None:
        return
    out = Path(ns.out or ROOT / "benchmarks/results/levers.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "levers", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "machine": info, "quick": ns.quick, "wall_s": time.perf_counter() - started,
                               "results": results}, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
