"""VQ-VAE training step time with GroupNorm against the per-position channel norm, in one process.

Builds the VQ-VAE of `recipes/tokenizers/vqvae-shapes.yaml` twice, `norm: group` and `norm: channel`
(everything else as the recipe says), and times training steps on shapes-world batches of the recipe's
size: forward, L1 + MSE + commitment loss, backward, AdamW. The two run in alternating rounds so that a
change in machine load hits both; the result is each one's median step time and their ratio. With
`--precision bf16-mixed` the networks run under autocast (the demo does this on CPUs with AMX).

    .venv/bin/python benchmarks/tokenizer_norm.py [--threads 2] [--steps 20] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
import yaml
from sampling import machine, median_ms_in_rounds, write_result  # this folder's benchmarks share these

from anymodal.data.shapes import ShapesWorld
from anymodal.hardware import native_bf16
from anymodal.systems.tokenizers import reconstruction_loss
from anymodal.tokenizers.vqvae import VQVAE, VQVAEConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tokenizers" / "vqvae-shapes.yaml"


def build(recipe: dict, norm: str, device: torch.device) -> tuple[VQVAE, torch.optim.Optimizer]:
    config = VQVAEConfig(**{**recipe["model"]["init_args"]["config"], "norm": norm})
    torch.manual_seed(0)
    model = VQVAE(config).to(device).to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=recipe["model"]["init_args"]["lr"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per norm (in rounds of 5)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per norm first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 warm-up + 2 steps at batch size 4")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tokenizer_norm.json"))
    args, _ = parser.parse_known_args(argv)  # make bench passes every benchmark the same flags
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipe = yaml.safe_load(RECIPE.read_text())
    batch_size = 4 if args.quick else recipe["data"]["init_args"]["batch_size"]
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    source = iter(ShapesWorld(size=32, seed=0, tasks={"t2i": 1.0}))
    batches = [torch.stack([d.images[0].pixels for d in itertools.islice(source, batch_size)]).to(device)
               for _ in range(warmup + steps)]  # (B, 3, 32, 32) each

    runs = {norm: build(recipe, norm, device) for norm in ("group", "channel")}

    def step(norm: str, pixels: torch.Tensor) -> float:
        model, opt = runs[norm]
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            out = model(pixels)
        loss = reconstruction_loss(out.recon.float(), pixels) + out.commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    ms = median_ms_in_rounds(step, list(runs), batches, warmup)
    result = {
        "machine": {**machine(str(device)), "native_bf16": native_bf16()},
        "recipe": str(RECIPE.relative_to(ROOT)), "precision": args.precision, "batch_size": batch_size,
        "steps": steps, "step_ms_median": ms, "channel_over_group": ms["channel"] / ms["group"],
    }
    print(f"VQ-VAE step ({args.precision}, batch {batch_size}, {torch.get_num_threads()} threads): "
          f"group {ms['group']:.1f} ms, channel {ms['channel']:.1f} ms, "
          f"channel / group = {result['channel_over_group']:.2f}")
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
