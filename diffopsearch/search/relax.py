"""The relaxation: soft sites built from one architecture sample, and the expected cost.

A soft site (``patch.llava.soft_forward``'s interface: ``.layer`` and ``__call__(SiteContext) ->
SoftOut``) removes no token. It runs :func:`operators.reduce.soft_reduce` for each operator choice
with a non-negligible weight (mixture: the named regimes; continuous: score x anchors with shared
knobs) and mixes the results with the sampled weights: hidden states, sizes and keep masks are
averaged, and the key bias is ``log(m + eps)`` of the mixed mask plus the weighted reweight bias.
The keep ladder's absolute counts at a site are its fractions times the visual mass that
reaches it (the sum of the earlier sites' keep masks, per sample); the mask of ladder entry K is
exactly the top-K of the site's score (rank temperature 0), so the relaxation is linear in the
ladder weights and a one-hot sample is the hard site with the dropped tokens at log(eps).

The expected cost is the cost model's per-layer FLOPs at the expected visual token count of every
layer (tensor arithmetic, so the budget term has a gradient), relative to the unreduced model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .state import REGIMES, SCORES, ArchSample, ArchState, SearchSpace

EPS = 1e-30       # forward: dropped keys get log(eps) = -69 (the toy's attention-sink logits exceed the
#                   other keys' by > 46, so log(1e-6) would leave dropped sinks audible)
EPS_GRAD = 1e-6   # backward: d/dm log(m + EPS_GRAD), so a dropped sink cannot send a 1e30-sized gradient
SKIP = 1e-4  # operator choices (and grid ladder entries) lighter than this are not computed


# ---------------------------------------------------------------- cost

def _layer_flops_fn():
    from ..cost import layer_flops

    return layer_flops


def expected_cost_ratio(state: ArchState, text_config, n_text: float, temperature: float = 1.0) -> Tensor:
    """E[cost] / cost_full under the state's distributions at ``temperature`` (a differentiable 0-d
    tensor). The loop anneals it with tau, so the budget binds the expectation early and, as the
    distributions sharpen towards their argmax, the plan that discretization will read.

    Per decoder layer the cost model's FLOPs at ``n_text`` + the expected visual tokens entering
    it; the operators' own small overhead is left to the hard plan's cost (the repair step)."""
    layer_flops = _layer_flops_fn()
    tokens = state.expected_tokens(temperature)
    n_vis = state.space.n_visual
    full = float(layer_flops(text_config, float(n_text + n_vis))) * state.space.num_layers
    soft = sum(layer_flops(text_config, tokens[l] + n_text) for l in range(state.space.num_layers))
    return soft / full


def log_mask(m: Tensor) -> Tensor:
    """log(m + EPS) in the forward, the gradient of log(m + EPS_GRAD): exact removal of dropped
    keys, bounded gradients (the multiplicative mask's derivative at m = 0 is e^(logit - max), which
    an attention sink makes astronomically large)."""
    from ..operators.reduce import log_bounded

    return log_bounded(m, EPS, EPS_GRAD)


# ---------------------------------------------------------------- grid counts

@lru_cache(maxsize=None)
def grid_keeps(rows: int, cols: int) -> tuple[int, ...]:
    """Every keep count that ``grid`` anchors can realise on a rows x cols token grid."""
    from ..operators.reduce import grid_shape

    return tuple(k for k in range(1, rows * cols + 1) if grid_shape(k, rows, cols) is not None)


def nearest_grid_keep(target: float, rows: int, cols: int, at_most: bool = False) -> int:
    """The realisable grid keep closest to ``target`` (``at_most``: the largest one <= target,
    at least the smallest realisable)."""
    keeps = grid_keeps(rows, cols)
    if at_most:
        below = [k for k in keeps if k <= target + 1e-9]
        return below[-1] if below else keeps[0]
    return min(keeps, key=lambda k: (abs(k - target), -k))


# ---------------------------------------------------------------- soft sites

@dataclass
class _Choice:
    weight: Tensor          # 0-d
    anchors: str            # topk | grid | keep-all
    score: str | None
    merge: object
    sharpness: object
    locality: object
    reweight: object


class SoftSite:
    """One candidate layer's relaxed site for one step."""

    def __init__(self, layer: int, q: Tensor, fracs: Tensor, choices: list[_Choice], space: SearchSpace, tau: float,
                 q_soft: Tensor | None = None):
        self.layer = layer
        self.q = q                  # (L,) relaxed ladder weights (straight-through: one-hot values)
        self.q_soft = q.detach() if q_soft is None else q_soft  # their relaxed values
        self.fracs = fracs          # (L,) ladder fractions
        self.choices = choices
        self.space = space
        self.tau = tau

    def __repr__(self) -> str:
        return f"SoftSite(layer={self.layer}, choices={[c.anchors + '/' + str(c.score) for c in self.choices]})"

    def _grid_ladder(self, mass: float):
        rows, cols = self.space.grid
        counts = [nearest_grid_keep(float(f) * mass, rows, cols) if f < 1.0 else rows * cols
                  for f in self.fracs.tolist()]
        keep = [i for i, w in enumerate(self.q_soft.tolist()) if w > SKIP]
        return self.q[keep], torch.tensor([counts[i] for i in keep], dtype=torch.float32)

    def __call__(self, ctx):
        from ..operators.reduce import soft_reduce
        from ..patch.llava import SoftOut

        x, sizes = ctx.x, ctx.sizes
        n = x.shape[1]
        # Ladder counts are fractions of the tokens that reach the site: the surviving mass of each
        # sample (earlier soft sites' masks); 1.0 keeps everything, whatever the mass.
        mass = ctx.log_mask.float().exp().clamp(max=1.0).sum(-1).detach()          # (B,)
        fr = self.fracs.to(x.device)
        counts = torch.where(fr[None] >= 1.0, torch.full_like(fr[None], float(n)), fr[None] * mass[:, None])  # (B, L)
        ys, ss, ms, bs = [], [], [], []
        total = 0.0
        for c in self.choices:
            w = c.weight.to(x.device)
            if c.anchors == "keep-all":
                y, s, m = x, sizes, torch.ones_like(sizes)
            else:
                if c.anchors == "grid":
                    q, cnt = self._grid_ladder(float(mass.mean()))
                    q, cnt = q.to(x.device), cnt.to(x.device)
                    scores = None
                else:
                    q, cnt = self.q.to(x.device), counts
                    scores = ctx.scores[c.score]
                # rank temperature 0: the mask of ladder entry K is exactly the top-K (linear in q)
                r = soft_reduce(x, ctx.keys, scores, ctx.coords, sizes, q, cnt, anchors=c.anchors, merge=c.merge,
                                sharpness=c.sharpness, locality=c.locality, reweight=0.0, tau=0.0,
                                log_mask=ctx.log_mask, eps=EPS)
                y, s, m = r.x, r.sizes, r.mask
            ys.append(w * y.float())
            ss.append(w * s)
            ms.append(w * m)
            bs.append(w * c.reweight * torch.log(s.clamp_min(1e-12)))
            total = total + w
        # renormalise over the computed choices (the skipped ones weigh < SKIP each)
        y = (sum(ys) / total).to(x.dtype)
        s, m = sum(ss) / total, sum(ms) / total
        own = log_mask(m)
        bias = own + sum(bs) / total
        return SoftOut(x=y, bias=bias, log_mask=own, sizes=s)


def _mixture_choices(sample: ArchSample, i: int, layer: int, space: SearchSpace) -> list[_Choice]:
    sc = space.score_at(layer)
    table = {
        "prune": ("topk", sc, 0.0, 0.0, 0.0, 0.0),
        "merge": ("topk", sc, 1.0, math.inf, 0.0, 1.0),   # the regimes' knobs are constants: the
        "pool": ("grid", None, 1.0, 0.0, math.inf, 0.0),   # exact hard assignment, as in the plan
        "reweight": ("keep-all", None, 0.0, 0.0, 0.0, 1.0),
    }
    out = []
    soft = sample.weight("regime")
    for r, name in enumerate(REGIMES):
        if float(soft[i, r]) > SKIP:
            out.append(_Choice(sample.regime[i, r], *table[name]))
    return out


def _continuous_choices(sample: ArchSample, i: int, layer: int) -> list[_Choice]:
    k = {name: v[i] for name, v in sample.knobs.items()}
    out = []
    w_topk, w_grid = sample.anchors[i, 0], sample.anchors[i, 1]
    sa, ss = sample.weight("anchors"), sample.weight("score")
    for j, name in enumerate(SCORES):
        if float(sa[i, 0] * ss[i, j]) > SKIP:
            out.append(_Choice(w_topk * sample.score[i, j], "topk", name, k["merge"], k["sharpness"], k["locality"],
                               k["reweight"]))
    if float(sa[i, 1]) > SKIP:
        out.append(_Choice(w_grid, "grid", None, k["merge"], k["sharpness"], k["locality"], k["reweight"]))
    return out


def build_sites(state: ArchState, sample: ArchSample, skip_identity: bool = False) -> list[SoftSite]:
    """The soft sites of one step. ``skip_identity``: leave out sites whose sample keeps every token
    with weight > 1 - SKIP (they would change nothing but cost time)."""
    space = state.space
    sites = []
    one = space.ladder.index(1.0)
    for i, layer in enumerate(space.layers):
        if space.operator == "mixture":
            choices = _mixture_choices(sample, i, layer, space)
        else:
            choices = _continuous_choices(sample, i, layer)
        identity = float(sample.weight("ladder")[i, one]) > 1 - SKIP
        if not (skip_identity and identity):
            sites.append(SoftSite(layer, sample.ladder[i], state.ladder_values, choices, space, sample.tau,
                                  q_soft=sample.weight("ladder")[i]))
    return sites


def init_keep_for_budget(state: ArchState, text_config, n_text: float, budget: float,
                         temperature: float = 1.0) -> float:
    """The "keep all" probability (same at every candidate layer, the rest spread evenly) at which
    the initial expected cost is the budget: the search starts on the constraint, neither side
    favoured. 1.0 (no reduction) when even that fits."""
    lo, hi = 0.0, 1.0
    for _ in range(40):  # cost grows with the keep-all probability: bisection
        mid = (lo + hi) / 2
        state.set_init_keep(mid)
        with torch.no_grad():
            c = float(expected_cost_ratio(state, text_config, n_text, temperature))
        lo, hi = (mid, hi) if c <= budget else (lo, mid)
    state.set_init_keep(lo)
    return lo
