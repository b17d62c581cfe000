"""``diffopsearch eval``: evaluate the unreduced model, a baseline (``plan=NAME budget=B``) or a searched
plan (``ckpt=PATH``) on the evaluation split; writes results.json (and the answers) in the run dir."""
from __future__ import annotations

import os
from pathlib import Path

from ..config import complete, run_dir, validate
from ..errors import UserError
from . import latency_for, model_id


def run(cfg, out_dir=None, accelerator=None) -> dict:
    import torch

    from ..backbone.load import load_backbone
    from ..data.datasets import load_from_config
    from ..evaluate import evaluate, mean_prompt_text_tokens, plan_source, resolve_plan
    from ..runtime import Procs, make_accelerator

    cfg = complete(cfg, "eval")
    validate(cfg)
    if cfg.limit is not None and int(cfg.limit) <= 0:
        raise UserError(f"limit={cfg.limit!r} is not valid: give a positive number of questions (the first N of the "
                        "split), or leave it out for all of them.")
    plan_file = plan_source(cfg.ckpt, cfg.plan.name)  # a bad ckpt fails before anything is loaded: missing,
    if plan_file is not None:                          # empty, not a plan...
        from ..plan import load_plan

        load_plan(str(plan_file))  # ... malformed, or keep / layer out of its own backbone's range
    torch.manual_seed(int(cfg.seed))
    accelerator = accelerator or make_accelerator(cfg.model.device)
    multi = accelerator.num_processes > 1
    # The data first: a bad path or column fails in seconds, before a 7B model is loaded.
    dataset = Procs(accelerator).main_first(lambda: load_from_config(cfg.dataset, limit=cfg.limit))
    model, processor = load_backbone(cfg.model, device=accelerator.device if multi else None)
    n_text = mean_prompt_text_tokens(processor, dataset)
    latency = latency_for(cfg, model, processor, dataset, n_text, accelerator) if not cfg.ckpt else None
    plan = resolve_plan(model, n_text, ckpt=cfg.ckpt, name=cfg.plan.name, budget=cfg.budget, layer=cfg.plan.layer,
                        seed=cfg.plan.seed, latency=latency)
    return evaluate(
        model, processor, plan, dataset, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
        accelerator=accelerator, out_dir=run_dir(out_dir),
        # answers live in one folder per working directory, keyed by the settings hash, so a rerun
        # of the same eval (in a new timestamped run dir) only computes what is missing
        cache_path=str(Path.cwd() / "outputs" / ".answers") + os.sep,
        metric=cfg.dataset.metric or None, vqa_mode=cfg.dataset.vqa_mode, model_name=model_id(cfg.model),
        extra={"budget": float(cfg.budget), "ckpt": cfg.ckpt, "limit": cfg.limit, "cost": cfg.cost},
    )
