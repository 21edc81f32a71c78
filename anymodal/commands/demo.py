"""`anymodal demo` (what `make demo` runs): the whole pipeline on the built-in shapes world.

1. trains the image tokenizers (VQ-VAE and VAE) and scores their reconstructions;
2. trains one unified model per image path (Chameleon-style discrete codes, Transfusion-style latents);
3. exports the bundles to OUT/chameleon and OUT/transfusion;
4. runs every task on both with the shapes-world checker;
5. writes OUT/report.html (samples next to prompts, the metric table) and OUT/overview.png.

With two threads or more, steps 1-4 run in two lanes side by side (anymodal.commands.lanes), each a process with
half the threads: VAE, transfusion, its evaluation; VQ-VAE, chameleon, its evaluation. Logs go to OUT/logs/.

The demo keeps to a wall-clock budget (20 minutes by default) on any machine: each training stage ends by its
deadline (`plan_deadlines`), with as many steps as fit and its learning-rate schedule shortened to match
(anymodal.systems.callbacks.TimeBudget). A slower machine trains fewer steps, and the report says how many.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from anymodal.commands.lanes import Stage, lane_threads, run_lanes
from anymodal.generate.settings import ImageSampling
from anymodal.hardware import resolve_precision
from anymodal.train import run_lightning

console = Console()

HOLDOUT = ["purple triangle", "cyan circle"]

BUDGET_MAX_STEPS = 20_000
"""Steps of a model trained under a budget with no --*-steps given: a bound that the budget always cuts first."""
TOKENIZER_WEIGHT, MODEL_WEIGHT = 2.0, 3.0
"""Shares of a lane's training time (Stage.weight): up to 40% for its tokenizer, the rest (and what the tokenizer
left) for its model. A tokenizer caps its model's images: on an AVX2 machine whose 20 minutes hold 300 VQ-VAE
steps at a 20% share, its reconstructions read 0.125 exact against 0.998 after the recipe's 800. On the 2-core
Zen 5 of the README's run the tokenizers end at their recipes' steps well before (138-157 s of about 1,130)."""
EVAL_RESERVE_S = 70.0
"""Seconds kept for each evaluation stage after its lane's training (measured: 32-59 s at n=100 on 1 thread)."""
REPORT_RESERVE_S = 20.0
"""Seconds kept for the report, the overview and the start of the lanes' processes."""


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
    vae_precision: str = "auto"
    """Lightning precision of the VAE's training; `auto` as for the VQ-VAE (bf16-mixed where bfloat16 convolutions
    measure faster; on an AVX512-BF16 EPYC at 1 thread, 1,200 steps in 152 s against 212 s in fp32, PSNR 34.1 dB
    against 32.4, every reconstruction exact both ways)."""
    model_precision: str = "auto"
    """Lightning precision of both unified models; `auto`: bf16-mixed where this machine measures bfloat16
    matmuls faster (AMX or AVX512-BF16: 1.2-1.4x per step, benchmarks/levers.py), else the recipe's 32-true."""
    compile: bool = True
    """torch.compile the decoder of training steps, and the VQ-VAE's encode of their images (UnifiedSystem's
    `compile`: 1.07-1.18x, with bf16 1.4-1.55x; the encode 1.12x more on chameleon's step)."""
    minutes: float | None = 20.0
    """Wall-clock budget of the whole demo: every training stage ends by its share of it (`plan_deadlines`), with as
    many steps as fit (at most its --*-steps) and its learning-rate schedule shortened to match. None: every
    stage trains the steps given (or its recipe's), however long that takes."""
    chameleon_steps: int | None = None
    """Training steps of the discrete-path model (None: as many as the budget allows; without a budget, its
    recipe's 2,600). On the 2-core Zen 5 of the README's run the 20 minutes hold about 3,000."""
    transfusion_steps: int | None = None
    """Training steps of the continuous-path model (None: as many as the budget allows; without a budget, its
    recipe's 2,600)."""
    lanes: bool | None = None
    """Train the two image paths side by side, each in a process with half the threads (None: where this process
    has two threads or more). On 2 cores each model then makes 1.06-1.11x the steps per second."""
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


def _fit(args: list[str], final: Path | None = None, status: str | None = None, label: str = "fit",
         deadline: float | None = None) -> int:
    """`anymodal fit` in this process; with `final`, the trained state is saved there; with `status`, the steps
    are written to that file (a lane's progress bar); with `deadline` (a time.time() value), training ends by
    then (TimeBudget). Returns the steps trained."""
    from anymodal.systems.callbacks import ProgressFile, TimeBudget

    callbacks = [ProgressFile(status, label)] if status else []
    if deadline is not None:
        callbacks.append(TimeBudget(deadline=deadline))
    cli = run_lightning(["fit", *args], callbacks=callbacks)
    if final is not None:
        cli.trainer.save_checkpoint(final)
    return cli.trainer.global_step


def _override(flag: str, value) -> list[str]:
    return [] if value is None else [f"--{flag}", str(value)]


def recipe_image_size(recipe: Path) -> int:
    """The image size a tokenizer recipe trains at (its data source's `size`)."""
    import yaml

    return int(yaml.safe_load(recipe.read_text())["data"]["init_args"]["source"]["init_args"]["size"])


def train_tokenizer(name: str, recipe: Path, out: Path, steps: int | None, precision: str | None,
                    eval_images: int, status: str | None = None, deadline: float | None = None) -> dict:
    """Train the image tokenizer `name` into OUT/tokenizers/NAME (by `deadline`, when given) and write its
    reconstruction metrics to OUT/runs/NAME/tokenizer-metrics.json; return {"steps": steps trained}."""
    from anymodal.data.shapes import ShapesWorld
    from anymodal.evaluate.reconstruction import evaluate_image_tokenizer
    from anymodal.systems.callbacks import write_progress
    from anymodal.tokenizers.image import load_image_tokenizer

    run_dir, tok_dir = out / "runs" / name, out / "tokenizers" / name
    trained = _fit(["--config", str(recipe), "--trainer.default_root_dir", str(run_dir),
                    "--model.init_args.export_dir", str(tok_dir), *_override("trainer.max_steps", steps),
                    *_override("trainer.precision", precision)], status=status, label=f"train {name}",
                   deadline=deadline)
    if status:
        write_progress(status, f"score {name}")
    world = ShapesWorld(size=recipe_image_size(recipe), seed=4242)  # the images the recipe trains on
    metrics = evaluate_image_tokenizer(load_image_tokenizer(tok_dir), world, n=eval_images)
    (run_dir / "tokenizer-metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return {"steps": trained}


def train_model(name: str, recipe: Path, tokenizer: str, out: Path, root: Path, steps: int | None,
                size: str | None, precision: str | None, compile: bool, status: str | None = None,
                deadline: float | None = None) -> dict:
    """Train the unified model `name` on OUT/tokenizers/TOKENIZER (by `deadline`, when given: at most `steps`, or
    BUDGET_MAX_STEPS) and export its bundle to OUT/NAME; return {"steps": steps trained}."""
    from anymodal.checkpoint import export_checkpoint
    from anymodal.systems.callbacks import write_progress

    run_dir = out / "runs" / name
    if deadline is not None and steps is None:
        steps = BUDGET_MAX_STEPS
    args = ["--config", str(recipe), "--config", str(root / "recipes/strategy/cpu.yaml"),
            "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
            "--model.init_args.image_tokenizer", str(out / "tokenizers" / tokenizer),
            "--model.init_args.text_tokenizer", str(root / "tokenizers/shapes-text"),
            *_override("trainer.max_steps", steps), *_override("model.init_args.size", size),
            *_override("trainer.precision", precision), "--model.init_args.compile", str(compile).lower()]
    trained = _fit(args, final=run_dir / "final.ckpt", status=status, label=f"train {name}", deadline=deadline)
    if status:
        write_progress(status, f"export {name}")
    export_checkpoint(run_dir / "final.ckpt", out / name, {"holdout": HOLDOUT})
    return {"steps": trained}


def evaluate_model(name: str, out: Path, n: int, seed: int, steps: int, status: str | None = None) -> tuple:
    """Score the bundle OUT/NAME on every task, and again with prompts as people type them; write
    OUT/NAME-scores.json and return both BenchResults."""
    from anymodal.benchmark import BenchSettings, run_shapes_bench
    from anymodal.checkpoint import load_bundle
    from anymodal.commands.generate import print_scores
    from anymodal.generate.tasks import Pipeline
    from anymodal.systems.callbacks import write_progress

    def progress(part: str):
        if status:
            return lambda task, done, total: write_progress(status, f"evaluate {name}{part}: {task}", done, total)

    bundle = load_bundle(out / name)
    pipeline = Pipeline(bundle)
    result = run_shapes_bench(pipeline, BenchSettings(n=n, seed=seed, sampling=ImageSampling(steps=steps)),
                              HOLDOUT, progress=progress(""))
    print_scores(result, f"{name} ({bundle.image_path} path)")
    typed = run_shapes_bench(pipeline, BenchSettings(  # the first half of the same scenes
        n=max(1, n // 2), seed=seed, sampling=ImageSampling(steps=steps), story_n=20,
        tasks=("t2i", "edit", "vqa", "story"), typed=True), HOLDOUT, keep_samples=0, progress=progress(", typed"))
    print_scores(typed, f"{name}, prompts as people type them")
    (out / f"{name}-scores.json").write_text(json.dumps(
        {"scores": result.scores, "settings": result.settings, "seconds": result.seconds,
         "typed_scores": typed.scores}, indent=2, default=float))
    return result, typed


def _stage_label(name: str, value, *parts: str) -> str:
    """A stage's key in the timings: its name, then `parts` and, for a training stage, the steps it trained."""
    if isinstance(value, dict) and "steps" in value:
        parts = (*parts, f"{value['steps']:,} steps")
    return f"{name} ({', '.join(parts)})" if parts else name


def plan_deadlines(stages: list[Stage], start: float, seconds: float) -> None:
    """Give each training stage of one lane (stages run in order; those of `weight` > 0) a `deadline` kwarg: the
    lane's time, less every stage's `reserve_s` and REPORT_RESERVE_S, shared out by weight in order. A stage
    that ends early leaves its time to the next."""
    weights = [stage.weight for stage in stages]
    training = seconds - REPORT_RESERVE_S - sum(stage.reserve_s for stage in stages)
    if training <= 0:
        raise ValueError(f"a budget of {seconds / 60:g} minutes leaves no time to train: the evaluations and the "
                         f"report keep {(seconds - training) / 60:.1f}; give --minutes more")
    done = 0.0
    for stage, weight in zip(stages, weights):
        if weight:
            done += weight
            stage.kwargs["deadline"] = start + training * done / sum(weights)


def run_demo(s: DemoSettings) -> Path:
    from anymodal.evaluate.report import write_overview, write_report

    start, start_wall = time.perf_counter(), time.time()
    out = Path(s.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(s.recipe_root) if s.recipe_root else Path(__file__).resolve().parents[2]
    if not (root / "recipes").is_dir():
        raise FileNotFoundError(f"no recipes/ folder under {root}; run the demo from the repository "
                                "(make demo) or pass recipe_root")
    threads = torch.get_num_threads()
    lanes = threads >= 2 if s.lanes is None else s.lanes
    model_precision = resolve_precision(s.model_precision)
    vqvae_precision = resolve_precision(s.vqvae_precision, "conv")
    vae_precision = resolve_precision(s.vae_precision, "conv")
    tokenizers = {name: Stage(f"train {name}", train_tokenizer, dict(
        name=name, recipe=root / "recipes/tokenizers" / recipe, out=out, steps=steps, precision=precision,
        eval_images=s.tokenizer_eval_images), weight=TOKENIZER_WEIGHT) for name, recipe, steps, precision in (
            ("shapes-vqvae", "vqvae-shapes.yaml", s.vqvae_steps, vqvae_precision),
            ("shapes-vae", "vae-shapes.yaml", s.vae_steps, vae_precision))}
    models = {name: Stage(f"train {name}", train_model, dict(
        name=name, recipe=root / "recipes/models" / recipe, tokenizer=tok, out=out, root=root, steps=steps,
        size=s.model_size, precision=model_precision, compile=s.compile), weight=MODEL_WEIGHT)
        for name, recipe, tok, steps in (
            ("transfusion", "transfusion-shapes.yaml", "shapes-vae", s.transfusion_steps),
            ("chameleon", "chameleon-shapes.yaml", "shapes-vqvae", s.chameleon_steps))}
    evaluations = {name: Stage(f"evaluate {name}", evaluate_model, dict(name=name, out=out, n=s.n, seed=s.seed,
                                                                       steps=s.steps), reserve_s=EVAL_RESERVE_S)
                   for name in models}
    lane_list = {"continuous": [tokenizers["shapes-vae"], models["transfusion"], evaluations["transfusion"]],
                 "discrete": [tokenizers["shapes-vqvae"], models["chameleon"], evaluations["chameleon"]]}
    in_order = [*tokenizers.values(), *models.values(), *evaluations.values()]  # without lanes
    if s.minutes is not None:
        for stages in lane_list.values() if lanes else [in_order]:
            plan_deadlines(stages, start_wall, 60 * s.minutes)
    timings: dict[str, float] = {}
    if lanes:
        per_lane = lane_threads(len(lane_list), threads)
        each = f"{per_lane} thread{'s' * (per_lane > 1)}"
        console.rule(f"[bold]two lanes side by side, {each} each (models in "
                     f"{model_precision or 'the recipes precision'}; logs in {out / 'logs'})")
        done = run_lanes(lane_list, out / "logs", threads=per_lane)
        evaluated = done.values
        timings.update((_stage_label(stage, evaluated.get(stage), "lane", each), v)
                       for stage, v in done.seconds.items())
    else:
        evaluated = {}
        for stage in in_order:
            console.rule(f"[bold]{stage.name}")
            t0 = time.perf_counter()
            value = stage.fn(**stage.kwargs)
            timings[_stage_label(stage.name, value)] = time.perf_counter() - t0
            if value is not None:
                evaluated[stage.name] = value
    tok_metrics = {name: json.loads((out / "runs" / name / "tokenizer-metrics.json").read_text())
                   for name in tokenizers}
    grids = {}
    for name in tokenizers:
        found = sorted((out / "runs" / name).rglob("*.png"), key=lambda p: p.stat().st_mtime)
        grids[name] = found[-1] if found else None
        console.print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in tok_metrics[name].items()})

    results = {name: evaluated[f"evaluate {name}"][0] for name in models}
    typed = {name: evaluated[f"evaluate {name}"][1] for name in models}
    machine = (f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}")
    timings["total (wall clock)"] = time.perf_counter() - start
    report = write_report(out / "report.html", results, tok_metrics, grids, timings, machine, typed)
    write_overview(out / "overview.png", results)
    (out / "tokenizer-metrics.json").write_text(json.dumps(tok_metrics, indent=2, default=float))
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    console.rule("[bold]done")
    console.print(f"report: {report}  (total {timings['total (wall clock)']:.0f} s)")
    return report
