"""``diffopsearch show ckpt=PATH``: a plan card (:mod:`diffopsearch.show`)."""
from __future__ import annotations

from ..config import complete


def run(cfg) -> dict:
    from ..show import show

    return show(complete(cfg, "show").ckpt)
