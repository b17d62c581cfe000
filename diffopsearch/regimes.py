"""The named regimes of the operator space and the published methods that are points of it
(docs/DESIGN.md section 2): the tables that the config, the search, the baselines, ``show`` and
``report`` read. Adding a baseline is one :data:`METHODS` entry (plus its size solver in baselines.py,
if it is not one site with a keep count, and its ``conf/plan/`` file). Torch-free.

A regime fixes a site's anchors and knobs; the score is the caller's (FastV's attention after layer 0,
the vision tower's CLS attention, the norm). ``large`` is what "large" sharpness / locality means: inf
in plans (the exact most similar / nearest anchor), a finite value where a gradient must flow (the
search starts its learnable knobs there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Method:
    """A published method as a plan of the space: ``site`` is the Site fields besides layer / keep of
    each of its sites (None: no sites), ``layer`` its default reduction layer, ``what`` the phrase
    ``show`` describes it with."""

    name: str
    site: dict | None
    layer: int
    what: str


_INF = math.inf
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("none", None, 0, "does nothing"),
    # FastV: last-prompt-token attention of the layer before the site, K = 2
    Method("fastv", dict(score="attn", anchors="topk"), 2, "prunes by the last prompt token's attention (FastV)"),
    # ToMe: bipartite soft matching, size-weighted average, proportional attention, before every layer
    Method("tome", dict(score="none", anchors="bipartite", merge=1.0, reweight=1.0), 0,
           "merges by bipartite soft matching (ToMe)"),
    Method("pool", dict(score="none", anchors="grid", merge=1.0, sharpness=0.0, locality=_INF), 0,
           "average-pools on a coarser grid"),
    Method("prumerge", dict(score="cls", anchors="iqr", merge=1.0, sharpness=_INF, locality=0.0), 0,
           "keeps the CLS-attention outliers and merges the rest into them (PruMerge)"),
    Method("visionzip", dict(score="cls", anchors="dominant", merge=1.0, sharpness=_INF, locality=0.0), 0,
           "keeps dominant + contextual tokens and merges the rest (VisionZip)"),
    Method("random", dict(score="random", anchors="topk"), 0, "prunes at random (seeded)"),
)}
