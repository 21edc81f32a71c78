"""`anymodal encode`: a source's documents -> WebDataset shards of token ids and VQ codes or VAE latents.

Training on the shards (anymodal.data.shards.EncodedShards) runs no image tokenizer, and resumes a run
by seeking. The source is split into `shards` parts with the sources' own sharding (`documents(j, shards)`),
one output shard per part, so any process can make any shard and a rerun makes only those missing:

- shapes / digits (generated): `documents` of them, `shard_size` per shard;
- a JSONL manifest, or a folder of images with captions.jsonl: every line (at most `documents`),
  `shard_size` per shard (line n goes to shard (n - 1) % shards);
- WebDataset shards: one output shard per input shard (at most `documents` in all).

Each shard is written under a temporary name, renamed when complete and then listed in manifest.json
(anymodal.data.shards), which also names the tokenizers (path and fingerprint), the image size and the
plan; a rerun with other settings into the same folder is refused. With `processes` > 1 shards are
encoded in parallel by spawned processes, each loading the tokenizers once.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path

import torch

from anymodal.data.document import Document, Image
from anymodal.data.shards import (
    Manifest,
    ShardRecord,
    read_manifest,
    sample_from_document,
    shard_name,
)
from anymodal.data.sources import Source, shard_count
from anymodal.tokenizers.fingerprint import image_tokenizer_fingerprint, text_tokenizer_fingerprint
from anymodal.tokenizers.image import load_image_tokenizer, read_image_tokenizer_spec
from anymodal.tokenizers.text import load_text_tokenizer

GENERATED = ("shapes", "digits")


@dataclass
class EncodeSettings:
    """What `anymodal encode` encodes, with what, and where."""

    source: str
    """shapes, digits, a JSONL manifest (*.jsonl), WebDataset shards (a .tar path or brace pattern), or a
    folder of images with a captions.jsonl."""
    out: str
    """The folder to write the shards and manifest.json into."""
    text_tokenizer: str
    """The text tokenizer folder (the model's)."""
    image_tokenizer: str
    """The image tokenizer folder: a VQ-VAE writes codes, a VAE latents."""
    image_size: int = 32
    """Side in pixels every image is loaded (center-cropped) or drawn at."""
    documents: int | None = None
    """Documents to encode: required for shapes and digits; for files at most this many (None: all)."""
    shard_size: int = 1000
    """Documents per shard (WebDataset input keeps its own shards)."""
    processes: int = 1
    """Processes encoding shards in parallel."""
    batch_size: int = 64
    """Images per image-tokenizer call."""
    seed: int = 0
    """Seed of a generated source (and of the task drawn for each image-caption pair)."""
    tasks: dict[str, float] | None = None
    """Task ratios of the source (shapes: over all tasks; pairs: over t2i and caption); None: its default."""
    holdout: list[str] = field(default_factory=list)
    """Shapes world: (color, shape) pairs such as "purple triangle" never shown."""
    device: str = "cpu"
    """Where the image tokenizer runs."""

    def __post_init__(self) -> None:
        for name in ("image_size", "shard_size", "processes", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.documents is not None and self.documents < 1:
            raise ValueError(f"documents={self.documents} must be >= 1")


@dataclass(frozen=True)
class ShardJob:
    """Output shard `index` of `shards`: part `index` of the source, at most `limit` documents."""

    index: int
    shards: int
    limit: int | None
    settings: EncodeSettings


@dataclass
class EncodeResult:
    """What a run of `encode` did: the manifest, and how many documents and images it encoded in how long."""

    manifest: Manifest
    documents: int
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------ sources
def open_source(s: EncodeSettings) -> Source:
    """The source `s.source` names, read once (no looping) at `s.image_size`."""
    if s.source == "shapes":
        from anymodal.data.shapes import ShapesWorld

        return ShapesWorld(size=s.image_size, seed=s.seed, tasks=s.tasks, holdout=s.holdout or None,
                           length=s.documents)
    if s.source == "digits":
        from anymodal.data.digits import DigitsSource

        return DigitsSource(size=s.image_size, tasks=s.tasks, seed=s.seed, length=s.documents)
    path = Path(s.source)
    if path.is_dir():
        from anymodal.data.folder import CaptionedFolder

        return CaptionedFolder(path, image_size=s.image_size, tasks=s.tasks, seed=s.seed)
    if s.source.endswith(".jsonl"):
        from anymodal.data.jsonl import JsonlSource

        return JsonlSource(path, image_size=s.image_size)
    if ".tar" in s.source:
        from anymodal.data.webdataset import WebDatasetSource

        return WebDatasetSource(s.source, image_size=s.image_size, tasks=s.tasks, seed=s.seed)
    raise ValueError(f"unknown source {s.source!r}: use shapes, digits, a .jsonl manifest, WebDataset shards "
                     "(.tar or a brace pattern) or a folder with captions.jsonl")


def plan_shards(s: EncodeSettings, source: Source) -> tuple[int, list[int | None]]:
    """(number of shards, the most documents each may hold: None for as many as its part has)."""
    if s.source in GENERATED:
        if s.documents is None:
            raise ValueError(f"the {s.source} source is endless; say how many documents to encode with --documents")
        shards = math.ceil(s.documents / s.shard_size)
        return shards, [None] * shards  # the source's length splits them (shard_count)
    urls = getattr(source, "urls", None)
    if urls is not None:  # WebDataset: one output shard per input shard
        shards = len(urls)
        return shards, [None if s.documents is None else shard_count(s.documents, j, shards) for j in range(shards)]
    with source.path.open(encoding="utf-8", errors="replace") as f:
        lines = sum(1 for line in f if line.strip())
    if lines == 0:
        raise ValueError(f"{source.path} holds no lines to encode")
    documents = min(s.documents or lines, lines)
    shards = math.ceil(documents / s.shard_size)
    return shards, [shard_count(documents, j, shards) for j in range(shards)]


# ------------------------------------------------------------------------------------------ one shard
_LOADED: dict[tuple[str, str, str], tuple] = {}


def _tokenizers(s: EncodeSettings):
    """(text tokenizer, image tokenizer) of `s`, loaded once per process."""
    key = (s.text_tokenizer, s.image_tokenizer, s.device)
    if key not in _LOADED:
        _LOADED[key] = (load_text_tokenizer(s.text_tokenizer),
                        load_image_tokenizer(s.image_tokenizer, device=s.device).requires_grad_(False))
    return _LOADED[key]


def _chunks(docs: Iterable[Document], images: int) -> Iterator[list[Document]]:
    """Runs of documents holding about `images` images (a run ends once it holds at least that many)."""
    chunk, n = [], 0
    for doc in docs:
        chunk.append(doc)
        n += len(doc.images)
        if n >= images:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


@torch.no_grad()
def encode_images(docs: list[Document], tokenizer, device: str) -> list[Document]:
    """`docs` with every Image's pixels replaced by the tokenizer's codes (h, w) or latents (C, h, w)."""
    pixels = [im.pixels for d in docs for im in d.images]
    if not pixels:
        return docs
    out = tokenizer.encode(torch.stack(pixels).to(device)).cpu()  # (N, h, w) codes or (N, C, h, w) latents
    key = "codes" if out.dtype == torch.long else "latents"
    encoded = iter(out)
    return [replace(d, segments=[Image(**{key: next(encoded)}) if isinstance(seg, Image) else seg
                                 for seg in d.segments]) for d in docs]


def encode_shard(job: ShardJob, report: Callable[[int, int], None] | None = None) -> ShardRecord:
    """Write output shard `job.index`; `report(documents, images)` is called after each tokenizer batch."""
    s = job.settings
    text, tokenizer = _tokenizers(s)
    docs: Iterable[Document] = open_source(s).documents(job.index, job.shards)
    if job.limit is not None:
        docs = islice(docs, job.limit)
    import webdataset as wds

    name = shard_name(job.index)
    final = Path(s.out) / name
    tmp = final.with_name(name + ".tmp")
    documents = images = 0
    with wds.TarWriter(str(tmp)) as sink:
        for chunk in _chunks(docs, s.batch_size):
            for doc in encode_images(chunk, tokenizer, s.device):
                key = f"{job.index:06d}_{documents:07d}"
                sink.write(sample_from_document(doc, key, [text.encode(t.text) for t in doc.texts]))
                documents += 1
                images += len(doc.images)
            if report is not None:
                report(len(chunk), sum(len(d.images) for d in chunk))
    tmp.replace(final)
    return ShardRecord(name, documents, images)


_PROGRESS: multiprocessing.Queue | None = None


def _start_worker(progress: multiprocessing.Queue, threads: int) -> None:
    global _PROGRESS
    _PROGRESS = progress
    torch.set_num_threads(threads)


def _encode_shard_in_worker(job: ShardJob) -> ShardRecord:
    return encode_shard(job, lambda documents, images: _PROGRESS.put((documents, images)))


# ------------------------------------------------------------------------------------------ the command
def new_manifest(s: EncodeSettings, shards: int) -> Manifest:
    """The manifest of this encoding before any shard is done: tokenizers, image size and plan."""
    spec = read_image_tokenizer_spec(s.image_tokenizer)
    images = "codes" if spec.kind == "vqvae" else "latents"
    if images == "codes" and spec.codebook_size > 2**16:
        raise ValueError(f"{s.image_tokenizer} has {spec.codebook_size} codes, more than 16-bit shards hold (65536)")
    size = {"codebook_size": spec.codebook_size} if images == "codes" else {"latent_channels": spec.latent_channels}
    return Manifest(
        image_size=s.image_size, images=images,
        text_tokenizer={"path": str(s.text_tokenizer), "sha256": text_tokenizer_fingerprint(s.text_tokenizer)},
        image_tokenizer={"path": str(s.image_tokenizer), "sha256": image_tokenizer_fingerprint(s.image_tokenizer),
                         "kind": spec.kind, "grid": list(spec.grid(s.image_size)), **size},
        plan={"source": s.source, "documents": s.documents, "shards": shards, "shard_size": s.shard_size,
              "seed": s.seed, "tasks": s.tasks, "holdout": list(s.holdout)})


def _identity(m: Manifest) -> dict:
    """What two encodings must share to write into one folder (tokenizer paths may differ, not their contents)."""
    doc = asdict(m)
    doc.pop("shards")
    for which in ("text_tokenizer", "image_tokenizer"):
        doc[which] = {k: v for k, v in doc[which].items() if k != "path"}
    return doc


def resume_manifest(s: EncodeSettings, fresh: Manifest) -> Manifest:
    """The manifest to continue: the folder's own when it was made with the same settings (its shards that are
    on disk kept), else `fresh`. Another encoding in the folder is refused."""
    out = Path(s.out)
    if not (out / "manifest.json").is_file():
        return fresh
    old = read_manifest(out)
    if _identity(old) != _identity(fresh):
        raise ValueError(f"{out} holds shards of another encoding (other source, settings or tokenizers); give a "
                         "new --out, or delete the folder to encode it again")
    old.shards = [r for r in old.shards if (out / r.name).is_file()]
    return old


def encode(s: EncodeSettings, progress: bool = True) -> EncodeResult:
    """Encode `s.source` into `s.out` (see the module docstring); finished shards of an earlier run are kept."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    shards, limits = plan_shards(s, open_source(s))
    out = Path(s.out)
    fresh = new_manifest(s, shards)  # reads the tokenizers: a bad one is refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    manifest = resume_manifest(s, fresh)
    for stale in out.glob("shard-*.tar.tmp"):
        stale.unlink()
    manifest.write(out)
    done = {r.name for r in manifest.shards}
    jobs = [ShardJob(j, shards, limits[j], s) for j in range(shards) if shard_name(j) not in done]
    planned = (s.documents if s.source in GENERATED else
               sum(limits) if all(n is not None for n in limits) else None)
    counted = {"documents": 0, "images": 0}
    started = time.perf_counter()
    columns = [TextColumn("[bold]encode[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("documents  {task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"{s.source} -> {out}", total=planned, completed=manifest.documents, rate="")

        def advance(documents: int, images: int) -> None:
            counted["documents"] += documents
            counted["images"] += images
            rate = counted["images"] / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=documents, rate=f"{rate:.1f} images/s")

        def finish(record: ShardRecord) -> None:
            manifest.shards = sorted([*manifest.shards, record], key=lambda r: r.name)
            manifest.write(out)

        if s.processes == 1 or len(jobs) <= 1:
            for job in jobs:
                finish(encode_shard(job, advance))
        else:
            _encode_in_processes(jobs, s.processes, advance, finish)
    return EncodeResult(manifest, counted["documents"], counted["images"], time.perf_counter() - started)


def _encode_in_processes(jobs: list[ShardJob], processes: int, advance, finish) -> None:
    """Encode `jobs` in `processes` spawned processes, reporting progress as their batches finish."""
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // processes)
    with ctx.Pool(min(processes, len(jobs)), initializer=_start_worker, initargs=(reports, threads)) as pool:
        pending = [pool.apply_async(_encode_shard_in_worker, (job,)) for job in jobs]
        while pending:
            try:
                advance(*reports.get(timeout=0.2))
            except queue.Empty:
                pass
            for result in [r for r in pending if r.ready()]:
                pending.remove(result)
                finish(result.get())  # re-raises a worker's error here
        while True:  # the last batches' reports may still be on their way
            try:
                advance(*reports.get(timeout=0.5))
            except queue.Empty:
                break
