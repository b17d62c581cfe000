"""Plans: what to reduce where, as versioned JSON (docs/DESIGN.md section 5, ``diffopsearch.plan/1``).

A plan is a list of sites (:class:`Site`) in increasing layer order plus the backbone it was made
for. Everything is validated before any model work: :func:`load_plan` / :meth:`Plan.from_dict`
check the structure and every field (a :class:`~diffopsearch.errors.UserError` naming the field),
:meth:`Plan.validate_for` checks the plan against a model config (layer count, visual tokens, grid).

Fields of a site (see operators/reduce.py for the maths):

- ``layer``: reduce before decoder layer ``layer`` (0 = at the LLM input), 0 <= layer < num_layers,
  strictly increasing over sites.
- ``keep``: visual tokens left after the site (absolute count), 1 <= keep <= tokens reaching it.
  ``keep`` equal to the tokens reaching the site is a no-op.
- ``score``: attn (FastV, not at layer 0) | cls | norm | random (seeded by the plan's ``seed``) | none
  (only for anchors that need no ranking: grid, bipartite).
- ``anchors``: topk | grid | bipartite (ToMe; keep >= tokens - tokens // 2) | iqr (PruMerge) |
  dominant (VisionZip). grid needs the incoming tokens to form a full grid (no earlier non-grid
  reduction) and keep = gr * gc with gr <= rows and gc <= cols.
- ``merge`` mu and ``reweight`` rho in [0, 1]; ``sharpness`` beta and ``locality`` lambda >= 0 or
  ``"inf"`` (JSON has no infinity: it is written as the string "inf").

The plan file never holds code or pickles, only these plain values.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .operators import ANCHORS, NEEDS_SCORE, SCORES, grid_shape, max_bipartite_merge

FORMAT = "diffopsearch.plan/1"
FORMAT_NAME = "diffopsearch.plan"
VERSION = 1
SITE_FIELDS = ("layer", "keep", "score", "anchors", "merge", "sharpness", "locality", "reweight")
TOP_FIELDS = ("format", "method", "backbone", "budget", "seed", "sites", "cost", "search", "run")
BACKBONE_FIELDS = ("name", "num_layers", "visual_tokens", "grid")


@dataclass(frozen=True)
class Site:
    layer: int              # reduce before decoder layer `layer` (0 = at the LLM input)
    keep: int               # visual tokens left after this site (absolute count)
    score: str = "attn"     # attn | cls | norm | random | none
    anchors: str = "topk"   # topk | grid | bipartite | iqr | dominant
    merge: float = 0.0      # mu in [0, 1]
    sharpness: float = 0.0  # beta >= 0 (inf allowed)
    locality: float = 0.0   # lambda >= 0 (inf allowed)
    reweight: float = 0.0   # rho in [0, 1]

    def to_dict(self) -> dict:
        return {f: _num_out(getattr(self, f)) for f in SITE_FIELDS}


@dataclass
class Plan:
    sites: list[Site] = field(default_factory=list)
    backbone: dict = field(default_factory=dict)
    budget: float | None = None
    method: str = "custom"
    cost: dict = field(default_factory=dict)
    search: dict | None = None
    seed: int = 0           # seeds the ``random`` score
    # How this file came to be, not what it says: creation time, wall seconds, whether the search was
    # resumed. Everything else is a function of the configuration and seed (byte-identical reruns).
    run: dict | None = None

    # -- accessors
    @property
    def num_layers(self) -> int:
        return int(self.backbone["num_layers"])

    @property
    def visual_tokens(self) -> int:
        return int(self.backbone["visual_tokens"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.backbone["grid"])  # type: ignore[return-value]

    def visual_tokens_per_layer(self, n_visual: int | None = None, num_layers: int | None = None) -> list[int]:
        """Visual tokens entering each decoder layer (a site at layer l acts before layer l)."""
        n = int(n_visual if n_visual is not None else self.visual_tokens)
        L = int(num_layers if num_layers is not None else self.num_layers)
        by_layer = {s.layer: s.keep for s in self.sites}
        out = []
        for layer in range(L):
            n = by_layer.get(layer, n)
            out.append(n)
        return out

    # -- (de)serialisation
    def to_dict(self) -> dict:
        d: dict[str, Any] = {"format": FORMAT, "method": self.method, "backbone": dict(self.backbone),
                             "budget": self.budget, "seed": self.seed,
                             "sites": [s.to_dict() for s in self.sites], "cost": _jsonable(self.cost)}
        if self.search is not None:
            d["search"] = _jsonable(self.search)
        if self.run is not None:
            d["run"] = _jsonable(self.run)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Plan":
        if not isinstance(d, dict):
            raise UserError(f"a plan must be a JSON object, got {type(d).__name__}")
        fmt = d.get("format")
        if fmt is None:
            raise UserError(f"plan field 'format' is missing: a plan file starts with \"format\": \"{FORMAT}\"")
        if not isinstance(fmt, str) or not fmt.startswith(FORMAT_NAME + "/"):
            raise UserError(f"plan field 'format' = {fmt!r} is not a diffopsearch plan: expected {FORMAT!r}")
        if fmt != FORMAT:
            raise UserError(f"plan field 'format' = {fmt!r}: this version of diffopsearch reads {FORMAT!r} only "
                            "(a plan written by a newer version? upgrade diffopsearch)")
        for k in d:
            if k not in TOP_FIELDS:
                raise UserError(f"plan field {k!r} is not known: a plan has {', '.join(TOP_FIELDS)}")
        for k in ("backbone", "sites"):
            if k not in d:
                raise UserError(f"plan field {k!r} is missing")
        backbone = d["backbone"]
        if not isinstance(backbone, dict):
            raise UserError(f"plan field 'backbone' must be an object, got {backbone!r}")
        raw_sites = d["sites"]
        if not isinstance(raw_sites, list):
            raise UserError(f"plan field 'sites' must be a list, got {raw_sites!r}")
        sites = [_site_from_dict(s, i) for i, s in enumerate(raw_sites)]
        method = d.get("method", "custom")
        cost = d.get("cost", {}) if d.get("cost") is not None else {}
        search = d.get("search")
        if not isinstance(method, str):
            raise UserError(f"plan field 'method' must be a string, got {method!r}")
        if not isinstance(cost, dict):
            raise UserError(f"plan field 'cost' must be an object, got {cost!r}")
        if search is not None and not isinstance(search, dict):
            raise UserError(f"plan field 'search' must be an object or null, got {search!r}")
        run = d.get("run")
        if run is not None and not isinstance(run, dict):
            raise UserError(f"plan field 'run' must be an object or null, got {run!r}")
        plan = cls(sites=sites, backbone=dict(backbone), budget=d.get("budget"), method=method, cost=cost,
                   search=search, seed=d.get("seed", 0), run=run)
        plan.validate()
        return plan

    def save(self, path: str | os.PathLike) -> Path:
        """Validate, then write the plan as JSON atomically."""
        from .io import atomic_write_json

        self.validate()
        return atomic_write_json(path, self.to_dict())

    # -- validation
    def validate(self) -> "Plan":
        """Check every field and the site sequence against the plan's own backbone; UserError
        naming the field on the first problem."""
        _check_backbone(self.backbone)
        if self.budget is not None and not (_is_number(self.budget) and 0 < self.budget <= 1):
            raise UserError(f"plan field 'budget' = {self.budget!r} is not valid: a number in (0, 1] or null")
        if not _is_int(self.seed):
            raise UserError(f"plan field 'seed' = {self.seed!r} is not valid: an integer")
        L, tokens = self.num_layers, self.visual_tokens
        grid: tuple[int, int] | None = self.grid
        prev_layer = -1
        for i, s in enumerate(self.sites):
            where = f"sites[{i}]"
            if not isinstance(s, Site):
                raise UserError(f"plan field {where} must be a Site, got {s!r}")
            _check_site_types(s, where)
            if not 0 <= s.layer < L:
                raise UserError(f"plan field {where}.layer = {s.layer} is out of range: the backbone has {L} "
                                f"decoder layers, so a site acts before layer 0..{L - 1}")
            if s.layer <= prev_layer:
                raise UserError(f"plan field {where}.layer = {s.layer} is not valid: sites must be in strictly "
                                f"increasing layer order (the previous site is at layer {prev_layer})")
            prev_layer = s.layer
            if not 1 <= s.keep <= tokens:
                raise UserError(f"plan field {where}.keep = {s.keep} is not valid: {tokens} visual tokens reach "
                                f"layer {s.layer}, so keep must be in 1..{tokens}")
            if s.score == "attn" and s.layer == 0:
                raise UserError(f"plan field {where}.score = 'attn' is not valid at layer 0: the attention score "
                                "needs a decoder layer before the site; use cls, norm or random there")
            if s.anchors in NEEDS_SCORE and s.score == "none":
                raise UserError(f"plan field {where}.score = 'none' is not valid with anchors={s.anchors!r}: it "
                                "ranks tokens, so give attn, cls, norm or random")
            if s.keep < tokens:
                if s.anchors == "bipartite" and tokens - s.keep > max_bipartite_merge(tokens):
                    raise UserError(f"plan field {where}.keep = {s.keep} is not valid with anchors='bipartite': "
                                    f"ToMe merges at most {max_bipartite_merge(tokens)} of {tokens} tokens per "
                                    f"site, so keep >= {tokens - max_bipartite_merge(tokens)}")
                if s.anchors == "grid":
                    if grid is None:
                        raise UserError(f"plan field {where}.anchors = 'grid' is not valid here: an earlier "
                                        "non-grid site left tokens that no longer form a grid")
                    shape = grid_shape(s.keep, *grid)
                    if shape is None:
                        raise UserError(f"plan field {where}.keep = {s.keep} is not valid with anchors='grid': "
                                        f"keep must be rows x cols of a grid within the {grid[0]} x {grid[1]} "
                                        "token grid")
                    grid = shape
                else:
                    grid = None
            tokens = s.keep
        return self

    def validate_for(self, model_config) -> "Plan":
        """Reject a plan made for another backbone: decoder layers, visual tokens and grid must
        match ``model_config`` (a LlavaConfig or a model with ``.config``)."""
        self.validate()
        actual = backbone_info(model_config)
        for k in ("num_layers", "visual_tokens", "grid"):
            want, have = self.backbone[k], actual[k]
            if k == "grid":
                want, have = list(want), list(have)
            if want != have:
                raise UserError(f"plan field backbone.{k} = {want!r} does not match the model ({have!r}): this "
                                f"plan was made for another backbone ({self.backbone.get('name') or 'unnamed'}); "
                                "make or search a plan for this model")
        return self


def backbone_info(model_config, name: str = "") -> dict:
    """The plan's ``backbone`` block for a LLaVA config (or a model): decoder layers, visual tokens
    per image and their grid, from the configs alone (works on the meta device)."""
    cfg = getattr(model_config, "config", model_config)
    tc, vc = cfg.text_config, cfg.vision_config
    side = int(vc.image_size) // int(vc.patch_size)
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise UserError(f"vision_feature_select_strategy {strategy!r} is not supported: plans need the "
                        "'default' strategy (patch tokens only, no CLS), as LLaVA-1.5 uses")
    return {"name": name or str(getattr(cfg, "_name_or_path", "") or ""),
            "num_layers": int(tc.num_hidden_layers), "visual_tokens": side * side, "grid": [side, side]}


def load_plan(path_or_dict) -> Plan:
    """A Plan from a plan.json path, a dict, or a Plan (validated). UserError on anything
    malformed: missing file, truncated / invalid JSON, unknown format, bad fields."""
    if isinstance(path_or_dict, Plan):
        return path_or_dict.validate()
    if isinstance(path_or_dict, dict):
        return Plan.from_dict(path_or_dict)
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise UserError(f"load_plan takes a path, a dict or a Plan, got {type(path_or_dict).__name__}")
    path = Path(path_or_dict)
    if not path.is_file():
        raise UserError(f"plan file {str(path)!r} does not exist (or is not a file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"plan file {str(path)!r} is not a plan: it is not UTF-8 text (a plan is a JSON file, "
                        f"format {FORMAT!r})") from None
    if not text.strip():
        raise UserError(f"plan file {str(path)!r} is empty: a plan is a JSON object with format {FORMAT!r} "
                        "(a search writes it, complete, when it ends)")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (the file looks truncated)" if e.pos >= len(text.rstrip()) - 1 else ""
        raise UserError(f"plan file {str(path)!r} is not valid JSON{hint}: {e.msg} at line {e.lineno}, "
                        f"column {e.colno}") from None
    return Plan.from_dict(d)


# --------------------------------------------------------------------------------------- helpers

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _num_in(v):
    """JSON has no infinity: accept the strings "inf" / "Infinity" for it."""
    if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "infinity", "+infinity"):
        return math.inf
    return v


def _num_out(v):
    return "inf" if isinstance(v, float) and math.isinf(v) and v > 0 else v


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def _site_from_dict(d, i: int) -> Site:
    where = f"sites[{i}]"
    if not isinstance(d, dict):
        raise UserError(f"plan field {where} must be an object with {', '.join(SITE_FIELDS)}, got {d!r}")
    for k in d:
        if k not in SITE_FIELDS:
            raise UserError(f"plan field {where}.{k} is not known: a site has {', '.join(SITE_FIELDS)}")
    for k in SITE_FIELDS:
        if k not in d:
            raise UserError(f"plan field {where}.{k} is missing: a site has {', '.join(SITE_FIELDS)}")
    values = {k: d[k] for k in SITE_FIELDS}
    for k in ("sharpness", "locality"):
        values[k] = _num_in(values[k])
    for k in ("merge", "sharpness", "locality", "reweight"):  # keep ints as given, floats for maths
        if _is_number(values[k]):
            values[k] = float(values[k])
    site = Site(**values)
    _check_site_types(site, where)
    return site


def _check_site_types(s: Site, where: str) -> None:
    for k in ("layer", "keep"):
        v = getattr(s, k)
        if not _is_int(v):
            raise UserError(f"plan field {where}.{k} = {v!r} is not valid: an integer")
    if s.score not in SCORES:
        raise UserError(f"plan field {where}.score = {s.score!r} is not known: use one of {', '.join(SCORES)}")
    if s.anchors not in ANCHORS:
        raise UserError(f"plan field {where}.anchors = {s.anchors!r} is not known: use one of {', '.join(ANCHORS)}")
    for k in ("merge", "reweight"):
        v = getattr(s, k)
        if not (_is_number(v) and 0.0 <= v <= 1.0):
            raise UserError(f"plan field {where}.{k} = {v!r} is not valid: a number in [0, 1]")
    for k in ("sharpness", "locality"):
        v = getattr(s, k)
        if not (_is_number(v) and v >= 0.0):
            raise UserError(f"plan field {where}.{k} = {v!r} is not valid: a number >= 0 (or \"inf\")")


def _check_backbone(b: dict) -> None:
    if not isinstance(b, dict):
        raise UserError(f"plan field 'backbone' must be an object, got {b!r}")
    for k in BACKBONE_FIELDS:
        if k not in b:
            raise UserError(f"plan field backbone.{k} is missing: backbone has {', '.join(BACKBONE_FIELDS)}")
    if not isinstance(b["name"], str):
        raise UserError(f"plan field backbone.name = {b['name']!r} is not valid: a string")
    for k in ("num_layers", "visual_tokens"):
        if not (_is_int(b[k]) and b[k] >= 1):
            raise UserError(f"plan field backbone.{k} = {b[k]!r} is not valid: a positive integer")
    g = b["grid"]
    if not (isinstance(g, (list, tuple)) and len(g) == 2 and all(_is_int(x) and x >= 1 for x in g)):
        raise UserError(f"plan field backbone.grid = {g!r} is not valid: [rows, cols], two positive integers")
    if g[0] * g[1] != b["visual_tokens"]:
        raise UserError(f"plan field backbone.grid = {list(g)!r} does not match backbone.visual_tokens = "
                        f"{b['visual_tokens']}: rows x cols must equal the visual token count")


__all__ = ["FORMAT", "Site", "Plan", "load_plan", "backbone_info"]
