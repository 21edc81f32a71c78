"""`anymodal encode`: its arguments and its handler (the logic is anymodal.encode)."""

from __future__ import annotations

import argparse


def add_encode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="encode a source into shards of token ids and VQ codes or VAE latents",
                       description="Encode a source into WebDataset shards of token ids and VQ codes or VAE "
                                   "latents (16-bit) with manifest.json; train on them with "
                                   "anymodal.data.shards.EncodedShards. A rerun skips finished shards.")
    p.add_argument("--source", required=True,
                   help="shapes, digits, a JSONL manifest (.jsonl), WebDataset shards ('data/shard-{000..009}.tar') "
                        "or a folder of images with captions.jsonl")
    p.add_argument("--text-tokenizer", required=True, help="the text tokenizer folder (the model's)")
    p.add_argument("--image-tokenizer", required=True, help="the image tokenizer folder: a VQ-VAE writes codes, a VAE latents")
    p.add_argument("--image-size", type=int, required=True, help="image side in pixels (the model's image_size)")
    p.add_argument("--out", required=True, help="the folder to write shards and manifest.json into")
    p.add_argument("--documents", type=int, default=None,
                   help="documents to encode (required for shapes and digits; files: at most this many)")
    p.add_argument("--shard-size", type=int, default=1000, help="documents per shard (WebDataset input keeps its shards)")
    p.add_argument("--processes", type=int, default=1, help="processes encoding shards in parallel")
    p.add_argument("--batch-size", type=int, default=64, help="images per image-tokenizer call")
    p.add_argument("--seed", type=int, default=0, help="seed of a generated source and of image-caption tasks")
    p.add_argument("--tasks", default=None,
                   help="task ratios, e.g. t2i=0.35,caption=0.15,vqa=0.15,edit=0.2,story=0.1,text=0.05 (shapes) "
                        "or t2i=1,caption=1 (image-caption pairs)")
    p.add_argument("--holdout", action="append", default=[],
                   help="shapes world: a 'color shape' pair never shown (repeatable)")
    p.add_argument("--device", default="cpu", help="where the image tokenizer runs: cpu, cuda, ...")


def parse_tasks(text: str | None) -> dict[str, float] | None:
    """'t2i=0.35,caption=0.15' -> {'t2i': 0.35, 'caption': 0.15}."""
    if text is None:
        return None
    tasks = {}
    for item in text.split(","):
        name, sep, ratio = item.partition("=")
        try:
            tasks[name.strip()] = float(ratio)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--tasks {text!r}: write name=ratio pairs separated by commas, e.g. t2i=1,caption=1")
    return tasks


def run_encode(ns: argparse.Namespace) -> None:
    from anymodal.encode import EncodeSettings, encode

    settings = EncodeSettings(source=ns.source, out=ns.out, text_tokenizer=ns.text_tokenizer,
                              image_tokenizer=ns.image_tokenizer, image_size=ns.image_size, documents=ns.documents,
                              shard_size=ns.shard_size, processes=ns.processes, batch_size=ns.batch_size,
                              seed=ns.seed, tasks=parse_tasks(ns.tasks), holdout=ns.holdout, device=ns.device)
    result = encode(settings)
    m = result.manifest
    print(f"{ns.out}: {m.documents} documents in {len(m.shards)} shards of {m.images} "
          f"({result.documents} documents, {result.images} images encoded now in {result.seconds:.1f} s: "
          f"{result.images_per_second:.1f} images/s)")
