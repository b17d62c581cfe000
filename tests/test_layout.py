"""The layout's rules (docs/ARCHITECTURE.md, "Rules"), checked by reading every import of the package,
function-local ones included. A violation names the module, the line and the import."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "diffopsearch"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

# part of the package -> the package parts it may import (None: any) and the third-party packages it may
# import (None: any). A part is a top-level module or sub-package of diffopsearch.
RULES = {
    "errors": (set(), set()),
    "regimes": (set(), set()),
    "operators": ({"operators"}, {"torch"}),
    "plan": ({"errors", "io", "operators", "plan"}, set()),
    "cost": ({"errors", "plan", "cost"}, set()),
    "patch": ({"errors", "operators", "plan", "patch"}, {"torch", "transformers"}),
    "runtime": ({"errors"}, {"torch", "accelerate"}),
}
CONFIG_READERS = {"cli", "config", "commands"}  # the only parts that may import hydra / omegaconf


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), path, is_pkg


def private_imports(name: str, path: Path, is_pkg: bool):
    """(line, module, name) for every private name (``_x``) imported from another module of the package."""
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            mod = (".".join(here[: len(here) - (node.level - 1)] + ([node.module] if node.module else []))
                   if node.level else node.module or "")
            if mod.split(".")[0] != "diffopsearch" or mod == name:
                continue
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    yield node.lineno, mod, a.name


def imports(name: str, path: Path, is_pkg: bool):
    """(line, absolute module imported) for every import statement of the module."""
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # `from . import x`: x may be a submodule
                    for a in node.names:
                        yield node.lineno, f"{mod}.{a.name}"
                    continue
            else:
                mod = node.module
            yield node.lineno, mod


def _part(module: str) -> str | None:
    """``diffopsearch.search.loop`` -> ``search``; None for a module outside the package."""
    bits = module.split(".")
    return bits[1] if bits[0] == "diffopsearch" and len(bits) > 1 else ("" if bits[0] == "diffopsearch" else None)


def violations() -> list[str]:
    out = []
    for name, path, is_pkg in _modules():
        part = _part(name)
        where = path.relative_to(PKG.parent)
        for line, mod in imports(name, path, is_pkg):
            target = _part(mod)
            top = mod.split(".")[0]
            if target is None:  # third party or standard library
                if top in STDLIB:
                    continue
                if top in ("hydra", "omegaconf") and part not in CONFIG_READERS:
                    out.append(f"{where}:{line} imports {mod}: only {sorted(CONFIG_READERS)} read the Hydra config")
                allowed_ext = RULES.get(part, (None, None))[1]
                if allowed_ext is not None and top not in allowed_ext:
                    out.append(f"{where}:{line} imports {mod}: {part} may import only {sorted(allowed_ext)}")
                continue
            if target == "commands" and part not in ("commands",):
                out.append(f"{where}:{line} imports {mod}: nothing below the command layer imports it")
            if target == "cli" and part not in ("cli", "__main__"):
                out.append(f"{where}:{line} imports {mod}: the CLI is the top; nothing imports it")
            allowed = RULES.get(part, (None, None))[0]
            if allowed is not None and target not in allowed and target != part:
                out.append(f"{where}:{line} imports {mod}: {part} may import only {sorted(allowed) or 'nothing'} "
                           "of the package")
        for line, mod, private in private_imports(name, path, is_pkg):
            out.append(f"{where}:{line} imports the private name {private} of {mod}: make it public or keep it inside")
    return out


def test_the_layout_rules_hold():
    assert violations() == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself can fail: an operator that imports the plan module, and a search module that
    reads the Hydra config, are both reported."""
    fake = tmp_path / "diffopsearch"
    (fake / "operators").mkdir(parents=True)
    (fake / "search").mkdir()
    (fake / "operators" / "bad.py").write_text("import torch\nfrom ..plan import Site\n")
    (fake / "search" / "bad.py").write_text("def f():\n    from omegaconf import OmegaConf\n")
    (fake / "search" / "worse.py").write_text("from .bad import _helper\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    found = violations()
    assert any("operators/bad.py:2 imports diffopsearch.plan" in v for v in found)
    assert any("search/bad.py:2 imports omegaconf" in v for v in found)
    assert any("search/worse.py:1 imports the private name _helper" in v for v in found)
    assert len(found) == 3


@pytest.mark.parametrize("part", sorted(RULES))
def test_every_ruled_part_exists(part):
    assert (PKG / part).is_dir() or (PKG / f"{part}.py").is_file()
