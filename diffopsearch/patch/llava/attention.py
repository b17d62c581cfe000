"""Attention plumbing of the reduced forward: RoPE, the masks the decoder layers take (transformers'
boolean / ``is_causal`` path, or an additive mask carrying the reweighting key bias), which attention
implementation a model runs, the decoder layer's cache keyword, and the vision tower's geometry."""
from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

SUPPORTED_ATTENTION = ("sdpa", "eager")


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama RoPE on (B, heads, T, hd) with cos/sin (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def build_mask(kpm: Tensor, bias: Tensor | None, q_len: int, impl: str, dtype: torch.dtype):
    """The 4D mask one decoder layer gets: queries are the last ``q_len`` of the ``kv`` keys (lower-right
    causal alignment), ``kpm`` (B, kv) marks real keys, ``bias`` (B, kv) is an additive key bias.

    Without bias this reproduces transformers' ``create_causal_mask``: ``None`` for SDPA when nothing is
    padded (``is_causal`` / single-query path), a boolean mask for SDPA, 0 / finfo.min floats for eager.
    With bias: a float mask, bias on allowed keys and finfo.min elsewhere (``where``, never ``+``, so
    half precision cannot overflow to -inf)."""
    kv = kpm.shape[1]
    if bias is None and impl == "sdpa" and (q_len == 1 or q_len == kv) and bool(kpm.all()):
        return None
    q_idx = torch.arange(kv - q_len, kv, device=kpm.device)
    causal = torch.arange(kv, device=kpm.device)[None, :] <= q_idx[:, None]
    allowed = causal[None, None] & kpm[:, None, None, :]
    if bias is None:
        if impl == "sdpa":
            return allowed
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=kpm.device), torch.finfo(dtype).min)
    return torch.where(allowed, bias[:, None, None, :].to(dtype), torch.finfo(dtype).min)


@functools.lru_cache(maxsize=None)
def _cache_kw_of(layer_cls) -> str:
    params = inspect.signature(layer_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kw(layer) -> str:
    """The decoder layer's name for the KV cache argument: transformers 5.24 renamed ``past_key_values``
    to ``cache`` (the old name is deprecated, to be removed in 5.40); older 5.x only know the old one."""
    return _cache_kw_of(type(layer))


def attn_implementation(model) -> str:
    layer = model.model.language_model.layers[0]
    return getattr(layer.self_attn.config, "_attn_implementation", None) or "eager"


def vision_layers(model):
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    return tower.encoder.layers


def grid_side(model) -> int:
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size
