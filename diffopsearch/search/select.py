"""Choosing the plan among what the search learned (the last step of DESIGN section 3's discretize).

The argmax of the learned distributions is one plan. After a short, noisy search the distributions
often hold several plans of nearly equal probability whose accuracies differ by points, and the
per-layer argmax can combine choices that were never good together (measured on the toy backbone:
the argmax plan several points under plans the same distributions sampled often). So the search
derives a few candidates, as DARTS-style methods do before they commit:

- the argmax plan (repaired and filled to the budget, as before);
- ``samples`` plans drawn from the learned distributions (temperature 1, Gumbel noise from a
  stream of their own, so the draw is a function of the seed), each repaired to the budget;
- the space's single-site *corners* (:func:`corner_plans`): at each candidate layer, each named
  regime (prune / merge / pool) with each score the layer offers, keeping as many tokens as the
  budget allows. A short search can collapse onto multi-site mixtures that look cheap (measured on
  an earlier toy backbone at budgets 0.4 and 0.25: every learned candidate spread its cuts over 4-6
  layers and lost 40 points, while one early cut ranked by CLS attention lost 2-3); the corners are
  where the relaxation's mass did not go;

and scores every distinct one on held-out questions of the *search* split that the loop never
trained on: the answer cross-entropy of one teacher-forced reduced forward (the search's own
objective; accuracy is recorded too but not used: on a few hundred questions its noise is a few
points, and on the toy backbone it picked plans the test split then found worse). With many
candidates it runs in two stages (:func:`select_plan`): a screen on the first few held-out
questions, then the argmax plan and the screen's best few on all of them. The lowest is the plan.
Every candidate is a plan of the searched space and satisfies ``cost <= budget``;
the evaluation split is never touched.
"""
from __future__ import annotations

import json

import torch

from .discretize import Choice, discretize
from .state import ArchState, SearchSpace, regime_knobs

SELECT_STREAM_STEP = 1 << 20  # sample "steps" far past any search step: draws of their own


def sample_choices(state: ArchState, seed: int, j: int) -> list[Choice]:
    """The discrete choices of the j-th selection sample (temperature 1, seeded noise)."""
    with torch.no_grad():
        smp = state.sample(SELECT_STREAM_STEP + j, 1.0, seed, noise=True, hard=True)
        ladder = smp.ladder.argmax(-1).tolist()
        if state.space.operator == "mixture":
            return [Choice(ladder=l, regime=r) for l, r in zip(ladder, smp.regime.argmax(-1).tolist())]
        return [Choice(ladder=l, score=s, anchors=a)
                for l, s, a in zip(ladder, smp.score.argmax(-1).tolist(), smp.anchors.argmax(-1).tolist())]


def candidate_plans(state: ArchState, backbone: dict, budget: float, text_config, n_text: float,
                    samples: int, seed: int, fill: bool = True) -> list[tuple[str, object, list]]:
    """``[(origin, plan, repair log)]``: the argmax plan first, then the distinct sampled ones."""
    out, seen = [], set()
    starts = [("argmax", None)] + [(f"sample {j}", sample_choices(state, seed, j)) for j in range(samples)]
    for origin, choices in starts:
        plan, repair = discretize(state, backbone, budget, text_config, n_text, choices=choices, fill=fill)
        key = json.dumps([s.to_dict() for s in plan.sites], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append((origin, plan, repair))
    return out


def corner_plans(space: SearchSpace, backbone: dict, budget: float, text_config, n_text: float,
                 method: str = "search") -> list[tuple[str, object, list]]:
    """``[(origin, plan, [])]``: one site at one candidate layer, a named regime (prune / merge /
    pool, :func:`~.state.regime_knobs`) with each score the layer offers (attention only after
    layer 0), keeping the most tokens whose plan fits the budget (a realisable grid for pool).
    Layers where even one token left costs more than the budget give none."""
    from ..baselines import pool_keeps
    from ..cost import plan_cost
    from ..plan import Plan, Site

    n = space.n_visual
    out = []
    for layer in space.layers:
        for regime in ("prune", "merge", "pool"):
            scores = ["none"] if regime == "pool" else [s for s in space.scores if s != "attn" or layer > 0]
            keeps = [k for k in pool_keeps(space.grid) if k < n] if regime == "pool" else list(range(1, n))
            for score in scores:
                fields = regime_knobs(regime, score)

                def plan_of(k):
                    plan = Plan(sites=[Site(layer=layer, keep=k, **fields)], backbone=dict(backbone),
                                budget=float(budget), method=method)
                    plan.cost = dict(plan_cost(text_config, plan, n, n_text))
                    return plan

                lo, hi = 0, len(keeps)  # cost grows with the keep count: the last keep that fits
                while lo < hi:
                    mid = (lo + hi) // 2
                    if plan_of(keeps[mid]).cost["flops_ratio"] <= budget:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo:
                    out.append((f"corner {regime}/{fields['score']}@L{layer}", plan_of(keeps[lo - 1]), []))
    return out


def _row(origin, plan) -> dict:
    return {"origin": origin, "flops_ratio": round(plan.cost["flops_ratio"], 5),
            "sites": [f"L{s.layer}:{s.keep}:{s.score}/{s.anchors}" for s in plan.sites]}


def _scores(sc: dict, prefix: str = "") -> dict:
    return {f"{prefix}accuracy": round(sc["accuracy"], 5), f"{prefix}ce": round(sc["ce"], 5)}


def select_plan(model, processor, candidates, heldout, screen: int | None = None, finalists: int = 2,
                batch_size: int = 32, procs=None):
    """The candidate with the lowest held-out answer CE, its index, and the table of every
    candidate's scores (plan.json records it).

    With ``screen`` (< the held-out questions), two stages: every candidate but the first (the
    argmax plan, always a finalist) is scored on the first ``screen`` questions (``screen_ce``),
    and the ``finalists`` best of them and the first are scored on all of them (``ce``); the
    others' ``ce`` is None. That keeps the cost of many candidates near that of a few."""
    from .loop import plan_scores

    def score(plan, data):
        return plan_scores(model, processor, plan, data, batch_size=batch_size, procs=procs)

    table = [_row(o, p) for o, p, _ in candidates]
    final = list(range(len(candidates)))
    if screen is not None and screen < len(heldout) and len(candidates) > finalists + 1:
        few = heldout.subset(range(screen), split=f"{heldout.split}, first {screen}")
        for i in final[1:]:
            table[i].update(_scores(score(candidates[i][1], few), "screen_"))
        final = [0] + sorted(final[1:], key=lambda i: (table[i]["screen_ce"], i))[:finalists]
    for i, row in enumerate(table):
        row.update(_scores(score(candidates[i][1], heldout)) if i in final else {"accuracy": None, "ce": None})
    best = min(final, key=lambda i: (table[i]["ce"], i))
    return candidates[best], best, table
