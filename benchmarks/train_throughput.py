"""Training speed: tokens per second and peak memory of the tiny recipes of both image paths.

For `recipes/models/transfusion-shapes.yaml` (continuous latents + diffusion loss) and
`recipes/models/chameleon-shapes.yaml` (discrete codes), at the recipe's size, batch size and sequence
length, with untrained image tokenizers of the recipes' shapes (speed does not depend on the weights):
`--warmup` steps, then `--steps` measured training steps (images encoded on the fly, forward, backward,
gradient clipping, AdamW, EMA update: what `anymodal fit` runs per step, minus Lightning's bookkeeping).
Packing the documents into batches is timed apart (`data ms/batch`).

Attention backends: on CPU only SDPA trains (FlexAttention has no backward there), so the CPU compares
flex with sdpa on forward-only steps; on CUDA both backends run the full training step.

Every configuration runs in a fresh process, so its peak memory is its own: the peak resident set
(`ru_maxrss`) and its growth over the measured steps on CPU, `torch.cuda.max_memory_allocated` on CUDA.
CPU time per wall second (`os.times`) is recorded with each figure, since the CPU may be shared.

    .venv/bin/python benchmarks/train_throughput.py             # writes benchmarks/results/train_throughput.json
    .venv/bin/python benchmarks/train_throughput.py --quick     # a smoke run (1 + 2 steps, batch 2), no file
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOKENIZER = ROOT / "tokenizers" / "shapes-text"
RECIPES = {"continuous": ROOT / "recipes/models/transfusion-shapes.yaml",
           "discrete": ROOT / "recipes/models/chameleon-shapes.yaml"}
TOKENIZER_RECIPES = {"continuous": ROOT / "recipes/tokenizers/vae-shapes.yaml",
                     "discrete": ROOT / "recipes/tokenizers/vqvae-shapes.yaml"}


# ------------------------------------------------------------------------------------------ one run
def rss_kib() -> int:
    """Current resident set size of this process in KiB (Linux), 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def image_tokenizer(path: str, folder: Path) -> tuple[Path, dict]:
    """An untrained image tokenizer with the config of the path's tokenizer recipe (defaults without one)."""
    import torch
    import yaml

    from anymodal.tokenizers.image import save_image_tokenizer
    from anymodal.tokenizers.vae import VAE, VAEConfig
    from anymodal.tokenizers.vqvae import VQVAE, VQVAEConfig

    cls, config_cls = (VQVAE, VQVAEConfig) if path == "discrete" else (VAE, VAEConfig)
    recipe = TOKENIZER_RECIPES[path]
    given = {}
    if recipe.is_file():
        given = (yaml.safe_load(recipe.read_text()).get("model", {}).get("init_args", {}) or {}).get("config") or {}
    fields = {f.name for f in dataclasses.fields(config_cls)}
    config = {k: v for k, v in given.items() if k in fields}
    if path == "discrete":
        config["kmeans_init"] = False  # untrained: no k-means on the first batch
    torch.manual_seed(0)
    tok = cls(config_cls(**config))
    used = {"recipe": str(recipe.relative_to(ROOT)) if given else None, **dataclasses.asdict(tok.config)}
    return save_image_tokenizer(tok, folder / path), used


def run_one(spec: dict) -> dict:
    """Time one configuration: {path, attention, mode ('train' | 'forward'), steps, warmup, threads, device}."""
    import torch
    import yaml

    from anymodal.data.shapes import ShapesWorld
    from anymodal.data.stream import PackedBatches
    from anymodal.systems.unified import UnifiedSystem

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    recipe = yaml.safe_load(RECIPES[spec["path"]].read_text())
    model_args = dict(recipe["model"]["init_args"])
    data_args = dict(recipe["data"]["init_args"])
    batch_size = spec.get("batch_size") or data_args["batch_size"]
    seq_len = spec.get("seq_len") or data_args["seq_len"]
    image_size = spec.get("image_size") or model_args["image_size"]
    model_args["image_size"] = image_size
    if spec.get("size"):
        model_args["size"] = spec["size"]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec.get("precision") == "bf16"
                else contextlib.nullcontext())
    with tempfile.TemporaryDirectory() as tmp:
        folder, tokenizer_config = image_tokenizer(spec["path"], Path(tmp))
        model_args.update(text_tokenizer=str(TEXT_TOKENIZER), image_tokenizer=str(folder))
        model_args["arch"] = {**(model_args.get("arch") or {}), "attention": spec["attention"],
                              "max_seq_len": max(seq_len, (model_args.get("arch") or {}).get("max_seq_len", 0))}
        torch.manual_seed(0)
        system = UnifiedSystem(**model_args)
        system.configure_model()
    system.to(device)
    hp = system.hparams
    params = sum(p.numel() for p in system.model.parameters())

    sources = [ShapesWorld(**{**s["init_args"], "size": image_size}) for s in data_args["sources"]]
    stream = PackedBatches(sources, system.encoder, seq_len, batch_size, data_args.get("weights"),
                           data_args.get("drop_text", 0.1), data_args.get("drop_image", 0.1), seed=0)
    n = spec["warmup"] + spec["steps"]
    t0 = time.perf_counter()
    batches = list(itertools.islice(iter(stream), n))
    data_s = (time.perf_counter() - t0) / n
    real_tokens = statistics.mean(float((b.spans[..., 0] == 0).mul(b.spans[..., 2]).sum()) / b.tokens.numel()
                                  for b in batches)

    train = spec["mode"] == "train"
    system.model.train(train)
    decay = [p for p in system.model.parameters() if p.ndim >= 2]
    no_decay = [p for p in system.model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))

    def step(batch) -> float:
        batch = batch.to(device)
        if not train:
            with torch.no_grad(), autocast:
                return float(system.compute_losses(batch).total)
        with autocast:
            losses = system.compute_losses(batch)
        opt.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(system.model.parameters(), recipe["trainer"].get("gradient_clip_val", 1.0))
        opt.step()
        if system.ema is not None:
            system.ema.update(system.model)
        return float(losses.total.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for batch in batches[:spec["warmup"]]:
        step(batch)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_kib()
    times, losses = [], []
    cpu0, wall0 = os.times(), time.perf_counter()
    for batch in batches[spec["warmup"]:]:
        t = time.perf_counter()
        losses.append(step(batch))
        sync()
        times.append(time.perf_counter() - t)
    cpu1, wall1 = os.times(), time.perf_counter()
    cpu_per_wall = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (wall1 - wall0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tokens = batch_size * seq_len
    flops_per_token = system.count_flops(batches[0]).total  # training FLOPs, dense attention (the MFU convention)
    out = {**spec, "batch_size": batch_size, "seq_len": seq_len, "size": hp.size, "params": params,
           "image_size": image_size, "train_flops_per_token": flops_per_token,
           "image_tokenizer": tokenizer_config,
           "tokens_per_s": tokens * len(times) / sum(times), "step_ms_median": 1e3 * statistics.median(times),
           "step_ms_min": 1e3 * min(times), "data_ms_per_batch": 1e3 * data_s, "document_fraction": real_tokens,
           "cpu_s_per_wall_s": cpu_per_wall, "loss_first": losses[0], "loss_last": losses[-1],
           "peak_rss_mib": peak_rss / 1024, "rss_growth_mib": max(0, peak_rss - rss_before) / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ------------------------------------------------------------------------------------------ driver
def machine(threads: int, device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": threads, "device": device, "load_average_before": list(os.getloadavg())}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def configurations(device: str) -> list[tuple[str, str, str]]:
    """(path, attention, mode) to run: training on SDPA everywhere, plus flex where it applies."""
    runs = []
    for path in ("continuous", "discrete"):
        runs.append((path, "sdpa", "train"))
        if device == "cuda":
            runs.append((path, "flex", "train"))
        else:  # FlexAttention has no backward on CPU: compare the backends forward-only
            runs += [(path, "sdpa", "forward"), (path, "flex", "forward")]
    return runs


def spawn(spec: dict, script: str = __file__) -> dict:
    """Run one configuration in a fresh interpreter (its own peak memory) through `script --worker` and return
    its results."""
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise SystemExit(f"configuration {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 warm-up + 2 steps at batch size 2")
    parser.add_argument("--out", default=None, help="where to write the results (default: "
                        "benchmarks/results/train_throughput.json; a --quick run writes nothing unless given)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker is not None:
        print(json.dumps(run_one(json.loads(ns.worker))))
        return

    import torch
    from rich.console import Console
    from rich.table import Table

    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = ns.threads or torch.get_num_threads()
    steps, warmup = (2, 1) if ns.quick else (ns.steps, ns.warmup)
    info = machine(threads, device)
    results = []
    started = time.perf_counter()
    for path, attention, mode in configurations(device):
        spec = {"path": path, "attention": attention, "mode": mode, "steps": steps, "warmup": warmup,
                "threads": threads, "device": device, "batch_size": 2 if ns.quick else None}
        results.append(spawn(spec))
        r = results[-1]
        print(f"{path:10s} {attention:4s} {mode:7s} {r['tokens_per_s']:9.0f} tok/s  "
              f"cpu/wall {r['cpu_s_per_wall_s']:.2f}", file=sys.stderr)
    info["load_average_after"] = list(os.getloadavg())
    ratios = {}
    for path in ("continuous", "discrete"):
        by = {(r["attention"], r["mode"]): r for r in results if r["path"] == path}
        mode = "train" if device == "cuda" else "forward"
        if ("flex", mode) in by and ("sdpa", mode) in by:
            ratios[path] = {"mode": mode, "flex_over_sdpa_time": by["flex", mode]["step_ms_median"]
                            / by["sdpa", mode]["step_ms_median"]}

    table = Table(title=f"training throughput ({device}, {threads} threads, {steps} steps after {warmup})")
    for col in ("path", "attn", "step", "B x T", "tokens/s", "ms/step", "data ms", "peak MiB", "cpu/wall"):
        table.add_column(col, justify="left" if col in ("path", "attn", "step") else "right")
    for r in results:
        memory = r.get("cuda_max_allocated_mib", r["peak_rss_mib"])
        table.add_row(r["path"], r["attention"], r["mode"], f"{r['batch_size']} x {r['seq_len']}",
                      f"{r['tokens_per_s']:.0f}", f"{r['step_ms_median']:.0f}", f"{r['data_ms_per_batch']:.0f}",
                      f"{memory:.0f}", f"{r['cpu_s_per_wall_s']:.2f}")
    console = Console(width=120)
    console.print(table)
    for path, ratio in ratios.items():
        console.print(f"{path}: flex / sdpa time, {ratio['mode']} step: {ratio['flex_over_sdpa_time']:.2f}")

    if ns.quick and ns.out is None:
        return
    out = Path(ns.out or ROOT / "benchmarks/results/train_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "train_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": info, "quick": ns.quick, "wall_s": time.perf_counter() - started, "results": results,
           "flex_over_sdpa": ratios}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
