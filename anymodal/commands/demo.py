"""`anymodal demo` (what `make demo` runs): the whole pipeline on the built-in shapes world.

1. trains the image tokenizers (VQ-VAE and VAE) and scores their reconstructions;
2. trains one unified model per image path (Chameleon-style discrete codes, Transfusion-style latents);
3. exports the bundles to OUT/chameleon and OUT/transfusion;
4. runs every task on both with the shapes-world checker;
5. writes OUT/report.html (samples next to prompts, the metric table) and OUT/overview.png.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from anymodal.generate.settings import ImageSampling
from anymodal.hardware import resolve_precision
from anymodal.train import run_lightning

console = Console()

HOLDOUT = ["purple triangle", "cyan circle"]


@dataclass
class DemoSettings:
    """Budget of each stage; the defaults fit about 20 minutes on a 2-core CPU."""

    out: str = "checkpoints/demo"
    vqvae_steps: int | None = None
    """Training steps of the VQ-VAE (None: its recipe's)."""
    vae_steps: int | None = None
    """Training steps of the VAE (None: its recipe's)."""
    vqvae_precision: str = "auto"
    """Lightning precision of the VQ-VAE's training; `auto`: bf16-mixed where this machine measures bfloat16
    convolutions faster (an AMX Xeon: 1.6x, same PSNR; not an AMD Zen 5) or on CUDA, else the recipe's 32-true
    (anymodal.hardware.resolve_precision)."""
    model_precision: str = "auto"
    """Lightning precision of both unified models; `auto`: bf16-mixed where this machine measures bfloat16
    matmuls faster (AMX or AVX512-BF16: 1.2-1.4x per step, benchmarks/levers.py), else the recipe's 32-true."""
    compile: bool = True
    """torch.compile the decoder of training steps (UnifiedSystem's `compile`: 1.07-1.18x, with bf16 1.4-1.55x)."""
    chameleon_steps: int | None = None
    """Training steps of the discrete-path model (None: its recipe's)."""
    transfusion_steps: int | None = None
    """Training steps of the continuous-path model (None: its recipe's)."""
    model_size: str | None = None
    """Named decoder size of both models (None: the recipes'; anymodal.config.SIZES)."""
    n: int = 100
    """Evaluation documents per task (held-out compositions add n/4)."""
    tokenizer_eval_images: int = 512
    """Images for the tokenizers' reconstruction metrics."""
    steps: int = ImageSampling.steps
    """Denoising steps when sampling the continuous path."""
    seed: int = 0
    """Seed of evaluation."""
    recipe_root: str | None = None
    """Folder holding recipes/ (None: the repository this package was installed from)."""


def _fit(args: list[str], final: Path | None = None) -> None:
    """`anymodal fit` in this process; with `final`, the trained state is saved there."""
    cli = run_lightning(["fit", *args])
    if final is not None:
        cli.trainer.save_checkpoint(final)


def _override(flag: str, value) -> list[str]:
    return [] if value is None else [f"--{flag}", str(value)]


def run_demo(s: DemoSettings) -> Path:
    from anymodal.benchmark import BenchSettings, run_shapes_bench
    from anymodal.checkpoint import export_checkpoint, load_bundle
    from anymodal.commands.generate import print_scores
    from anymodal.data.shapes import ShapesWorld
    from anymodal.evaluate.reconstruction import evaluate_image_tokenizer
    from anymodal.evaluate.report import write_overview, write_report
    from anymodal.generate.tasks import Pipeline
    from anymodal.tokenizers.image import load_image_tokenizer

    out = Path(s.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(s.recipe_root) if s.recipe_root else Path(__file__).resolve().parents[2]
    if not (root / "recipes").is_dir():
        raise FileNotFoundError(f"no recipes/ folder under {root}; run the demo from the repository "
                                "(make demo) or pass recipe_root")
    timings: dict[str, float] = {}
    tok_metrics: dict[str, dict] = {}
    grids: dict[str, Path] = {}

    def stage(name: str):
        console.rule(f"[bold]{name}")
        return time.perf_counter()

    tokenizer_stages = (
        ("shapes-vqvae", root / "recipes/tokenizers/vqvae-shapes.yaml", s.vqvae_steps,
         resolve_precision(s.vqvae_precision, "conv")),
        ("shapes-vae", root / "recipes/tokenizers/vae-shapes.yaml", s.vae_steps, None))
    for name, recipe, steps, precision in tokenizer_stages:
        t0 = stage(f"image tokenizer {name}" + (f" ({precision})" if precision else ""))
        run_dir, tok_dir = out / "runs" / name, out / "tokenizers" / name
        _fit(["--config", str(recipe), "--trainer.default_root_dir", str(run_dir),
              "--model.init_args.export_dir", str(tok_dir), *_override("trainer.max_steps", steps),
              *_override("trainer.precision", precision)])
        tok = load_image_tokenizer(tok_dir)
        tok_metrics[name] = evaluate_image_tokenizer(tok, ShapesWorld(size=32, seed=4242), n=s.tokenizer_eval_images)
        grid = sorted(run_dir.rglob("*.png"), key=lambda p: p.stat().st_mtime)
        grids[name] = grid[-1] if grid else None
        timings[f"train {name}"] = time.perf_counter() - t0
        console.print({k: round(v, 4) if isinstance(v, float) else v for k, v in tok_metrics[name].items()})

    results, typed = {}, {}
    model_precision = resolve_precision(s.model_precision)
    for name, recipe, tok, steps in (
            ("transfusion", root / "recipes/models/transfusion-shapes.yaml", "shapes-vae", s.transfusion_steps),
            ("chameleon", root / "recipes/models/chameleon-shapes.yaml", "shapes-vqvae", s.chameleon_steps)):
        t0 = stage(f"unified model: {name}" + (f" ({model_precision})" if model_precision else ""))
        run_dir = out / "runs" / name
        _fit(["--config", str(recipe), "--config", str(root / "recipes/strategy/cpu.yaml"),
              "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
              "--model.init_args.image_tokenizer", str(out / "tokenizers" / tok),
              "--model.init_args.text_tokenizer", str(root / "tokenizers/shapes-text"),
              *_override("trainer.max_steps", steps), *_override("model.init_args.size", s.model_size),
              *_override("trainer.precision", model_precision), "--model.init_args.compile", str(s.compile).lower()],
             final=run_dir / "final.ckpt")
        export_checkpoint(run_dir / "final.ckpt", out / name, {"holdout": HOLDOUT})
        timings[f"train {name}"] = time.perf_counter() - t0
        t0 = stage(f"evaluate {name}")
        bundle = load_bundle(out / name)
        settings = BenchSettings(n=s.n, seed=s.seed, sampling=ImageSampling(steps=s.steps))
        results[name] = run_shapes_bench(Pipeline(bundle), settings, HOLDOUT)
        print_scores(results[name], f"{name} ({bundle.image_path} path)")
        typed[name] = run_shapes_bench(Pipeline(bundle), BenchSettings(  # the first half of the same scenes
            n=max(1, s.n // 2), seed=s.seed, sampling=ImageSampling(steps=s.steps), story_n=20,
            tasks=("t2i", "edit", "vqa", "story"), typed=True), HOLDOUT, keep_samples=0)
        timings[f"evaluate {name}"] = time.perf_counter() - t0
        print_scores(typed[name], f"{name}, prompts as people type them")
        (out / f"{name}-scores.json").write_text(json.dumps(
            {"scores": results[name].scores, "settings": results[name].settings, "seconds": results[name].seconds,
             "typed_scores": typed[name].scores}, indent=2, default=float))

    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    report = write_report(out / "report.html", results, tok_metrics, grids, timings, machine, typed)
    write_overview(out / "overview.png", results)
    (out / "tokenizer-metrics.json").write_text(json.dumps(tok_metrics, indent=2, default=float))
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    console.rule("[bold]done")
    console.print(f"report: {report}  (total {sum(timings.values()):.0f} s)")
    return report
