"""Image tokenizers: shapes of the grids, round trips, the folder format, evaluation, and a two-step fit per recipe."""

import itertools
from pathlib import Path

import pytest
import torch

from anymodal.data.shapes import ShapesWorld
from anymodal.evaluate.reconstruction import evaluate_image_tokenizer
from anymodal.tokenizers.image import load_image_tokenizer, save_image_tokenizer
from anymodal.tokenizers.vae import VAE, VAEConfig
from anymodal.tokenizers.vqvae import VQVAE, VQVAEConfig

ROOT = Path(__file__).resolve().parents[1]


def shapes_pixels(n: int, seed: int = 0) -> torch.Tensor:
    docs = itertools.islice(iter(ShapesWorld(size=32, seed=seed, tasks={"t2i": 1.0})), n)
    return torch.stack([d.images[0].pixels for d in docs])  # (n, 3, 32, 32)


def small_vq(**kw) -> VQVAE:
    return VQVAE(VQVAEConfig(channels=16, max_channels=32, codebook_size=64, kmeans_init=False, **kw))


@pytest.mark.parametrize("downsample", [4, 8, 16])
def test_code_grid_follows_the_downsampling(downsample):
    vq = small_vq(downsample=downsample).eval()
    codes = vq.encode(torch.rand(2, 3, 32, 32))
    assert codes.shape == (2, 32 // downsample, 32 // downsample) and codes.dtype == torch.int64
    assert vq.grid(32) == (32 // downsample, 32 // downsample)
    assert vq.decode(codes).shape == (2, 3, 32, 32)


def test_a_bad_downsampling_is_a_clear_error():
    with pytest.raises(ValueError, match="downsample=3"):
        VQVAEConfig(downsample=3)


def test_fsq_option_has_the_product_of_its_levels_as_codebook():
    vq = VQVAE(VQVAEConfig(channels=16, max_channels=32, quantizer="fsq", fsq_levels=[8, 5, 5, 5])).eval()
    assert vq.codebook_size == 1000
    codes = vq.encode(torch.rand(2, 3, 32, 32))
    assert int(codes.max()) < 1000 and vq.encode(vq.decode(codes)).shape == codes.shape


@pytest.mark.parametrize("norm, local", [("channel", True), ("group", False)])
def test_channel_norm_keeps_a_code_blind_to_far_away_content(norm, local):
    # At 64x64 the encoder's receptive field (53 px) does not reach from one corner to the other:
    # with `channel` norm the top-left latent ignores a change in the bottom-right corner, with
    # GroupNorm (image-wide statistics) it does not.
    vq = small_vq(norm=norm).eval()
    x = shapes_pixels(1).repeat(1, 1, 2, 2)  # (1, 3, 64, 64)
    y = x.clone()
    y[..., 56:, 56:] = 0.0
    z = vq.encoder(vq.norm(torch.cat([x, y])))  # (2, D, 16, 16)
    assert torch.equal(z[0, :, 0, 0], z[1, :, 0, 0]) == local
    assert not torch.equal(z[0, :, -1, -1], z[1, :, -1, -1])


def test_an_unknown_norm_is_a_clear_error():
    with pytest.raises(ValueError, match="norm='batch'"):
        VQVAEConfig(norm="batch")


TRAINED = [p for p in (ROOT / "tokenizers" / "shapes-vqvae", ROOT / "checkpoints" / "demo" / "tokenizers" / "shapes-vqvae")
           if (p / "model.safetensors").is_file()]


@pytest.mark.skipif(not TRAINED, reason="needs a trained shapes VQ-VAE (make demo, or its recipe)")
def test_decode_then_encode_gives_back_nearly_all_codes():
    metrics = evaluate_image_tokenizer(load_image_tokenizer(TRAINED[0]), ShapesWorld(size=32, seed=7), n=64)
    assert metrics["code_roundtrip"] >= 0.9 and metrics["psnr"] >= 28 and metrics["codebook_usage"] >= 0.3


@pytest.mark.parametrize("kind", ["vqvae", "vae"])
def test_save_then_load_gives_identical_outputs(kind, tmp_path):
    tok = (small_vq() if kind == "vqvae" else VAE(VAEConfig(block_out_channels=[16, 32], norm_num_groups=8))).eval()
    x = shapes_pixels(4)
    folder = save_image_tokenizer(tok, tmp_path / kind, {"psnr": 1.0})
    again = load_image_tokenizer(folder).eval()
    with torch.no_grad():
        a, b = tok.encode(x), again.encode(x)
        assert torch.equal(a, b)
        assert torch.equal(tok.decode(a), again.decode(b))
    assert (folder / "README.md").read_text().count("psnr") >= 1


def test_loading_what_is_not_a_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="nope"):
        load_image_tokenizer(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"kind": "gan", "config": {}}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_image_tokenizer(tmp_path / "bad")
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match="kind"):
        load_image_tokenizer(tmp_path / "bad")


def test_evaluation_reports_reconstruction_codebook_and_checker_metrics():
    metrics = evaluate_image_tokenizer(small_vq().eval(), ShapesWorld(size=32, seed=3), n=16, batch_size=8)
    for key in ("psnr", "ssim", "codebook_usage", "perplexity", "shapes_exact", "code_roundtrip"):
        assert key in metrics
    assert 0.0 <= metrics["codebook_usage"] <= 1.0 and 0.0 <= metrics["code_roundtrip"] <= 1.0
    assert metrics["n"] == 16


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes" / "tokenizers").glob("*.yaml")), ids=lambda p: p.stem)
def test_two_step_fit_of_each_tokenizer_recipe(recipe, tmp_path):
    from anymodal.commands.cli import main

    export = tmp_path / "tok"
    main(["fit", "--config", str(recipe), "--trainer.max_steps=2", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.val_check_interval=2", "--data.init_args.batch_size=4", "--data.init_args.val_batches=1",
          "--model.init_args.export_dir", str(export), "--model.init_args.export_images=8",
          "--trainer.accelerator=cpu"])
    tok = load_image_tokenizer(export)
    assert tok.encode(shapes_pixels(2)).shape[0] == 2
    assert list(tmp_path.rglob("*.png")), "a reconstruction grid is written"
