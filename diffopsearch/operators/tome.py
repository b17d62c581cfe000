"""ToMe bipartite soft matching (Bolya et al., facebookresearch/ToMe ``tome/merge.py``), pure and
batched.

One step on n tokens: split alternately into A (even indices) and B (odd indices); cosine
similarity of the keys; each A token picks its most similar B token; the r A tokens with the
highest such similarity are merged into their B partner by a size-weighted average
(``merge_wavg``), sizes add up; r is capped at n // 2 as in ToMe (no protected CLS token here,
LLaVA's visual tokens have none). Proportional attention is the caller's
``log(size)`` key bias (the ``reweight`` knob).

Where the merge happens is a choice, not something the decoder forces: a ToMe site before decoder
layer l merges on layer l-1's keys (before RoPE, mean over kv heads) after that layer's MLP, i.e.
between two blocks, and before layer 0 on the raw embeddings (the projected image features); ToMe
merges inside each block, between its attention and its MLP, on that block's own keys. Proportional
attention is ``log`` of the token's current size in every later layer, as in ToMe.

Differences from ToMe's ViT code forced by the decoder: outputs are returned in original
position order (RoPE positions must stay increasing) instead of ToMe's ``[unmerged A, B]`` layout,
so the next step's alternate split runs over the position-ordered sequence; a merged token keeps
its B token's position id and grid coordinate. ``merge`` (mu) scales the merged-in mass
(mu = 1 is ToMe).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import max_bipartite_merge
from .rows import add_rows, take_rows


class Matching(NamedTuple):
    src_idx: torch.Tensor  # (B, r) indices into A of the merged A tokens
    dst_idx: torch.Tensor  # (B, r) indices into B of their partners
    unm_idx: torch.Tensor  # (B, |A| - r) indices into A of the unmerged A tokens (ascending)


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Matching:
    """ToMe's matching on metric (B, n, c): A = metric[:, ::2], B = metric[:, 1::2]."""
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src_idx = edge_idx[:, :r]
    unm_idx = edge_idx[:, r:].sort(dim=-1).values
    dst_idx = node_idx.gather(1, src_idx)
    return Matching(src_idx, dst_idx, unm_idx)


def max_merge(n: int) -> int:
    """The largest r one ToMe step merges on n tokens (ToMe's cap: n // 2)."""
    return max_bipartite_merge(n)


def bipartite_merge(x: torch.Tensor, keys: torch.Tensor, sizes: torch.Tensor, pos: torch.Tensor,
                    coords: torch.Tensor, r: int, merge: float = 1.0):
    """One ToMe step. x (B, n, d), keys (B, n, c) the similarity metric, sizes (B, n), pos (B, n)
    long, coords (B, n, 2). Returns (x, sizes, pos, coords, index) with n - r tokens in position
    order; ``index`` (B, n - r) is each output's representative input token (the B partner for a
    merged token)."""
    bsz, n = x.shape[:2]
    r = min(int(r), max_merge(n))
    idx = torch.arange(n, device=x.device).expand(bsz, n)
    if r <= 0:
        return x, sizes, pos, coords, idx
    m = bipartite_soft_matching(keys, r)
    sizes = sizes.to(x.dtype)
    xa, xb = x[:, ::2], x[:, 1::2]
    sa, sb = sizes[:, ::2], sizes[:, 1::2]
    # merge_wavg: sum(size * x) / sum(size), with the merged-in mass scaled by mu.
    w_src = merge * sa.gather(1, m.src_idx)
    x_src = take_rows(xa, m.src_idx)
    num = add_rows(xb * sb[..., None], m.dst_idx, x_src * w_src[..., None])
    den = sb.scatter_add(1, m.dst_idx, w_src)
    xb_new = num / den[..., None]
    # Survivors: unmerged A tokens and every B token, then back into position order.
    a_idx, b_idx = idx[:, ::2], idx[:, 1::2]
    keep_idx = torch.cat([a_idx.gather(1, m.unm_idx), b_idx], dim=1)
    new_x = torch.cat([take_rows(xa, m.unm_idx), xb_new], dim=1)
    new_s = torch.cat([sa.gather(1, m.unm_idx), den], dim=1)
    order = pos.gather(1, keep_idx).argsort(dim=1)
    keep_idx = keep_idx.gather(1, order)
    new_x = take_rows(new_x, order)
    new_s = new_s.gather(1, order)
    return (new_x, new_s, pos.gather(1, keep_idx),
            take_rows(coords, keep_idx), keep_idx)
