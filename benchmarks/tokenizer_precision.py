"""Training step time of both image tokenizers in fp32 and bf16 autocast, channels-last and contiguous, in one process.

Builds the VAE of `recipes/tokenizers/vae-shapes.yaml` and the VQ-VAE of `recipes/tokenizers/vqvae-shapes.yaml`
as their recipes say, and times training steps on shapes-world batches of the recipes' size: forward,
reconstruction loss (+ the VAE's KL or the VQ-VAE's commitment), backward, AdamW. Each tokenizer runs four ways:
{fp32, bf16 autocast} x {channels-last, contiguous}; the ways run in alternating rounds of 5 steps so that a
change in machine load hits all of them. The result is each way's median step and its speed against fp32
contiguous. The recipes and the demo pick from this: the VAE recipe keeps contiguous tensors, and the demo's
`--vae-precision auto` / `--vqvae-precision auto` train in bf16-mixed where bf16 convolutions are faster.

    .venv/bin/python benchmarks/tokenizer_precision.py [--threads 1] [--steps 20] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time
from pathlib import Path

import torch
import yaml
from sampling import machine, median_ms_in_rounds, write_result  # this folder's benchmarks share these

from anymodal.data.shapes import ShapesWorld
from anymodal.hardware import native_bf16
from anymodal.systems.tokenizers import reconstruction_loss
from anymodal.tokenizers.vae import VAE, VAEConfig
from anymodal.tokenizers.vqvae import VQVAE, VQVAEConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"vae": ROOT / "recipes/tokenizers/vae-shapes.yaml", "vqvae": ROOT / "recipes/tokenizers/vqvae-shapes.yaml"}
WAYS = [(p, layout) for p in ("fp32", "bf16") for layout in ("channels_last", "contiguous")]


def build(name: str, recipe: dict, layout: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    config = recipe["model"]["init_args"]["config"]
    torch.manual_seed(0)
    model = VAE(VAEConfig(**config)) if name == "vae" else VQVAE(VQVAEConfig(**config))
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=recipe["model"]["init_args"]["lr"])


def loss_of(name: str, model: torch.nn.Module, pixels: torch.Tensor, recipe: dict) -> torch.Tensor:
    if name == "vae":  # as VAESystem.training_step with the recipe's settings
        out = model(pixels, sample=recipe["model"]["init_args"].get("sample_posterior", True))
        kl = out.kl.float().mean() / pixels[0].numel()
        return reconstruction_loss(out.recon.float(), pixels) + recipe["model"]["init_args"]["kl_weight"] * kl
    out = model(pixels)
    return reconstruction_loss(out.recon.float(), pixels) + out.commit_loss


def timed_step(name: str, recipe: dict, runs: dict, way: tuple[str, str], pixels: torch.Tensor) -> float:
    """Seconds of one training step of `runs[way]` (a model and its optimizer) on `pixels`."""
    model, opt = runs[way]
    pixels = pixels.contiguous(memory_format=torch.channels_last if way[1] == "channels_last"
                               else torch.contiguous_format)
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=way[0] == "bf16"):
        loss = loss_of(name, model, pixels, recipe)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per way (in rounds of 5)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per way first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 warm-up + 2 steps at batch size 4")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tokenizer_precision.json"))
    args, _ = parser.parse_known_args(argv)  # make bench passes every benchmark the same flags
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    result: dict = {"machine": {**machine("cpu"), "native_bf16": native_bf16()}, "steps": steps, "tokenizers": {}}
    for name, path in RECIPES.items():
        recipe = yaml.safe_load(path.read_text())
        batch_size = 4 if args.quick else recipe["data"]["init_args"]["batch_size"]
        source = iter(ShapesWorld(size=32, seed=0, tasks={"t2i": 1.0}))
        batches = [torch.stack([d.images[0].pixels for d in itertools.islice(source, batch_size)])
                   for _ in range(warmup + steps)]  # (B, 3, 32, 32) each
        runs = {way: build(name, recipe, way[1]) for way in WAYS}
        step = functools.partial(timed_step, name, recipe, runs)
        ms = {f"{p} {layout}": v for (p, layout), v in median_ms_in_rounds(step, WAYS, batches, warmup).items()}
        base = ms["fp32 contiguous"]
        result["tokenizers"][name] = {"recipe": str(path.relative_to(ROOT)), "batch_size": batch_size,
                                      "step_ms_median": ms, "speedup_over_fp32_contiguous":
                                      {k: base / v for k, v in ms.items()}}
        print(f"{name} (batch {batch_size}, {torch.get_num_threads()} threads): " + ", ".join(
            f"{k} {v:.1f} ms ({base / v:.2f}x)" for k, v in ms.items()), flush=True)

    return write_result(args.out, result)


if __name__ == "__main__":
    main()
