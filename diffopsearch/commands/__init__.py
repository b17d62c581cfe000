"""The command bodies: what ``diffopsearch <command>`` runs (``cli.BODIES``), one module per command.

This is the only code that reads a Hydra config. Each body completes its config from the schema
(:func:`diffopsearch.config.complete`: every default is defined once, in ``config.py``), reads it, and
calls the library below with plain typed arguments: ``search``, ``evaluate``, ``baselines``, ``report``,
``show``. Nothing below imports this package (docs/ARCHITECTURE.md, checked by tests/test_layout.py).
"""
from __future__ import annotations


def model_id(model_cfg) -> str:
    """How results name the model: ``name`` or ``name:path``."""
    return f"{model_cfg.name}:{model_cfg.path}" if model_cfg.path else str(model_cfg.name)


def latency_for(cfg, model, processor, dataset, n_text: float, accelerator=None):
    """The latency model when the job says ``cost=latency`` (built or read from the cache, at
    ``latency_batch_size`` or else ``batch_size``), else None (``cost=flops``). With several processes the
    main one profiles (alone on the device) and the others read its cache file, so that every process
    sizes the same plans."""
    if cfg.cost != "latency":
        return None
    from ..latency import for_dataset
    from ..runtime import Procs

    procs = Procs(accelerator)
    bs = cfg.latency_batch_size or cfg.batch_size
    lm = for_dataset(model, processor, dataset, bs, n_text)[0] if procs.is_main else None
    procs.wait()
    return lm if lm is not None else for_dataset(model, processor, dataset, bs, n_text)[0]
