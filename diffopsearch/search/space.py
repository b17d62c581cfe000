"""What the search chooses among, and how a choice becomes a plan under the budget (docs/DESIGN.md §3).

A plan of the space has one or two sites (non-increasing counts by construction):

- the first site: a candidate layer and an operator (a named regime with a score: prune / merge by
  attn, cls or norm; pool on the grid);
- optionally a second site at a later candidate layer with a prune / merge operator, keeping a
  fraction ``ratio`` of what the first site kept.

The first site's keep count is never chosen: it is *solved* from the budget by the cost model (the
most tokens whose plan fits), so every plan of the space satisfies ``cost <= budget``. The operators'
continuous knobs (merge, sharpness, locality, reweight) come from outside (the learned knobs).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..errors import UserError
from ..regimes import regime_knobs

RATIOS = (0.7, 0.5, 0.35, 0.2, 0.1)  # second site's keep / first site's keep
FIRST_REGIMES = ("prune", "merge", "pool")
SECOND_REGIMES = ("prune", "merge")    # a grid is not realisable after a top-k site
SCORES = ("attn", "cls", "norm")


@dataclass(frozen=True)
class Op:
    regime: str
    score: str   # "none" for pool

    @property
    def name(self) -> str:
        return self.regime if self.score == "none" else f"{self.regime}/{self.score}"


OPS = tuple([Op(r, s) for r in ("prune", "merge") for s in SCORES] + [Op("pool", "none")])


@dataclass(frozen=True)
class Choice:
    """A discrete plan of the space: indices into ``space.layers`` / ``OPS`` / ``space.ratios``;
    ``second`` None = one site."""

    layer: int
    op: int
    second: tuple[int, int, int] | None = None   # (layer index, op index, ratio index)

    def key(self) -> tuple:
        return (self.layer, self.op, self.second)


@dataclass(frozen=True)
class SearchSpace:
    layers: tuple[int, ...]          # candidate layers, sorted
    n_visual: int
    grid: tuple[int, int]
    num_layers: int
    scores: tuple[str, ...] = SCORES  # the scores this backbone offers (cls needs a CLIP layer to read)
    ratios: tuple[float, ...] = RATIOS
    two_sites: bool = True

    def __post_init__(self):
        if list(self.layers) != sorted(set(self.layers)) or not self.layers:
            raise ValueError("layers must be a non-empty sorted list of distinct layers")

    def op_allowed(self, layer_index: int, op_index: int, slot: int) -> bool:
        """Whether ``OPS[op]`` may act at candidate layer ``layer_index`` as the ``slot``-th site."""
        op, layer = OPS[op_index], self.layers[layer_index]
        if op.regime not in (FIRST_REGIMES if slot == 0 else SECOND_REGIMES):
            return False
        if op.score == "attn":
            return layer > 0 and "attn" in self.scores
        return op.score == "none" or op.score in self.scores

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "n_visual": self.n_visual, "grid": list(self.grid),
                "num_layers": self.num_layers, "scores": list(self.scores), "ratios": list(self.ratios),
                "two_sites": self.two_sites, "ops": [o.name for o in OPS]}


class Planner:
    """Choices -> plans under the budget, for one backbone / budget / mean text length. The keep solver
    is a bisection over the cost model (cost grows with the first site's keep), memoised per plan shape.
    ``latency``: a :class:`~diffopsearch.latency.LatencyModel`; the budget is then a fraction of its
    predicted prefill time instead of the prefill FLOPs (``cost=latency``)."""

    def __init__(self, space: SearchSpace, backbone: dict, budget: float, text_config, n_text: float,
                 latency=None):
        from ..cost import dims

        self.space, self.backbone, self.budget, self.n_text = space, dict(backbone), float(budget), float(n_text)
        self.dims = dims(text_config)
        self.latency = latency
        self._solve = lru_cache(maxsize=None)(self._solve_uncached)

    # -- the sites of a choice, with knobs
    def fit(self, choice: Choice, floats) -> tuple[Choice, int | None]:
        """(the choice as it runs, its first keep): a second site whose own overhead leaves no room for
        the first is dropped; None when not even the first site alone fits."""
        k1 = self.keep1(choice, floats)
        if k1 is None and choice.second is not None:
            choice = Choice(choice.layer, choice.op)
            k1 = self.keep1(choice, floats)
        return choice, k1

    def hard_sites(self, choice: Choice, floats, knobs=None) -> list:
        """The sites ``choice`` runs with under the budget: knobs ``floats(slot, regime)`` (floats, also what
        the keep is solved with), or ``knobs(slot, regime)`` (tensors) for the forward to differentiate."""
        choice, k1, floats, knobs = self._runnable(choice, floats, knobs)
        return self.sites(choice, knobs or floats, k1)

    def _runnable(self, choice: Choice, floats, knobs=None):
        """``fit``, and where the learned knobs switched on an overhead the budget cannot carry (a prune
        site that learned to merge, on a budget its feasible prune just met), the choice with merge 0:
        every choice the policy may draw runs under budget."""
        choice, k1 = self.fit(choice, floats)
        if k1 is None:
            floats, knobs = _no_merge(floats), (_no_merge(knobs) if knobs is not None else None)
            choice, k1 = self.fit(choice, floats)
        return choice, k1, floats, knobs

    def sites(self, choice: Choice, knobs, keep1: int) -> list:
        """Site objects (:class:`~diffopsearch.plan.Site`, or tensor-knob sites when ``knobs`` returns
        tensors) for ``choice`` with the first site keeping ``keep1``. ``knobs(slot, regime)`` -> dict."""
        out = []
        op = OPS[choice.op]
        out.append(self._site(self.space.layers[choice.layer], keep1, op, knobs(0, op.regime)))
        if choice.second is not None:
            li, oi, ri = choice.second
            op2 = OPS[oi]
            keep2 = max(1, int(round(self.space.ratios[ri] * keep1)))
            if keep2 < keep1:
                out.append(self._site(self.space.layers[li], keep2, op2, knobs(1, op2.regime)))
        return out

    @staticmethod
    def _site(layer, keep, op, k):
        from ..operators.reduce import SearchSite
        from ..plan import Site

        fields = regime_knobs(op.regime, op.score)
        fields.update(k)
        if any(hasattr(v, "requires_grad") for v in k.values()):
            return SearchSite(layer=layer, keep=keep, **fields)
        return Site(layer=layer, keep=keep, **{n: (float(v) if n in ("merge", "sharpness", "locality", "reweight")
                                                   else v) for n, v in fields.items()})

    # -- the budget
    def keep1(self, choice: Choice, knobs) -> int | None:
        """The most tokens the first site can keep with the plan's cost <= budget; None if even one does
        not fit. Depends on the knobs only through which overheads they switch on."""
        flags = tuple(sorted((slot, r, float(v["merge"]) > 0, float(v["sharpness"]) > 0)
                             for slot, r, v in self._used_knobs(choice, knobs)))
        return self._solve(choice, flags)

    def _used_knobs(self, choice, knobs):
        out = [(0, OPS[choice.op].regime, knobs(0, OPS[choice.op].regime))]
        if choice.second is not None:
            r = OPS[choice.second[1]].regime
            out.append((1, r, knobs(1, r)))
        return out

    def _solve_uncached(self, choice: Choice, flags) -> int | None:
        fl = {(slot, r): (m, s) for slot, r, m, s in flags}

        def knobs(slot, regime):  # only what the cost model reads: whether merge / similarity run
            m, s = fl[(slot, regime)]
            return {"merge": 1.0 if m else 0.0, "sharpness": 1.0 if s else 0.0}

        n = self.space.n_visual
        op = OPS[choice.op]
        keeps = _grid_keeps(tuple(self.space.grid)) if op.regime == "pool" else tuple(range(1, n))
        lo, hi = 0, len(keeps)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.cost(self.sites(choice, knobs, keeps[mid])) <= self.budget + 1e-12:
                lo = mid + 1
            else:
                hi = mid
        return keeps[lo - 1] if lo else None

    def cost(self, sites) -> float:
        """The budget's metric of a plan of ``sites``: its FLOPs ratio, or its predicted latency ratio."""
        from ..cost import plan_cost
        from ..plan import Plan

        plan = Plan(sites=list(sites), backbone=self.backbone)
        if self.latency is not None:
            return self.latency.ratio(plan, self.n_text)
        return plan_cost(self.dims, plan, self.space.n_visual, self.n_text)["flops_ratio"]

    def plan(self, choice: Choice, knobs, method: str = "search"):
        """The hard :class:`~diffopsearch.plan.Plan` of ``choice`` with float knobs, or None if it cannot
        meet the budget."""
        from ..cost import plan_cost
        from ..plan import Plan

        choice, k1, knobs, _ = self._runnable(choice, knobs)
        if k1 is None:
            return None
        plan = Plan(sites=self.sites(choice, knobs, k1), backbone=dict(self.backbone), budget=self.budget,
                    method=method)
        plan.cost = dict(plan_cost(self.dims, plan, self.space.n_visual, self.n_text))
        if self.latency is not None:
            plan.cost.update(self.latency.cost_record(plan, self.n_text))
        return plan


@lru_cache(maxsize=None)
def _grid_keeps(grid: tuple[int, int]) -> tuple[int, ...]:
    from ..baselines import pool_keeps

    return tuple(k for k in pool_keeps(grid) if k < grid[0] * grid[1])


def make_space(model_config, layers=None, two_sites: bool = True) -> SearchSpace:
    """The space for a backbone (a LlavaConfig or a model): every decoder layer is a candidate unless
    ``layers`` names some."""
    model_config = getattr(model_config, "config", model_config)
    from ..evaluate import visual_token_count

    n_layers = int(model_config.text_config.num_hidden_layers)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise UserError(f"search.candidate_layers={layers!r} is not valid for this backbone: it has {n_layers} "
                        f"decoder layers, so candidate layers lie in 0..{n_layers - 1} (bad: {bad}).")
    n_visual, grid = visual_token_count(model_config)
    return SearchSpace(layers=tuple(sorted(set(layers))), n_visual=int(n_visual), grid=tuple(grid),
                       num_layers=n_layers, scores=available_scores(model_config), two_sites=two_sites)


def available_scores(model_config) -> tuple[str, ...]:
    """attn and norm always; cls when the LLaVA feature layer is the output of a CLIP layer (the CLS
    attention is read from that layer, as the reduced forward does)."""
    vfl = getattr(model_config, "vision_feature_layer", -2)
    idx = max(vfl) if isinstance(vfl, (list, tuple)) else int(vfl)
    n = int(model_config.vision_config.num_hidden_layers)
    hs = idx if idx >= 0 else n + 1 + idx
    return ("attn", "cls", "norm") if hs >= 1 else ("attn", "norm")


def _no_merge(knobs):
    """``knobs`` with merge 0 at every slot (a float, or a tensor without a graph when the others are tensors)."""
    def wrapped(slot, regime):
        k = dict(knobs(slot, regime))
        m = k["merge"]
        k["merge"] = m.detach() * 0 if hasattr(m, "detach") else 0.0
        return k
    return wrapped


def min_cost_ratio(text_config, backbone: dict, n_text: float, first_layer: int, latency=None) -> float:
    """The cheapest plan there is: one token left at the first candidate layer (ranked by norm, which
    adds no FLOPs overhead), in FLOPs or (``latency``) in predicted time."""
    from ..cost import plan_cost
    from ..plan import Plan, Site

    plan = Plan(sites=[Site(layer=first_layer, keep=1, score="norm")], backbone=dict(backbone), method="min")
    if latency is not None:
        return float(latency.ratio(plan, n_text))
    return float(plan_cost(text_config, plan, int(backbone["visual_tokens"]), n_text)["flops_ratio"])



def corner_choices(space: SearchSpace) -> list[Choice]:
    """The space's single-site corners: every allowed (layer, operator) as the only site."""
    return [Choice(li, oi) for li in range(len(space.layers)) for oi in range(len(OPS))
            if space.op_allowed(li, oi, 0)]


def describe(choice: Choice, space: SearchSpace) -> str:
    s = f"{OPS[choice.op].name}@L{space.layers[choice.layer]}"
    if choice.second is not None:
        li, oi, ri = choice.second
        s += f" + {OPS[oi].name}@L{space.layers[li]}x{space.ratios[ri]:g}"
    return s

