"""Atomic file writes: nothing the tool writes is ever half-written."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import UnwritableError


def _unwritable(path, err: OSError) -> UnwritableError:
    return UnwritableError(f"cannot write {str(path)!r} ({err.strerror or err}): choose a directory "
                           "this user can write, e.g. hydra.run.dir=DIR (and run from a writable working "
                           "directory: the answer cache lives in ./outputs/.answers)")


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove that a file can be written in it; UnwritableError if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _unwritable(path, e) from None
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` (same directory,
    so the rename is atomic on POSIX): a crash at any point leaves either the old file or the new
    one under ``path``, never a part of one. A path that cannot be written: UnwritableError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _unwritable(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def replace_block(path: str | os.PathLike, begin: str, end: str, block: str) -> Path:
    """Write ``block`` (which starts with ``begin`` and ends with ``end``) over the file's part from ``begin`` to
    ``end``, or append it when the file has none (the benchmark scripts' sections of BENCHMARKS.md); atomic."""
    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.exists() else ""
    block = block.strip("\n")
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    return atomic_write_text(p, text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
