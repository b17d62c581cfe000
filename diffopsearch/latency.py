"""Measured prefill time as the cost (docs/DESIGN.md section 4, ``cost=latency``): a latency model of one
backbone on one device, profiled once and cached as JSON.

What a user waits for before the first token is the prefill: the vision tower and projector, the
embeddings, every decoder layer on its (possibly reduced) sequence, the reduction steps and the last
position's logits. The model splits it into

- ``layer_ms(length)``: one decoder layer's time on a batch of sequences of that length, measured where it
  runs (inside the reduced forward, :func:`diffopsearch.patch.llava.stage_timer`'s "layer" stage) on a grid
  of lengths from the text alone to the unreduced length, fitted non-decreasing (a longer sequence never
  runs faster; single medians at batch 1 sometimes do) and interpolated linearly;
- ``fixed_ms``: what no plan shortens (vision tower, projector, embeddings, masks, logits): a forward's
  time outside its decoder layers and reduction steps, the median over every profiled forward;
- ``op_call_ms[kind] + op_ms[kind] * n_in``: each operator kind's own time at a site with ``n_in`` visual
  tokens in (the "reduce" stage of a real forward, measured at n and n/2 tokens in): a per-site constant
  (calls and kernel launches, which dominate at batch 1) plus a per-token slope;
- ``setup_ms``: what a forward with sites does once before the first (the "setup" stage: finding the visual
  segment and its grid).

A plan's predicted time is ``fixed + setup (if it has sites) + sum over layers of layer_ms(n_text + visual
tokens in that layer) + sum over sites of (op_call_ms[kind] + op_ms[kind] * tokens in)``; its ratio divides by
the unreduced model's prefill as users run it (the plain transformers forward, measured:
``reference_offset_ms`` closes the model's unreduced sum on it). The model is keyed by (device, backbone,
dtype, batch size, attention implementation, torch version) and stored under the cache dir; a file that is
damaged or made for another key is rebuilt, with a warning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError

FORMAT = "diffopsearch.latency/3"  # /2: setup_ms; the rotary tables of a site in its op time; /3: layer times
# fitted non-decreasing
GRID = 8            # lengths of the decoder-layer grid
OP_REPEATS = 5      # timed rounds per measurement (median)
log = logging.getLogger("diffopsearch")


def op_kind(site) -> str:
    """The operator kind of a site, as the latency model times it: ToMe's bipartite step, the grid pool,
    the PruMerge / VisionZip anchors, or a top-k site by its score, merging or pruning."""
    if site.anchors in ("bipartite", "grid", "iqr", "dominant"):
        return site.anchors
    return f"{site.score}/{'merge' if float(site.merge) > 0 else 'prune'}"


@dataclass
class LatencyModel:
    key: dict
    lengths: list[int]
    layer_ms: list[float]
    num_layers: int
    fixed_ms: float
    op_ms: dict[str, float]          # kind -> ms per visual token entering the site
    n_visual: int
    n_text: float                    # the profiling batch's mean text tokens (the unreduced reference)
    reference_offset_ms: float = 0.0  # the plain transformers forward minus the model's unreduced sum
    op_call_ms: dict = field(default_factory=dict)  # kind -> ms per site whatever its size (calls, launches)
    setup_ms: float = 0.0            # once per forward with sites, before the first
    seconds: float = 0.0             # how long profiling took
    format: str = FORMAT
    measured: dict = field(default_factory=dict)  # the raw measurements the fits come from

    # ---- prediction
    def layer_time(self, length: float) -> float:
        xs, ys = self.lengths, self.layer_ms
        if length <= xs[0]:
            i = 0
        elif length >= xs[-1]:
            i = len(xs) - 2
        else:
            i = max(j for j in range(len(xs) - 1) if xs[j] <= length)
        x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
        return max(0.0, y0 + (y1 - y0) * (length - x0) / max(x1 - x0, 1e-9))

    def op_time(self, site, n_in: int) -> float:
        kind = op_kind(site)
        if kind not in self.op_ms:  # a kind not profiled: the closest one that was (merging or not)
            kind = "cls/merge" if float(site.merge) > 0 else "norm/prune"
        return self.op_call_ms.get(kind, 0.0) + self.op_ms.get(kind, 0.0) * n_in

    def plan_ms(self, plan, n_text: float) -> float:
        """Predicted prefill ms of ``plan`` (a Plan or None) for prompts of ``n_text`` text tokens."""
        sites = {s.layer: s for s in (plan.sites if plan is not None else [])}
        total, n = self.fixed_ms + (self.setup_ms if sites else 0.0), self.n_visual
        for layer in range(self.num_layers):
            s = sites.get(layer)
            if s is not None and s.keep < n:
                total += self.op_time(s, n)
                n = s.keep
            total += self.layer_time(n_text + n)
        return total

    def reference_ms(self, n_text: float) -> float:
        """The unreduced model's prefill as users run it (the plain transformers forward)."""
        return self.plan_ms(None, n_text) + self.reference_offset_ms

    def ratio(self, plan, n_text: float) -> float:
        """Predicted prefill time of ``plan`` over the unreduced model's (plain transformers forward)."""
        return self.plan_ms(plan, n_text) / self.reference_ms(n_text)

    def cost_record(self, plan, n_text: float) -> dict:
        """What plan.json records of a plan sized by measured time: the metric, this model's identity and
        the plan's predicted latency ratio."""
        return {"metric": "latency", "latency_ratio_predicted": round(self.ratio(plan, n_text), 5),
                "latency_model": dict(self.key), "latency_n_text": round(float(n_text), 3)}

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- identity and cache

def model_key(model, batch_size: int, device=None) -> dict:
    """What a latency model is valid for."""
    import torch

    device = device or next(model.parameters()).device
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        import platform

        dev = f"cpu {platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip()
    cfg = model.config.to_json_string(use_diff=False) if hasattr(model.config, "to_json_string") else repr(model.config)
    return {"format": FORMAT, "device": dev, "backbone": hashlib.sha256(cfg.encode()).hexdigest()[:16],
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "batch_size": int(batch_size),
            "attn_implementation": str(getattr(model.config, "_attn_implementation", None) or "eager"),
            "torch": torch.__version__}


def cache_path(key: dict, root: Path | None = None) -> Path:
    if root is None:
        from .backbone.load import cache_dir

        root = cache_dir()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / "latency" / f"{digest}.json"


def load_cached(path: Path, key: dict) -> LatencyModel | None:
    """The cached model at ``path`` if it is intact and made for ``key``; None (with a warning for a
    damaged or mismatched file) otherwise: a cache is never trusted blindly."""
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        lm = LatencyModel(**d)
        ok = (lm.format == FORMAT and lm.key == key and len(lm.lengths) == len(lm.layer_ms) >= 2
              and all(math.isfinite(x) and x >= 0 for x in lm.layer_ms + [lm.fixed_ms, lm.setup_ms]
                      + list(lm.op_ms.values()) + list(lm.op_call_ms.values())))
    except (ValueError, TypeError, KeyError) as e:
        log.warning("the latency model cache %s is damaged (%s): profiling again.", path, e)
        return None
    if not ok:
        log.warning("the latency model cache %s does not match this device / backbone / settings or holds "
                    "invalid values: profiling again.", path)
        return None
    return lm


# ---------------------------------------------------------------- profiling

def _paired(fwd, model, inputs, sync, repeats: int, refs: list, rests: list) -> dict:
    """Per-stage and total times of ``fwd``'s prefill (:func:`diffopsearch.patch.llava.stage_timer`) as
    fractions of the plain transformers forward run just before it in the same round: the median over
    ``repeats`` rounds. Pairing cancels the slow drift of a shared machine (this one's timings wander by
    10-20% over a minute); the reference times themselves go to ``refs``, and each round's time outside
    the timed stages (what no plan shortens) to ``rests``."""
    from .evaluate import prefill
    from .patch.llava import stage_timer

    prefill(fwd, inputs)  # warm-up
    runs = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        prefill(model, inputs)
        sync()
        ref = time.perf_counter() - t0
        refs.append(ref)
        acc = {"reduce": 0.0, "layer": 0.0, "setup": 0.0}

        def record(stage, seconds, acc=acc):
            acc[stage] = acc.get(stage, 0.0) + seconds

        with stage_timer(record, sync):
            t0 = time.perf_counter()
            prefill(fwd, inputs)
            sync()
            acc["total"] = time.perf_counter() - t0
        runs.append({k: v / ref for k, v in acc.items()})
        rests.append((acc["total"] - acc["layer"] - acc["reduce"] - acc["setup"]) / ref)
    return {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}


def profile(model, inputs: dict, n_text: float, progress: bool = True) -> LatencyModel:
    """Profile ``model`` (a LlavaForConditionalGeneration) on one batch ``inputs`` (an eval batch: the
    batch size and images the model is for) with mean text length ``n_text``.

    Decoder layers are timed where they run, inside the reduced forward (``stage_timer``'s "layer" stage),
    with the visual segment cut to each length of the grid by a random prune before layer 0; the fixed part
    is the project's forward without sites minus its layers; every measurement is taken as a fraction of
    the plain transformers forward run beside it (the reference: what a user would otherwise run, which
    latency ratios divide by), then scaled by the reference's median time."""
    from .evaluate import prefill, visual_token_count
    from .patch.llava import apply_plan
    from .plan import Plan, Site, backbone_info
    from .runtime import sync as sync_device

    t_start = time.time()
    device = next(model.parameters()).device
    sync = lambda: sync_device(device)  # noqa: E731
    n_visual, _ = visual_token_count(model.config)
    L = len(model.model.language_model.layers)
    B, T = inputs["input_ids"].shape
    backbone = backbone_info(model.config)
    keeps = sorted({max(1, int(round(n_visual * i / (GRID - 1)))) for i in range(GRID)})
    half = n_visual // 2
    kinds = {  # one site of each kind at layer 1 (attn needs a layer before it)
        "attn/prune": Site(1, half, "attn"), "norm/prune": Site(1, half, "norm"),
        "random/prune": Site(1, half, "random"), "cls/prune": Site(1, half, "cls"),
        "cls/merge": Site(1, half, "cls", merge=1.0, sharpness=math.inf, reweight=1.0),
        "grid": Site(1, _grid_keep(n_visual), "none", "grid", merge=1.0, locality=math.inf),
        "iqr": Site(1, half, "cls", "iqr", merge=1.0, sharpness=math.inf),
        "dominant": Site(1, half, "cls", "dominant", merge=1.0, sharpness=math.inf),
        "bipartite": Site(1, n_visual - n_visual // 4, "none", "bipartite", merge=1.0, reweight=1.0),
    }
    bar = _bar(progress, len(keeps) + 1 + 2 * len(kinds))
    lengths, layer_frac, op_frac, small_frac, refs, rests, loop_frac = [], [], {}, {}, [], [], 1.0
    try:
        prefill(model, inputs)  # warm-up of the reference
        for k in keeps:
            sites = [Site(0, k, "random")] if k < n_visual else []
            st = _paired(apply_plan(model, Plan(sites=sites, backbone=backbone)), model, inputs, sync, OP_REPEATS,
                         refs, rests)
            lengths.append(T - n_visual + k)
            layer_frac.append(st["layer"] / L)
            if not sites:
                loop_frac = st["total"]
            bar.advance()
        # each kind at two sizes: all n tokens in, and n/2 after a random prune before layer 0 (whose own
        # time, measured alone, is subtracted): a per-site constant plus a per-token slope
        pre = Site(0, half, "random")
        st = _paired(apply_plan(model, Plan(sites=[pre], backbone=backbone)), model, inputs, sync, OP_REPEATS,
                     refs, rests)
        base, setup_frac = st["reduce"], st["setup"]
        bar.advance()
        for kind, site in kinds.items():
            if site.score == "cls" and not _has_cls(model):
                bar.advance(2)
                continue
            st = _paired(apply_plan(model, Plan(sites=[site], backbone=backbone)), model, inputs, sync, OP_REPEATS,
                         refs, rests)
            op_frac[kind] = st["reduce"]
            bar.advance()
            if kind != "grid":  # a grid cannot follow a top-k site: one size only
                smaller = dataclasses.replace(site, keep=max(1, site.keep * half // n_visual))
                st = _paired(apply_plan(model, Plan(sites=[pre, smaller], backbone=backbone)), model, inputs, sync,
                             OP_REPEATS, refs, rests)
                small_frac[kind] = max(0.0, st["reduce"] - base)
            bar.advance()
    finally:
        bar.close()
    ref_ms = 1e3 * sorted(refs)[len(refs) // 2]
    layer_ms = [f * ref_ms for f in nondecreasing(layer_frac)]
    loop_ms = loop_frac * ref_ms
    # what no plan shortens, from every profiled forward (not the one without sites alone: a single
    # paired measurement moved it by a few % of the prefill, and with it every prediction)
    fixed = sorted(rests)[len(rests) // 2] * ref_ms
    per, call = {}, {}
    for kind, f in op_frac.items():  # t(n_in) = call + per * n_in through (n, t_n) and (n/2, t_half)
        t_n, t_half = f * ref_ms, small_frac.get(kind, f / 2) * ref_ms
        per[kind] = max(0.0, (t_n - t_half) / (n_visual - half))
        call[kind] = max(0.0, t_n - per[kind] * n_visual)
    return LatencyModel(key=model_key(model, B, device), lengths=lengths, layer_ms=layer_ms, num_layers=L,
                        fixed_ms=fixed, op_ms=per, op_call_ms=call, setup_ms=setup_frac * ref_ms,
                        n_visual=n_visual, n_text=float(n_text), reference_offset_ms=ref_ms - fixed - L * layer_ms[-1],
                        seconds=round(time.time() - t_start, 2),
                        measured={"full_prefill_ms": ref_ms, "loop_prefill_ms": loop_ms,
                                  "layer_ms_raw": [f * ref_ms for f in layer_frac],
                                  "op_ms_at_layer1": {k: f * ref_ms for k, f in op_frac.items()},
                                  "reference_runs": len(refs), "batch": [B, T]})


def nondecreasing(ys: list[float]) -> list[float]:
    """The least-squares non-decreasing fit of ``ys`` (pool adjacent violators). A decoder layer never runs
    faster on a longer sequence, so a dip in the measured curve is noise (at batch 1 on 2 CPU cores one
    profile measured 1.74 ms at 125 tokens and 1.40 ms at 145); and the keep solvers' bisection
    needs a plan's predicted time to grow with what it keeps."""
    blocks: list[tuple[float, int]] = []  # (mean, count) of runs pooled so far
    for y in ys:
        blocks.append((float(y), 1))
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks.pop(-2), blocks.pop()
            blocks.append(((m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2))
    return [m for m, c in blocks for _ in range(c)]


def _grid_keep(n: int) -> int:
    """A near-square grid count about a quarter of ``n`` (what a 2 x 2 pool keeps)."""
    side = max(1, int(round(n ** 0.5 / 2)))
    return side * side


def _has_cls(model) -> bool:
    from .search.space import available_scores

    return "cls" in available_scores(model.config)


class _bar:
    """A rich progress bar while profiling (or nothing)."""

    def __init__(self, enabled: bool, total: int):
        self.p = None
        if enabled:
            from rich.progress import Progress

            self.p = Progress(transient=True)
            self.p.start()
            self.task = self.p.add_task("profiling latency", total=total)

    def advance(self, n: int = 1):
        if self.p is not None:
            self.p.advance(self.task, n)

    def close(self):
        if self.p is not None:
            self.p.stop()


def latency_model(model, inputs: dict, n_text: float, root: Path | None = None, progress: bool = True,
                  refresh: bool = False) -> tuple[LatencyModel, Path, bool]:
    """The latency model for ``model`` at ``inputs``' batch size: from the cache when there is a valid one,
    else profiled and cached (atomic write). Returns (model, its file, whether it was profiled now)."""
    from .io import atomic_write_json

    key = model_key(model, inputs["input_ids"].shape[0])
    path = cache_path(key, root)
    if not refresh:
        cached = load_cached(path, key)
        if cached is not None:
            return cached, path, False
    lm = profile(model, inputs, n_text, progress)
    atomic_write_json(path, lm.to_dict())
    return lm, path, True


def for_dataset(model, processor, dataset, batch_size: int, n_text: float, progress: bool = True,
                refresh: bool = False) -> tuple[LatencyModel, Path, bool]:
    """:func:`latency_model` on the first ``batch_size`` questions of ``dataset`` (their images and prompts)."""
    from .data.datasets import make_eval_batch
    from .runtime import device_of, to_device

    idx = list(range(min(batch_size, len(dataset))))
    if len(idx) < batch_size:
        raise UserError(f"batch_size={batch_size} is larger than the {len(dataset)} questions of "
                        f"{dataset.name}/{dataset.split}: the latency model needs one full batch.")
    recs, imgs = dataset.batch(idx)
    if len(recs) < batch_size:
        raise UserError(f"some of the first {batch_size} images of {dataset.name}/{dataset.split} cannot be "
                        "decoded: the latency model needs one full batch of images.")
    inputs = to_device(make_eval_batch(processor, recs, imgs), device_of(model), next(model.parameters()).dtype)
    return latency_model(model, inputs, n_text, progress=progress, refresh=refresh)


def print_model(lm: LatencyModel, path: Path, profiled: bool, console=None) -> None:
    """The latency model as tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    k = lm.key
    how = f"profiled now in {lm.seconds:.1f} s" if profiled else "read from the cache"
    console.print(f"latency model: {k['device']}, backbone {k['backbone']}, {k['dtype']}, batch {k['batch_size']}, "
                  f"{k['attn_implementation']} attention ({how}; {path})")
    t = Table(title="one decoder layer (whole batch)")
    t.add_column("sequence length", justify="right")
    t.add_column("ms", justify="right")
    for n, ms in zip(lm.lengths, lm.layer_ms):
        t.add_row(str(n), f"{ms:.3f}")
    console.print(t)
    full = lm.reference_ms(lm.n_text)
    console.print(f"fixed parts (vision tower, projector, embeddings, masks, logits): {lm.fixed_ms:.2f} ms = "
                  f"{100 * lm.fixed_ms / full:.1f}% of the unreduced prefill ({full:.2f} ms, the plain "
                  f"transformers forward; {lm.measured.get('loop_prefill_ms', float('nan')):.2f} ms without sites "
                  "in the reduced forward; "
                  f"{lm.num_layers} layers, {lm.n_text:.1f} text + {lm.n_visual} visual tokens)")
    console.print(f"set-up of a forward with sites (visual segment and grid, once): {lm.setup_ms:.3f} ms")
    o = Table(title="operator kinds: own time")
    for c in ("kind", "ms per site", "ms per visual token in", f"ms at {lm.n_visual} tokens", "% of unreduced prefill"):
        o.add_column(c, justify="right" if c != "kind" else "left")
    for kind, per in sorted(lm.op_ms.items()):
        call = lm.op_call_ms.get(kind, 0.0)
        at_n = call + per * lm.n_visual
        o.add_row(kind, f"{call:.3f}", f"{per:.5f}", f"{at_n:.3f}", f"{100 * at_n / full:.1f}%")
    console.print(o)
