"""Test-wide settings: offline hubs, few threads, deterministic seeds, GPU tests skip themselves."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TEXT_TOKENIZER = str(ROOT / "tokenizers" / "shapes-text")


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    """Tiny untrained image tokenizer folders: {'discrete': VQ-VAE (8x8 codes of 64), 'continuous': VAE (4x8x8)}."""
    from anymodal.tokenizers.image import save_image_tokenizer
    from anymodal.tokenizers.vae import VAE, VAEConfig
    from anymodal.tokenizers.vqvae import VQVAE, VQVAEConfig

    root = tmp_path_factory.mktemp("image_tokenizers")
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(channels=16, max_channels=32, codebook_size=64, kmeans_init=False))
    vae = VAE(VAEConfig(block_out_channels=[16, 32, 32], norm_num_groups=8))
    return {"discrete": str(save_image_tokenizer(vq, root / "vq")),
            "continuous": str(save_image_tokenizer(vae, root / "vae"))}


@pytest.fixture
def make_system(tokenizer_dirs):
    """Factory: a debug-size UnifiedSystem for 'discrete' or 'continuous', with its model built."""
    from anymodal.systems.unified import UnifiedSystem

    def make(path: str, **overrides):
        kwargs = dict(text_tokenizer=TEXT_TOKENIZER, image_tokenizer=tokenizer_dirs[path], size="debug",
                      warmup_steps=2, ema_decay=0.0)
        kwargs.update(overrides)
        system = UnifiedSystem(**kwargs)
        system.configure_model()
        return system

    return make


@pytest.fixture
def fit_args(tokenizer_dirs, tmp_path):
    """Factory: `anymodal fit` arguments of the transfusion shapes recipe on the test tokenizers, debug size,
    one step, batches of one row, everything written under tmp_path; `extra` flags go last."""
    recipe = ROOT / "recipes" / "models" / "transfusion-shapes.yaml"

    def args(*extra: str) -> list[str]:
        return ["fit", "--config", str(recipe), "--config", str(ROOT / "recipes" / "strategy" / "cpu.yaml"),
                "--model.init_args.text_tokenizer", TEXT_TOKENIZER,
                "--model.init_args.image_tokenizer", tokenizer_dirs["continuous"], "--model.init_args.size", "debug",
                "--trainer.max_steps=1", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.callbacks=[]",
                "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
                "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                "--data.init_args.batch_size", "1", *extra]

    return args
