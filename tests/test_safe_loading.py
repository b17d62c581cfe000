"""Safe loading: nothing the tool reads can run code.

No pickle anywhere (no pickle-family import, no torch.load without weights_only=True, no
allow_pickle=True, checked by reading every call of the package and scripts/), no pickled file shipped
with the package, and trust_remote_code off unless a config turns it on."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "diffopsearch"


pytestmark = pytest.mark.usefixtures("clean_cli_env")  # tests/conftest.py


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _sources():
    return sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


def test_no_pickle_and_no_unsafe_torch_load_anywhere():
    offenders = []
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] in UNSAFE_MODULES for n in names):
                    offenders.append(f"{rel}:{node.lineno} imports {names}")
            elif isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                kw = {k.arg: k.value for k in node.keywords}
                if name == "load" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "torch":
                    wo = kw.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        offenders.append(f"{rel}:{node.lineno} torch.load without weights_only=True")
                if name in ("read_pickle", "load_pickle"):
                    offenders.append(f"{rel}:{node.lineno} {name}")
                for key in ("allow_pickle", "trust_remote_code"):
                    v = kw.get(key)
                    if isinstance(v, ast.Constant) and v.value is True:
                        offenders.append(f"{rel}:{node.lineno} {key}=True")
    assert offenders == []


def test_shipped_files_hold_no_pickle():
    pickled = [p for p in PACKAGE.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".npy")]
    assert pickled == []
    assert list((PACKAGE / "assets" / "toy-llava").glob("*.safetensors"))


def test_trust_remote_code_is_off_unless_a_config_turns_it_on(monkeypatch, assets):
    import transformers
    from omegaconf import OmegaConf

    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.config import compose

    for model in ("toy", "llava", "llava13b"):
        assert compose("eval", [f"model={model}"]).model.trust_remote_code is False
    seen = []
    for cls in (transformers.AutoProcessor, transformers.LlavaForConditionalGeneration):
        real = cls.from_pretrained.__func__

        def spy(c, *a, _real=real, **k):
            seen.append(k.get("trust_remote_code"))
            return _real(c, *a, **k)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    base = {"name": "toy", "path": str(assets.model), "dtype": "auto", "device": "cpu"}
    load_backbone(OmegaConf.create(base))
    load_backbone(OmegaConf.create({**base, "trust_remote_code": True}))
    assert seen == [False, False, True, True]
