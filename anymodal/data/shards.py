"""Encoded shards: documents whose text is token ids and whose images are VQ codes or VAE latents.

`anymodal encode` writes them (anymodal/encode.py); `EncodedShards` reads them for training, so training
runs no image tokenizer. A folder of encoded shards holds

    manifest.json       what made the shards: the text and image tokenizers (path and fingerprint,
                        anymodal.tokenizers.fingerprint), the image size, what images hold (codes or
                        latents) and their dtype, the plan (source, documents, number of shards), and
                        each finished shard with its document and image counts
    shard-000000.tar    WebDataset tar shards; one sample per document, its members sharing a key:
      <key>.json          {"task": "t2i", "segments": [{"text": "a red circle", "ids": [17, 40]},
                           {"image": "0.npy"}], "meta": {...}}
      <key>.0.npy         image 0: codes (h, w) uint16, or latents (C, h, w) float16 (scaled, as the
                          model reads them)

A shard is written under a temporary name and renamed when complete, then listed in the manifest, so a
rerun of `anymodal encode` skips what is finished. Training refuses shards made by other tokenizers
(`check_encoded_sources`, at the datamodule's setup).

Readers (rank x DataLoader worker) split the documents into contiguous, balanced ranges over the shards
in order (`reader_pieces`): every document belongs to exactly one reader. A reader's stream is its
range, pass after pass (in a new piece order each pass with `shuffle`), and can start at any document:
`documents(shard, num_shards, start)` seeks there directly, which is how a resumed run continues.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .document import Document, Image, Text
from .sources import Source, shard_count

FORMAT = "anymodal-encoded-shards"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"codes": "uint16", "latents": "float16"}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


# ------------------------------------------------------------------------------------------ manifest
@dataclass
class ShardRecord:
    """One finished shard: its file name and how many documents and images it holds."""

    name: str
    documents: int
    images: int


@dataclass
class Manifest:
    """The manifest.json of a folder of encoded shards (see the module docstring)."""

    image_size: int
    images: str
    """"codes" (VQ-VAE) or "latents" (VAE)."""
    text_tokenizer: dict[str, Any]
    """{"path", "sha256"} of the text tokenizer folder."""
    image_tokenizer: dict[str, Any]
    """{"path", "sha256", "kind", "grid", "codebook_size" | "latent_channels"} of the image tokenizer folder."""
    plan: dict[str, Any]
    """What the encoding was asked for: source, documents, shards, seed; a rerun must ask the same."""
    shards: list[ShardRecord] = field(default_factory=list)
    dtype: str = ""
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.images not in DTYPES:
            raise ValueError(f"images={self.images!r} must be 'codes' or 'latents'")
        self.dtype = self.dtype or DTYPES[self.images]
        self.shards = [s if isinstance(s, ShardRecord) else ShardRecord(**s) for s in self.shards]
        self.shards.sort(key=lambda s: s.name)

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.plan["shards"]

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["complete"], doc["documents"] = self.complete, self.documents
        return json.dumps(doc, indent=2) + "\n"

    def write(self, folder: str | Path) -> None:
        """Write manifest.json into `folder` atomically (a reader never sees half a file)."""
        path = Path(folder) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of a folder of encoded shards."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: it is not a folder of encoded shards; make one "
                                f"with `anymodal encode --out {folder} ...`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); encode the data again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not the manifest of anymodal encoded shards (format {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path} has version {doc.get('version')}, this anymodal reads version {VERSION}; "
                         "encode the data again")
    for derived in ("complete", "documents"):  # written for readers of the file, recomputed here
        doc.pop(derived, None)
    try:
        return Manifest(**doc)
    except TypeError as e:
        raise ValueError(f"{path} does not describe encoded shards ({e}); encode the data again") from None


# ------------------------------------------------------------------------------------------ samples
def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    """The entries of `meta` that JSON can hold (the shapes world's scene objects are left out)."""
    kept = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        kept[k] = v
    return kept


def sample_from_document(doc: Document, key: str, text_ids: list[list[int]]) -> dict[str, Any]:
    """The tar sample of `doc`, whose images hold codes or latents; `text_ids` are its Text segments' ids."""
    ids = iter(text_ids)
    segments: list[dict[str, Any]] = []
    sample: dict[str, Any] = {"__key__": key}
    for seg in doc.segments:
        if isinstance(seg, Text):
            segments.append({"text": seg.text, "ids": [int(i) for i in next(ids)]})
            continue
        name = f"{len(sample) - 1}.npy"  # 0.npy, 1.npy, ...: the sample holds __key__ and the images so far
        if seg.codes is not None:
            codes = seg.codes.cpu().numpy()
            if codes.min() < 0 or codes.max() > np.iinfo(np.uint16).max:
                raise ValueError(f"document {key}: codes in [{codes.min()}, {codes.max()}] do not fit 16 bits")
            sample[name] = _npy(codes.astype(np.uint16))  # (h, w)
        else:
            latents = seg.latents.float().cpu().numpy().astype(np.float16)  # (C, h, w)
            if not np.isfinite(latents).all():
                raise ValueError(f"document {key}: latents overflow float16; check the VAE's scale factor")
            sample[name] = _npy(latents)
        segments.append({"image": name})
    record = {"task": doc.task, "segments": segments, "meta": _jsonable(doc.meta)}
    sample["json"] = json.dumps(record).encode()
    return sample


def document_from_sample(sample: dict[str, bytes], where: str) -> Document:
    """The Document of one tar sample: Text segments with their ids, Images holding codes or latents."""
    try:
        record = json.loads(sample["json"])
        segments: list[Text | Image] = []
        for seg in record["segments"]:
            if "text" in seg:
                segments.append(Text(seg["text"], ids=seg["ids"]))
                continue
            array = np.load(io.BytesIO(sample[seg["image"]]), allow_pickle=False)
            if array.dtype == np.uint16:
                segments.append(Image(codes=torch.from_numpy(array.astype(np.int64))))  # (h, w)
            else:
                segments.append(Image(latents=torch.from_numpy(array.astype(np.float32))))  # (C, h, w)
        return Document(segments, record["task"], record.get("meta", {}))
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise ValueError(f"{where} is not a readable encoded document ({type(e).__name__}: {e}); "
                         "encode the data again") from None


def read_shard(path: str | Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of the samples `start` to `stop` of a tar shard, in order.

    Samples before `start` are passed over by their headers (tarfile seeks past member data), not read."""
    with tarfile.open(path, "r:") as tar:
        index, key, sample = -1, None, {}
        for member in tar:
            name = member.name.rpartition("/")[2]
            k, _, ext = name.partition(".")
            if k != key:
                if key is not None and index >= start:
                    yield key, sample
                index, key, sample = index + 1, k, {}
                if stop is not None and index >= stop:
                    return
            if index >= start and member.isfile():
                sample[ext] = tar.extractfile(member).read()
        if key is not None and index >= start:
            yield key, sample


# ------------------------------------------------------------------------------------------ readers
@dataclass(frozen=True)
class Piece:
    """Documents `start` to `stop` of shard `shard` (an index into the manifest's shards)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def reader_pieces(counts: list[int], reader: int, readers: int) -> list[Piece]:
    """The pieces of shards that reader `reader` of `readers` reads, for shards of `counts` documents.

    The documents, in shard order, are cut into `readers` contiguous ranges whose sizes differ by at most
    one; the ranges cover every document exactly once."""
    total = sum(counts)
    lo = reader * (total // readers) + min(reader, total % readers)
    hi = lo + shard_count(total, reader, readers)
    pieces, first = [], 0
    for shard, n in enumerate(counts):
        a, b = max(lo, first), min(hi, first + n)
        if a < b:
            pieces.append(Piece(shard, a - first, b - first))
        first += n
    return pieces


class EncodedShards(Source):
    """Documents from a folder written by `anymodal encode`: Text with token ids, Images with codes or latents.

    Args:
        path: The folder (manifest.json and its shards).
        loop: Repeat forever (training); False: one pass (validation).
        shuffle: Visit each reader's pieces of shards in a new order every pass (drawn from `seed`).
        seed: Seeds the piece order.
    """

    seekable = True
    """`documents` takes a `start`: resumed runs restore positions directly (anymodal.data.resumable)."""

    def __init__(self, path: str | Path, loop: bool = True, shuffle: bool = False, seed: int = 0) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.complete:
            raise ValueError(f"{self.path} is encoded in part ({len(self.manifest.shards)} of "
                             f"{self.manifest.plan['shards']} shards); run the same `anymodal encode` again to "
                             "finish it")
        super().__init__(seed=seed, length=self.manifest.documents)
        self.loop = loop
        self.shuffle = shuffle

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the shards were encoded from."""
        return self.manifest.image_size

    def documents(self, shard: int, num_shards: int, start: int = 0) -> Iterator[Document]:
        """Reader `shard` of `num_shards`: its range of documents pass after pass, from its `start`-th on."""
        pieces = reader_pieces([s.documents for s in self.manifest.shards], shard, num_shards)
        per_pass = sum(len(p) for p in pieces)
        if per_pass == 0:
            raise ValueError(f"{self.path} holds {self.manifest.documents} documents, fewer than its "
                             f"{num_shards} readers (ranks x DataLoader workers); encode more or use fewer workers")
        n = start
        while self.loop or n < per_pass:
            passes, offset = divmod(n, per_pass)
            order = pieces
            if self.shuffle:
                order = [pieces[i] for i in self.rng(shard, passes).permutation(len(pieces))]
            for piece in order:  # the piece that holds the n-th document, entered at its offset
                if offset < len(piece):
                    break
                offset -= len(piece)
            name = self.manifest.shards[piece.shard].name
            for key, sample in read_shard(self.path / name, piece.start + offset, piece.stop):
                doc = document_from_sample(sample, f"{self.path / name}:{key}")
                doc.meta.update(shard=name, key=key)
                yield doc
                n += 1


# ------------------------------------------------------------------------------------------ checks
def check_encoded_sources(sources: list[Source], text_tokenizer: str | None, image_tokenizer: str | None,
                          pre_encoded: bool = False) -> None:
    """Refuse, in one sentence, encoded shards made by other tokenizers than the model's, and, for a model that
    loads no image tokenizer (`pre_encoded`), any source that yields pixels."""
    from anymodal.tokenizers.fingerprint import image_tokenizer_fingerprint, text_tokenizer_fingerprint

    ours: dict[str, str] = {}
    for source in sources:
        manifest = getattr(source, "manifest", None)
        if not isinstance(manifest, Manifest):
            if pre_encoded:
                raise ValueError(f"the model is built with pre_encoded=true (no image tokenizer weights) but "
                                 f"{type(source).__name__} yields pixels; encode it with `anymodal encode` and "
                                 "train on anymodal.data.shards.EncodedShards, or set pre_encoded: false")
            continue
        for what, folder, made_by, fingerprint in (
                ("text", text_tokenizer, manifest.text_tokenizer, text_tokenizer_fingerprint),
                ("image", image_tokenizer, manifest.image_tokenizer, image_tokenizer_fingerprint)):
            if folder is None:
                continue
            if what not in ours:
                ours[what] = fingerprint(folder)
            if made_by["sha256"] != ours[what]:
                raise ValueError(
                    f"{source.path} was encoded with the {what} tokenizer {made_by['path']} (sha256 "
                    f"{made_by['sha256'][:12]}) but the model uses {folder} (sha256 {ours[what][:12]}); train "
                    f"with the tokenizer the shards were made with, or encode the data again with "
                    f"`anymodal encode --{what}-tokenizer {folder}`")
