"""Importance scores of visual tokens (docs/DESIGN.md section 2, knob 1). Pure, batched, no model.

- ``attn``   (FastV): attention that the last prompt token pays to each visual token in one decoder
  layer, softmax over every key that query sees, mean over heads. Computed as a small separate
  product from that layer's own (RoPE-applied) q/k, so the model keeps running with SDPA and never
  needs ``output_attentions``.
- ``cls``    (PruMerge / VisionZip): vision-tower CLS attention to the patches, mean over heads.
- ``norm``:  L2 norm of the hidden state.
- ``random``: seeded uniform noise (the random-pruning control).

Higher is more important everywhere.
"""
from __future__ import annotations

import torch

from . import SCORES  # noqa: F401


def _expand_kv(k: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, S, dh) -> (B, Hkv*groups, S, dh), query head h reading kv head h // groups (as
    transformers' ``repeat_kv``)."""
    if groups == 1:
        return k
    b, hkv, s, dh = k.shape
    return k[:, :, None].expand(b, hkv, groups, s, dh).reshape(b, hkv * groups, s, dh)


def attn_scores(q_last: torch.Tensor, keys: torch.Tensor, num_key_value_groups: int = 1,
                visual_index: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                scale: float | None = None) -> torch.Tensor:
    """FastV's score.

    q_last: (B, H, dh) query of the last prompt token, RoPE applied. keys: (B, Hkv, S, dh) every key
    that query attends to (the whole prefix, RoPE applied), H = Hkv * num_key_value_groups (GQA).
    key_mask: optional (B, S) bool, False for padding keys (left padding); they get no probability.
    visual_index: optional (B, n) long, positions of the visual tokens inside S (per sample, since
    left padding shifts them). The softmax runs over all S keys, exactly as in the layer itself, and
    only then are the visual columns taken. scale defaults to dh ** -0.5 (Llama's ``scaling``).
    Returns (B, n) (or (B, S) without visual_index): probabilities averaged over heads.
    """
    dh = q_last.shape[-1]
    scale = dh ** -0.5 if scale is None else scale
    k = _expand_kv(keys, num_key_value_groups)
    logits = torch.einsum("bhd,bhsd->bhs", q_last.float(), k.float()) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :].bool(), float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=1)  # (B, S)
    if visual_index is not None:
        probs = probs.gather(1, visual_index)
    return probs


def cls_scores(q_cls: torch.Tensor, keys: torch.Tensor, scale: float | None = None,
               num_prefix: int = 1) -> torch.Tensor:
    """Vision-tower CLS attention to the patches (PruMerge / VisionZip signal).

    q_cls: (B, H, dh) the CLS token's query in one vision layer; keys: (B, H, 1 + n, dh) the keys of
    that layer, CLS first. The softmax runs over all 1 + n keys (CLS included, as in CLIP), then
    the patch columns are taken and averaged over heads -> (B, n). Use the layer whose output
    LLaVA feeds the projector (``vision_feature_layer``, usually -2), as VisionZip does. VisionZip
    sums heads; the mean only rescales, so rankings are identical.
    """
    dh = q_cls.shape[-1]
    scale = dh ** -0.5 if scale is None else scale
    logits = torch.einsum("bhd,bhsd->bhs", q_cls.float(), keys.float()) * scale
    return logits.softmax(dim=-1)[..., num_prefix:].mean(dim=1)


def norm_scores(x: torch.Tensor) -> torch.Tensor:
    """(B, n, d) -> (B, n): L2 norm of each hidden state."""
    return x.float().norm(dim=-1)


def random_scores(shape: tuple[int, ...], seed: int = 0, device=None) -> torch.Tensor:
    """Seeded uniform scores of ``shape`` (B, n). Deterministic for a given seed and shape; drawn on
    the CPU with a private generator so the global RNG is untouched and devices agree."""
    g = torch.Generator().manual_seed(int(seed))
    out = torch.rand(tuple(shape), generator=g)
    return out.to(device) if device is not None else out
