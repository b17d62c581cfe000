"""The learnable architecture state (docs/DESIGN.md section 3): a staged policy over the space's discrete
choices, and the operators' continuous knobs.

Policy (score-function gradients): the first site's layer, then its operator given the layer; then
whether a second site follows (a Bernoulli per first layer), its layer among the later ones, its
operator given that layer and its keep ratio given the operator. One site, two sites and non-increasing
counts are what it expresses; the first site's keep is solved from the budget (:mod:`.space`). Every
factor starts uniform over what is allowed and feasible at the budget, and "a second site" at even odds.

Knobs (backpropagation through the hard forward): merge, sharpness, locality and reweight per slot
(first / second site) and regime, each starting at its named regime's value (:mod:`diffopsearch.regimes`,
"large" = :data:`LARGE`) and kept in its domain by projection after every step, so a knob that never
moves is exactly the regime's and the learned plan reads as such.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..regimes import KNOBS, regime_knobs
from .space import OPS, Choice, SearchSpace

LARGE = 50.0            # "large" sharpness / locality: cos in [-1, 1] and squared grid distances >= 1
KNOB_SCALE = {"merge": 1.0, "sharpness": 10.0, "locality": 1.0, "reweight": 1.0}  # value = parameter x scale
KNOB_MAX = {"merge": 1.0, "sharpness": 100.0, "locality": 100.0, "reweight": 1.0}
KNOB_REGIMES = ("prune", "merge", "pool")
NEG = -1e9              # logit of a forbidden choice (finite: no NaN in log-softmax)


@dataclass
class Sample:
    choice: Choice
    log_prob: Tensor    # 0-d, differentiable in the policy's logits


class Policy(nn.Module):
    def __init__(self, space: SearchSpace, feasible: Tensor):
        """``feasible`` (S, |OPS|) bool: first-site choices allowed at the layer and able to meet the budget."""
        super().__init__()
        self.space = space
        S, O, R = len(space.layers), len(OPS), len(space.ratios)
        self.layer1 = nn.Parameter(torch.zeros(S))
        self.op1 = nn.Parameter(torch.zeros(S, O))
        self.two = nn.Parameter(torch.zeros(S))       # logit of "a second site follows" per first layer
        self.layer2 = nn.Parameter(torch.zeros(S))
        self.op2 = nn.Parameter(torch.zeros(S, O))
        self.ratio = nn.Parameter(torch.zeros(O, R))  # given the second site's operator: how much a prune
        # or a merge can drop depends on which it is
        allowed2 = torch.tensor([[space.op_allowed(li, oi, 1) for oi in range(O)] for li in range(S)])
        self.register_buffer("mask1", feasible.bool().clone(), persistent=False)
        self.register_buffer("mask2", allowed2, persistent=False)
        if not bool(self.mask1.any()):
            raise ValueError("no first site can meet the budget")

    # ---- the factors' log-probabilities (all finite; forbidden entries ~ -1e9)
    def factors(self) -> dict[str, Tensor]:
        S = len(self.space.layers)
        lay1 = self.layer1.masked_fill(~self.mask1.any(1), NEG).log_softmax(-1)              # (S,)
        op1 = self.op1.masked_fill(~self.mask1, NEG).log_softmax(-1)                         # (S, O)
        later = torch.arange(S)[None, :] > torch.arange(S)[:, None]                           # (l1, l2)
        ok2 = later & self.mask2.any(1)[None, :]
        has_later = ok2.any(1)
        two = torch.where(has_later, nn.functional.logsigmoid(self.two), torch.full_like(self.two, NEG))
        one = torch.where(has_later, nn.functional.logsigmoid(-self.two), torch.zeros_like(self.two))
        lay2 = self.layer2[None, :].expand(S, S).masked_fill(~ok2, NEG).log_softmax(-1)        # (l1, l2)
        op2 = self.op2.masked_fill(~self.mask2, NEG).log_softmax(-1)                         # (S, O)
        ratio = self.ratio.log_softmax(-1)                                                   # (O, R)
        if not self.space.two_sites:
            two, one = torch.full_like(two, NEG), torch.zeros_like(one)
        return {"layer1": lay1, "op1": op1, "one": one, "two": two, "layer2": lay2, "op2": op2, "ratio": ratio}

    def log_prob(self, c: Choice, f: dict | None = None) -> Tensor:
        f = f or self.factors()
        lp = f["layer1"][c.layer] + f["op1"][c.layer, c.op]
        if c.second is None:
            return lp + f["one"][c.layer]
        li, oi, ri = c.second
        return lp + f["two"][c.layer] + f["layer2"][c.layer, li] + f["op2"][li, oi] + f["ratio"][oi, ri]

    def first_log_prob(self, c: Choice, f: dict) -> Tensor:
        return f["layer1"][c.layer] + f["op1"][c.layer, c.op]

    def second_log_prob(self, c: Choice, f: dict) -> Tensor:
        """log pi(second site | first site, a second site follows): 0 for a one-site plan."""
        if c.second is None:
            return torch.zeros(())
        li, oi, ri = c.second
        return f["layer2"][c.layer, li] + f["op2"][li, oi] + f["ratio"][oi, ri]

    def sample_pair(self, generator: torch.Generator) -> tuple[Choice, Choice | None]:
        """A first site drawn from the policy, and the same first site with a second site drawn from the
        policy's second-site factors (None where no second site can follow it). The search runs both: their
        difference on the same batch is the second site's value, with the first site's effect cancelled."""
        f = self.factors()
        l1 = _draw(f["layer1"], generator)
        o1 = _draw(f["op1"][l1], generator)
        if float(f["two"][l1].detach()) < NEG / 2:
            return Choice(l1, o1), None
        l2 = _draw(f["layer2"][l1], generator)
        o2 = _draw(f["op2"][l2], generator)
        return Choice(l1, o1), Choice(l1, o1, (l2, o2, _draw(f["ratio"][o2], generator)))

    def sample(self, generator: torch.Generator) -> Sample:
        """One plan drawn from the policy with ``generator`` (on the CPU: draws are a function of its seed)."""
        f = self.factors()
        l1 = _draw(f["layer1"], generator)
        o1 = _draw(f["op1"][l1], generator)
        second = None
        if float(f["two"][l1].detach()) > NEG / 2 and float(torch.rand((), generator=generator)) < float(f["two"][l1].detach().exp()):
            l2 = _draw(f["layer2"][l1], generator)
            o2 = _draw(f["op2"][l2], generator)
            second = (l2, o2, _draw(f["ratio"][o2], generator))
        c = Choice(l1, o1, second)
        return Sample(c, self.log_prob(c, f))

    @torch.no_grad()
    def ranked(self, k: int) -> list[tuple[Choice, float]]:
        """The ``k`` most probable plans, most probable first (exact, by enumeration of the factors)."""
        f = self.factors()
        S, O, R = len(self.space.layers), len(OPS), len(self.space.ratios)
        first = f["layer1"][:, None] + f["op1"]                                              # (S, O)
        single = (first + f["one"][:, None]).flatten()
        double = (first[:, :, None, None, None] + f["two"][:, None, None, None, None]
                  + f["layer2"][:, None, :, None, None] + f["op2"][None, None, :, :, None]
                  + f["ratio"][None, None, None, :, :]).flatten()
        allp = torch.cat([single, double])
        top = allp.topk(min(k, allp.numel()))
        out = []
        for lp, idx in zip(top.values.tolist(), top.indices.tolist()):
            if lp < NEG / 2:
                break
            if idx < S * O:
                out.append((Choice(idx // O, idx % O), lp))
            else:
                l1, o1, l2, o2, r = _unravel(idx - S * O, (S, O, S, O, R))
                out.append((Choice(l1, o1, (l2, o2, r)), lp))
        return out

    def mode(self) -> Choice:
        """The most probable plan as a whole (exact)."""
        return self.ranked(1)[0][0]

    @torch.no_grad()
    def decode(self, f: dict | None = None) -> Choice:
        """The gradient phase's plan: each decision's most probable option in turn (first layer, its operator,
        whether a second site follows, then its layer, operator and ratio), as NAS methods read their
        architecture off the learned distributions. Unlike :meth:`mode` it does not penalise a second site
        for being described by more factors than no second site. ``f``: :meth:`factors`, when the caller has
        them."""
        f = f or self.factors()
        one, two = self.decode_pair(f)
        if two is None or float(f["two"][one.layer]) <= float(f["one"][one.layer]):
            return one
        return two

    @torch.no_grad()
    def decode_pair(self, f: dict | None = None) -> tuple[Choice, Choice | None]:
        """The decoded first site alone, and with its greedy second site (None where none can follow), whatever
        "a second site follows" says: the pair whose paired difference decides that decision (:mod:`.loop`)."""
        f = f or self.factors()
        l1 = int(f["layer1"].argmax())
        o1 = int(f["op1"][l1].argmax())
        if float(f["two"][l1]) < NEG / 2:
            return Choice(l1, o1), None
        l2 = int(f["layer2"][l1].argmax())
        o2 = int(f["op2"][l2].argmax())
        return Choice(l1, o1), Choice(l1, o1, (l2, o2, int(f["ratio"][o2].argmax())))

    def entropy(self) -> Tensor:
        """A cheap proxy of the policy's entropy (the bonus that keeps exploration alive): the first layer's,
        plus the operator's and the second-site decision's at the first layer's distribution, plus the
        second site's factors (its layer at that distribution, its operator at the second layer's, its ratio
        at the operator's): untried second sites stay in play until the pairs have measured them."""
        f = self.factors()

        def h(logp: Tensor) -> Tensor:  # entropy along the last dimension; forbidden entries contribute 0
            return -(logp.exp() * logp.clamp_min(NEG / 2)).sum(-1)

        p1 = f["layer1"].exp()
        pt = f["two"].exp()
        h_two = -(pt * f["two"] + (1 - pt) * f["one"])
        p2 = (p1[:, None] * f["layer2"].exp()).sum(0)                                        # (S,)
        po = (p2[:, None] * f["op2"].exp()).sum(0)                                          # (O,)
        second = (p1 * h(f["layer2"])).sum() + (p2 * h(f["op2"])).sum() + (po * h(f["ratio"])).sum()
        return h(f["layer1"]) + (p1 * (h(f["op1"]) + h_two)).sum() + second

    def distributions(self) -> dict:
        """JSON-ready marginals (plan.json's ``search.distributions``)."""
        with torch.no_grad():
            f = self.factors()
            p1 = f["layer1"].exp()
            return {"layers": list(self.space.layers), "ops": [o.name for o in OPS], "ratios": list(self.space.ratios),
                    "first_layer": _rounded(p1), "first_op": _rounded(f["op1"].exp()),
                    "second_site": _rounded(f["two"].exp()), "second_layer": _rounded(self.layer2.softmax(-1)),
                    "second_op": _rounded(f["op2"].exp()), "ratio": _rounded(f["ratio"].exp())}


def _draw(logp: Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(logp.detach().exp(), 1, generator=generator))


def _unravel(idx: int, shape) -> list[int]:
    out = []
    for dim in reversed(shape):
        out.append(idx % dim)
        idx //= dim
    return out[::-1]


class Knobs(nn.Module):
    """Per slot (first / second site) and regime: merge, sharpness, locality, reweight. The parameters are
    the values over :data:`KNOB_SCALE` (so Adam moves sharpness / locality ten times as far per step),
    initialised at the regime's own values and projected into their domains by :meth:`project_`."""

    def __init__(self):
        super().__init__()
        init = torch.zeros(2, len(KNOB_REGIMES), len(KNOBS))
        for ri, regime in enumerate(KNOB_REGIMES):
            named = regime_knobs(regime, "norm", large=LARGE)
            if regime == "prune":
                named["sharpness"] = LARGE  # were it to start merging, into the most similar anchor
            for ki, knob in enumerate(KNOBS):
                init[:, ri, ki] = float(named[knob]) / KNOB_SCALE[knob]
        self.raw = nn.Parameter(init)

    def value(self, slot: int, regime: str, device=None) -> dict[str, Tensor]:
        """The knobs of ``regime`` at ``slot`` as 0-d tensors (in the graph)."""
        row = self.raw[slot, KNOB_REGIMES.index(regime)]
        if device is not None:
            row = row.to(device)
        return {k: row[i] * KNOB_SCALE[k] for i, k in enumerate(KNOBS)}

    def floats(self, slot: int, regime: str) -> dict[str, float]:
        with torch.no_grad():
            return {k: round(float(v), 4) for k, v in self.value(slot, regime).items()}

    @torch.no_grad()
    def project_(self) -> None:
        for i, k in enumerate(KNOBS):
            self.raw[..., i].clamp_(0.0, KNOB_MAX[k] / KNOB_SCALE[k])

    def to_dict(self) -> dict:
        return {f"{slot}/{r}": self.floats(i, r) for i, slot in enumerate(("first", "second")) for r in KNOB_REGIMES}


class ArchState(nn.Module):
    """Everything that learns: the policy and the knobs (on the CPU: a few hundred scalars)."""

    def __init__(self, space: SearchSpace, feasible: Tensor):
        super().__init__()
        self.space = space
        self.policy = Policy(space, feasible)
        self.knobs = Knobs()


def _rounded(t: Tensor, digits: int = 4):
    t = t.detach().cpu().double()
    if t.dim() == 0:
        return round(float(t), digits)
    return [_rounded(x, digits) for x in t]
