"""The repository layout promises of docs/design.md."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tokenizers_folder_holds_no_python():
    assert not list((ROOT / "tokenizers").rglob("*.py"))


def test_hf_tokenizers_is_not_shadowed_from_the_repo_root():
    code = (
        "import tokenizers, transformers, sys;"
        "assert 'site-packages' in tokenizers.__file__, tokenizers.__file__;"
        "from tokenizers import Tokenizer; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cli_help_lists_the_commands():
    from anymodal.commands.cli import OVERVIEW

    for cmd in ("fit", "validate", "test", "eval", "export", "generate", "demo"):
        assert f"  {cmd} " in OVERVIEW


def test_messages_name_only_commands_that_exist():
    """Every `anymodal X` a string in the package mentions is a command the CLI has."""
    from anymodal.commands.cli import COMMANDS, LIGHTNING_COMMANDS

    known = set(COMMANDS) | set(LIGHTNING_COMMANDS)
    named = []
    for path in (ROOT / "anymodal").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                named += [(path.name, c) for c in re.findall(r"`anymodal ([a-z][a-z-]*)", node.value)]
    assert named, "the scan found no command names at all"
    assert not [(f, c) for f, c in named if c not in known]
