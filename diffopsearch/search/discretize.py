"""From the learned distributions to a hard plan that always fits the budget (DESIGN section 3).

1. Per candidate layer the most likely ladder entry; per site the named regime with the largest
   weight (mixture) or the knobs as they are with the most likely score and anchors (continuous).
   Entries at 1.0 (and the reweight regime, which keeps every token) emit no site.
2. Keep counts are absolute: the fraction times the tokens that really reach the site (rounded;
   grid anchors snap to a realisable rows x cols grid). ``grid`` after a non-grid reduction is not
   realisable (the tokens no longer form a grid), so such a site falls back to ``topk`` with its
   most likely score.
3. Repair: while the hard plan's cost (``cost.plan_cost``, operator overhead included) exceeds the
   budget, apply the cheapest tightening: among all candidate layers, the one-step move down the
   ladder (or out of the reweight regime) that loses the least log-probability per unit of FLOPs
   saved. When every ladder is at its bottom, keep counts shrink directly; a budget below what
   any plan can reach is a UserError before the search starts (:func:`min_cost_ratio`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import UserError
from .relax import nearest_grid_keep
from .state import ANCHORS, REGIMES, SCORES, ArchState, regime_knobs

REWEIGHT = REGIMES.index("reweight") if "reweight" in REGIMES else -1


@dataclass(frozen=True)
class Choice:
    """The discrete choice at one candidate layer: a ladder index and an operator."""

    ladder: int               # index into the ladder
    regime: int | None = None  # mixture mode
    score: int | None = None   # continuous mode
    anchors: int | None = None


def _plan_cost_fn():
    from ..cost import plan_cost

    return plan_cost


def _site_fields(state: ArchState, i: int, c: Choice, knobs: dict | None) -> dict:
    layer = state.space.layers[i]
    if state.space.operator == "mixture":
        return regime_knobs(REGIMES[c.regime], state.space.score_at(layer))
    return dict(score=SCORES[c.score], anchors=ANCHORS[c.anchors],
                merge=_r(knobs["merge"][i]), sharpness=_r(knobs["sharpness"][i]),
                locality=_r(knobs["locality"][i]), reweight=_r(knobs["reweight"][i]))


def _r(x) -> float:
    return round(float(x), 4)


def build_sites(state: ArchState, choices: list[Choice], knobs: dict | None = None,
                score_logits: torch.Tensor | None = None, min_keep: list[int] | None = None) -> list:
    """Hard sites for ``choices`` (one per candidate layer), in layer order. ``min_keep``: optional
    per-layer cap on the keep count (the last-resort repair)."""
    from ..plan import Site

    space = state.space
    n_in = space.n_visual
    grid = tuple(space.grid)  # the incoming tokens' grid, None once a non-grid site acted
    sites = []
    for i, c in enumerate(choices):
        frac = space.ladder[c.ladder]
        keep_all = frac >= 1.0 or (c.regime is not None and c.regime == REWEIGHT)
        cap = None if min_keep is None else min_keep[i]
        if keep_all and cap is None:
            continue
        f = _site_fields(state, i, c, knobs)
        keep = n_in if keep_all else max(1, int(round(frac * n_in)))
        if cap is not None:
            keep = min(keep, cap)
        if keep >= n_in:
            continue
        if f["anchors"] == "grid" and grid is None:
            f["anchors"] = "topk"
            if state.space.operator == "mixture":
                f.update(score=space.score_at(space.layers[i]))
            else:
                logits = score_logits[i] if score_logits is not None else torch.zeros(len(SCORES))
                f["score"] = SCORES[int(torch.argmax(logits))]
        if f["anchors"] == "grid":
            keep = nearest_grid_keep(keep, *grid, at_most=cap is not None)
            if keep >= n_in:
                continue
            from ..operators.reduce import grid_shape

            grid = grid_shape(keep, *grid)
            f["score"] = "none"
        else:
            grid = None
        sites.append(Site(layer=space.layers[i], keep=int(keep), **f))
        n_in = keep
    return sites


def argmax_choices(state: ArchState) -> list[Choice]:
    with torch.no_grad():
        ladder = state.ladder_probs().argmax(-1).tolist()
        if state.space.operator == "mixture":
            regime = state.regime_probs().argmax(-1).tolist()
            return [Choice(ladder=l, regime=r) for l, r in zip(ladder, regime)]
        score = state.masked_score_logits().argmax(-1).tolist()
        anchors = state.anchor_logits.argmax(-1).tolist()
        return [Choice(ladder=l, score=s, anchors=a) for l, s, a in zip(ladder, score, anchors)]


def _log_prob(state: ArchState, i: int, c: Choice) -> float:
    with torch.no_grad():
        lp = torch.log_softmax(state.ladder_logits[i], -1)[c.ladder]
        if c.regime is not None:
            lp = lp + torch.log_softmax(state.regime_logits[i], -1)[c.regime]
    return float(lp)


def _tighten(state: ArchState, i: int, c: Choice) -> Choice | None:
    """The next cheaper choice at candidate layer i, or None at the bottom."""
    L = len(state.space.ladder)
    if c.regime is not None and c.regime == REWEIGHT:
        with torch.no_grad():
            lp = state.regime_logits[i].clone()
        lp[REWEIGHT] = -math.inf
        return replace(c, regime=int(lp.argmax()), ladder=max(c.ladder, 1) if L > 1 else c.ladder)
    if c.ladder + 1 < L:
        return replace(c, ladder=c.ladder + 1)
    return None


def make_plan(state: ArchState, choices: list[Choice], backbone: dict, budget: float, text_config,
              n_text: float, method: str = "search", min_keep: list[int] | None = None):
    from ..plan import Plan

    with torch.no_grad():
        knobs = state.knobs() if state.space.operator == "continuous" else None
        sl = state.masked_score_logits() if state.space.operator == "continuous" else None
    sites = build_sites(state, choices, knobs, sl, min_keep)
    plan = Plan(sites=sites, backbone=dict(backbone), budget=float(budget), method=method)
    plan.cost = dict(_plan_cost_fn()(text_config, plan, state.space.n_visual, n_text))
    return plan


def min_cost_ratio(text_config, backbone: dict, n_text: float, layers) -> float:
    """The cheapest plan there is: one token left at the first candidate layer (ranked by norm,
    which adds no overhead)."""
    from ..plan import Plan, Site

    plan = Plan(sites=[Site(layer=layers[0], keep=1, score="norm")], backbone=dict(backbone), method="min")
    return float(_plan_cost_fn()(text_config, plan, int(backbone["visual_tokens"]), n_text)["flops_ratio"])


def discretize(state: ArchState, backbone: dict, budget: float, text_config, n_text: float,
               choices: list[Choice] | None = None, method: str = "search"):
    """The hard plan of the state (``choices``: start from these instead of the argmax), repaired
    to ``cost <= budget``. Returns (plan, repair_log): one entry per tightening step."""
    choices = list(choices if choices is not None else argmax_choices(state))
    plan = make_plan(state, choices, backbone, budget, text_config, n_text, method)
    log = []
    while plan.cost["flops_ratio"] > budget:
        best = None
        for i, c in enumerate(choices):
            new = _tighten(state, i, c)
            if new is None:
                continue
            trial = choices[:i] + [new] + choices[i + 1:]
            tp = make_plan(state, trial, backbone, budget, text_config, n_text, method)
            saved = plan.cost["flops_ratio"] - tp.cost["flops_ratio"]
            if saved <= 1e-12:
                continue
            loss = _log_prob(state, i, c) - _log_prob(state, i, new)
            key = (max(loss, 0.0) / saved, -saved)
            if best is None or key < best[0]:
                best = (key, i, new, tp)
        if best is None:
            plan = _shrink_until_fits(state, choices, backbone, budget, text_config, n_text, method, log)
            break
        _, i, new, plan = best
        log.append({"layer": state.space.layers[i], "ladder": state.space.ladder[new.ladder],
                    "regime": REGIMES[new.regime] if new.regime is not None else None,
                    "flops_ratio": round(plan.cost["flops_ratio"], 5)})
        choices[i] = new
    return plan, log


def _shrink_until_fits(state, choices, backbone, budget, text_config, n_text, method, log):
    """Last resort when every ladder is at its bottom: shrink the earliest site's keep count."""
    n = state.space.n_visual
    caps = [n] * len(choices)
    plan = make_plan(state, choices, backbone, budget, text_config, n_text, method)
    for i in range(len(choices)):
        while plan.cost["flops_ratio"] > budget:
            current = {s.layer: s.keep for s in plan.sites}.get(state.space.layers[i])
            cap = (current if current is not None else n) - 1
            if cap < 1:
                break
            caps[i] = cap
            # the first layer must act: give it the cheapest choice there if it emitted no site
            if current is None:
                choices[i] = replace(choices[i], ladder=len(state.space.ladder) - 1)
            plan = make_plan(state, choices, backbone, budget, text_config, n_text, method, min_keep=caps)
            log.append({"layer": state.space.layers[i], "keep": cap, "flops_ratio": round(plan.cost["flops_ratio"], 5)})
        if plan.cost["flops_ratio"] <= budget:
            return plan
    raise UserError(f"budget={budget} cannot be met by any plan over candidate layers {list(state.space.layers)}: "
                    f"the cheapest reaches a FLOPs ratio of {plan.cost['flops_ratio']:.3f} (the text tokens alone "
                    "cost that much). Raise the budget or add earlier candidate layers.")
