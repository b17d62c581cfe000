"""Choosing the plan among what the search learned (the last step of DESIGN section 3's discretize).

The argmax of the learned distributions is one plan. After a short, noisy search the distributions
often hold several plans of nearly equal probability whose accuracies differ by points, and the
per-layer argmax can combine choices that were never good together (measured on the toy backbone:
the argmax plan several points under plans the same distributions sampled often). So the search
derives a few candidates, as DARTS-style methods do before they commit:

- the argmax plan (repaired and filled to the budget, as before);
- ``samples`` plans drawn from the learned distributions (temperature 1, Gumbel noise from a
  stream of their own, so the draw is a function of the seed), each repaired to the budget;

and scores every distinct one on held-out questions of the *search* split that the loop never
trained on: the answer cross-entropy of one teacher-forced reduced forward (the search's own
objective; accuracy is recorded too but not used: on a few hundred questions its noise is a few
points, and on the toy backbone it picked plans the test split then found worse). The lowest is
the plan. Every candidate is a point of the learned distributions and satisfies ``cost <= budget``;
the evaluation split is never touched.
"""
from __future__ import annotations

import json

import torch

from .discretize import Choice, discretize
from .state import ArchState

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


def select_plan(model, processor, candidates, heldout, batch_size: int = 32, procs=None):
    """The candidate with the lowest held-out answer CE, its index, and the table of every
    candidate's scores (plan.json records it)."""
    from .loop import plan_scores

    table = []
    for origin, plan, repair in candidates:
        sc = plan_scores(model, processor, plan, heldout, batch_size=batch_size, procs=procs)
        table.append({"origin": origin, "flops_ratio": round(plan.cost["flops_ratio"], 5),
                      "sites": [f"L{s.layer}:{s.keep}:{s.score}/{s.anchors}" for s in plan.sites],
                      "accuracy": round(sc["accuracy"], 5), "ce": round(sc["ce"], 5)})
    best = min(range(len(table)), key=lambda i: (table[i]["ce"], i))
    return candidates[best], best, table
