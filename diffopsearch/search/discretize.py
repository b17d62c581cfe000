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
   saved. The last tightened site then gets back, token by token, what still fits (a ladder step
   is coarse). Optionally (``fill``) a plan under budget spends what is left the same way in
   reverse: one-step loosenings that fit, then a token-exact top-up. When every ladder is at its
   bottom, the first site's keep count shrinks directly; a budget below what any plan can reach is
   a UserError before the search starts (:func:`min_cost_ratio`).
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
                score_logits: torch.Tensor | None = None, overrides: dict[int, int] | None = None) -> list:
    """Hard sites for ``choices`` (one per candidate layer), in layer order. ``overrides``: exact
    keep counts for some candidate indices (capped by the tokens reaching them; grid anchors take the
    largest realisable grid <= it): the repair's fine adjustments."""
    from ..operators.reduce import grid_shape
    from ..plan import Site

    space = state.space
    overrides = overrides or {}
    n_in = space.n_visual
    grid = tuple(space.grid)  # the incoming tokens' grid, None once a non-grid site acted
    sites = []
    for i, c in enumerate(choices):
        frac = space.ladder[c.ladder]
        keep_all = frac >= 1.0 or (c.regime is not None and c.regime == REWEIGHT)
        exact = overrides.get(i)
        if exact is None:
            if keep_all:
                continue
            keep = max(1, int(round(frac * n_in)))
        else:
            keep = max(1, min(int(exact), n_in))
        if keep >= n_in:
            continue
        f = _site_fields(state, i, c, knobs)
        if f["anchors"] == "grid" and grid is None:
            f["anchors"] = "topk"
            if state.space.operator == "mixture":
                f.update(score=space.score_at(space.layers[i]))
            else:
                logits = score_logits[i] if score_logits is not None else torch.zeros(len(SCORES))
                f["score"] = SCORES[int(torch.argmax(logits))]
        if f["anchors"] == "grid":
            keep = nearest_grid_keep(keep, *grid, at_most=exact is not None)
            if keep >= n_in:
                continue
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
              n_text: float, method: str = "search", overrides: dict[int, int] | None = None):
    from ..plan import Plan

    with torch.no_grad():
        knobs = state.knobs() if state.space.operator == "continuous" else None
        sl = state.masked_score_logits() if state.space.operator == "continuous" else None
    sites = build_sites(state, choices, knobs, sl, overrides)
    plan = Plan(sites=sites, backbone=dict(backbone), budget=float(budget), method=method)
    plan.cost = dict(_plan_cost_fn()(text_config, plan, state.space.n_visual, n_text))
    return plan


def min_cost_ratio(text_config, backbone: dict, n_text: float, layers) -> float:
    """The cheapest plan there is: one token left at the first candidate layer (ranked by norm,
    which adds no overhead)."""
    from ..plan import Plan, Site

    plan = Plan(sites=[Site(layer=layers[0], keep=1, score="norm")], backbone=dict(backbone), method="min")
    return float(_plan_cost_fn()(text_config, plan, int(backbone["visual_tokens"]), n_text)["flops_ratio"])


def _top_up(state, choices, i, lo_plan, hi_keep, backbone, budget, text_config, n_text, method, log):
    """The largest keep in (lo's keep at candidate i, hi_keep) whose plan still fits; ``lo_plan``
    if none does. Cost grows with the keep count, so the first fit from the top is the largest."""
    layer = state.space.layers[i]
    lo = lo_plan.cost["visual_tokens_per_layer"][layer]
    for k in range(hi_keep - 1, lo, -1):
        tp = make_plan(state, choices, backbone, budget, text_config, n_text, method, overrides={i: k})
        if lo_plan.cost["flops_ratio"] < tp.cost["flops_ratio"] <= budget:
            log.append({"layer": layer, "keep": k, "top_up": True, "flops_ratio": round(tp.cost["flops_ratio"], 5)})
            return tp
    return lo_plan


def _moves(state, choices, plan, step, backbone, budget, text_config, n_text, method):
    """Every one-step ladder move (``step`` = +1 tighter, -1 looser) with its plan, its change of
    cost and the log-probability it gives up (negative: the distribution prefers the new choice)."""
    out = []
    for i, c in enumerate(choices):
        new = _tighten(state, i, c) if step > 0 else (replace(c, ladder=c.ladder - 1) if c.ladder > 0 else None)
        if new is None:
            continue
        tp = make_plan(state, choices[:i] + [new] + choices[i + 1:], backbone, budget, text_config, n_text, method)
        delta = abs(plan.cost["flops_ratio"] - tp.cost["flops_ratio"])
        if delta <= 1e-12:
            continue
        out.append((_log_prob(state, i, c) - _log_prob(state, i, new), delta, i, new, tp))
    return out


def discretize(state: ArchState, backbone: dict, budget: float, text_config, n_text: float,
               choices: list[Choice] | None = None, method: str = "search", top_up: bool = True,
               fill: bool = False):
    """The hard plan of the state (``choices``: start from these instead of the argmax), repaired
    to ``cost <= budget``. Returns (plan, log): one entry per change.

    ``top_up``: a ladder step is coarse, so the last tightening may undershoot the budget by up to
    one step; the tightened site then gets back, token by token, as many tokens as still fit.
    ``fill``: a plan under budget spends what is left: one-step loosenings that fit, the one that
    gives up the least log-probability per unit of FLOPs first, then a token-exact top-up of the
    best loosening that did not fit."""
    choices = list(choices if choices is not None else argmax_choices(state))
    plan = make_plan(state, choices, backbone, budget, text_config, n_text, method)
    log, last = [], None
    while plan.cost["flops_ratio"] > budget:
        moves = _moves(state, choices, plan, +1, backbone, budget, text_config, n_text, method)
        if not moves:
            return _shrink_until_fits(state, choices, backbone, budget, text_config, n_text, method, log), log
        _, _, i, new, tp = min(moves, key=lambda m: (max(m[0], 0.0) / m[1], -m[1]))
        last = (i, plan.cost["visual_tokens_per_layer"][state.space.layers[i]])
        plan = tp
        log.append({"layer": state.space.layers[i], "ladder": state.space.ladder[new.ladder],
                    "regime": REGIMES[new.regime] if new.regime is not None else None,
                    "flops_ratio": round(plan.cost["flops_ratio"], 5)})
        choices[i] = new
    if fill:
        while True:
            moves = _moves(state, choices, plan, -1, backbone, budget, text_config, n_text, method)
            fits = [m for m in moves if m[4].cost["flops_ratio"] <= budget]
            if not fits:
                if moves:  # the preferred loosening that does not fit whole: as many tokens as fit
                    _, _, i, new, tp = min(moves, key=lambda m: (m[0] / m[1], -m[1]))
                    last = (i, tp.cost["visual_tokens_per_layer"][state.space.layers[i]])
                break
            _, _, i, new, tp = min(fits, key=lambda m: (m[0] / m[1], -m[1]))
            plan = tp
            log.append({"layer": state.space.layers[i], "ladder": state.space.ladder[new.ladder], "fill": True,
                        "flops_ratio": round(plan.cost["flops_ratio"], 5)})
            choices[i] = new
    if top_up and last is not None:
        i, hi_keep = last
        plan = _top_up(state, choices, i, plan, hi_keep, backbone, budget, text_config, n_text, method, log)
    return plan, log


def _shrink_until_fits(state, choices, backbone, budget, text_config, n_text, method, log):
    """Last resort when every ladder is at its bottom: shrink the first candidate site's keep count
    (down to one token, the cheapest plan there is: :func:`min_cost_ratio`)."""
    choices[0] = replace(choices[0], ladder=len(state.space.ladder) - 1)
    if choices[0].regime is not None and choices[0].regime == REWEIGHT:
        choices[0] = _tighten(state, 0, choices[0])
    layer = state.space.layers[0]
    plan = make_plan(state, choices, backbone, budget, text_config, n_text, method)
    while plan.cost["flops_ratio"] > budget:
        current = {s.layer: s.keep for s in plan.sites}.get(layer, state.space.n_visual)
        if current <= 1:
            raise UserError(f"budget={budget} cannot be met by any plan over candidate layers "
                            f"{list(state.space.layers)}: the cheapest reaches a FLOPs ratio of "
                            f"{plan.cost['flops_ratio']:.3f} (the text tokens alone cost that much). Raise the "
                            "budget or add earlier candidate layers.")
        plan = make_plan(state, choices, backbone, budget, text_config, n_text, method, overrides={0: current - 1})
        log.append({"layer": layer, "keep": current - 1, "flops_ratio": round(plan.cost["flops_ratio"], 5)})
    return plan
