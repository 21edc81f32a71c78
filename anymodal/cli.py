"""The `anymodal` command.

`anymodal fit|validate|test|predict --config recipe.yaml [--config strategy.yaml] ...` is LightningCLI:
the recipe selects a system (model) and a datamodule by class path. Every other command
(`eval`, `export`, `generate`, `demo`) is a small typed function with its own `--help`.
"""

from __future__ import annotations

import argparse
import os
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

OVERVIEW = """usage: anymodal <command> [options]

Train and sample unified any-to-any generators.

training (LightningCLI; compose recipes with a repeated --config):
  fit        train a system:      anymodal fit --config recipes/tokenizers/vqvae-shapes.yaml
  validate   run validation once
  test       run the test loop
  predict    run the predict loop

other commands:
  eval       evaluate a trained tokenizer or bundle (anymodal eval --help)
  export     turn a training checkpoint into an inference bundle
  generate   sample: t2i, edit, caption, vqa, story (anymodal generate --help)
  demo       train and evaluate everything on built-in data (what `make demo` runs)

Run `anymodal <command> --help` for the options of a command.
"""


def run_lightning(args: list[str]) -> None:
    """Run LightningCLI on `args` (the subcommand first). Recipes choose classes by class_path."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


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


def cmd_eval(ns: argparse.Namespace) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    if ns.what == "tokenizer":
        from anymodal.data.digits import DigitsSource
        from anymodal.data.shapes import ShapesWorld
        from anymodal.evaluate.reconstruction import evaluate_image_tokenizer
        from anymodal.tokenizers.image import load_image_tokenizer

        tok = load_image_tokenizer(ns.tokenizer)
        source = (ShapesWorld(size=ns.size, seed=ns.seed) if ns.source == "shapes"
                  else DigitsSource(size=ns.size, seed=ns.seed))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anymodal", description="Train and sample unified any-to-any generators.")
    sub = parser.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    return parser


COMMANDS = {"eval": cmd_eval}


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
    COMMANDS[ns.command](ns)


if __name__ == "__main__":
    main()
