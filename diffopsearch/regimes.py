"""The named regimes of the operator space (docs/DESIGN.md section 2): one table that the search, the
baselines and ``show`` read. Torch-free.

A regime fixes a site's anchors and knobs; the score is the caller's (FastV's attention after layer 0,
the vision tower's CLS attention, the norm). ``large`` is what "large" sharpness / locality means: inf
in plans (the exact most similar / nearest anchor), a finite value where a gradient must flow (the
search starts its learnable knobs there).
"""
from __future__ import annotations

import math

# regime -> (anchors, merge, sharpness, locality, reweight); None = "large"
_TABLE = {
    "prune": ("topk", 0.0, 0.0, 0.0, 0.0),
    "merge": ("topk", 1.0, None, 0.0, 1.0),      # PruMerge-like: each dropped token into its most similar anchor
    "pool": ("grid", 1.0, 0.0, None, 0.0),       # LLaVA-style: each token into its own grid cell
    "reweight": ("topk", 0.0, 0.0, 0.0, 1.0),    # keep = n: only proportional attention acts
}
REGIMES = tuple(_TABLE)
KNOBS = ("merge", "sharpness", "locality", "reweight")


def regime_knobs(regime: str, score: str, large: float = math.inf) -> dict:
    """The Site fields besides layer / keep of ``regime`` ranking by ``score`` (grid anchors need none)."""
    if regime not in _TABLE:
        raise ValueError(f"unknown regime {regime!r}; known: {', '.join(REGIMES)}")
    anchors, merge, sharpness, locality, reweight = _TABLE[regime]
    return dict(score="none" if anchors == "grid" else score, anchors=anchors, merge=merge,
                sharpness=large if sharpness is None else sharpness,
                locality=large if locality is None else locality, reweight=reweight)
