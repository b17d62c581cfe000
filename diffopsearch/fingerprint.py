"""Identities of the code, the weights and the data, for caches that must not outlive what made them.

An answer cached by ``diffopsearch eval`` is only valid for the code, model weights and data files that
produced it. These fingerprints are cheap (no full read of multi-GB weight files) and change whenever
any of those change.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_SAMPLE = 1 << 20  # bytes read from each end of a weight file


def code_version() -> str:
    """The package version (a release marker; tests change it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffopsearch")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    """Hash of every Python source file of the package: a development checkout changes it with every
    edit, an installed wheel with every release."""
    h = hashlib.sha256()
    for f in sorted(_PACKAGE.rglob("*.py")):
        h.update(str(f.relative_to(_PACKAGE)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def code_fingerprint() -> str:
    return f"{code_version()}+{_source_hash()}"


def _file_fingerprint(path: Path) -> str:
    """Size plus the first and last MiB: a retrained or swapped weight file changes it."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE))
        if size > 2 * _SAMPLE:
            f.seek(size - _SAMPLE)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """The hub revision the weights came from, or a fingerprint of the local weight files, or '' when
    the model was built in memory (its identity is then the caller's name for it)."""
    config = getattr(model, "config", None)
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return f"rev:{commit}"
    where = Path(str(getattr(model, "name_or_path", "") or ""))
    if where.is_dir():
        files = sorted(p for p in where.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".json"))
        return "files:" + ",".join(f"{p.name}={_file_fingerprint(p)}" for p in files)
    return ""


def dataset_fingerprint(dataset) -> str:
    """Names, sizes and modification times of the data files under a local ``dataset.path`` (a hub id:
    '', its name and split are in the key already). Rewritten data files change it."""
    root = Path(str(getattr(dataset, "path", "") or ""))
    if not root.exists():
        return ""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root) if p != root else p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
