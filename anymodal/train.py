"""Launching a LightningCLI run: what `anymodal fit|validate|test|predict` and the demo both call.

Recipes choose the system and the datamodule by class path (`model.class_path`, `data.class_path`).
"""

from __future__ import annotations

import os
import re
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def run_lightning(args: list[str]):
    """Run LightningCLI on `args` (the subcommand first). Recipes choose classes by class_path.

    A recipe key or flag the parser rejects (a misspelled key, a wrong type) is reported in one line that
    names it, followed by jsonargparse's detail, instead of the whole usage text (ANYMODAL_DEBUG=1 keeps it).
    """
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class Parser(LightningArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error or os.environ.get("ANYMODAL_DEBUG"):
                super().error(message, ex)
            unknown = re.findall(r"class_path '([\w.]+)':\s+Option '([^']+)' is not accepted", message)
            if unknown:
                keys = "; ".join(f"{cls} has no option {key!r}" for cls, key in unknown)
                message = f"{keys} (a misspelled key in a recipe or flag?)\n{message}"
            print(f"anymodal {args[0]}: error: {message}\n"
                  f"`anymodal {args[0]} --help` lists the options; `--model.help CLASS` those of a class",
                  file=sys.stderr)
            raise SystemExit(2)

    argv, sys.argv = sys.argv, sys.argv[:1]  # `args` is the command line; LightningCLI warns when both are set
    try:
        return LightningCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_class=Parser,
        )
    finally:
        sys.argv = argv
