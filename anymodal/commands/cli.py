"""The `anymodal` command.

`anymodal fit|validate|test|predict --config recipe.yaml [--config strategy.yaml] ...` is LightningCLI:
the recipe selects a system (model) and a datamodule by class path. Every other command
(`eval`, `export`, `generate`, `demo`) is a small typed function with its own `--help`.
"""

from __future__ import annotations

import argparse
import os
import sys

from anymodal.train import LIGHTNING_COMMANDS, run_lightning

OVERVIEW = """usage: anymodal <command> [options]

Train and sample unified any-to-any generators.

training (LightningCLI; compose recipes with a repeated --config):
  fit        train a system:      anymodal fit --config recipes/tokenizers/vqvae-shapes.yaml
  validate   run validation once
  test       run the test loop
  predict    run the predict loop

other commands:
  eval       evaluate a trained tokenizer or bundle (anymodal eval --help)
  text-tokenizer  train a byte-level BPE on a source's text
  export     turn a training checkpoint into an inference bundle
  generate   sample: t2i, edit, caption, vqa, story (anymodal generate --help)
  demo       train and evaluate everything on built-in data (what `make demo` runs)

Run `anymodal <command> --help` for the options of a command.
"""


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained tokenizer or bundle")
    which = p.add_subparsers(dest="what", required=True)
    t = which.add_parser("tokenizer", help="reconstruction metrics of an image tokenizer folder")
    t.add_argument("--tokenizer", required=True, help="a tokenizer folder, e.g. tokenizers/shapes-vqvae")
    t.add_argument("--source", default="shapes", choices=["shapes", "digits"], help="built-in data to score on")
    t.add_argument("--size", type=int, default=32, help="image side in pixels")
    t.add_argument("--n", type=int, default=512, help="number of images")
    t.add_argument("--seed", type=int, default=1234, help="seed of the evaluation data (differs from training)")
    t.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    _eval_shapes_parser(which)


def cmd_eval(ns: argparse.Namespace) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    if ns.what == "shapes":
        from anymodal.commands.generate import run_eval_shapes

        run_eval_shapes(ns)
        return
    if ns.what == "tokenizer":
        from anymodal.evaluate.reconstruction import evaluate_image_tokenizer
        from anymodal.tokenizers.image import load_image_tokenizer

        tok = load_image_tokenizer(ns.tokenizer)
        source = build_source(ns.source, seed=ns.seed, size=ns.size)
        metrics = evaluate_image_tokenizer(tok, source, n=ns.n)
        table = Table(title=f"{ns.tokenizer} on {ns.source} (n={ns.n}, seed={ns.seed})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in metrics.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        Console().print(table)
        if ns.json:
            with open(ns.json, "w") as f:
                json.dump(metrics, f, indent=2)


def _text_tokenizer_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("text-tokenizer", help="train a byte-level BPE text tokenizer on a source's text")
    p.add_argument("--source", default="shapes",
                   help="shapes, digits, or a JSONL manifest path (its Text segments are used)")
    p.add_argument("--out", required=True, help="folder to write (a Hugging Face tokenizer folder)")
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size, specials included")
    p.add_argument("--documents", type=int, default=20000, help="number of documents to read")
    p.add_argument("--seed", type=int, default=0, help="seed of the source")


def cmd_text_tokenizer(ns: argparse.Namespace) -> None:
    import itertools

    from anymodal.data.document import Text
    from anymodal.tokenizers.text import train_text_tokenizer

    source = build_source(ns.source, seed=ns.seed)
    texts = (s.text for d in itertools.islice(iter(source), ns.documents) for s in d.segments if isinstance(s, Text))
    tok = train_text_tokenizer(texts, vocab_size=ns.vocab_size)
    tok.save(ns.out)
    print(f"wrote {ns.out}: {len(tok)} ids (specials {tok.special_ids})")


def build_source(name: str, seed: int = 0, size: int = 32):
    """A built-in source by name ('shapes', 'digits') or a JSONL manifest path."""
    if name == "shapes":
        from anymodal.data.shapes import ShapesWorld

        return ShapesWorld(size=size, seed=seed)
    if name == "digits":
        from anymodal.data.digits import DigitsSource

        return DigitsSource(size=size, seed=seed)
    if name.endswith(".jsonl"):
        from anymodal.data.jsonl import JsonlSource

        return JsonlSource(name, image_size=size)
    raise SystemExit(f"unknown source {name!r}: use shapes, digits, or a path to a .jsonl manifest")


def _bundle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="an inference bundle folder (written by `anymodal export`)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (image i uses seed + i)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow; a check)")


def _image_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=25, help="denoising steps (continuous path)")
    p.add_argument("--cfg", type=float, default=3.0, help="text guidance scale (1 = off)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="apply guidance only on this fraction of the trajectory")
    p.add_argument("--temperature", type=float, default=0.3, help="code sampling temperature (discrete path)")
    p.add_argument("--top-k", type=int, default=0, help="code sampling top-k (discrete path; 0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch")


def _text_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="text temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="text top-k (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="text nucleus top-p (1 = all)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest answer")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample from a bundle: t2i, edit, caption, vqa, story")
    which = p.add_subparsers(dest="task", required=True)
    t = which.add_parser("t2i", help="text to image")
    _bundle_arg(t)
    t.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    t.add_argument("--prompts", default=None, help="a file with one prompt per line")
    t.add_argument("--out", required=True, help="output folder: 0000.png, ... and index.jsonl")
    t.add_argument("--num-images", type=int, default=1, help="images per prompt")
    _image_sampling_args(t)
    e = which.add_parser("edit", help="edit an image by an instruction")
    _bundle_arg(e)
    e.add_argument("--image", default=None, help="the image to edit")
    e.add_argument("--instruction", default=None, help="what to change")
    e.add_argument("--edits", default=None, help="JSONL of {\"image\": path, \"instruction\": text} lines")
    e.add_argument("--out", required=True, help="output folder: 0000.png, ... and index.jsonl")
    e.add_argument("--cfg-image", type=float, default=1.5, help="source-image guidance scale (1 = off)")
    _image_sampling_args(e)
    c = which.add_parser("caption", help="caption images")
    _bundle_arg(c)
    c.add_argument("--image", action="append", required=True, help="an image (repeatable)")
    _text_sampling_args(c)
    q = which.add_parser("vqa", help="answer a question about an image")
    _bundle_arg(q)
    q.add_argument("--image", required=True, help="the image")
    q.add_argument("--question", action="append", required=True, help="a question (repeatable)")
    _text_sampling_args(q)
    s = which.add_parser("story", help="interleaved text and images from a prompt")
    _bundle_arg(s)
    s.add_argument("--prompt", required=True, help="how the story starts")
    s.add_argument("--out", required=True, help="output folder: story.html, story.md and images")
    s.add_argument("--max-images", type=int, default=4, help="most images in the story")
    s.add_argument("--text-temperature", type=float, default=0.0, help="temperature of the story's text")
    _image_sampling_args(s)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="turn a training checkpoint into an inference bundle")
    p.add_argument("--checkpoint", required=True, help="a Lightning .ckpt of the unified model")
    p.add_argument("--out", required=True, help="the bundle folder to write")
    p.add_argument("--holdout", action="append", default=[],
                   help="a held-out 'color shape' pair of the training data (repeatable; used by `eval shapes`)")


def _eval_shapes_parser(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("shapes", help="score a bundle on every shapes-world task")
    p.add_argument("--checkpoint", required=True, help="an inference bundle folder")
    p.add_argument("--n", type=int, default=200, help="documents per task (held-out compositions add n/4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation scenes and of sampling")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--tasks", nargs="+", default=None, help="subset of t2i caption vqa edit story")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (continuous path)")
    p.add_argument("--cfg", type=float, default=3.0, help="text guidance scale")
    p.add_argument("--cfg-image", type=float, default=1.5, help="source-image guidance scale (edits)")
    p.add_argument("--temperature", type=float, default=0.3, help="code temperature (discrete path)")
    p.add_argument("--top-k", type=int, default=0, help="code top-k (discrete path)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train and evaluate everything on the shapes world; writes OUT/report.html")
    p.add_argument("--out", default="checkpoints/demo", help="where runs, bundles and the report go")
    for flag in ("vqvae", "vae", "chameleon", "transfusion"):
        p.add_argument(f"--{flag}-steps", type=int, default=None, help=f"training steps of the {flag} (default: recipe)")
    p.add_argument("--vqvae-precision", default="auto",
                   help="precision of the VQ-VAE's training: auto (bf16-mixed on AMX CPUs and CUDA, else the "
                        "recipe's 32-true), or any Lightning precision")
    p.add_argument("--size", default=None, help="decoder size of both unified models (default: recipes')")
    p.add_argument("--n", type=int, default=100, help="evaluation documents per task")
    p.add_argument("--tokenizer-eval-images", type=int, default=512, help="images for reconstruction metrics")
    p.add_argument("--steps", type=int, default=25, help="denoising steps when sampling")


def cmd_demo(ns: argparse.Namespace) -> None:
    from anymodal.commands.demo import DemoSettings, run_demo

    run_demo(DemoSettings(out=ns.out, vqvae_steps=ns.vqvae_steps, vae_steps=ns.vae_steps,
                          vqvae_precision=ns.vqvae_precision,
                          chameleon_steps=ns.chameleon_steps, transfusion_steps=ns.transfusion_steps, size=ns.size,
                          n=ns.n, tokenizer_eval_images=ns.tokenizer_eval_images, steps=ns.steps))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anymodal", description="Train and sample unified any-to-any generators.")
    sub = parser.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    _text_tokenizer_parser(sub)
    _generate_parser(sub)
    _export_parser(sub)
    _demo_parser(sub)
    return parser


def cmd_export(ns: argparse.Namespace) -> None:
    from anymodal.checkpoint import export_checkpoint

    out = export_checkpoint(ns.checkpoint, ns.out, {"holdout": ns.holdout})
    print(f"wrote bundle {out}")


def cmd_generate(ns: argparse.Namespace) -> None:
    from anymodal.commands.generate import run_generate

    run_generate(ns)


COMMANDS = {"eval": cmd_eval, "text-tokenizer": cmd_text_tokenizer, "generate": cmd_generate,
            "export": cmd_export, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(OVERVIEW)
        return
    if argv[0] in LIGHTNING_COMMANDS:
        run_lightning(argv)
        return
    ns = build_parser().parse_args(argv)
    try:
        COMMANDS[ns.command](ns)
    except (ValueError, FileNotFoundError, KeyError) as e:
        # Bad input gets one sentence, not a traceback (ANYMODAL_DEBUG=1 shows it).
        if os.environ.get("ANYMODAL_DEBUG"):
            raise
        msg = e.args[0] if e.args else str(e)
        print(f"anymodal {ns.command}: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
