"""Every recipe under recipes/ parses as `anymodal fit` would read it, without building anything: model
recipes on the CPU strategy, every strategy composed with model recipes, the image tokenizer recipes.
Adding a YAML file is all the registration it needs."""

import sys

import pytest
import yaml
from conftest import ROOT
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from anymodal.config import ArchConfig

RECIPES = ROOT / "recipes"
MODELS = sorted((RECIPES / "models").glob("*.yaml"))
STRATEGIES = sorted((RECIPES / "strategy").glob("*.yaml"))
TOKENIZERS = sorted((RECIPES / "tokenizers").glob("*.yaml"))
CPU = RECIPES / "strategy" / "cpu.yaml"


class Parsed(Exception):
    """Carries the parsed config out of the CLI before any class is instantiated."""

    def __init__(self, config) -> None:
        super().__init__("parsed")
        self.config = config


class ParseOnly(LightningCLI):
    def before_instantiate_classes(self) -> None:
        raise Parsed(self.config)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["anymodal"])  # LightningCLI warns when it sees pytest's arguments too


def parse(*recipes, extra: tuple[str, ...] = ()):
    """The `fit` config of the composed recipes, parsed as `anymodal fit` parses it (see anymodal.train)."""
    args = ["fit", *(a for r in recipes for a in ("--config", str(r))), *extra]
    with pytest.raises(Parsed) as parsed:
        ParseOnly(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  args=args)
    return parsed.value.config.fit


def names(paths):
    return [p.stem for p in paths]


def test_every_recipe_file_is_covered():
    every = set(RECIPES.rglob("*.yaml")) | set(RECIPES.rglob("*.yml"))
    assert every == set(MODELS) | set(STRATEGIES) | set(TOKENIZERS)
    assert MODELS and CPU in STRATEGIES


@pytest.mark.parametrize("recipe", MODELS, ids=names(MODELS))
def test_model_recipe_parses_on_cpu(recipe):
    config = parse(recipe, CPU)
    assert config.model.class_path == "anymodal.systems.unified.UnifiedSystem"
    assert config.data.class_path == "anymodal.data.datamodule.UnifiedDataModule"
    assert config.trainer.accelerator == "cpu" and config.trainer.precision == "32-true"
    init = config.model.init_args
    arch = ArchConfig.from_name(init.size, **(init.arch or {}))  # the size is a known name, overrides are fields
    assert config.data.init_args.seq_len <= arch.max_seq_len
    assert config.data.init_args.sources, "a model recipe names its training sources"


@pytest.mark.parametrize("strategy", STRATEGIES, ids=names(STRATEGIES))
@pytest.mark.parametrize("model", ["transfusion-shapes", "chameleon-1b"])
def test_strategy_recipe_composes_with_a_model_recipe(strategy, model):
    config = parse(RECIPES / "models" / f"{model}.yaml", strategy)
    for key, value in yaml.safe_load(strategy.read_text())["trainer"].items():
        if isinstance(value, dict) and "class_path" in value:  # a strategy class: its path and the given arguments
            parsed = config.trainer[key]
            assert parsed.class_path == value["class_path"], key
            for name, given in value.get("init_args", {}).items():
                assert parsed.init_args[name] == given, f"{key}.init_args.{name}"
        else:
            assert config.trainer[key] == value, key


@pytest.mark.parametrize("recipe", TOKENIZERS, ids=names(TOKENIZERS))
def test_tokenizer_recipe_parses(recipe):
    for config in (parse(recipe), parse(recipe, CPU)):
        assert config.model.class_path.startswith("anymodal.systems.tokenizers.")
        assert config.data.class_path == "anymodal.data.datamodule.ImageDataModule"


def test_the_parser_rejects_an_unknown_key(capsys):
    with pytest.raises(SystemExit):
        parse(MODELS[0], CPU, extra=("--model.init_args.lrr", "0.1"))
    assert "lrr" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", [p for p in MODELS if "shapes" in p.name], ids=lambda p: p.name)
def test_a_shapes_model_recipe_draws_images_of_its_tokenizer_recipes_size(recipe):
    from anymodal.commands.demo import recipe_image_size

    init = yaml.safe_load(recipe.read_text())["model"]["init_args"]
    exports = {yaml.safe_load(p.read_text())["model"]["init_args"]["export_dir"]: p for p in TOKENIZERS}
    tokenizer = exports[init["image_tokenizer"]]  # the tokenizer recipe that writes the folder this recipe reads
    assert init["image_size"] == recipe_image_size(tokenizer) == 24  # one patch / 2x2 codes per cell of the world
