"""``diffopsearch search``: search on the search split, write ``plan.json`` in the run directory,
evaluate it on the evaluation split (``results.json``) and, with ``search.eval_baselines=true``, every
baseline at the same budget (one table). The search itself: :mod:`diffopsearch.search`."""
from __future__ import annotations

from pathlib import Path

from ..config import complete, run_dir, to_dict, validate
from ..errors import UserError
from . import latency_for, model_id

PLAN_NAME = "plan.json"
BASELINES_DIR = "baselines"


def settings_from(cfg):
    """The loop's settings from a search job config (its ``search`` group, ``budget``, ``seed``)."""
    from ..search.loop import SearchSettings, scaled_steps

    cfg = complete(cfg, "search")
    kw = {k: cfg.search[k] for k in SearchSettings.__dataclass_fields__ if k not in ("budget", "seed")}
    kw["steps"] = scaled_steps(cfg.search.steps, float(cfg.budget), bool(cfg.search.scale_steps))
    return SearchSettings(budget=float(cfg.budget), seed=int(cfg.seed), **kw)


def run(cfg, out_dir=None, accelerator=None) -> dict:
    import torch

    from ..backbone.load import load_backbone
    from ..data.datasets import load_from_config, splits_overlap
    from ..evaluate import evaluate, mean_prompt_text_tokens
    from ..runtime import Procs, make_accelerator
    from ..search import hold_out, search_plan
    from ..search.space import make_space

    cfg = complete(cfg, "search")
    validate(cfg)
    s, ds = cfg.search, cfg.dataset
    out = run_dir(out_dir)
    accelerator = accelerator or make_accelerator(cfg.model.device)
    multi = accelerator.num_processes > 1
    is_main = accelerator.process_index == 0
    torch.manual_seed(int(cfg.seed))
    # The data first: a bad path or column fails in seconds, before a large model is loaded.
    train, evalset = Procs(accelerator).main_first(lambda: (
        load_from_config(ds, split=ds.search_split, limit=s.train_limit, search=True),
        load_from_config(ds, limit=cfg.limit)))
    if splits_overlap(train.split, evalset.split) and train.path == evalset.path and \
            (ds.search_questions_config or ds.questions_config) == ds.questions_config:
        raise UserError(f"dataset.search_split={train.split!r} overlaps the evaluation split "
                        f"dataset.split={evalset.split!r}: the search must never see the questions its results are "
                        "reported on; use another split (dataset.search_split=train) or disjoint row ranges "
                        "(search_split='validation[:4000]' with split='validation[4000:]').")
    train, heldout = hold_out(train, s.select_questions, cfg.seed)
    model, processor = load_backbone(cfg.model, device=accelerator.device if multi else None)
    space = make_space(model.config, s.candidate_layers, s.two_sites)
    n_text = mean_prompt_text_tokens(processor, train)
    latency = latency_for(cfg, model, processor, train, n_text, accelerator)
    name = model_id(cfg.model)
    # every process reads the checkpoint on resume; only the main one writes (the loop sees to it)
    plan, res = search_plan(model, processor, train, space, settings_from(cfg), n_text, out_dir=out,
                            accelerator=accelerator, resume=cfg.resume, config=to_dict(cfg), model_name=name,
                            heldout=heldout, select_samples=s.select_samples, select_corners=s.select_corners,
                            screen_questions=s.screen_questions, finalists=s.select_finalists,
                            margin=s.select_margin, latency=latency)
    if is_main:
        plan.save(out / PLAN_NAME)
        _print_plan(plan)
    accelerator.wait_for_everyone()
    common = dict(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, accelerator=accelerator,
                  metric=ds.metric or None, vqa_mode=ds.vqa_mode, model_name=name)
    extra = {"budget": float(cfg.budget), "ckpt": str(out / PLAN_NAME), "limit": cfg.limit, "cost": cfg.cost,
             "method": "search", "search": {**{k: plan.search[k] for k in ("steps", "final_loss", "seed")},
                                            "seconds": plan.run["seconds"]}}
    results = evaluate(model, processor, plan, evalset, out_dir=out, extra=extra, resume=cfg.resume, **common)
    if s.eval_baselines:
        rows = eval_baselines(model, processor, evalset, float(cfg.budget), out, common, cfg.seed, resume=cfg.resume,
                              latency=latency)
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
                   resume: bool = False, latency=None) -> list[dict]:
    """Every baseline at ``budget`` (and the unreduced model), each into ``out/baselines/NAME``, sized by
    FLOPs or (``latency``) by predicted time, like the searched plan."""
    from ..baselines import make_plan
    from ..config import PLAN_NAMES
    from ..evaluate import evaluate, mean_prompt_text_tokens, visual_token_count

    n_visual, grid = visual_token_count(model.config)
    n_text = mean_prompt_text_tokens(processor, evalset)
    rows = []
    for name in PLAN_NAMES:
        try:
            plan = make_plan(name, 1.0 if name == "none" else budget, model.config.text_config, n_visual, grid,
                             n_text, seed=seed, latency=latency)
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
