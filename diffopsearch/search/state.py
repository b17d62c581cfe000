"""The architecture state of the search (DESIGN section 3): the only thing that learns.

Per candidate layer ``s``:

- ``ladder``: logits of a categorical over the keep ladder (fractions of the tokens reaching the
  layer, 1.0 = no reduction here). Where and how many in one distribution.
- the operator, in one of two modes:
  ``mixture``: logits of a categorical over the named regimes prune / merge / pool / reweight
  (DESIGN section 2's table), relaxed with Gumbel-softmax (GDAS / SNAS style);
  ``continuous``: free knobs, merge mu = sigmoid, sharpness beta = softplus * scale, locality
  lambda = softplus * scale, reweight rho = sigmoid, plus categoricals over the score (attn / cls /
  norm) and the anchors (topk / grid), the second is what finds hybrids.

Noise is a pure function of (seed, step) (:func:`gumbel`), so a resumed run draws exactly what an
uninterrupted one draws, and data-parallel processes sample the same architecture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

REGIMES = ("prune", "merge", "pool", "reweight")
SCORES = ("attn", "cls", "norm")
ANCHORS = ("topk", "grid")
KNOBS = ("merge", "sharpness", "locality", "reweight")
SHARPNESS_SCALE = 10.0  # beta = softplus(raw) * scale: Adam steps of ~lr move beta by ~lr * scale
LOCALITY_SCALE = 1.0


def regime_knobs(regime: str, score: str, large: float = math.inf) -> dict:
    """The Site fields (besides layer / keep) of a named regime ranking by ``score`` (see
    :meth:`SearchSpace.score_at`: a site before layer 0 has no earlier decoder layer's attention).
    ``large``: the "large" sharpness / locality (inf: the exact most similar / nearest anchor, as
    the baselines use; the soft forward uses the same constants)."""
    if regime == "prune":
        return dict(score=score, anchors="topk", merge=0.0, sharpness=0.0, locality=0.0, reweight=0.0)
    if regime == "merge":
        return dict(score=score, anchors="topk", merge=1.0, sharpness=large, locality=0.0, reweight=1.0)
    if regime == "pool":
        return dict(score="none", anchors="grid", merge=1.0, sharpness=0.0, locality=large, reweight=0.0)
    if regime == "reweight":  # k = n: nothing is removed, only the reweighting bias acts
        return dict(score=score, anchors="topk", merge=0.0, sharpness=0.0, locality=0.0, reweight=1.0)
    raise ValueError(f"unknown regime {regime!r}")


def seed_for(seed: int, step: int, stream: int) -> int:
    """A 63-bit generator seed from (seed, step, stream): distinct streams never share draws."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def gumbel(shape, seed: int, step: int, stream: int) -> Tensor:
    """Gumbel(0, 1) noise drawn on the CPU from a generator seeded by (seed, step, stream)."""
    g = torch.Generator().manual_seed(seed_for(seed, step, stream))
    u = torch.rand(tuple(shape), generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u))).float()


@dataclass(frozen=True)
class SearchSpace:
    """What is searched: candidate layers (sorted), the keep ladder (descending, holds 1.0), the
    operator mode, and the backbone facts the relaxation needs."""

    layers: tuple[int, ...]
    ladder: tuple[float, ...]
    operator: str  # mixture | continuous
    n_visual: int
    grid: tuple[int, int]
    num_layers: int
    scores: tuple[str, ...] = SCORES  # the scores this backbone offers (cls needs a CLIP layer to read)

    def __post_init__(self):
        if self.operator not in ("mixture", "continuous"):
            raise ValueError(f"operator {self.operator!r}: use mixture or continuous")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError("layers must be sorted and distinct")
        if list(self.ladder) != sorted(set(self.ladder), reverse=True) or self.ladder[0] != 1.0:
            raise ValueError("ladder must be distinct fractions in descending order starting at 1.0")
        if "norm" not in self.scores or any(s not in SCORES for s in self.scores):
            raise ValueError(f"scores {self.scores!r}: a subset of {SCORES} that holds norm")

    def score_at(self, layer: int) -> str:
        """The score the named regimes rank by at ``layer``: FastV's attention after layer 0, else the
        vision tower's CLS attention, else the norm."""
        if layer > 0 and "attn" in self.scores:
            return "attn"
        return "cls" if "cls" in self.scores else "norm"

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "ladder": list(self.ladder), "operator": self.operator,
                "n_visual": self.n_visual, "grid": list(self.grid), "num_layers": self.num_layers,
                "scores": list(self.scores)}


@dataclass
class ArchSample:
    """One relaxed architecture for one step (all (S, ...) with S candidate layers)."""

    tau: float
    ladder: Tensor                      # (S, L) relaxed one-hot over the ladder
    regime: Tensor | None = None        # (S, 4) mixture mode
    score: Tensor | None = None         # (S, 3) continuous mode
    anchors: Tensor | None = None       # (S, 2) continuous mode
    knobs: dict = field(default_factory=dict)  # continuous mode: name -> (S,)
    soft: dict = field(default_factory=dict)   # name -> the relaxed values (detached), for deciding
    #                                            what is worth computing when the forward is hard

    def weight(self, name: str) -> Tensor:
        """The relaxed (detached) values of ``name``: what a choice is worth to the gradient."""
        return self.soft.get(name, getattr(self, name).detach())


def _gumbel_softmax(logits: Tensor, tau: float, noise: Tensor | None, hard: bool = False) -> tuple[Tensor, Tensor]:
    """Relaxed one-hot sample and its detached relaxed values; ``hard``: straight-through (the
    forward sees the exact one-hot of the sample, the gradient is the relaxed sample's)."""
    z = logits if noise is None else logits + noise.to(logits.device, logits.dtype)
    y = torch.softmax(z / tau, dim=-1)
    if not hard:
        return y, y.detach()
    one = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
    return one - y.detach() + y, y.detach()


class ArchState(nn.Module):
    """The learnable architecture parameters (tens to hundreds of scalars)."""

    def __init__(self, space: SearchSpace, init_keep: float = 0.5):
        """``init_keep``: initial probability of the 1.0 (no reduction) entry at every layer, the rest
        spread evenly (:meth:`set_init_keep`)."""
        super().__init__()
        self.space = space
        S, L = len(space.layers), len(space.ladder)
        self.ladder_logits = nn.Parameter(torch.zeros(S, L))
        self.set_init_keep(init_keep)
        self.register_buffer("ladder_values", torch.tensor(space.ladder, dtype=torch.float32), persistent=False)
        # attn needs a decoder layer before the site: masked out at layer 0
        avail = torch.ones(S, len(SCORES), dtype=torch.bool)
        for i, layer in enumerate(space.layers):
            for j, name in enumerate(SCORES):
                avail[i, j] = name in space.scores and not (name == "attn" and layer == 0)
        self.register_buffer("score_available", avail, persistent=False)
        if space.operator == "mixture":
            self.regime_logits = nn.Parameter(torch.zeros(S, len(REGIMES)))
        else:
            self.score_logits = nn.Parameter(torch.zeros(S, len(SCORES)))
            self.anchor_logits = nn.Parameter(torch.zeros(S, len(ANCHORS)))
            # start in the middle of the space: mu = rho = 0.5, beta = 5, lambda = 0.5
            self.merge_raw = nn.Parameter(torch.zeros(S))
            self.sharpness_raw = nn.Parameter(torch.full((S,), _softplus_inv(5.0 / SHARPNESS_SCALE)))
            self.locality_raw = nn.Parameter(torch.full((S,), _softplus_inv(0.5 / LOCALITY_SCALE)))
            self.reweight_raw = nn.Parameter(torch.zeros(S))

    @torch.no_grad()
    def set_init_keep(self, init_keep: float) -> None:
        L = len(self.space.ladder)
        self.ladder_logits.zero_()
        if L > 1:
            p = min(max(float(init_keep), 1e-4), 1 - 1e-4)
            self.ladder_logits[:, 0] = math.log(p * (L - 1) / (1 - p))

    # ---- distributions (no noise): what E[cost] and the plan read
    def ladder_probs(self, temperature: float = 1.0) -> Tensor:
        return torch.softmax(self.ladder_logits / temperature, dim=-1)

    def regime_probs(self, temperature: float = 1.0) -> Tensor:
        return torch.softmax(self.regime_logits / temperature, dim=-1)

    def masked_score_logits(self) -> Tensor:
        return self.score_logits.masked_fill(~self.score_available, float("-inf"))

    def knobs(self) -> dict[str, Tensor]:
        f = nn.functional
        return {"merge": torch.sigmoid(self.merge_raw),
                "sharpness": f.softplus(self.sharpness_raw) * SHARPNESS_SCALE,
                "locality": f.softplus(self.locality_raw) * LOCALITY_SCALE,
                "reweight": torch.sigmoid(self.reweight_raw)}

    def expected_fraction(self, temperature: float = 1.0) -> Tensor:
        """(S,) expected fraction of the tokens reaching each candidate layer that leave it, under
        the distributions at ``temperature`` (softmax(logits / T): T -> 0 is the argmax plan)."""
        keep = self.ladder_probs(temperature) @ self.ladder_values
        if self.space.operator == "mixture":
            w = self.regime_probs(temperature)[:, REGIMES.index("reweight")]
            keep = w + (1 - w) * keep  # the reweight regime keeps every token
        return keep

    def expected_tokens(self, temperature: float = 1.0) -> Tensor:
        """(num_layers,) expected visual tokens entering every decoder layer (independent sites:
        the expectation of the product of fractions is the product of expectations)."""
        frac = self.expected_fraction(temperature)
        per_layer = []
        running = torch.ones((), device=frac.device)
        it = dict(zip(self.space.layers, range(len(self.space.layers))))
        for layer in range(self.space.num_layers):
            if layer in it:
                running = running * frac[it[layer]]
            per_layer.append(running)
        return torch.stack(per_layer) * self.space.n_visual

    # ---- one relaxed sample per step
    def sample(self, step: int, tau: float, seed: int, noise: bool = True, hard: bool = False) -> ArchSample:
        """Gumbel-softmax relaxation at temperature ``tau``; the noise depends only on (seed, step).
        ``hard``: straight-through samples (exact one-hot forward, relaxed gradient)."""
        S = len(self.space.layers)

        def draw(shape, stream):
            return gumbel(shape, seed, step, stream) if noise else None

        out = ArchSample(tau=tau, ladder=None)
        out.ladder, out.soft["ladder"] = _gumbel_softmax(self.ladder_logits, tau, draw(self.ladder_logits.shape, 0), hard)
        if self.space.operator == "mixture":
            out.regime, out.soft["regime"] = _gumbel_softmax(self.regime_logits, tau, draw((S, len(REGIMES)), 1), hard)
        else:
            out.score, out.soft["score"] = _gumbel_softmax(self.masked_score_logits(), tau, draw((S, len(SCORES)), 2), hard)
            out.anchors, out.soft["anchors"] = _gumbel_softmax(self.anchor_logits, tau, draw((S, len(ANCHORS)), 3), hard)
            out.knobs = self.knobs()
        return out

    # ---- reporting
    def distributions(self) -> dict:
        """The learned distributions and knobs, JSON-ready (plan.json's ``search.distributions``)."""
        with torch.no_grad():
            out = {"layers": list(self.space.layers), "ladder": list(self.space.ladder),
                   "ladder_probs": _rounded(self.ladder_probs()),
                   "expected_fraction": _rounded(self.expected_fraction()),
                   "expected_tokens_per_layer": _rounded(self.expected_tokens())}
            if self.space.operator == "mixture":
                out["regimes"] = list(REGIMES)
                out["regime_probs"] = _rounded(self.regime_probs())
            else:
                out["scores"] = list(SCORES)
                out["score_probs"] = _rounded(torch.softmax(self.masked_score_logits(), -1))
                out["anchors"] = list(ANCHORS)
                out["anchor_probs"] = _rounded(torch.softmax(self.anchor_logits, -1))
                out["knobs"] = {k: _rounded(v) for k, v in self.knobs().items()}
        return out


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _rounded(t: Tensor, digits: int = 5):
    t = t.detach().cpu().double()
    if t.dim() == 0:
        return round(float(t), digits)
    return [_rounded(x, digits) for x in t]
