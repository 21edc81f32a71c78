"""Sampling speed: seconds per image against denoising steps, with and without the prefix KV cache.

A `tiny`-size continuous model (untrained weights; speed does not depend on them) generates one image
with classifier-free guidance (batch 1, 2 branches) after prompts of 16, 256 and 1024 random text ids,
for 4, 8, 16 and 32 denoising steps. With the cache the prompt is prefilled once and each step runs only
the image's patch slots against it, so the per-step cost (the slope of seconds against steps) should not
grow with the prompt; without it every step recomputes the whole sequence. The discrete path is timed too
(64 codes, one forward per code), and beside it parallel (MaskGIT-style) decoding of the same model in 4, 8
and 16 forwards, at batch 1 and 32 (a 16-token prompt). Timings are the fastest of `--repeats` runs.

    .venv/bin/python benchmarks/sampling.py            # writes benchmarks/results/sampling.json
    .venv/bin/python benchmarks/sampling.py --quick    # a smoke run (small grid, one repeat)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from anymodal.config import ArchConfig
from anymodal.data.sequence import EncodedDocument
from anymodal.diffusion.schedule import build_objective
from anymodal.generate.engine import Engine, ImageSampling
from anymodal.model.unified import ModelConfig, UnifiedModel
from anymodal.tokenizers.text import TextTokenizer, load_text_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOKENIZER = ROOT / "tokenizers" / "shapes-text"


def build_model(path: str, text: TextTokenizer, max_seq_len: int, device: str) -> UnifiedModel:
    """An untrained `tiny` unified model: 8x8 latent grid in 2x2 patches (16 slots), or 8x8 = 64 codes (with the
    mask id of parallel decoding)."""
    arch = ArchConfig.from_name("tiny", max_seq_len=max_seq_len, attention="sdpa")
    if path == "continuous":
        config = ModelConfig(arch=arch, text_vocab_size=len(text), image_path="continuous", latent_channels=4, grid=8,
                             patch_size=2)
    else:
        config = ModelConfig(arch=arch, text_vocab_size=len(text), image_path="discrete", codebook_size=1024, grid=8,
                             mask_code=True)
    torch.manual_seed(0)
    return UnifiedModel(config).to(device).eval().requires_grad_(False)


def random_prompts(text: TextTokenizer, length: int, generator: torch.Generator) -> list[EncodedDocument]:
    """A conditional prompt of `length` tokens (`<bos>` + random text ids) and the unconditional `<bos>`."""
    low = max(text.special_ids) + 1
    ids = torch.randint(low, len(text), (length - 1,), generator=generator).tolist()
    return [EncodedDocument(tokens=[text.bos_id, *ids], loss_mask=[False] * length),
            EncodedDocument(tokens=[text.bos_id], loss_mask=[False])]


def time_image(model: UnifiedModel, text: TextTokenizer, objective, prompts: list[EncodedDocument],
               sampling: ImageSampling, use_cache: bool, repeats: int) -> dict:
    """Fastest of `repeats` runs of prefill + one guided image; CPU seconds per wall second of that run."""
    best = None
    for _ in range(repeats):
        engine = Engine(model, text, objective, use_cache=use_cache)
        cpu0, t0 = os.times(), time.perf_counter()
        engine.start(prompts, branches=2)
        engine.generate_image(sampling, [sampling.guidance], [torch.Generator().manual_seed(0)])
        if model.lm_head.weight.is_cuda:
            torch.cuda.synchronize()
        wall, cpu1 = time.perf_counter() - t0, os.times()
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        if best is None or wall < best["seconds"]:
            per_step = engine.stats.denoise_forwards[0] if engine.stats.denoise_forwards else None
            best = {"seconds": wall, "cpu_per_wall": cpu / wall, "positions_per_denoise_step": per_step,
                    "forwards": len(engine.stats.forwards)}
    return best


def time_codes(model: UnifiedModel, text: TextTokenizer, batch: int, parallel_steps: int, repeats: int,
               generator: torch.Generator) -> dict:
    """Fastest of `repeats` runs of prefill + `batch` guided discrete images (16-token prompts), decoded
    autoregressively (parallel_steps 0) or in `parallel_steps` forwards."""
    prompts = random_prompts(text, 16, generator)
    cond, uncond = [prompts[0]] * batch, [prompts[1]] * batch
    sampling = ImageSampling(temperature=1.0, parallel_steps=parallel_steps)
    best = None
    for _ in range(repeats):
        engine = Engine(model, text, None)
        t0 = time.perf_counter()
        engine.start(cond + uncond, branches=2)
        engine.generate_image(sampling, [sampling.guidance], [torch.Generator().manual_seed(i) for i in range(batch)])
        if model.lm_head.weight.is_cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        if best is None or wall < best["seconds"]:
            best = {"seconds": wall, "ms_per_image": 1e3 * wall / batch, "forwards": len(engine.stats.forwards)}
    return best


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def median_ms_in_rounds(step, ways: list, batches: list, warmup: int, round_size: int = 5) -> dict:
    """Median milliseconds of `step(way, batch)` (which returns seconds) for each way: `warmup` unmeasured
    batches each first, then the rest in alternating rounds of `round_size`, so that a change in the machine's
    load hits every way alike."""
    for way in ways:
        for batch in batches[:warmup]:
            step(way, batch)
    times: dict = {way: [] for way in ways}
    measured = batches[warmup:]
    for start in range(0, len(measured), round_size):
        for way in ways:
            times[way] += [step(way, batch) for batch in measured[start:start + round_size]]
    return {way: 1e3 * statistics.median(t) for way, t in times.items()}


def write_result(path: str | Path, result: dict) -> dict:
    """Write a benchmark's `result` as JSON to `path` (its folder made) and return it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def machine(device: str) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32], help="denoising steps to time")
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 256, 1024], help="prompt lengths in tokens")
    parser.add_argument("--discrete-prompts", type=int, nargs="+", default=[16, 256],
                        help="prompt lengths of the discrete path")
    parser.add_argument("--parallel-batches", type=int, nargs="+", default=[1, 32],
                        help="batch sizes of the autoregressive / parallel decoding comparison")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the fastest is kept")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampling.json"))
    parser.add_argument("--quick", action="store_true", help="smoke run: steps 2 4, prompts 16 64, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.prompts, args.discrete_prompts, args.repeats = [2, 4], [16, 64], [16], 1
        args.parallel_batches = [1, 4]
    torch.set_num_threads(args.threads)
    console = Console(width=120)
    text = load_text_tokenizer(TEXT_TOKENIZER)
    max_seq_len = max(args.prompts + args.discrete_prompts) + 128
    gen = torch.Generator().manual_seed(0)
    started, cpu_started = time.perf_counter(), os.times()

    model = build_model("continuous", text, max_seq_len, args.device)
    objective = build_objective("flow")
    slots = model.config.slots
    time_image(model, text, objective, random_prompts(text, 16, gen), ImageSampling(steps=2), True, 1)  # warm-up
    continuous = []
    for length in args.prompts:
        prompts = random_prompts(text, length, gen)
        for use_cache in (True, False):
            for steps in args.steps:
                run = time_image(model, text, objective, prompts, ImageSampling(steps=steps), use_cache, args.repeats)
                continuous.append({"prompt_tokens": length, "cache": use_cache, "steps": steps, **run})
                console.log(f"continuous prompt={length} cache={use_cache} steps={steps}: {run['seconds']:.3f} s")

    per_step = []
    for length in args.prompts:
        for use_cache in (True, False):
            rows = [r for r in continuous if r["prompt_tokens"] == length and r["cache"] == use_cache]
            per_step.append({"prompt_tokens": length, "cache": use_cache,
                             "seconds_per_step": slope([r["steps"] for r in rows], [r["seconds"] for r in rows]),
                             "positions_per_step": rows[0]["positions_per_denoise_step"]})
    lo, hi = min(args.prompts), max(args.prompts)

    def step_cost(length: int, use_cache: bool) -> float:
        return next(r["seconds_per_step"] for r in per_step if r["prompt_tokens"] == length and r["cache"] == use_cache)

    ratios = {f"cache_{hi}_vs_{lo}": step_cost(hi, True) / step_cost(lo, True),
              f"no_cache_{hi}_vs_{lo}": step_cost(hi, False) / step_cost(lo, False)}

    model = build_model("discrete", text, max_seq_len, args.device)
    discrete = []
    for length in args.discrete_prompts:
        prompts = random_prompts(text, length, gen)
        for use_cache in (True, False):
            run = time_image(model, text, None, prompts, ImageSampling(temperature=1.0), use_cache, args.repeats)
            discrete.append({"prompt_tokens": length, "cache": use_cache, "codes": model.config.slots, **run})
            console.log(f"discrete prompt={length} cache={use_cache}: {run['seconds']:.3f} s")

    parallel = []
    time_codes(model, text, 1, 4, 1, gen)  # warm-up
    for batch in args.parallel_batches:
        for steps in (0, 4, 8, 16):
            run = time_codes(model, text, batch, steps, args.repeats, gen)
            parallel.append({"batch": batch, "parallel_steps": steps, **run})
            console.log(f"discrete batch={batch} parallel_steps={steps}: {run['ms_per_image']:.1f} ms/image")

    cpu_done = os.times()
    total = time.perf_counter() - started
    result = {
        "machine": machine(args.device),
        "model": {"size": "tiny", "max_seq_len": max_seq_len, "continuous_slots": slots, "discrete_codes": 64,
                  "batch_size": 1, "branches": 2},
        "continuous": continuous, "per_step": per_step, "per_step_ratio": ratios, "discrete": discrete,
        "parallel": parallel,
        "total_seconds": total,
        "cpu_per_wall": ((cpu_done.user - cpu_started.user) + (cpu_done.system - cpu_started.system)) / total,
    }

    table = Table(title=f"continuous: seconds per image (tiny, batch 1, CFG 2 branches, {slots} slots)")
    table.add_column("prompt")
    table.add_column("cache")
    for steps in args.steps:
        table.add_column(f"{steps} steps", justify="right")
    table.add_column("s/step", justify="right")
    table.add_column("positions/step", justify="right")
    for row in per_step:
        times = [r["seconds"] for r in continuous
                 if r["prompt_tokens"] == row["prompt_tokens"] and r["cache"] == row["cache"]]
        table.add_row(str(row["prompt_tokens"]), "yes" if row["cache"] else "no", *(f"{t:.3f}" for t in times),
                      f"{row['seconds_per_step'] * 1e3:.1f} ms", str(row["positions_per_step"]))
    console.print(table)
    console.print("per-step cost ratio, longest vs shortest prompt: "
                  + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    table = Table(title="discrete: seconds per image (64 codes, batch 1, CFG 2 branches)")
    for name in ("prompt", "cache", "seconds", "forwards"):
        table.add_column(name, justify="right")
    for r in discrete:
        table.add_row(str(r["prompt_tokens"]), "yes" if r["cache"] else "no", f"{r['seconds']:.3f}",
                      str(r["forwards"]))
    console.print(table)
    table = Table(title="discrete: ms per image, autoregressive (64 forwards) or parallel decoding (16-token "
                        "prompt, CFG)")
    table.add_column("batch", justify="right")
    for steps in (0, 4, 8, 16):
        table.add_column("autoregressive" if steps == 0 else f"{steps} steps", justify="right")
    for batch in args.parallel_batches:
        rows = [r for r in parallel if r["batch"] == batch]
        table.add_row(str(batch), *(f"{r['ms_per_image']:.1f}" for r in rows))
    console.print(table)
    console.print(f"total {total:.0f} s, {result['cpu_per_wall']:.2f} CPU s per wall s, "
                  f"{torch.get_num_threads()} threads, {result['machine']['processor']}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
