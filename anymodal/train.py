"""Launching a LightningCLI run: what `anymodal fit|validate|test|predict` and the demo both call.

Recipes choose the system and the datamodule by class path (`model.class_path`, `data.class_path`).
Every run also gets, whatever its recipe says, `StopOnSignal` (SIGTERM/SIGINT: finish the step, save
`interrupted.ckpt`, exit) and `SafeCheckpointIO` (atomic checkpoint writes, `weights_only` reads) from
`anymodal.systems.faults`.
"""

from __future__ import annotations

import os
import pickle
import re
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def run_lightning(args: list[str], callbacks: list | tuple = ()):
    """Run LightningCLI on `args` (the subcommand first). Recipes choose classes by class_path.

    A recipe key or flag the parser rejects (a misspelled key, a wrong type) and an error a class raises when
    built (a missing tokenizer folder) are reported in one line that names it (`parser_error_sentence`), or, for
    other parser errors, that line followed by jsonargparse's detail (ANYMODAL_DEBUG=1 keeps the whole text).
    `callbacks` join the recipe's (the demo's lanes add a ProgressFile).
    """
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from anymodal.systems.faults import SafeCheckpointIO, StopOnSignal

    class Parser(LightningArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error or os.environ.get("ANYMODAL_DEBUG"):
                super().error(message, ex)
            sentence = parser_error_sentence(message)
            if sentence:
                print(f"anymodal {args[0]}: error: {sentence}", file=sys.stderr)
                raise SystemExit(2)
            print(f"anymodal {args[0]}: error: {message}\n"
                  f"`anymodal {args[0]} --help` lists the options; `--model.help CLASS` those of a class",
                  file=sys.stderr)
            raise SystemExit(2)

    class CLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            sys.argv[1:] = args  # parsed; Lightning's launcher starts ranks 1.. (DDP, DeepSpeed) with sys.argv

        def instantiate_trainer(self, **kwargs):
            """The recipe's Trainer, with SafeCheckpointIO unless the recipe names a checkpoint plugin."""
            plugins = self.config_init.get(f"{self.subcommand}.trainer.plugins" if self.subcommand else
                                           "trainer.plugins")
            plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                plugins.append(SafeCheckpointIO())
            return super().instantiate_trainer(**{"plugins": plugins, **kwargs})

    argv, sys.argv = sys.argv, sys.argv[:1]  # `args` is the command line; LightningCLI warns when both are set
    try:
        return CLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_class=Parser,
            trainer_defaults={"callbacks": [StopOnSignal(), *callbacks]},
        )
    except ValueError as e:  # a class that raised while being built, as jsonargparse words it
        sentence = parser_error_sentence(str(e))
        if sentence is None or os.environ.get("ANYMODAL_DEBUG"):
            raise
        raise ValueError(sentence) from None
    except pickle.UnpicklingError as e:  # LightningCLI reads --ckpt_path's hyperparameters (weights_only=True)
        from anymodal.checkpoint import refused_pickle

        refused = refused_pickle(e)
        if refused is None or os.environ.get("ANYMODAL_DEBUG"):
            raise
        raise ValueError(f"--ckpt_path {_ckpt_path(args)} was refused unread: it holds pickled {refused}, which "
                         "torch's weights_only loader does not run; resume only from checkpoints written by "
                         "`anymodal fit`") from None
    finally:
        sys.argv = argv


def _ckpt_path(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
        if arg == "--ckpt_path" and i + 1 < len(args):
            return args[i + 1]
    return "(the checkpoint)"


def _type_name(expected: str) -> str:
    """"<class 'int'>" -> "int"; other type texts as they are."""
    found = re.fullmatch(r"<class '([\w.]+)'>", expected.strip())
    return found.group(1) if found else expected.strip()


def parser_error_sentence(message: str) -> str | None:
    """One sentence for a jsonargparse error we recognise (None otherwise):

    - an unknown key: "anymodal.systems.unified.UnifiedSystem has no option 'lrr' (a misspelled key ...)";
    - a value of the wrong type: "UnifiedSystem option 'warmup_steps' expects int, got 'many'";
    - an error raised while building a class (a ValueError naming a missing folder): that error, after the class.
    """
    unknown = re.findall(r"class_path '([\w.]+)':\s+Option '([^']+)' is not accepted", message)
    if unknown:
        keys = "; ".join(f"{cls} has no option {key!r}" for cls, key in unknown)
        return f"{keys} (a misspelled key in a recipe or flag?); `--help` lists the options"
    typed = re.search(r"class_path '([\w.]+)':\s+Parser key \"([^\"]+)\":\s+Expected a (.+?)\. Got value: (.+)", message)
    if typed:
        cls, key, expected, value = typed.groups()
        return f"{cls.rsplit('.', 1)[-1]} option {key!r} expects {_type_name(expected)}, got {value.strip()!r}"
    typed = re.match(r"Parser key \"([^\"]+)\":\s+Expected a (.+?)\. Got value: (.+)", message)
    if typed:
        key, expected, value = typed.groups()
        return f"{key} expects {_type_name(expected)}, got {value.strip()!r}"
    if "Does not validate against any of the Union subtypes" in message and "Errors:" in message:
        errors = re.findall(r"^\s*- (.+)$", message.split("Errors:", 1)[1], flags=re.MULTILINE)
        raised = [e for e in errors if not e.startswith(("Expected a ", "Problem with given class_path"))]
        built = re.search(r"class_path='([\w.]+)'", message)
        if raised:
            return f"{built.group(1).rsplit('.', 1)[-1]}: {raised[0]}" if built else raised[0]
    return None
