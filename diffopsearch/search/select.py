"""The reported safety net after the gradient phase (docs/DESIGN.md section 3): selection among a few
candidates on held-out questions of the search split.

The gradient phase's own plan is the policy's mode, with its learned knobs. Selection scores it beside

- the next most probable plans of the policy (``samples``), with the learned knobs;
- the space's single-site *corners* (``corners``): every allowed (layer, named regime) with the regime's
  exact knobs, keeping as many tokens as the budget allows;

by the answer cross-entropy of one teacher-forced reduced forward on held-out questions that the loop
never trained on (accuracy on a few hundred questions is too noisy to choose by). With many candidates it
runs in two stages (:func:`select_plan`): a screen on the first few held-out questions, then the mode and
the screen's best few on all of them; the lowest wins. plan.json records the table, the winner and
whether the winner is the gradient phase's own plan. Every candidate satisfies ``cost <= budget``; the
evaluation split is never touched.
"""
from __future__ import annotations

import json

from ..regimes import regime_knobs
from .policy import ArchState
from .space import OPS, Planner, corner_choices, describe


def candidate_plans(state: ArchState, planner: Planner, samples: int, corners: bool) -> list[tuple[str, object]]:
    """``[(origin, plan)]``: the policy's mode first ("gradient"), then its next most probable plans, then
    the corners; duplicates (same sites) dropped, the first origin kept."""
    out, seen = [], set()

    def add(origin, plan):
        if plan is None:
            return
        key = json.dumps([s.to_dict() for s in plan.sites], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((origin, plan))

    ranked = state.policy.ranked(samples + 1)
    for j, (choice, _) in enumerate(ranked):
        add("gradient" if j == 0 else f"policy #{j + 1} {describe(choice, planner.space)}",
            planner.plan(choice, state.knobs.floats))
    if corners:
        for choice in corner_choices(planner.space):
            op = OPS[choice.op]
            exact = regime_knobs(op.regime, op.score)
            knobs = lambda slot, regime, e=exact: {k: e[k] for k in ("merge", "sharpness", "locality", "reweight")}  # noqa: E731
            add(f"corner {describe(choice, planner.space)}", planner.plan(choice, knobs))
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
    gradient phase's plan, always a finalist) is scored on the first ``screen`` questions (``screen_ce``),
    and the ``finalists`` best of them and the first are scored on all of them (``ce``); the
    others' ``ce`` is None. That keeps the cost of many candidates near that of a few."""
    from .loop import plan_scores

    def score(plan, data):
        return plan_scores(model, processor, plan, data, batch_size=batch_size, procs=procs)

    table = [_row(o, p) for o, p in candidates]
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
