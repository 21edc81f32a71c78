"""The `anymodal` command.

`anymodal fit|validate|test|predict --config recipe.yaml [--config strategy.yaml] ...` is LightningCLI:
the recipe selects a system (model) and a datamodule by class path. Every other command
(`eval`, `export`, `generate`, `demo`) is a small typed function with its own `--help`.
"""

from __future__ import annotations

import argparse
import os
import sys

from anymodal.app.settings import ServeSettings
from anymodal.commands.demo import DemoSettings, run_demo
from anymodal.commands.encode import add_encode_parser
from anymodal.commands.generate import (
    add_eval_shapes_parser,
    add_generate_parser,
    run_eval_shapes,
    run_generate,
)
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
  text-lm    train a small text LM on a source's text, saved as a Hugging Face folder (for init_from)
  encode     encode a source into shards of token ids and VQ codes or VAE latents (train without the image tokenizer)
  export     turn a training checkpoint into an inference bundle, or a bundle into a Hugging Face folder
  generate   sample: t2i, edit, caption, vqa, story (anymodal generate --help)
  demo       train and evaluate everything on built-in data (what `make demo` runs)
  serve      a web app over bundles: every task in the browser (anymodal serve --checkpoint BUNDLE)

Run `anymodal <command> --help` for the options of a command.
"""


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained tokenizer or bundle")
    which = p.add_subparsers(dest="what", required=True)
    t = which.add_parser("tokenizer", help="reconstruction metrics of an image tokenizer folder")
    t.add_argument("--tokenizer", required=True, help="a tokenizer folder, e.g. tokenizers/shapes-vqvae")
    t.add_argument("--source", default="shapes", choices=["shapes", "digits"], help="built-in data to score on")
    t.add_argument("--image-size", "--size", type=int, default=32, help="image side in pixels")
    t.add_argument("--n", type=int, default=512, help="number of images")
    t.add_argument("--seed", type=int, default=1234, help="seed of the evaluation data (differs from training)")
    t.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    add_eval_shapes_parser(which)


def cmd_eval(ns: argparse.Namespace) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    if ns.what == "shapes":
        run_eval_shapes(ns)
        return
    if ns.what == "tokenizer":
        from anymodal.evaluate.reconstruction import evaluate_image_tokenizer
        from anymodal.tokenizers.image import load_image_tokenizer

        tok = load_image_tokenizer(ns.tokenizer)
        source = build_source(ns.source, seed=ns.seed, image_size=ns.image_size)
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
    p.add_argument("--lowercase", action="store_true",
                   help="lower-case text before splitting it (for a lower-case corpus such as the shapes world's)")


def cmd_text_tokenizer(ns: argparse.Namespace) -> None:
    import itertools

    from anymodal.data.document import Text
    from anymodal.tokenizers.text import train_text_tokenizer

    source = build_source(ns.source, seed=ns.seed)
    texts = (s.text for d in itertools.islice(iter(source), ns.documents) for s in d.segments if isinstance(s, Text))
    tok = train_text_tokenizer(texts, vocab_size=ns.vocab_size, lowercase=ns.lowercase)
    tok.save(ns.out)
    print(f"wrote {ns.out}: {len(tok)} ids (specials {tok.special_ids})")


def build_source(name: str, seed: int = 0, image_size: int = 32):
    """A built-in source by name ('shapes', 'digits') or a JSONL manifest path."""
    if name == "shapes":
        from anymodal.data.shapes import ShapesWorld

        return ShapesWorld(size=image_size, seed=seed)
    if name == "digits":
        from anymodal.data.digits import DigitsSource

        return DigitsSource(size=image_size, seed=seed)
    if name.endswith(".jsonl"):
        from anymodal.data.jsonl import JsonlSource

        return JsonlSource(name, image_size=image_size)
    raise SystemExit(f"unknown source {name!r}: use shapes, digits, or a path to a .jsonl manifest")


def _text_lm_parser(sub: argparse._SubParsersAction) -> None:
    from anymodal.text_lm import TextLMSettings

    d = TextLMSettings(out="")
    p = sub.add_parser("text-lm", help="train a small text LM on a source's text; writes a Hugging Face folder")
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, the tokenizer)")
    p.add_argument("--source", default="shapes", help="shapes, digits, or a JSONL manifest path (its Text segments)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="text tokenizer folder")
    p.add_argument("--size", default=d.size, help="named decoder size (anymodal.config.SIZES)")
    p.add_argument("--tied-embeddings", action="store_true", help="share the embedding with the LM head")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per packed row")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and the source")


def cmd_text_lm(ns: argparse.Namespace) -> None:
    from anymodal.text_lm import TextLMSettings, train_text_lm

    settings = TextLMSettings(out=ns.out, tokenizer=ns.tokenizer, size=ns.size, tied_embeddings=ns.tied_embeddings,
                              steps=ns.steps, seq_len=ns.seq_len, batch_size=ns.batch_size, lr=ns.lr,
                              warmup_steps=min(TextLMSettings.warmup_steps, max(1, ns.steps // 10)), seed=ns.seed)
    out = train_text_lm(settings, build_source(ns.source, seed=ns.seed))
    print(f"wrote {out}: a {ns.size}-size Llama LM (load_text_model or init_from reads it)")


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="turn a training checkpoint into an inference bundle, or a bundle into a "
                                      "Hugging Face folder (--format hf)")
    p.add_argument("--checkpoint", required=True,
                   help="a Lightning .ckpt of the unified model, or the checkpoint folder of a ZeRO run (or, with "
                        "--format hf, a bundle folder)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--format", default="bundle", choices=["bundle", "hf"],
                   help="bundle: an anymodal bundle; hf: a discrete-path model as a Hugging Face causal-LM folder "
                        "(AutoModelForCausalLM/AutoTokenizer load it; `anymodal generate` still samples from it)")
    p.add_argument("--holdout", action="append", default=[],
                   help="a held-out 'color shape' pair of the training data (repeatable; used by `eval shapes`)")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    d = DemoSettings()
    p = sub.add_parser("demo", help="train and evaluate everything on the shapes world; writes OUT/report.html")
    p.add_argument("--out", default=d.out, help="where runs, bundles and the report go")
    p.add_argument("--minutes", type=float, default=d.minutes,
                   help=f"wall-clock budget of the whole demo (default {d.minutes:g}): each training stage ends by its "
                        "share of it, with as many steps as fit (at most its --*-steps) and its learning-rate "
                        "schedule shortened to match; 0: no budget, the steps as given")
    for flag, default in (("vqvae", "its recipe's"), ("vae", "its recipe's"),
                          ("chameleon", "as many as the budget allows; without one, its recipe's"),
                          ("transfusion", "as many as the budget allows; without one, its recipe's")):
        p.add_argument(f"--{flag}-steps", type=int, default=getattr(d, f"{flag}_steps"),
                       help=f"training steps of the {flag}, fewer where the budget ends first (default: {default})")
    p.add_argument("--lanes", action=argparse.BooleanOptionalAction, default=d.lanes,
                   help="train the two image paths side by side, each in a process with half the threads "
                        "(tokenizer, then model; logs in OUT/logs). Default: with two threads or more")
    for flag, name in (("vqvae", "VQ-VAE"), ("vae", "VAE")):
        p.add_argument(f"--{flag}-precision", default=getattr(d, f"{flag}_precision"),
                       help=f"precision of the {name}'s training: auto (bf16-mixed where bfloat16 convolutions "
                            "measure faster here, and on CUDA; else the recipe's 32-true), or any Lightning precision")
    p.add_argument("--model-precision", default=d.model_precision,
                   help="precision of both unified models: auto (bf16-mixed where bfloat16 matmuls measure faster "
                        "here, and on CUDA; else the recipe's 32-true), or any Lightning precision")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="train the unified models eagerly (default: torch.compile their decoder)")
    p.add_argument("--model-size", "--size", default=d.model_size,
                   help="named decoder size of both unified models (anymodal.config.SIZES; default: the recipes')")
    p.add_argument("--n", type=int, default=d.n, help="evaluation documents per task")
    p.add_argument("--tokenizer-eval-images", type=int, default=d.tokenizer_eval_images,
                   help="images for reconstruction metrics")
    p.add_argument("--steps", type=int, default=d.steps, help="denoising steps when sampling")


def cmd_demo(ns: argparse.Namespace) -> None:
    run_demo(DemoSettings(out=ns.out, vqvae_steps=ns.vqvae_steps, vae_steps=ns.vae_steps,
                          vqvae_precision=ns.vqvae_precision, vae_precision=ns.vae_precision,
                          model_precision=ns.model_precision, compile=ns.compile,
                          chameleon_steps=ns.chameleon_steps, transfusion_steps=ns.transfusion_steps,
                          model_size=ns.model_size, n=ns.n, tokenizer_eval_images=ns.tokenizer_eval_images,
                          steps=ns.steps, lanes=ns.lanes, minutes=ns.minutes or None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anymodal", description="Train and sample unified any-to-any generators.")
    sub = parser.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    _text_tokenizer_parser(sub)
    _text_lm_parser(sub)
    add_generate_parser(sub)
    _export_parser(sub)
    _demo_parser(sub)
    _serve_parser(sub)
    add_encode_parser(sub)
    return parser


def cmd_encode(ns: argparse.Namespace) -> None:
    from anymodal.commands.encode import run_encode

    run_encode(ns)


def cmd_export(ns: argparse.Namespace) -> None:
    from anymodal.checkpoint import export_checkpoint, export_hf

    if ns.format == "hf":
        out = export_hf(ns.checkpoint, ns.out, {"holdout": ns.holdout} if ns.holdout else None)
        print(f"wrote Hugging Face folder {out} (AutoModelForCausalLM, AutoTokenizer; VQ decoder in image_tokenizer/)")
        return
    out = export_checkpoint(ns.checkpoint, ns.out, {"holdout": ns.holdout})
    print(f"wrote bundle {out}")


def cmd_generate(ns: argparse.Namespace) -> None:
    run_generate(ns)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    d = ServeSettings()
    p = sub.add_parser("serve", help="a web app over one or several bundles (Gradio): every task in the browser")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="an inference bundle folder (repeatable: the page offers each in a dropdown)")
    p.add_argument("--host", default=d.host, help="address to bind (0.0.0.0 serves every network interface)")
    p.add_argument("--port", type=int, default=d.port, help="port (default: 7860 or the next free one)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests sampled at once; others queue")
    p.add_argument("--queue-size", type=int, default=d.queue_size, help="requests waiting at most")
    p.add_argument("--max-images", type=int, default=d.max_images, help="most images one request may ask for")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="most denoising steps a request may ask for")
    p.add_argument("--max-story-images", type=int, default=d.max_story_images, help="most images one story may have")


def cmd_serve(ns: argparse.Namespace) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from anymodal.app.web import launch, load_pipelines

    settings = ServeSettings(host=ns.host, port=ns.port, concurrency=ns.concurrency, queue_size=ns.queue_size,
                             max_images=ns.max_images, max_steps=ns.max_steps,
                             max_story_images=ns.max_story_images)
    launch(load_pipelines(ns.checkpoint, ns.device), settings)


COMMANDS = {"eval": cmd_eval, "text-tokenizer": cmd_text_tokenizer, "text-lm": cmd_text_lm, "generate": cmd_generate,
            "export": cmd_export, "demo": cmd_demo, "serve": cmd_serve, "encode": cmd_encode}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(OVERVIEW)
        return
    if argv[0] in LIGHTNING_COMMANDS:
        command, run = argv[0], lambda: run_lightning(argv)
    else:
        ns = build_parser().parse_args(argv)
        command, run = ns.command, lambda: COMMANDS[ns.command](ns)
    try:
        run()
    except (ValueError, OSError, KeyError) as e:
        # Bad input (and a full disk, a missing permission) gets one sentence, not a traceback (ANYMODAL_DEBUG=1
        # shows it).
        if os.environ.get("ANYMODAL_DEBUG"):
            raise
        print(f"anymodal {command}: error: {error_sentence(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def error_sentence(e: BaseException) -> str:
    """The message of `e` as one line: our own errors' text; an OS error with its file ("[Errno 28] No space
    left on device: 'x'"); a KeyError's key without quotes."""
    if isinstance(e, KeyError) and len(e.args) == 1:
        return str(e.args[0])
    if isinstance(e, OSError) or not (len(e.args) == 1 and isinstance(e.args[0], str)):
        return str(e)
    return e.args[0]

if __name__ == "__main__":
    main()
