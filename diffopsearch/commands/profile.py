"""``diffopsearch profile``: the latency model of a backbone on this device (what ``cost=latency`` uses),
built or read from the cache, printed as tables."""
from __future__ import annotations

from ..config import complete, validate


def run(cfg) -> dict:
    from ..backbone.load import load_backbone
    from ..data.datasets import load_from_config
    from ..evaluate import mean_prompt_text_tokens
    from ..latency import for_dataset, print_model

    cfg = complete(cfg, "profile")
    validate(cfg)
    dataset = load_from_config(cfg.dataset, limit=cfg.batch_size)
    model, processor = load_backbone(cfg.model)
    lm, path, profiled = for_dataset(model, processor, dataset, cfg.batch_size,
                                     mean_prompt_text_tokens(processor, dataset), refresh=cfg.refresh)
    print_model(lm, path, profiled)
    return {"latency_model": str(path), "profiled": profiled, "seconds": lm.seconds}
