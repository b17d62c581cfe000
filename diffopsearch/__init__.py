"""diffopsearch: differentiable search over visual-token reduction operators for LLaVA-family models.

Two lines add a searched (or baseline) reduction plan to your own LLaVA code::

    plan = diffopsearch.load_plan("plan.json")
    model = diffopsearch.apply_plan(model, plan)   # same forward / generate conventions

``diffopsearch.load_backbone("toy")`` (or a Hugging Face id / local directory) gives a (model,
processor) pair as the commands load it.

The public names are imported lazily, so ``import diffopsearch`` stays cheap (no torch).
"""
from __future__ import annotations

__all__ = ["load_plan", "apply_plan", "Plan", "Site", "load_backbone"]

_LAZY = {
    "load_plan": "diffopsearch.plan",
    "Plan": "diffopsearch.plan",
    "Site": "diffopsearch.plan",
    "apply_plan": "diffopsearch.patch.llava",
    "load_backbone": "diffopsearch.backbone.load",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'diffopsearch' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
