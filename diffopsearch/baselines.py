"""The published baselines as plans, each solved for a FLOPs budget (cost.py).

``make_plan(name, budget, ...)`` returns a :class:`~diffopsearch.plan.Plan` in the same format as a
searched plan, so every method runs through the same forward. Each method has one free size
parameter; the solver takes, among the values whose cost is <= budget, the one with the highest
cost (the closest to the budget the method's form allows); a budget the method cannot reach is a
UserError. If the unreduced model already fits (budget = 1), the plan has no sites.

- ``none``: no sites (the budget is not applied: it records the unreduced reference).
- ``fastv``: FastV, K = 2 by default (``layer``): last-prompt-token attention of layer K-1, top-k,
  original positions, pruned. Free parameter: the keep count.
- ``tome``: ToMe, bipartite soft matching with size-weighted average (merge 1) and proportional
  attention (reweight 1), a constant r merged before every decoder layer from ``layer`` (default
  0, as ToMe merges in every block of a ViT) to the last, capped by ToMe's n // 2 per step. Free
  parameter: r (the smallest r that fits).
- ``pool``: LLaVA-style average pooling before the first decoder layer (``layer`` to move it): a
  gr x gc grid of near-square cells (2 x 2 windows = 144 of 576 tokens is one point). Free
  parameter: the grid (gr, gc with gc / gr as close as integers allow to the token grid's aspect),
  so budgets above or below one 2x2 pool get coarser or finer average-pooling windows (uneven
  window sizes when the grid does not divide, like adaptive average pooling without overlap).
- ``prumerge``: LLaVA-PruMerge(+): CLS-attention IQR outliers, filled to the keep count by evenly
  spaced tokens (PruMerge+'s spatial sampling) when there are fewer outliers (anchors ``iqr``);
  every pruned token then joins its most key-similar kept token (sharpness inf) by a size-weighted
  average. Differences from the paper's code: the keep count is fixed by the budget instead of
  adaptive; clusters are a partition (each pruned token merges once) with plain averaging rather
  than each kept token adding the CLS-weighted sum of its 32 nearest keys; the merge happens on the
  projected features at the LLM input rather than inside the CLIP tower.
- ``visionzip``: VisionZip: dominant tokens by CLS attention plus contextual tokens (5/32 of the
  keep count: 54+10, 108+20, 162+30), each remaining token merged into its most similar contextual
  token (anchors ``dominant``, sharpness inf, averaging). Free parameter: the keep count.
- ``random``: seeded random pruning before the first decoder layer (top-k of seeded noise). Free
  parameter: the keep count.
"""
from __future__ import annotations

import math
from typing import Sequence

from .cost import dims, plan_cost
from .errors import UserError
from .plan import Plan, Site
from .regimes import METHODS as _TABLE

METHODS = tuple(_TABLE)  # the table's order: the unreduced model, then the baselines
DEFAULT_LAYER = {name: m.layer for name, m in _TABLE.items() if m.site is not None}


def method_site(name: str, layer: int, keep: int) -> Site:
    """One site of the method ``name`` (regimes.METHODS) before ``layer``, keeping ``keep`` tokens."""
    return Site(layer=layer, keep=keep, **_TABLE[name].site)


def tome_sites(start: int, num_layers: int, n_visual: int, r: int) -> list[Site]:
    """A constant r from layer ``start`` on, capped at n // 2 per step; steps that merge nothing
    are left out."""
    sites, n = [], n_visual
    for layer in range(start, num_layers):
        step = min(r, n // 2)
        if step <= 0:
            continue
        n -= step
        sites.append(method_site("tome", layer, n))
    return sites


def pool_keeps(grid: Sequence[int]) -> list[int]:
    """Keep counts of the near-square grids gr x gc (gc within one of gr * cols / rows)."""
    H, W = int(grid[0]), int(grid[1])
    keeps = set()
    for gr in range(1, H + 1):
        for gc in {math.floor(gr * W / H), math.ceil(gr * W / H)}:
            if 1 <= gc <= W:
                keeps.add(gr * gc)
    return sorted(keeps)


def make_plan(name: str, budget: float, text_config, n_visual: int, grid: Sequence[int], n_text: float,
              layer: int | None = None, seed: int = 0, backbone_name: str = "", latency=None) -> Plan:
    """The ``name`` baseline's plan with FLOPs ratio <= ``budget`` (see the module docstring).
    ``text_config``: the decoder config (or a LlavaConfig); ``n_visual`` visual tokens on a
    ``grid`` = (rows, cols); ``n_text`` the (mean) text tokens per prompt, which the ratio depends
    on; ``layer`` overrides the method's reduction layer (tome: the first merging layer). ``latency``: a
    :class:`~diffopsearch.latency.LatencyModel`; the budget is then a fraction of the predicted prefill
    time (``cost=latency``) and the free parameter is solved against it."""
    if name not in METHODS:
        raise UserError(f"plan {name!r} is not a known baseline: use one of {', '.join(METHODS)}")
    L = dims(text_config)["L"]
    grid = [int(g) for g in grid]
    if grid[0] * grid[1] != int(n_visual):
        raise UserError(f"grid {grid} does not hold {n_visual} visual tokens")
    backbone = {"name": backbone_name, "num_layers": L, "visual_tokens": int(n_visual), "grid": grid}
    if name == "none":
        return _finish(Plan(sites=[], backbone=backbone, budget=None, method="none", seed=seed),
                       text_config, n_text, latency)
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise UserError(f"budget {budget!r} is not valid: a {'latency' if latency else 'FLOPs'} ratio in (0, 1]")
    layer = DEFAULT_LAYER[name] if layer is None else int(layer)
    if not 0 <= layer < L:
        raise UserError(f"plan.layer {layer} is not valid: the backbone has {L} decoder layers (0..{L - 1})")
    if name == "fastv" and layer == 0:
        raise UserError("plan.layer 0 is not valid for fastv: its attention score comes from the layer before "
                        "the site, so K >= 1 (the paper uses K = 2)")

    def plan_of(sites: list[Site]) -> Plan:
        return Plan(sites=sites, backbone=backbone, budget=float(budget), method=name, seed=seed)

    n = int(n_visual)
    if name == "tome":
        candidates = [(r, tome_sites(layer, L, n, r)) for r in range(0, n // 2 + 1)]
    else:
        keeps = pool_keeps(grid) if name == "pool" else range(1, n)
        candidates = [(k, [method_site(name, layer, k)]) for k in keeps if k < n] + [(n, [])]
    best, lowest = None, None
    for value, sites in candidates:
        ratio = (latency.ratio(plan_of(sites), n_text) if latency is not None
                 else plan_cost(text_config, plan_of(sites), n, n_text)["flops_ratio"])
        if lowest is None or ratio < lowest[0]:
            lowest = (ratio, value)
        if ratio <= budget + 1e-12 and (best is None or ratio > best[0]):
            best = (ratio, value, sites)
    if best is None:
        what = "r" if name == "tome" else "keep"
        raise UserError(f"budget {budget} is below what {name} can reach on this backbone: its cheapest form "
                        f"({what}={lowest[1]} at layer {layer}) costs {lowest[0]:.3f} of the full prefill "
                        f"{'time predicted on this device' if latency is not None else 'FLOPs'} "
                        f"with {n_text:g} text tokens; raise the budget to >= {lowest[0]:.3f}"
                        + (" or move the site earlier (plan.layer)" if layer > 0 else ""))
    return _finish(plan_of(best[2]), text_config, n_text, latency)


def _finish(plan: Plan, text_config, n_text: float, latency=None) -> Plan:
    plan.cost = plan_cost(text_config, plan, plan.visual_tokens, n_text)
    if latency is not None:
        plan.cost.update(latency.cost_record(plan, n_text))
    return plan.validate()
