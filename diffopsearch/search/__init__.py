"""`diffopsearch search`: the operator search (docs/DESIGN.md section 3).

- :mod:`.space`: what is chosen (one or two sites, their layers, operators and keep ratio) and the
  plan of a choice, its first keep solved from the budget (every plan fits by construction);
- :mod:`.policy`: what learns (a staged policy over the choices, the operators' knobs);
- :mod:`.loop`: the gradient phase (score-function gradients for the choices from several hard plans
  per step, backpropagation through the hard forward for the knobs; log, checkpoints, resume, data
  parallel);
- :mod:`.select`: the reported safety net (the policy's plan against the runners-up and the corners
  on held-out questions).

:func:`search_plan` searches and chooses; the ``search`` command around it (data, plan.json, the
evaluation) is :mod:`diffopsearch.commands.search`.
"""
from __future__ import annotations

from ..errors import UserError

__all__ = ["hold_out", "search_plan"]


def hold_out(train, n: int, seed: int):
    """Split the search split into (rows the loop trains on, ``n`` held-out rows that choose the
    plan: :mod:`.select`), by a permutation drawn from ``seed``. At most a quarter is held out."""
    import torch

    from .loop import seed_for

    n = min(int(n), len(train) // 4)
    if n <= 0:
        return train, None
    g = torch.Generator().manual_seed(seed_for(seed, 0, 29))
    perm = torch.randperm(len(train), generator=g).tolist()
    return (train.subset(sorted(perm[n:])),
            train.subset(sorted(perm[:n]), split=f"{train.split} ({n} held-out rows)"))


def search_plan(model, processor, train, space, settings, n_text, out_dir=None, accelerator=None, resume=False,
                progress=True, config: dict | None = None, stop_after=None, model_name: str = "",
                heldout=None, select_samples: int = 0, select_corners: bool = False, screen_questions=None,
                finalists: int = 2, on_step=None, margin: float = 1.0, latency=None):
    """Search and choose: returns (plan, SearchResult). The gradient phase's plan is the policy's mode with
    its learned knobs; with ``heldout`` questions it competes with the policy's next ``select_samples``
    plans and (``select_corners``) the space's corners (:mod:`.select`), and plan.json says which won.
    ``latency``: a latency model; the budget is then a fraction of the predicted prefill time.
    Writes nothing but the loop's log / checkpoints."""
    from ..plan import backbone_info
    from .loop import search
    from .space import Planner, min_cost_ratio

    text_config = model.config.text_config
    backbone = backbone_info(model.config, name=model_name)
    floor = min_cost_ratio(text_config, backbone, n_text, space.layers[0], latency)
    if settings.budget < floor:
        what = ("of the unreduced prefill time predicted on this device (the vision tower and the other fixed "
                "parts stay; or use cost=flops)" if latency is not None else "of the full prefill FLOPs")
        raise UserError(f"budget={settings.budget} is below what any plan can reach on this backbone and data: "
                        f"even one visual token left at layer {space.layers[0]} costs {floor:.3f} {what} "
                        f"(text tokens: {n_text:.1f} on average). Use budget >= {floor:.3f}.")
    planner = Planner(space, backbone, settings.budget, text_config, n_text, latency=latency)
    res = search(model, processor, train, space, planner, settings, n_text, out_dir=out_dir,
                 accelerator=accelerator, resume=resume, progress=progress, stop_after=stop_after, on_step=on_step)
    from .select import candidate_plans

    cands = candidate_plans(res.state, planner, select_samples if heldout is not None else 0,
                            select_corners and heldout is not None)
    selection = None
    if heldout is not None and len(heldout) and len(cands) > 1:
        from ..runtime import Procs
        from .select import select_plan

        (origin, plan), best, table = select_plan(model, processor, cands, heldout, screen_questions, finalists,
                                                  procs=Procs(accelerator), margin=margin)
        selection = {"questions": len(heldout), "split": heldout.split, "chosen": best, "chosen_origin": origin,
                     "gradient_plan_won": best == 0, "margin_se": margin, "candidates": table,
                     # select_plan decides whether it screened; its table says so
                     "screen_questions": screen_questions if any("screen_ce" in r for r in table) else None}
    else:
        plan = cands[0][1]
    plan.seed = settings.seed
    from dataclasses import asdict

    from .space import describe

    config = dict(config or {})
    was_resume = bool(config.pop("resume", resume))  # how the plan was reached, not what it is: in plan.run
    mode = res.state.policy.decode()
    plan.search = {
        "config": config, "settings": asdict(settings), "space": space.to_dict(), "seed": settings.seed,
        "steps": res.steps, "final_loss": res.final_loss, "n_text": n_text,
        "gradient_plan": {"choice": describe(mode, space), "sites": [s.to_dict() for s in cands[0][1].sites]},
        "distributions": res.state.policy.distributions(), "knobs": res.state.knobs.to_dict(),
        "selection": selection,
    }
    # Everything that differs between two runs of the same config and seed lives here, so the rest
    # of plan.json is byte-identical across reruns and across an interrupted + resumed run.
    plan.run = {"created": _utc_now(), "seconds": round(res.seconds, 2), "resume": was_resume,
                "resumed_from": res.resumed_from, "reduced_forwards": res.forwards}
    return plan, res


def _utc_now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
