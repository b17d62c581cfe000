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
import math

from ..regimes import regime_knobs
from .policy import ArchState
from .space import OPS, Planner, corner_choices, describe


def candidate_plans(state: ArchState, planner: Planner, samples: int, corners: bool) -> list[tuple[str, object]]:
    """``[(origin, plan)]``: the gradient phase's plan first ("gradient": :meth:`Policy.decode`), then the
    policy's most probable plans (``samples`` of them besides the first), then
    the corners; duplicates (same sites) dropped, the first origin kept."""
    out, seen = [], set()

    def add(origin, plan):
        if plan is None:
            return
        key = json.dumps([s.to_dict() for s in plan.sites], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((origin, plan))

    add("gradient", planner.plan(state.policy.decode(), state.knobs.floats))
    for j, (choice, _) in enumerate(state.policy.ranked(samples + 1)):
        if len(out) > samples:
            break
        add(f"policy #{j + 1} {describe(choice, planner.space)}", planner.plan(choice, state.knobs.floats))
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
                batch_size: int = 32, procs=None, margin: float = 1.0):
    """The chosen candidate, its index, and the table of every candidate's scores (plan.json records it).

    With ``screen`` (< the held-out questions), two stages: every candidate but the first (the
    gradient phase's plan, always a finalist) is scored on the first ``screen`` questions (``screen_ce``),
    and the ``finalists`` best of them and the first are scored on all of them (``ce``); the
    others' ``ce`` is None. That keeps the cost of many candidates near that of a few.

    The finalist with the lowest held-out answer CE replaces the gradient phase's plan only if, question by
    question, its CE is lower by more than ``margin`` paired standard errors (``paired_diff``, ``paired_se``
    in its row): a few hundred questions cannot tell plans closer than that apart, and a challenger that
    wins by noise is a worse plan about as often as a better one."""
    from .loop import encode_questions, plan_scores
    from ..runtime import Procs

    procs = procs or Procs()

    def score(plan, data, per_question=False):
        return plan_scores(model, processor, plan, data, batch_size=batch_size, procs=procs,
                           per_question=per_question)

    def encoded(data):  # images decoded and the vision tower run once, not once per candidate
        return encode_questions(model, processor, data, batch_size, procs)

    table = [_row(o, p) for o, p in candidates]
    final = list(range(len(candidates)))
    if screen is not None and screen < len(heldout) and len(candidates) > finalists + 1:
        few = encoded(heldout.subset(range(screen), split=f"{heldout.split}, first {screen}"))
        for i in final[1:]:
            table[i].update(_scores(score(candidates[i][1], few), "screen_"))
        final = [0] + sorted(final[1:], key=lambda i: (table[i]["screen_ce"], i))[:finalists]
    per_q = {}
    heldout = encoded(heldout)
    for i, row in enumerate(table):
        if i in final:
            sc = score(candidates[i][1], heldout, per_question=True)
            per_q[i] = sc["per_question"]
            row.update(_scores(sc))
        else:
            row.update({"accuracy": None, "ce": None})
    for i in final[1:]:
        diff, se = paired_difference(per_q[i], per_q[0], procs)
        table[i].update({"paired_diff": round(diff, 6), "paired_se": round(se, 6)})
    best = 0
    if len(final) > 1:
        challenger = min(final[1:], key=lambda i: (table[i]["ce"], i))
        if table[challenger]["paired_diff"] < -margin * table[challenger]["paired_se"]:
            best = challenger
    return candidates[best], best, table


def paired_difference(a, b, procs) -> tuple[float, float]:
    """Mean over questions of a - b (per-question values, this process's rows; the same rows in both) and
    its standard error, over every process's questions."""
    import torch

    d = (a - b).double()
    tally = torch.tensor([float(d.sum()), float(d.square().sum()), float(d.numel())], dtype=torch.float64)
    procs.mean_([tally])  # means of sums: the ratios below are the same as of the sums
    s, s2, n = (float(x) for x in tally)
    if n <= 0:
        return 0.0, 0.0
    mean = s / n
    n_all = n * procs.world
    var = max(s2 / n - mean * mean, 0.0) * n_all / max(n_all - 1, 1)
    return mean, math.sqrt(var / n_all)
