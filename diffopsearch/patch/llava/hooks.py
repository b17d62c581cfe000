"""q/k capture by forward hooks (no ``output_attentions``, no recomputation) and the scores read from
them: FastV's last-prompt-token attention in a decoder layer, the CLS attention of a CLIP layer."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...operators.rows import take_rows
from ...operators.scores import attn_scores, cls_scores
from .attention import rope


class Capture:
    """Forward hooks that keep the outputs of ``q_proj``/``k_proj`` of some attention modules for one
    forward pass. ``q`` keeps only the named query rows (the last prompt token / the CLS token)."""

    def __init__(self):
        self.handles: list = []
        self.q: dict[Any, Tensor] = {}
        self.k: dict[Any, Tensor] = {}

    def watch(self, key, attn_module, q_rows: slice | None):
        def keep_k(_m, _inp, out):
            self.k[key] = out

        self.handles.append(attn_module.k_proj.register_forward_hook(keep_k))
        if q_rows is not None:
            def keep_q(_m, _inp, out):
                self.q[key] = out[:, q_rows]

            self.handles.append(attn_module.q_proj.register_forward_hook(keep_q))

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def fastv_scores(attn, q_rows: Tensor, k_all: Tensor, cos: Tensor, sin: Tensor, kpm: Tensor,
                  bias: Tensor | None, vidx: Tensor, query_index: Tensor | None = None) -> Tensor:
    """FastV's signal (B, n) from one decoder layer's raw projections: ``q_rows`` the query of the last
    token (B, 1, H*hd), or of every token (B, T, H*hd) when ``query_index`` (B,) names the query token per
    sample (then keys after it are causally masked); k_all (B, T, Hkv*hd); RoPE with cos/sin (B, T, hd)."""
    B, T, _ = k_all.shape
    hd = attn.head_dim
    cos, sin = cos.float(), sin.float()
    if query_index is None:
        q_last, cq, sq, key_mask = q_rows, cos[:, -1:], sin[:, -1:], kpm
    else:
        qi = query_index.to(k_all.device).view(B, 1)
        q_last, cq, sq = take_rows(q_rows, qi), take_rows(cos, qi), take_rows(sin, qi)
        key_mask = kpm & (torch.arange(T, device=k_all.device)[None] <= qi)
    q = rope(q_last.float().view(B, 1, -1, hd).transpose(1, 2), cq, sq)[:, :, 0]     # (B, H, hd)
    k = rope(k_all.float().view(B, T, -1, hd).transpose(1, 2), cos, sin)               # (B, Hkv, T, hd)
    groups = q.shape[1] // k.shape[1]
    if bias is None:
        return attn_scores(q, k, groups, visual_index=vidx, key_mask=key_mask, scale=attn.scaling)
    # a reweighting site before this layer: its key bias was part of this layer's softmax, so it is here
    logits = torch.einsum("bhd,bhsd->bhs", q, k.repeat_interleave(groups, 1)) * attn.scaling + bias[:, None]
    logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
    return logits.softmax(-1).mean(1).gather(1, vidx)


def cls_attention(attn, q_cls: Tensor, k_all: Tensor) -> Tensor:
    """CLS attention (B, N) to the N patches in one CLIP layer from its raw q (B, 1, D) / k (B, 1+N, D)."""
    B, T, _ = k_all.shape
    hd = attn.head_dim
    return cls_scores(q_cls.view(B, -1, hd), k_all.view(B, T, -1, hd).transpose(1, 2), scale=attn.scale)
