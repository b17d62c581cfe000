"""Checkpoints of the search: the architecture state and its optimizer as safetensors + JSON (no pickle).

Every write is atomic and the JSON is the commit, so a run killed at any point leaves a JSON and a
tensors file of the same step (the new pair, or the old one); ``resume=true`` continues from it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

CKPT_DIR = "checkpoint"
CKPT_TENSORS = "search_state.safetensors"
CKPT_META = "search_state.json"
CKPT_PREV = "search_state.prev.safetensors"  # the tensors the JSON names while a new checkpoint is written


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"optim.{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out_dir: Path, state: nn.Module, opt, meta: dict) -> None:
    """The previous tensors moved aside (``CKPT_PREV``), the new tensors (safetensors) written, then
    the JSON that names their step: every write atomic, the JSON the commit. Killed at any point, the
    folder holds a JSON and a tensors file of the same step (the new pair, or the old one)."""
    import os

    from ..io import atomic_save_safetensors, atomic_write_json

    d = Path(out_dir) / CKPT_DIR
    otensors, ometa = _flatten_optimizer(opt)
    tensors = {f"state.{k}": v for k, v in state.state_dict().items()}
    tensors.update(otensors)
    if (d / CKPT_TENSORS).exists() and (d / CKPT_META).exists():
        os.replace(d / CKPT_TENSORS, d / CKPT_PREV)  # what the current JSON names, until the new JSON lands
    atomic_save_safetensors(d / CKPT_TENSORS, tensors, metadata={"step": str(meta["step"])})
    atomic_write_json(d / CKPT_META, {**meta, "optimizer": ometa})


def load_checkpoint(out_dir: Path, state: nn.Module, opt, key: str) -> dict | None:
    """Restore state and optimizer from ``out_dir/checkpoint``; the meta dict, or None if absent."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = Path(out_dir) / CKPT_DIR
    files = [d / n for n in (CKPT_TENSORS, CKPT_PREV) if (d / n).exists()]
    if not (d / CKPT_META).exists() or not files:
        return None
    try:
        meta = json.loads((d / CKPT_META).read_text())
        steps = {}
        for path in files:  # the tensors of the JSON's step: the current file, or the previous one when
            with safe_open(str(path), "pt") as f:  # a kill fell between the new tensors and the new JSON
                steps[path] = (f.metadata() or {}).get("step")
        match = [path for path in files if steps[path] == str(meta.get("step"))]
        tensors = load_file(str(match[0])) if match else None
    except Exception as e:  # a damaged checkpoint is a user-facing problem, not a crash
        raise UserError(f"the search checkpoint in {str(d)!r} cannot be read ({type(e).__name__}: {e}); delete "
                        "that folder to start the search afresh, or run without resume=true.") from e
    if tensors is None:
        raise UserError(f"the search checkpoint in {str(d)!r} is inconsistent (JSON step {meta.get('step')}, "
                        f"tensors step {', '.join(str(v) for v in steps.values())}); delete that folder to start "
                        "afresh.")
    if meta.get("key") != key:
        raise UserError(f"resume=true found a search checkpoint in {str(d)!r} made with different settings "
                        "(search.*, budget, seed, model or data differ): resume with the same configuration, "
                        "or use a new run directory.")
    state.load_state_dict({k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")})
    opt.load_state_dict(_unflatten_optimizer(tensors, meta.pop("optimizer")))
    return meta
