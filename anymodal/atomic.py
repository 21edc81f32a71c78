"""Atomic writes: a file or a folder appears whole, or the previous one stays.

    with atomic_file("run/last.ckpt") as tmp:      # write tmp; it is renamed over the target at the end
        torch.save(state, tmp)
    with atomic_folder("bundles/b") as tmp:        # fill the folder tmp; it replaces bundles/b at the end
        save_file(weights, tmp / "model.safetensors")

Both write beside the target (same folder, so the final rename stays on one file system and is atomic) under
a hidden name (`.NAME.tmp-...`). An exception, a full disk or a kill before the end leaves the target as it
was; the exception removes the temporary, a kill leaves it behind, never under the target's name.

A folder that replaces an existing one keeps the old folder's other entries (files the new one does not
write, e.g. a grid a training callback put there): they move into the new folder before the swap. The swap
is two renames (old aside, new in); the old folder is deleted after.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _hidden(path: Path, what: str) -> str:
    return f".{path.name}.{what}-"


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block ends without error, it is synced and renamed to
    `path` (replacing any old file). On error the temporary is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_hidden(path, "tmp"), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name changes
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; once the block ends without error, it becomes `path`.

    An existing folder at `path` is replaced only then (its entries the new folder lacks are kept). On error
    the temporary folder is removed and `path` is untouched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder; remove it or choose another folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_hidden(path, "tmp"), dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o777 & ~_umask())
    _swap_in(tmp, path)


def _swap_in(new: Path, path: Path) -> None:
    """Put the complete folder `new` at `path`, keeping entries of an old `path` that `new` does not have."""
    if not path.exists():
        os.rename(new, path)
        return
    for entry in path.iterdir():
        if not (new / entry.name).exists():
            os.rename(entry, new / entry.name)
    old = Path(tempfile.mkdtemp(prefix=_hidden(path, "old"), dir=path.parent))
    os.rename(path, old / path.name)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


@functools.cache
def _umask() -> int:
    """The process umask (new files get 0o666 & ~umask, as open() would make them), read once."""
    try:  # Linux: read it without setting it (os.umask would change it for other threads for a moment)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
