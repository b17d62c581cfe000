"""`diffopsearch search`: the operator search (docs/DESIGN.md section 3).

- :mod:`.space`: what is chosen (one or two sites, their layers, operators and keep ratio) and the
  plan of a choice, its first keep solved from the budget (every plan fits by construction);
- :mod:`.policy`: what learns (a staged policy over the choices, the operators' knobs);
- :mod:`.loop`: the gradient phase (score-function gradients for the choices from several hard plans
  per step, backpropagation through the hard forward for the knobs; log, checkpoints, resume, data
  parallel);
- :mod:`.select`: the reported safety net (the policy's plan against the runners-up and the corners
  on held-out questions).

:func:`run` is the command: search on the search split, write ``plan.json`` in the run directory,
evaluate it on the evaluation split (``results.json``) and, with ``search.eval_baselines=true``, every
baseline at the same budget (one table).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

__all__ = ["run", "search_plan"]

PLAN_NAME = "plan.json"
BASELINES_DIR = "baselines"


def _get(cfg, key, default=None):
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except Exception:
        return default
    return default if value is None else value


def settings_from(cfg):
    from .loop import SearchSettings

    s = cfg.search
    fields = SearchSettings.__dataclass_fields__
    kw = {k: _get(s, k) for k in fields if k not in ("budget", "seed") and _get(s, k) is not None}
    return SearchSettings(budget=float(cfg.budget), seed=int(_get(cfg, "seed", 0)), **kw)


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
                finalists: int = 2, on_step=None):
    """Search and choose: returns (plan, SearchResult). The gradient phase's plan is the policy's mode with
    its learned knobs; with ``heldout`` questions it competes with the policy's next ``select_samples``
    plans and (``select_corners``) the space's corners (:mod:`.select`), and plan.json says which won.
    Writes nothing but the loop's log / checkpoints."""
    from ..plan import backbone_info
    from .loop import search
    from .space import Planner, min_cost_ratio

    text_config = model.config.text_config
    backbone = backbone_info(model.config, name=model_name)
    floor = min_cost_ratio(text_config, backbone, n_text, space.layers[0])
    if settings.budget < floor:
        raise UserError(f"budget={settings.budget} is below what any plan can reach on this backbone and data: "
                        f"even one visual token left at layer {space.layers[0]} costs {floor:.3f} of the full "
                        f"prefill FLOPs (text tokens: {n_text:.1f} on average). Use budget >= {floor:.3f}.")
    planner = Planner(space, backbone, settings.budget, text_config, n_text)
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
                                                  procs=Procs(accelerator))
        selection = {"questions": len(heldout), "split": heldout.split, "chosen": best, "chosen_origin": origin,
                     "gradient_plan_won": best == 0, "candidates": table,
                     # select_plan decides whether it screened; its table says so
                     "screen_questions": screen_questions if any("screen_ce" in r for r in table) else None}
    else:
        plan = cands[0][1]
    plan.seed = settings.seed
    from dataclasses import asdict

    from .space import describe

    config = dict(config or {})
    was_resume = bool(config.pop("resume", resume))  # how the plan was reached, not what it is: in plan.run
    mode = res.state.policy.mode()
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


def run(cfg, out_dir=None, accelerator=None) -> dict:
    """The body of ``diffopsearch search``: returns the searched plan's results dict."""
    import torch

    from ..backbone.load import load_backbone
    from ..config import to_dict, validate
    from ..data.datasets import load_from_config, load_qa, splits_overlap
    from ..evaluate import evaluate, make_accelerator, mean_prompt_text_tokens, output_dir

    validate(cfg)
    out = output_dir(out_dir)
    accelerator = accelerator or make_accelerator(cfg.model)
    multi = accelerator.num_processes > 1
    is_main = accelerator.process_index == 0
    torch.manual_seed(int(_get(cfg, "seed", 0)))
    ds = cfg.dataset
    # The data first: a bad path or column fails in seconds, before a large model is loaded.
    train = load_qa(_get(ds, "name", "toy"), _get(ds, "path") or None, _get(ds, "search_split", "train"),
                    _get(ds, "search_questions_config") or _get(ds, "questions_config"),
                    _get(ds, "search_images_config") or _get(ds, "images_config"),
                    _get(cfg.search, "train_limit"))
    limit = _get(cfg, "limit")
    evalset = load_from_config(ds, limit=None if limit is None else int(limit))
    if splits_overlap(train.split, evalset.split) and train.path == evalset.path and \
            (_get(ds, "search_questions_config") or _get(ds, "questions_config")) == _get(ds, "questions_config"):
        raise UserError(f"dataset.search_split={train.split!r} overlaps the evaluation split "
                        f"dataset.split={evalset.split!r}: the search must never see the questions its results are "
                        "reported on; use another split (dataset.search_split=train) or disjoint row ranges "
                        "(search_split='validation[:4000]' with split='validation[4000:]').")
    train, heldout = hold_out(train, int(_get(cfg.search, "select_questions", 0)), int(_get(cfg, "seed", 0)))
    model, processor = load_backbone(cfg.model, device=accelerator.device if multi else None)
    from .space import make_space

    space = make_space(model.config, _get(cfg.search, "candidate_layers"), bool(_get(cfg.search, "two_sites", True)))
    settings = settings_from(cfg)
    n_text = mean_prompt_text_tokens(processor, train)
    model_name = str(_get(cfg.model, "name", "model"))
    path = _get(cfg.model, "path", "")
    model_id = f"{model_name}:{path}" if path else model_name
    # every process reads the checkpoint on resume; only the main one writes (the loop sees to it)
    plan, res = search_plan(model, processor, train, space, settings, n_text, out_dir=out,
                            accelerator=accelerator, resume=bool(_get(cfg, "resume", False)),
                            config=to_dict(cfg), model_name=model_id, heldout=heldout, select_samples=int(_get(cfg.search, "select_samples", 0)),
                            select_corners=bool(_get(cfg.search, "select_corners", False)),
                            screen_questions=_get(cfg.search, "screen_questions", None),
                            finalists=int(_get(cfg.search, "select_finalists", 2)))
    if is_main:
        plan.save(out / PLAN_NAME)
        _print_plan(plan)
    accelerator.wait_for_everyone()
    common = dict(batch_size=int(_get(cfg, "batch_size", 16)), max_new_tokens=int(_get(cfg, "max_new_tokens", 16)),
                  accelerator=accelerator, metric=_get(ds, "metric") or None,
                  vqa_mode=_get(ds, "vqa_mode", "official"), model_name=model_id)
    extra = {"budget": float(cfg.budget), "ckpt": str(out / PLAN_NAME), "limit": None if limit is None else int(limit),
             "method": "search", "search": {**{k: plan.search[k] for k in ("steps", "final_loss", "seed")},
                                            "seconds": plan.run["seconds"]}}
    results = evaluate(model, processor, plan, evalset, out_dir=out, extra=extra,
                       resume=bool(_get(cfg, "resume", False)), **common)
    if bool(_get(cfg.search, "eval_baselines", False)):
        rows = eval_baselines(model, processor, evalset, float(cfg.budget), out, common, int(_get(cfg, "seed", 0)),
                              resume=bool(_get(cfg, "resume", False)))
        rows.insert(0, _row("search", results))
        results["baselines"] = rows
        if is_main:
            from ..io import atomic_write_json

            atomic_write_json(out / "results.json", results)
            print_comparison(rows, float(cfg.budget))
    return results


def _row(method: str, r: dict) -> dict:
    lat = r.get("latency") or {}
    return {"method": method, "accuracy": r["accuracy"], "n": r["n"], "flops_ratio": r["flops_ratio"],
            "avg_visual_tokens": (r.get("visual_tokens") or {}).get("avg"),
            "prefill_ms_per_sample": lat.get("prefill_ms_per_sample"),
            "prefill_ms_per_batch": lat.get("prefill_ms_per_batch")}


def eval_baselines(model, processor, evalset, budget: float, out: Path, common: dict, seed: int,
                   resume: bool = False) -> list[dict]:
    """Every baseline at ``budget`` (and the unreduced model), each into ``out/baselines/NAME``."""
    from ..baselines import make_plan
    from ..config import PLAN_NAMES
    from ..evaluate import evaluate, mean_prompt_text_tokens, visual_token_count

    n_visual, grid = visual_token_count(model.config)
    n_text = mean_prompt_text_tokens(processor, evalset)
    rows = []
    for name in PLAN_NAMES:
        try:
            plan = make_plan(name, 1.0 if name == "none" else budget, model.config.text_config, n_visual, grid,
                             n_text, seed=seed)
            r = evaluate(model, processor, plan, evalset, out_dir=out / BASELINES_DIR / name, show=False,
                         resume=resume, extra={"budget": 1.0 if name == "none" else budget, "method": name}, **common)
        except UserError as e:
            # e.g. FastV at K=2 cannot reach a small budget, or a backbone without the CLS signal:
            # a row that says so, and the other methods still run
            rows.append({"method": name, "accuracy": None, "n": 0, "flops_ratio": None, "avg_visual_tokens": None,
                         "prefill_ms_per_sample": None, "prefill_ms_per_batch": None, "unavailable": str(e)})
            continue
        rows.append(_row(name, r))
    return rows


def print_comparison(rows: list[dict], budget: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"search vs baselines at budget {budget:g} (none = unreduced)")
    for c, j in (("method", "left"), ("accuracy", "right"), ("FLOPs ratio", "right"), ("avg visual tokens", "right"),
                 ("prefill ms / sample", "right")):
        t.add_column(c, justify=j)
    for r in rows:
        ms = r["prefill_ms_per_sample"]
        if r["accuracy"] is None:
            t.add_row(r["method"], "-", "n/a", "-", "-")
            continue
        t.add_row(r["method"], f"{100 * r['accuracy']:.2f}%", f"{r['flops_ratio']:.3f}",
                  "-" if r["avg_visual_tokens"] is None else f"{r['avg_visual_tokens']:.1f}",
                  "-" if ms is None else f"{ms:.2f}")
    Console().print(t)


def _print_plan(plan) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"searched plan: FLOPs ratio {plan.cost['flops_ratio']:.3f} <= budget {plan.budget:g}")
    for c in ("layer", "keep", "score", "anchors", "merge", "sharpness", "locality", "reweight"):
        t.add_column(c, justify="right")
    for s in plan.sites:
        t.add_row(*(str(getattr(s, c)) for c in ("layer", "keep", "score", "anchors", "merge", "sharpness",
                                                  "locality", "reweight")))
    Console().print(t)
