"""The five-knob reduction operator of docs/DESIGN.md section 2. Pure batched tensor maths.

Inputs at a site (the visual segment only): x (B, n, d) hidden states, keys (B, n, c) the
similarity metric (patch/llava/ passes the previous layer's keys averaged over kv heads, as ToMe
does, and the hidden states at layer 0; may be None when nothing needs a similarity), scores (B, n)
importance (higher = more important; None for grid / bipartite), pos (B, n) long original position ids
(increasing), coords (B, n, 2) float grid (row, col), sizes (B, n) how many original tokens each token stands for (None = ones).

Anchor rules (``Site.anchors``), each keeping exactly ``keep`` tokens:

- ``topk``: the ``keep`` best scores (ties: lower index first).
- ``grid``: a regular gr x gc grid of cells over the incoming token grid (gr * gc = keep, the
  factorisation closest to the grid's aspect, see :func:`grid_shape`; rows/cols split into
  near-equal bands). Each cell is represented by its first token in raster order (its position id);
  the output coordinate, and the coordinate used by the locality term, is the cell centre, so with
  large locality every token goes to its own cell: keep = n/4 on an even grid is exactly 2x2
  average pooling. Needs the incoming tokens to form a full grid.
- ``bipartite``: ToMe's bipartite soft matching (operators/tome.py), r = n - keep <= n // 2;
  sharpness / locality are unused.
- ``iqr`` (PruMerge / PruMerge+): tokens whose score is an upper outlier (> Q3 + 1.5 IQR, the
  PruMerge rule) are kept first; when there are fewer outliers than ``keep``, the remaining slots
  are filled with tokens sampled evenly in raster order among the non-outliers (PruMerge+'s
  spatial sampling), so a fixed budget still gives a fixed count; with more outliers than ``keep``
  the best-scoring outliers are kept.
- ``dominant`` (VisionZip): ``keep - c`` dominant tokens by score plus c = round(keep * 5 / 32)
  contextual tokens (VisionZip's 54+10 / 108+20 / 162+30 split), taken every ``R // c``-th among
  the R remaining tokens in raster order; dropped tokens merge only into contextual tokens.

Merge: a dropped token j is shared among the receiving anchors i by
``P_ij = softmax_i(beta * cos(key_j, key_i) - lambda * |c_j - c_i|^2)`` (beta = inf: most similar
anchor; lambda = inf: nearest anchor, it wins if both are inf; both 0: evenly). Output
``y_i = (s_i V_i + mu sum_j P_ij s_j V_j) / (s_i + mu sum_j P_ij s_j)``, new size
``s_i + mu sum_j P_ij s_j`` (size-weighted, so stacked merges stay true averages; with all sizes 1
this is docs/DESIGN.md's formula). Reweight: the key bias ``rho * log(size)`` (:func:`key_bias`,
``Reduced.bias``), which the forward adds to these tokens' attention logits in all later layers.
Across stacked sites the bias is of the token's *current* cumulative size, never a sum of the
sites' biases (patch/llava/forward.py, ``reweight_after``).

Knobs may be floats or 0-d tensors that require grad (the search learns them through this function:
the output is differentiable in merge, sharpness, locality and reweight).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import ANCHORS, NEEDS_SCORE, contextual_count, grid_shape, tome
from .rows import take_rows


class Reduced(NamedTuple):
    x: torch.Tensor       # (B, k, d)
    pos: torch.Tensor     # (B, k) long, increasing
    coords: torch.Tensor  # (B, k, 2)
    sizes: torch.Tensor   # (B, k)
    index: torch.Tensor   # (B, k) long: each output's anchor token in the input
    bias: torch.Tensor    # (B, k) additive key bias for later layers: reweight * log(sizes)


# ----------------------------------------------------------------------------- small helpers

def _isinf(v) -> bool:
    if isinstance(v, torch.Tensor):
        return bool(torch.isinf(v).any())
    return math.isinf(float(v))


def _merges(mu) -> bool:
    """Whether the merge branch runs: mu > 0, or a learnable mu (its gradient at 0 says whether to merge)."""
    if isinstance(mu, torch.Tensor) and mu.requires_grad:
        return True
    return float(mu) > 0


def is_zero(v) -> bool:
    """A knob that is exactly 0 and not learnable (a learnable 0 still gets a gradient: not zero)."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.requires_grad and float(v) == 0.0
    return float(v) == 0.0


def key_bias(sizes: torch.Tensor, reweight) -> torch.Tensor:
    """Additive attention-logit bias on visual keys: ``reweight * log(sizes)``."""
    return reweight * torch.log(sizes.float().clamp_min(1e-12))


def descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each token, 0 = best score; ties by lower index. Ranks are hard (not differentiable)."""
    order = torch.argsort(scores.float(), dim=1, descending=True, stable=True)
    ar = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ar)


def topk_mask(scores: torch.Tensor, k) -> torch.Tensor:
    """(B, n) bool: the k best scores per sample (k int or (B,) tensor), ties by lower index."""
    ranks = descending_ranks(scores)
    k = k[:, None] if isinstance(k, torch.Tensor) else k
    return ranks < k


def _mask_to_index(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k True entries per row (every row has exactly k), increasing: position order, since a
    segment's positions increase with the index. (One call, no sort: the reduction step is dispatch-bound
    at batch 1, docs/DESIGN.md section 4.)"""
    return mask.nonzero()[:, 1].view(mask.shape[0], k)


def _grid_layout(coords: torch.Tensor):
    """Row/col rank of every token on the incoming grid, plus the sorted distinct row and col
    values. All samples must share one full grid (true for the input and after grid sites)."""
    rows = torch.unique(coords[0, :, 0], sorted=True)
    cols = torch.unique(coords[0, :, 1], sorted=True)
    n = coords.shape[1]
    if rows.numel() * cols.numel() != n:
        raise ValueError(f"grid anchors need the incoming tokens to form a full grid; got {n} tokens "
                         f"on {rows.numel()} rows x {cols.numel()} cols")
    rr = torch.searchsorted(rows, coords[..., 0].contiguous())
    cr = torch.searchsorted(cols, coords[..., 1].contiguous())
    return rr, cr, rows, cols


# ----------------------------------------------------------------------------- anchor rules

class Anchors(NamedTuple):
    index: torch.Tensor           # (B, k) anchor token indices, increasing position
    receive: torch.Tensor | None  # (B, k) bool: anchor accepts merged mass (None: every anchor does)
    coords: torch.Tensor          # (B, k, 2) output / locality coordinate of each anchor
    drop: torch.Tensor | None = None  # (B, n - k) the other tokens, increasing (None: hard_reduce finds them)


def topk_anchors(scores, pos, coords, k) -> Anchors:
    # one stable sort gives both sides: the k best (ties: lower index first) and the rest, each put back in
    # index (= position) order
    order = torch.argsort(scores.float(), dim=1, descending=True, stable=True)
    idx = order[:, :k].sort(dim=1).values
    return Anchors(idx, None, take_rows(coords, idx), order[:, k:].sort(dim=1).values)


def grid_anchors(pos, coords, k) -> Anchors:
    rr, cr, rows, cols = _grid_layout(coords)
    H, W = rows.numel(), cols.numel()
    shape = grid_shape(k, H, W)
    if shape is None:
        raise ValueError(f"keep={k} is not a gr x gc grid on a {H} x {W} token grid")
    gr, gc = shape
    rband, cband = rr * gr // H, cr * gc // W
    cell = rband * gc + cband
    # Cell centres from the distinct row/col values, so equal cells get bit-identical centres.
    # (Bands differ in size by at most one, so every token is strictly nearest its own centre.)
    row_c, col_c = _band_centres(rows, gr), _band_centres(cols, gc)
    # Representative = first token (smallest position) of each cell.
    big = int(pos.max()) + 1
    order = torch.argsort(cell * big + pos, dim=1)
    cs = cell.gather(1, order)
    first = torch.ones_like(cs, dtype=torch.bool)
    first[:, 1:] = cs[:, 1:] != cs[:, :-1]
    idx = _mask_to_index(torch.zeros_like(first).scatter(1, order, first), k)
    ic = cell.gather(1, idx)
    acoords = torch.stack([row_c[ic // gc], col_c[ic % gc]], dim=-1).to(coords.dtype)
    return Anchors(idx, None, acoords)


def _band_centres(values: torch.Tensor, g: int) -> torch.Tensor:
    """Mean of the sorted distinct ``values`` in each of g near-equal consecutive bands."""
    band = torch.arange(values.numel(), device=values.device) * g // values.numel()
    sums = torch.zeros(g, dtype=values.dtype, device=values.device).index_add_(0, band, values)
    counts = torch.zeros(g, dtype=values.dtype, device=values.device).index_add_(0, band, torch.ones_like(values))
    return sums / counts


def _even_fill(candidate: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Pick m (B,) of the ``candidate`` tokens evenly spaced in raster order: the t-th candidate
    (of R) is picked when floor((t+1) m / R) > floor(t m / R), which picks exactly m."""
    t = candidate.long().cumsum(1) - 1
    R = candidate.long().sum(1, keepdim=True).clamp_min(1)
    m = m[:, None]
    return candidate & (((t + 1) * m) // R > (t * m) // R)


def iqr_anchors(scores, pos, coords, k) -> Anchors:
    s = scores.float()
    q = torch.quantile(s, torch.tensor([0.25, 0.75], device=s.device), dim=1)  # numpy's linear rule
    upper = q[1] + 1.5 * (q[1] - q[0])
    out = s > upper[:, None]
    n_out = out.sum(1)
    fill = _even_fill(~out, (k - n_out).clamp_min(0))
    chosen = torch.where((n_out >= k)[:, None], topk_mask(s, k), out | fill)
    idx = _mask_to_index(chosen, k)
    return Anchors(idx, None, take_rows(coords, idx))


def dominant_anchors(scores, pos, coords, k) -> Anchors:
    n = scores.shape[1]
    c = contextual_count(k)
    dom = topk_mask(scores, k - c)
    rest = ~dom
    if c > 0:
        step = max(1, (n - (k - c)) // c)
        t = rest.long().cumsum(1) - 1
        target = rest & (t % step == 0) & (t // step < c)
    else:
        target = torch.zeros_like(dom)
    idx = _mask_to_index(dom | target, k)
    return Anchors(idx, target.gather(1, idx), take_rows(coords, idx))


def select_anchors(anchors: str, scores, pos, coords, k) -> Anchors:
    if anchors in NEEDS_SCORE and scores is None:
        raise ValueError(f"anchors={anchors!r} needs scores")
    if anchors == "topk":
        return topk_anchors(scores, pos, coords, k)
    if anchors == "grid":
        return grid_anchors(pos, coords, k)
    if anchors == "iqr":
        return iqr_anchors(scores, pos, coords, k)
    if anchors == "dominant":
        return dominant_anchors(scores, pos, coords, k)
    raise ValueError(f"unknown anchors {anchors!r}; allowed: {', '.join(ANCHORS)}")


# ----------------------------------------------------------------------------- merge weights

def _normalize(k):
    k = k.float()
    return k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def assignment(keys_src, keys_anc, c_src, c_anc, sharpness, locality, allowed=None) -> torch.Tensor:
    """P (B, m, k): how each of m source tokens is shared among k anchors,
    softmax_i(beta cos(key_j, key_i) - lambda |c_j - c_i|^2) over allowed anchors.
    Infinite sharpness / locality give the one-hot argmax (locality wins if both are inf)."""
    B, m, k = c_src.shape[0], c_src.shape[1], c_anc.shape[1]
    hard_loc, hard_sim = _isinf(locality), _isinf(sharpness)
    logits = None  # a sum of the terms that are on; none on: zeros (an even share)
    if hard_loc or not is_zero(locality):
        d2 = (c_src.float()[:, :, None, :] - c_anc.float()[:, None, :, :]).pow(2).sum(-1)
        logits = -d2 if hard_loc else -locality * d2
    if not hard_loc and (hard_sim or not is_zero(sharpness)):
        if keys_src is None or keys_anc is None:
            raise ValueError("sharpness > 0 needs keys")
        cos = _normalize(keys_src) @ _normalize(keys_anc).transpose(-1, -2)
        logits = cos if hard_sim else sharpness * cos if logits is None else logits + sharpness * cos
    if logits is None:
        logits = torch.zeros(B, m, k, device=c_src.device)
    if allowed is not None:  # None: every anchor receives, nothing to mask
        allowed = allowed[:, None, :] if allowed.dim() == 2 else allowed
        logits = logits.masked_fill(~allowed, float("-inf"))
    if hard_loc or hard_sim:
        p = torch.nn.functional.one_hot(logits.argmax(-1), k).to(logits.dtype)
        return p if allowed is None else p * allowed.any(-1, keepdim=True)
    p = logits.softmax(-1)
    return p if allowed is None else torch.nan_to_num(p, nan=0.0)  # a source with no allowed anchor flows nowhere


# ----------------------------------------------------------------------------- hard mode

@dataclass
class SearchSite:
    """The site protocol :func:`hard_reduce` reads (``layer``, ``keep``, ``score``, ``anchors`` and the four
    knobs), with tensor knobs: the search's forward differentiates through them. ``plan.Site`` is the same
    protocol with float knobs."""

    layer: int
    keep: int
    score: str
    anchors: str
    merge: object
    sharpness: object
    locality: object
    reweight: object


def hard_reduce(x, keys, scores, pos, coords, sizes, site) -> Reduced:
    """Apply one site for real: returns exactly ``site.keep`` tokens per sample, in original
    position order. ``site`` needs .keep .anchors .merge .sharpness .locality .reweight."""
    B, n = x.shape[:2]
    k = int(site.keep)
    if sizes is None:
        sizes = torch.ones(B, n, device=x.device, dtype=torch.float32)
    coords = coords.to(torch.float32)
    if k > n or k < 1:
        raise ValueError(f"keep={k} with {n} incoming tokens")
    if k == n:  # nothing dropped, nothing merged: a no-op (cost model counts it as free)
        idx = torch.arange(n, device=x.device).expand(B, n)
        return Reduced(x, pos, coords, sizes, idx, key_bias(sizes, site.reweight))
    if site.anchors == "bipartite":
        r = n - k
        if r > tome.max_merge(n):
            raise ValueError(f"bipartite merging removes at most {tome.max_merge(n)} of {n} tokens; keep={k}")
        if keys is None:
            raise ValueError("bipartite anchors need keys")
        y, s, p, c, idx = tome.bipartite_merge(x.float(), keys, sizes.float(), pos, coords, r, float(site.merge))
        return Reduced(y.to(x.dtype), p, c, s, idx, key_bias(s, site.reweight))
    anc = select_anchors(site.anchors, scores, pos, coords, k)
    idx = anc.index
    xa = take_rows(x, idx)
    sa = sizes.gather(1, idx).float()
    mu = site.merge
    if _merges(mu) and (anc.receive is None or bool(anc.receive.any())):
        drop = anc.drop
        if drop is None:
            drop = _mask_to_index(torch.ones(B, n, dtype=torch.bool, device=x.device).scatter_(1, idx, False), n - k)
        xd = take_rows(x, drop).float()
        sd = sizes.gather(1, drop).float()
        kd = None if keys is None else take_rows(keys, drop)
        ka = None if keys is None else take_rows(keys, idx)
        P = assignment(kd, ka, take_rows(coords, drop), anc.coords, site.sharpness, site.locality,
                       allowed=anc.receive)  # (B, n-k, k)
        Pw = P * sd[..., None]
        flow = mu * Pw.sum(1)                                   # (B, k)
        num = sa[..., None] * xa.float() + mu * (Pw.transpose(1, 2) @ xd)
        sa = sa + flow
        xa = (num / sa[..., None]).to(x.dtype)
    return Reduced(xa, pos.gather(1, idx), anc.coords, sa, idx, key_bias(sa, site.reweight))
