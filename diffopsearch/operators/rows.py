"""Per-sample row gathers and scatter-adds along the token dimension, as flat ``index_select`` /
``index_add`` on a (B * n, ...) view. On CPU these are about 10x faster than ``gather`` / ``scatter_add``
with an index expanded over the feature dimensions (measured on (16, 170, 128) float32: 1.0 ms against
0.08 ms), and they give the same values; every reduction step and splice of the reduced forward runs
through them, so this is most of the operators' own time."""
from __future__ import annotations

import torch
from torch import Tensor


def _flat(index: Tensor, n: int) -> Tensor:
    """(B, k) per-sample row indices into n rows -> (B * k,) indices into the flattened (B * n) rows."""
    B = index.shape[0]
    if B == 1:
        return index.reshape(-1)
    return (index + torch.arange(0, B * n, n, device=index.device)[:, None]).reshape(-1)


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, n, ...) -> (B, k, ...): ``out[b, i] = x[b, index[b, i]]`` (differentiable in x)."""
    if x.dim() == 2:
        return x.gather(1, index)
    B, n = x.shape[:2]
    return x.reshape(B * n, *x.shape[2:]).index_select(0, _flat(index, n)).view(*index.shape, *x.shape[2:])


def add_rows(base: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """Out of place, ``out[b, index[b, i]] += src[b, i]`` for base (B, n, ...), index (B, k), src (B, k, ...)
    (differentiable in base and src)."""
    if base.dim() == 2:
        return base.scatter_add(1, index, src)
    B, n = base.shape[:2]
    flat = base.reshape(B * n, *base.shape[2:]).index_add(0, _flat(index, n), src.reshape(-1, *src.shape[2:]))
    return flat.view(base.shape)
