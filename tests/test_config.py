"""ArchConfig: named sizes, parameter counts, and errors that say what to change."""

import pytest

from anymodal.config import SIZES, ArchConfig
from anymodal.model.decoder import Decoder


@pytest.mark.parametrize("name", list(SIZES))
def test_every_named_size_builds(name):
    config = ArchConfig.from_name(name)
    assert config.dim % config.n_heads == 0 and config.n_heads % config.kv_heads == 0
    assert config.mlp_hidden_dim > config.dim
    assert ArchConfig(**{f: getattr(config, f) for f in config.__dataclass_fields__}) == config


def test_debug_is_the_tiny_test_size():
    config = ArchConfig.from_name("debug")
    assert (config.dim, config.n_layers, config.n_heads, config.kv_heads) == (64, 2, 4, 2)


def test_num_params_counts_the_real_modules():
    for overrides in ({}, {"qk_norm": True}, {"n_kv_heads": 1, "mlp_hidden": 100}):
        config = ArchConfig.from_name("debug", **overrides)
        decoder_params = sum(p.numel() for p in Decoder(config).parameters())
        assert config.num_params(vocab_size=0) == decoder_params
        assert config.num_params(vocab_size=10) == decoder_params + 2 * 10 * config.dim
        assert config.num_params(vocab_size=10, tied_embeddings=True) == decoder_params + 10 * config.dim


def test_large_sizes_have_the_expected_parameter_counts():
    assert 1.0e9 < ArchConfig.from_name("1b").num_params(vocab_size=32000) < 1.2e9  # TinyLlama: 1.10B
    seven = ArchConfig.from_name("7b")
    assert 6.6e9 < seven.num_params(vocab_size=32000) < 6.9e9  # Llama-2-7B: 6.74B
    assert ArchConfig.from_name("7b", mlp_hidden=0).mlp_hidden_dim == 11008  # the 8/3 rule reproduces it


def test_overrides_replace_fields_and_rederive_mlp():
    config = ArchConfig.from_name("small", dim=1024, n_heads=16)
    assert (config.dim, config.n_heads, config.n_layers) == (1024, 16, 8)
    assert config.mlp_hidden_dim == 2816  # 8/3 * 1024 rounded up to 256


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_heads": 6, "n_kv_heads": 4, "dim": 96}, "n_heads=6 must be divisible by n_kv_heads=4"),
        ({"dim": 100, "n_heads": 8}, "dim=100 must be divisible by n_heads=8"),
        ({"dim": 60, "n_heads": 4, "n_kv_heads": None}, "head_dim = dim/n_heads = 15 must be even"),
        ({"n_layers": 0}, "n_layers=0 must be a positive integer"),
        ({"attention": "xformers"}, "attention='xformers' must be one of auto, sdpa, flex"),
        ({"z_loss": -1.0}, "z_loss=-1.0 must be >= 0"),
        ({"norm_eps": 0.0}, "norm_eps=0.0 must be positive"),
    ],
)
def test_bad_values_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ArchConfig(**kwargs)


def test_unknown_names_and_fields_are_listed():
    with pytest.raises(ValueError, match="unknown model size 'huge'; choose one of debug, shapes, tiny"):
        ArchConfig.from_name("huge")
    with pytest.raises(ValueError, match="ArchConfig has no field dimm"):
        ArchConfig.from_name("debug", dimm=3)
