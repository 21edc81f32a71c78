"""`anymodal encode` and training on its shards: what the shards hold, rerun and parallel encoding, real photos,
the split over readers (2 ranks x 2 workers), exact resume without replay, a fit through the CLI with no
image-tokenizer weights, and the refusal of shards made by another tokenizer."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, TEXT_TOKENIZER
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from anymodal.commands.cli import main
from anymodal.data.datamodule import UnifiedDataModule
from anymodal.data.images import load_image
from anymodal.data.resumable import ResumableLoader, SeekableBatches
from anymodal.data.shapes import ShapesWorld
from anymodal.data.shards import EncodedShards, check_encoded_sources, read_manifest, reader_pieces
from anymodal.encode import EncodeSettings, encode
from anymodal.tokenizers.fingerprint import image_tokenizer_fingerprint, text_tokenizer_fingerprint
from anymodal.tokenizers.image import load_image_tokenizer
from anymodal.tokenizers.text import load_text_tokenizer

DOCS, SHARD = 64, 16  # the shapes world, 4 shards
TASKS = {"t2i": 0.4, "caption": 0.2, "vqa": 0.2, "edit": 0.2}  # short documents: several per 96-token row


def settings(tokenizer_dirs, out, path="continuous", **overrides) -> EncodeSettings:
    kwargs = dict(source="shapes", out=str(out), text_tokenizer=TEXT_TOKENIZER, image_tokenizer=tokenizer_dirs[path],
                  image_size=32, documents=DOCS, shard_size=SHARD, tasks=TASKS)
    return EncodeSettings(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def shards(tokenizer_dirs, tmp_path_factory):
    """The shapes world (DOCS documents) encoded with the test VAE into 4 shards."""
    out = tmp_path_factory.mktemp("encoded") / "vae"
    encode(settings(tokenizer_dirs, out), progress=False)
    return out


def test_shards_hold_ids_and_latents_of_the_source_and_name_the_tokenizers(shards, tokenizer_dirs):
    manifest = read_manifest(shards)
    assert manifest.complete and manifest.documents == DOCS and len(manifest.shards) == 4
    assert manifest.images == "latents" and manifest.dtype == "float16" and manifest.image_size == 32
    assert manifest.image_tokenizer["sha256"] == image_tokenizer_fingerprint(tokenizer_dirs["continuous"])
    assert manifest.text_tokenizer["sha256"] == text_tokenizer_fingerprint(TEXT_TOKENIZER)
    assert manifest.image_tokenizer["grid"] == [8, 8] and manifest.image_tokenizer["latent_channels"] == 4
    vae, text = load_image_tokenizer(tokenizer_dirs["continuous"]), load_text_tokenizer(TEXT_TOKENIZER)
    source = ShapesWorld(size=32, seed=0, tasks=TASKS, length=DOCS)
    expected = [d for j in range(4) for d in source.documents(j, 4)]  # shard j: part j of the source's sharding
    got = list(EncodedShards(shards, loop=False))
    assert [r.documents for r in manifest.shards] == [SHARD] * 4 and len(got) == len(expected) == DOCS
    for want, doc in zip(expected, got):
        assert doc.task == want.task and [t.text for t in doc.texts] == [t.text for t in want.texts]
        assert [t.ids for t in doc.texts] == [text.encode(t.text) for t in want.texts]
        assert all(im.pixels is None and im.latents.shape == (4, 8, 8) for im in doc.images)
    latents = vae.encode(torch.stack([im.pixels for d in expected for im in d.images]))  # (N, 4, 8, 8)
    torch.testing.assert_close(torch.stack([im.latents for d in got for im in d.images]), latents,
                               atol=2e-3, rtol=1e-3)  # float16 in the shard


def test_codes_round_trip_exactly(tokenizer_dirs, tmp_path):
    encode(settings(tokenizer_dirs, tmp_path, "discrete", documents=12), progress=False)
    assert read_manifest(tmp_path).dtype == "uint16"
    vq = load_image_tokenizer(tokenizer_dirs["discrete"])
    docs = list(EncodedShards(tmp_path, loop=False))
    want = list(ShapesWorld(size=32, seed=0, tasks=TASKS, length=12).documents(0, 1))
    codes = vq.encode(torch.stack([im.pixels for d in want for im in d.images]))  # (N, 8, 8)
    assert torch.equal(torch.stack([im.codes for d in docs for im in d.images]), codes)


def test_a_rerun_skips_finished_shards_and_another_encoding_is_refused(shards, tokenizer_dirs, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    (out / "shard-000002.tar").unlink()  # as if the first run had stopped before this shard
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    result = encode(settings(tokenizer_dirs, out), progress=False)
    assert result.documents == read_manifest(out).shards[2].documents == SHARD
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[013].tar")} == before
    assert (out / "shard-000002.tar").read_bytes() != b"" and read_manifest(out).complete
    with pytest.raises(ValueError, match="holds shards of another encoding"):
        encode(settings(tokenizer_dirs, out, seed=1), progress=False)


def test_processes_write_the_same_shards(tokenizer_dirs, tmp_path):
    one, two = (settings(tokenizer_dirs, tmp_path / str(n), documents=8, shard_size=4, processes=n) for n in (1, 2))
    encode(one, progress=False)
    encode(two, progress=False)  # two spawned processes, one shard each
    assert read_manifest(one.out).shards == read_manifest(two.out).shards
    for a, b in zip(EncodedShards(one.out, loop=False), EncodedShards(two.out, loop=False)):
        assert a.texts[0].ids == b.texts[0].ids and len(a.images) == len(b.images)
        for x, y in zip(a.images, b.images):  # one thread per process: convolutions may round differently
            torch.testing.assert_close(x.latents, y.latents, atol=2e-3, rtol=1e-3)


def test_real_photos_from_a_folder_with_captions(tokenizer_dirs, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    photos = tmp_path / "photos"
    photos.mkdir()
    lines = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        PIL.Image.fromarray(getattr(skimage_data, name)()).save(photos / f"{name}.jpg", quality=90)
        lines.append(json.dumps({"image": f"{name}.jpg", "caption": f"a photo: {name}"}))
    (photos / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "encoded"
    main(["encode", "--source", str(photos), "--text-tokenizer", TEXT_TOKENIZER, "--image-tokenizer",
          tokenizer_dirs["continuous"], "--image-size", "64", "--out", str(out), "--shard-size", "2"])
    docs = list(EncodedShards(out, loop=False))
    assert read_manifest(out).image_size == 64 and len(docs) == 4
    vae = load_image_tokenizer(tokenizer_dirs["continuous"])
    for doc in docs:
        assert doc.task in ("t2i", "caption") and doc.texts[0].text == f"a photo: {Path(doc.meta['image']).stem}"
        pixels = load_image(photos / doc.meta["image"], 64)  # (3, 64, 64)
        torch.testing.assert_close(doc.images[0].latents, vae.encode(pixels[None])[0], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("counts", [[16, 16, 16, 16], [5, 0, 9, 1], [3]])
def test_readers_of_2_ranks_x_2_workers_cover_every_document_once(counts):
    every = []
    for rank in range(2):
        for worker in range(2):
            pieces = reader_pieces(counts, rank * 2 + worker, 4)
            every.append([(p.shard, i) for p in pieces for i in range(p.start, p.stop)])
    flat = [d for reader in every for d in reader]
    assert sorted(flat) == [(s, i) for s, n in enumerate(counts) for i in range(n)]  # no gaps, no duplicates
    assert max(map(len, every)) - min(map(len, every)) <= 1  # balanced


def test_reader_streams_split_the_shards_and_seek(shards):
    source = EncodedShards(shards, loop=False)
    keys = [[d.meta["key"] for d in source.documents(r, 4)] for r in range(4)]
    assert sorted(k for reader in keys for k in reader) == sorted(d.meta["key"] for d in source)
    assert len({k for reader in keys for k in reader}) == DOCS
    endless = EncodedShards(shards, shuffle=True, seed=3)  # one reader: its 4 pieces (shards) in a new order each pass
    stream = [d.meta["key"] for d, _ in zip(endless.documents(0, 1), range(160))]  # 2.5 passes
    assert sorted(stream[:DOCS]) == sorted(stream[DOCS:2 * DOCS]) == sorted(d.meta["key"] for d in source)
    assert stream[:DOCS] != stream[DOCS:2 * DOCS]
    for start in (0, 7, DOCS, DOCS + 23):  # a stream started at a document is the rest of the whole stream
        assert [d.meta["key"] for d, _ in zip(endless.documents(0, 1, start), range(160 - start))] == stream[start:]


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "loss_mask", "spans", "images"))


def test_resume_with_2_ranks_x_2_workers_continues_exactly(shards, make_system):
    """Each rank's loader (2 workers) serves 3 batches and is saved; a fresh loader restored from its state
    serves what the uninterrupted loader serves next. Nothing is replayed: the readers seek."""
    encoder = make_system("continuous").encoder
    straight = {}
    for rank in range(2):
        def batches(rank=rank):
            return SeekableBatches([EncodedShards(shards)], encoder, 96, 2, seed=0, rank=rank, world=2)

        straight[rank] = [b for b, _ in zip(ResumableLoader(batches(), num_workers=2), range(7))]
        first = ResumableLoader(batches(), num_workers=2)
        served = [b for b, _ in zip(first, range(3))]  # an odd count: the other worker serves next
        again = ResumableLoader(batches(), num_workers=2, served=3, states=first.state_at(3))
        resumed = [b for b, _ in zip(again, range(4))]
        assert all(_same(a, b) for a, b in zip(served + resumed, straight[rank]))
        assert set(again.states) == {rank * 2, rank * 2 + 1}  # this rank's two readers
    assert not _same(straight[0][0], straight[1][0])  # the ranks read other documents


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed run saves nothing
def test_resumed_fit_on_shards_with_workers_repeats_the_uninterrupted_run(shards, make_system, tmp_path):
    """A 5-step run saves a checkpoint after step 3 (its workers have batches in flight then); resuming from it
    trains steps 4 and 5 on the same batches with the same losses."""

    def fit(ckpt_path=None):
        torch.manual_seed(0)
        system = make_system("continuous", ema_decay=0.9, pre_encoded=True)
        data = UnifiedDataModule([EncodedShards(shards, shuffle=True)], seq_len=256, batch_size=2, num_workers=2)
        recorder = Losses()
        callbacks = [recorder] if ckpt_path else [recorder, ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=3,
                                                                             save_top_k=-1)]
        trainer = Trainer(accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False,
                          enable_checkpointing=not ckpt_path, enable_model_summary=False, callbacks=callbacks,
                          default_root_dir=tmp_path, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(system, datamodule=data, ckpt_path=ckpt_path)
        return recorder.losses

    straight = fit()
    (saved,) = tmp_path.glob("*3.ckpt")
    resumed = fit(ckpt_path=saved)
    assert len(straight) == 5 and len(resumed) == 2
    np.testing.assert_allclose(resumed, straight[3:], rtol=0, atol=1e-6)
    state = torch.load(saved, weights_only=True)
    assert not any(k.startswith("image_tokenizer.") for k in state["state_dict"])  # no tokenizer weights held
    assert state["UnifiedDataModule"]["readers"] == 2 and set(state["UnifiedDataModule"]["positions"]) == {0, 1}


def encoded_fit_args(tokenizer_dirs, root: Path, shards: Path, image_tokenizer: str) -> list[str]:
    recipe = ROOT / "recipes" / "models" / "transfusion-shapes-encoded.yaml"
    source = json.dumps([{"class_path": "anymodal.data.shards.EncodedShards", "init_args": {"path": str(shards)}}])
    return ["fit", "--config", str(recipe), "--config", str(ROOT / "recipes" / "strategy" / "cpu.yaml"),
            "--model.init_args.text_tokenizer", TEXT_TOKENIZER, "--model.init_args.image_tokenizer", image_tokenizer,
            "--model.init_args.size", "debug", "--model.init_args.image_size", "32",  # the shards' size
            "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size", "2",
            "--data.init_args.seq_len", "256", "--data.init_args.num_workers", "0", "--data.init_args.sources", source,
            "--data.init_args.val_sources=null"]


def test_fit_from_shards_through_the_cli_loads_no_image_tokenizer_weights(shards, tokenizer_dirs, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(sys, "argv", ["anymodal"])

    def refuse(*args, **kwargs):
        raise AssertionError("the image tokenizer's weights were loaded")

    monkeypatch.setattr("anymodal.systems.unified.load_image_tokenizer", refuse)
    main(encoded_fit_args(tokenizer_dirs, tmp_path, shards, tokenizer_dirs["continuous"]))
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    assert "train/diffusion_loss" in metrics.read_text()


def test_training_refuses_shards_of_another_tokenizer_in_one_sentence(shards, tokenizer_dirs, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["anymodal"])
    other = tmp_path / "other-vae"
    shutil.copytree(tokenizer_dirs["continuous"], other)
    vae = load_image_tokenizer(other)
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)  # the same config, other weights
    from anymodal.tokenizers.image import save_image_tokenizer

    save_image_tokenizer(vae, other)
    with pytest.raises(SystemExit):
        main(encoded_fit_args(tokenizer_dirs, tmp_path, shards, str(other)))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was encoded with the image tokenizer" in err and str(other) in err and err.count(". ") == 0
    with pytest.raises(ValueError, match="yields pixels"):
        check_encoded_sources([ShapesWorld()], TEXT_TOKENIZER, tokenizer_dirs["continuous"], pre_encoded=True)



GATHER = """
import json, sys
import torch.distributed as dist
from anymodal.data.resumable import gather_states
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
print(json.dumps(gather_states({rank * 2 + w: {"drawn": [rank, w]} for w in range(2)})))  # this rank's readers
dist.destroy_process_group()
"""


def test_every_rank_saves_the_positions_of_all_readers(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [subprocess.Popen([sys.executable, "-c", GATHER, str(rank), init], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True) for rank in range(2)]
    merged = [json.loads(rank.communicate(timeout=120)[0]) for rank in ranks]
    want = {str(rank * 2 + w): {"drawn": [rank, w]} for rank in range(2) for w in range(2)}
    assert merged == [want, want]
