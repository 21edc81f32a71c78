"""Where settings live: the size dial, the image size named once, the objective saved with the weights."""

import logging
import sys
from pathlib import Path

import pytest
import yaml

from anymodal.commands.cli import main
from anymodal.config import SIZES

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOKENIZER = str(ROOT / "tokenizers" / "shapes-text")


def test_model_recipes_name_the_image_size_once():
    for recipe in (ROOT / "recipes").rglob("*.yaml"):
        text = recipe.read_text()
        if "size: &image_size" not in text and "image_size: &image_size" not in text:
            continue
        literal = [line for line in text.splitlines() if "*image_size" not in line and "&image_size" not in line
                   and ("image_size:" in line or "{size:" in line or line.strip().startswith("size: 3"))]
        assert not literal, f"{recipe.name} states an image size again: {literal}"
        config = yaml.safe_load(text)  # the anchor resolves to one value everywhere
        assert config


def test_a_source_of_another_image_size_stops_fit_in_one_sentence(fit_args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["anymodal"])
    with pytest.raises(SystemExit) as exit_:
        main(fit_args("--model.init_args.image_size", "64"))  # the recipe's sources still yield 24 px
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("anymodal fit: error: ShapesWorld yields 24 px images but the model is built for "
                       "image_size=64; state the size once in the recipe (a YAML anchor, as recipes/models/*.yaml "
                       "do) so data and model agree")


def test_the_named_size_wins_and_arch_overrides_are_said(tokenizer_dirs, tmp_path, monkeypatch, caplog):
    from anymodal.systems.unified import UnifiedSystem

    monkeypatch.setattr(sys, "argv", ["anymodal"])
    system = UnifiedSystem(text_tokenizer=TEXT_TOKENIZER, image_tokenizer=tokenizer_dirs["continuous"], size="debug")
    assert system.model_config.arch == SIZES["debug"]
    with caplog.at_level(logging.INFO):
        system = UnifiedSystem(text_tokenizer=TEXT_TOKENIZER, image_tokenizer=tokenizer_dirs["continuous"],
                               size="debug", arch={"dim": 32, "max_seq_len": 512})
    assert system.model_config.arch.dim == 32
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "model size 'debug' with the recipe's arch overrides dim=32: trains a decoder of dim 32" in said
    assert "max_seq_len" not in said  # equal to the named size's value: not an override


def test_export_saves_the_objective_whole_and_sampling_rebuilds_it(make_system, tmp_path):
    import json

    from anymodal.checkpoint import load_bundle, save_bundle

    system = make_system("continuous", objective="ddpm")
    folder = save_bundle(tmp_path / "b", system.sampling_model(), system.text, system.image_tokenizer,
                         system.objective.config())
    saved = json.loads((folder / "objective.json").read_text())
    assert saved == {"name": "ddpm", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                     "sampler": "ddim"}
    assert "prediction" not in json.loads((folder / "config.json").read_text())["model"]
    bundle = load_bundle(folder)
    assert bundle.objective.config() == saved and bundle.image_size == 32
    assert type(bundle.objective.make_sampler(3, "ddpm")).__name__ == "DDPMScheduler"
