"""Measure the search at LLaVA-1.5-7B's true shape on a CPU and project its cost on one GPU (issue 16).

    OMP_NUM_THREADS=1 python scripts/real_size.py                 # measure, write BENCHMARKS.md's section
    python scripts/real_size.py --quick --out /tmp/B.md            # a smaller smoke run

The backbone is tests/real_shape.py's: LLaVA-1.5-7B's geometry (CLIP 336 px / patch 14: 576 visual tokens on
24 x 24, feature layer -2, ``default`` strategy, LLaVA's projector, a 32-layer Llama decoder, LLaVA-1.5's
processor) with small widths (decoder d = 64) and random weights, built into ``--work``. Each measurement runs
in a child process of its own (so one peak does not hide another):

1. **peak resident memory of one search step** (the loop's own ``search()``, the search defaults of
   ``diffopsearch search`` except the ones named) at batch ``--batch``, with activation checkpointing on / off
   and the step in one forward or in micro-batches of 2; and of the worst knob backward there is (a merge site
   at layer 0 at the budget's keep: every decoder layer in the graph); and of ``diffopsearch search`` itself
   (the CLI, default batch, a few steps);
2. **activation memory per sample per layer**: every tensor autograd saves for the backward of a knob plan
   whose graph spans all 32 layers at the full sequence length, summed per decoder layer and classed by its
   size per token (hidden-size multiples, MLP-size multiples, token pairs), at d = 64; then scaled to the 7B
   widths class by class;
3. **FLOPs of one search step**: counted with ``torch.utils.flop_counter.FlopCounterMode`` (eager attention,
   which it counts), next to the analytic model of the same step (``diffopsearch.cost`` per recorded forward,
   plus backward and recomputation, plus the CLIP tower), then the same step at 7B widths;

and from these, the projection: GPU memory and GPU-hours of the default and ``search=thorough`` searches on
LLaVA-1.5-7B on one A100-80GB and one H100, at ``--utilisation`` of the dense bf16 peak. Everything lands in
BENCHMARKS.md between ``<!-- real-size:begin -->`` and ``<!-- real-size:end -->`` (added at the end when missing;
the rest of the file is left as it is), with the assumptions next to the numbers and the command that made it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests", ROOT / "scripts"):  # scripts: bench.machine_info
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

BEGIN, END = "<!-- real-size:begin -->", "<!-- real-size:end -->"
GPUS = {"A100-80GB": {"tflops": 312.0, "bw_tbs": 2.039, "mem_gb": 80.0},
        "H100 (SXM)": {"tflops": 989.0, "bw_tbs": 3.35, "mem_gb": 80.0}}
GQA_TEXT = 40.0          # text tokens of a LLaVA-1.5 GQA prompt, Vicuna's tokenizer (template, question, post-prompt)
GQA_ANSWER = 3.0         # answer tokens + eos under teacher forcing (GQA answers are one or two words)
GQA_TESTDEV = 12578      # questions in GQA test-dev balanced (the eval split of dataset=gqa)
CUDA_OVERHEAD_GB = 2.0   # CUDA context, cuBLAS workspaces, allocator slack
BYTES_BF16 = 2


# ------------------------------------------------------------------------------------------ helpers

def proc_mem() -> dict:
    """Current and peak resident set (MB) of this process, from /proc (Linux)."""
    out = {}
    try:
        text = Path("/proc/self/status").read_text()
        for key in ("VmRSS", "VmHWM"):
            m = re.search(rf"{key}:\s+(\d+)\s+kB", text)
            if m:
                out[key] = int(m.group(1)) / 1024
    except OSError:
        pass
    if "VmHWM" not in out:
        import resource

        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS: Linux's /proc/self/clear_refs, value 5."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def gc_collect():
    import gc

    gc.collect()


def setup(work: Path, seed: int = 0) -> tuple[Path, Path]:
    """The real-shape backbone and a small toy world under ``work`` (made once)."""
    import real_shape as rs

    model_dir, world_dir = work / "model", work / "world"
    if not (model_dir / "config.json").exists():
        rs.build_real_shape(model_dir, seed=seed)
    if not (world_dir / "world.json").exists() and not any(world_dir.glob("*/*.parquet")):
        from diffopsearch.data import world

        world.write_world(world_dir, seed=seed, sizes={"train": 96, "test": 8})
    return model_dir, world_dir


def search_settings(budget: float, overrides=()):
    """``diffopsearch search``'s SearchSettings (its composed config: the defaults as they are now)."""
    from diffopsearch.config import compose
    from diffopsearch.commands.search import settings_from

    cfg = compose("search", [f"budget={budget}", "model=llava", *overrides])
    return settings_from(cfg), cfg


def load(model_dir, world_dir, attn: str = "sdpa"):
    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.config import ModelConfig
    from diffopsearch.data.datasets import load_qa

    model, proc = load_backbone(ModelConfig(name="llava", path=str(model_dir), dtype="float32", device="cpu",
                                            attn_implementation=attn))
    train = load_qa("toy", str(world_dir), "train")
    return model, proc, train


def planner_for(model, proc, train, budget):
    from diffopsearch.evaluate import mean_prompt_text_tokens
    from diffopsearch.plan import backbone_info
    from diffopsearch.search.space import Planner, make_space

    space = make_space(model.config)
    n_text = mean_prompt_text_tokens(proc, train)
    return space, Planner(space, backbone_info(model.config), budget, model.config.text_config, n_text), n_text


def worst_choice(space):
    """merge/cls at layer 0: the knob plan whose graph spans every decoder layer with the most tokens."""
    from diffopsearch.search.space import OPS, Choice

    op = next(i for i, o in enumerate(OPS) if o.regime == "merge" and o.score == "cls")
    return Choice(space.layers.index(0), op)


# ------------------------------------------------------------------------------------------ children

def knob_reuse_bug() -> bool:
    """Whether a knob tensor of ``Knobs.value`` can take only one backward (its ``* scale`` saves a wrapped
    number that the first backward frees): then the loop's knob backward fails at the second micro-batch,
    because it builds a plan's knob tensors once and backpropagates once per micro-batch."""
    from diffopsearch.search.policy import Knobs

    v = Knobs().value(0, "merge")["merge"]
    (v * 1.0).backward()
    try:
        (v * 1.0).backward()
    except RuntimeError:
        return True
    return False


def patch_knob_values() -> None:
    """Measurement workaround for :func:`knob_reuse_bug`: the same knob values and gradients, through a scale
    that keeps no saved tensor (what building the knob tensors once per micro-batch in the loop would do)."""
    import torch

    from diffopsearch.search import policy

    class _Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scale):
            ctx.scale = scale
            return x * scale

        @staticmethod
        def backward(ctx, g):
            return g * ctx.scale, None

    def value(self, slot, regime, device=None):
        row = self.raw[slot, policy.KNOB_REGIMES.index(regime)]
        if device is not None:
            row = row.to(device)
        return {k: _Scale.apply(row[i], float(policy.KNOB_SCALE[k])) for i, k in enumerate(policy.KNOBS)}

    policy.Knobs.value = value


def child_step(a) -> dict:
    """Peak RSS of one search step, and of the worst knob backward, at one setting."""
    import dataclasses

    import torch

    from diffopsearch.data.datasets import make_train_batch
    from diffopsearch.patch.llava import encode_images
    from diffopsearch.search.loop import micro_batches, plan_losses, reference_logprobs, search
    from diffopsearch.search.policy import Knobs
    from diffopsearch.search.space import describe

    torch.manual_seed(0)
    workaround = bool(a.micro) and a.micro < a.batch and knob_reuse_bug()
    if workaround:
        patch_knob_values()
    settings, _ = search_settings(a.budget)
    settings = dataclasses.replace(settings, steps=1, batch_size=a.batch, micro_batch=a.micro,
                                   checkpoint_layers=a.ckpt == "on")
    model, proc, train = load(a.model, a.world)
    space, planner, n_text = planner_for(model, proc, train, a.budget)
    gc_collect()
    base = proc_mem()["VmRSS"]
    can_reset = reset_peak()
    t0 = time.time()
    res = search(model, proc, train, space, planner, settings, n_text, progress=False)
    step_s = time.time() - t0
    step_peak = proc_mem()["VmHWM"]
    rec = res.history[0]
    order = sorted(range(len(rec["losses"])), key=lambda j: (rec["losses"][j], j))[:settings.knob_plans]
    knob_plans = [rec["plans"][j] for j in order]

    # the worst knob backward: every layer in the graph, at the budget's keep
    gc_collect()
    reset_peak()
    choice = worst_choice(space)
    knobs = Knobs()
    sites = planner.hard_sites(choice, knobs.floats, lambda s, r: knobs.value(s, r))
    recs, imgs = train.batch(list(range(a.batch)))
    batch = make_train_batch(proc, recs, imgs)
    t0 = time.time()
    for chunk in micro_batches(batch, a.micro):
        vision = encode_images(model, chunk["pixel_values"])
        ref = reference_logprobs(model, chunk, vision)
        plan_losses(model, chunk, sites, ref, "kl", a.ckpt == "on", vision).sum().backward()
    worst_s = time.time() - t0
    worst_peak = proc_mem()["VmHWM"]
    return {"base_mb": base, "step_peak_mb": step_peak, "step_s": step_s, "knob_plans": knob_plans,
            "worst_plan": describe(choice, space), "worst_keep": int(sites[0].keep), "worst_peak_mb": worst_peak,
            "worst_s": worst_s, "peak_reset": can_reset, "settings": dataclasses.asdict(settings),
            "workaround": workaround,
            "seq_len": int(batch["input_ids"].shape[1]), "n_text": n_text}


def child_act(a) -> dict:
    """Bytes autograd saves for a knob backward, per decoder layer, per sample, by class."""
    import collections

    import torch

    from diffopsearch.data.datasets import make_train_batch
    from diffopsearch.patch.llava import encode_images
    from diffopsearch.search.loop import plan_losses, reference_logprobs
    from diffopsearch.operators.reduce import SearchSite

    model, proc, train = load(a.model, a.world)
    tc = model.config.text_config
    d, m, H = tc.hidden_size, tc.intermediate_size, tc.num_attention_heads
    dh = getattr(tc, "head_dim", None) or d // H
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    B = 2
    recs, imgs = train.batch(list(range(B)))
    batch = make_train_batch(proc, recs, imgs)
    vision = encode_images(model, batch["pixel_values"])
    ref = reference_logprobs(model, batch, vision)
    layers = model.model.language_model.layers
    cur = {"l": -1, "T": 0}
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: cur.update(l=i, T=(args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True) for i, layer in enumerate(layers)]
    out = {}
    n = 576
    for ckpt in (False, True):
        saved = collections.defaultdict(dict)
        cur.update(l=-1, T=0)

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                saved[(cur["l"], cur["T"])][ptr] = (tuple(t.shape), t.element_size(), t.untyped_storage().nbytes())
            return t

        # the knobs as the search's knob forward has them: tensors (so the reweight knob puts a float bias on
        # the visual keys, even at 0); one token dropped at layer 0: the full sequence through all 32 layers,
        # every layer in the graph
        knobs = {k: torch.tensor(v, requires_grad=True) for k, v in
                 (("merge", 1.0), ("sharpness", 50.0), ("locality", 0.0), ("reweight", 1.0))}
        sites = [SearchSite(layer=0, keep=n - 1, score="norm", anchors="topk", **knobs)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = plan_losses(model, batch, sites, ref, "kl", ckpt, vision).sum()
        per_layer = []
        for (l, T), tensors in saved.items():
            if l < 0:
                continue
            cls = {"d": 0.0, "m": 0.0, "dh": 0.0, "pairs": 0.0, "other": 0.0}
            nbytes = 0
            for shape, esize, sbytes in tensors.values():
                numel = math.prod(shape)
                per_tok = numel / (B * T)
                nbytes += sbytes
                if per_tok >= d and abs(per_tok / d - round(per_tok / d)) < 1e-9 and per_tok < H * T:
                    cls["d"] += per_tok / d * esize
                elif per_tok >= m and abs(per_tok / m - round(per_tok / m)) < 1e-9 and per_tok < H * T:
                    cls["m"] += per_tok / m * esize
                elif per_tok >= T and abs(per_tok / (H * T) - round(per_tok / (H * T))) < 1e-9:
                    cls["pairs"] += per_tok / (H * T) * esize
                elif per_tok >= dh and abs(per_tok / dh - round(per_tok / dh)) < 1e-9:
                    cls["dh"] += per_tok / dh * esize   # rotary cos / sin
                else:
                    cls["other"] += per_tok * esize
            per_layer.append((l, T, nbytes / B, cls))
        inner = [x for x in per_layer if 0 < x[0] < len(layers) - 1]  # the first / last carry the site / head
        T = inner[0][1]
        out[f"ckpt={'on' if ckpt else 'off'}"] = {
            "T": T, "bytes_per_sample_layer": sum(x[2] for x in inner) / len(inner),
            # units: element sizes summed per token per (d | m | H*T) elements
            "units": {k: sum(x[3][k] for x in inner) / len(inner) for k in ("d", "m", "dh", "pairs", "other")},
            "total_saved_mb": sum(v[2] for t in saved.values() for v in t.values()) / 1e6}
        loss.backward()
    for h in hooks:
        h.remove()
    return {"d": d, "m": m, "H": H, "B": B, "layers": len(layers), "kinds": out}


def child_flops(a) -> dict:
    """One search step under FlopCounterMode (eager attention), with every forward it made recorded."""
    import dataclasses

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import diffopsearch.patch.llava as pl
    from diffopsearch.search import loop

    torch.manual_seed(0)
    settings, _ = search_settings(a.budget)
    settings = dataclasses.replace(settings, steps=1, batch_size=a.batch, micro_batch=a.micro,
                                   checkpoint_layers=a.ckpt == "on")
    model, proc, train = load(a.model, a.world, attn="eager")
    space, planner, n_text = planner_for(model, proc, train, a.budget)
    calls, encodes = [], []
    orig_fwd, orig_enc = pl.search_forward, pl.encode_images

    def rec_fwd(model_, sites, input_ids, *args, **kw):
        grad = any(torch.is_tensor(getattr(s, "merge", None)) and s.merge.requires_grad for s in sites)
        calls.append({"B": int(input_ids.shape[0]), "T": int(input_ids.shape[1]),
                      "W": int(kw.get("logits_to_keep") or input_ids.shape[1]), "grad": grad,
                      "checkpoint": bool(kw.get("checkpoint")),
                      "sites": [{"layer": int(s.layer), "keep": int(s.keep), "score": s.score, "anchors": s.anchors,
                                 "merge": float(s.merge), "sharpness": float(s.sharpness),
                                 "locality": float(s.locality), "reweight": float(s.reweight)} for s in sites]})
        return orig_fwd(model_, sites, input_ids, *args, **kw)

    def rec_enc(model_, pixel_values):
        encodes.append(int(pixel_values.shape[0]))
        return orig_enc(model_, pixel_values)

    pl.search_forward, loop.encode_images = rec_fwd, rec_enc
    try:
        t0 = time.time()
        with FlopCounterMode(display=False) as fc:
            res = loop.search(model, proc, train, space, planner, settings, n_text, progress=False)
        seconds = time.time() - t0
    finally:
        pl.search_forward, loop.encode_images = orig_fwd, orig_enc
    counts = fc.get_flop_counts()
    total = fc.get_total_flops()
    # the vision tower and projector are called on their own (encode_images), so they are top-level modules
    vision = sum(sum(v.values()) for k, v in counts.items()
                 if "." not in k and (k.endswith("VisionModel") or k.endswith("Projector")))
    return {"counted_total": total, "counted_vision": vision, "seconds": seconds, "calls": calls, "encodes": encodes,
            "settings": dataclasses.asdict(settings), "n_text": n_text, "record": res.history[0],
            "text": _dims(model.config), "vision_cfg": _vdims(model.config)}


def child_cli(a) -> dict:
    """``diffopsearch search`` itself as a grandchild; its peak RSS (the only child this process waits for)."""
    import resource

    argv = [sys.executable, "-m", "diffopsearch", "search", *a.rest]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.time()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=a.cwd, env=env)
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rc": p.returncode, "peak_mb": peak, "seconds": seconds, "args": list(a.rest),
            "stderr_tail": p.stderr[-2000:] if p.returncode else ""}


# ------------------------------------------------------------------------------------------ the analytic model

def _dims(config) -> dict:
    from diffopsearch.cost import dims

    g = dict(dims(config))
    g["V"] = int(config.text_config.vocab_size)
    return g


def _vdims(config) -> dict:
    v = config.vision_config
    return {"d": int(v.hidden_size), "m": int(v.intermediate_size), "L": int(v.num_hidden_layers),
            "N": (v.image_size // v.patch_size) ** 2 + 1, "patch": int(v.patch_size), "channels": 3,
            "D": int(config.text_config.hidden_size)}


def vision_flops(vd: dict) -> float:
    """One image through CLIP (every layer: HF runs them all for hidden_states) and LLaVA's projector, per
    FlopCounterMode's convention (matmuls and the patch convolution, 2 per multiply-add, no causal halving)."""
    N, d, m, L = vd["N"], vd["d"], vd["m"], vd["L"]
    layer = 2 * N * d * 4 * d + 2 * N * d * m * 2 + 4 * N * N * d
    patches = N - 1
    conv = 2 * patches * d * vd["channels"] * vd["patch"] ** 2
    proj = 2 * patches * (d * vd["D"] + vd["D"] * vd["D"])
    return L * layer + conv + proj


def call_flops(call: dict, g: dict, n_visual: int = 576, text_delta: float = 0.0) -> dict:
    """Analytic FLOPs of one recorded search forward (FlopCounterMode's convention: causal=False): forward;
    for a knob forward also the backward (input gradients only: the weights are frozen; attention's two
    operands both need gradients) and, with checkpointing, the recomputation of the layers in the graph."""
    from diffopsearch import cost
    from diffopsearch.plan import Plan, Site

    B, W = call["B"], call["W"]
    n_text = call["T"] - n_visual + text_delta
    sites = [Site(**s) for s in call["sites"]]
    plan = Plan(sites=sites, backbone={"num_layers": g["L"], "visual_tokens": n_visual})
    c = cost.plan_cost(g, plan, n_visual, n_text, causal=False)
    head = 2 * W * g["d"] * g["V"]
    fwd = B * (c["flops"] + head)
    out = {"forward": fwd, "backward": 0.0, "recompute": 0.0}
    if call["grad"] and sites:
        first = min(s.layer for s in sites)
        qd = g["H"] * g["dh"]
        lin = attn = 0.0
        for v in c["visual_tokens_per_layer"][first:]:
            n = n_text + v
            attn_l = 4 * n * n * qd
            lin += cost.layer_flops(g, n, causal=False) - attn_l
            attn += attn_l
        out["backward"] = B * (lin + 2 * attn + head)
        out["recompute"] = B * (lin + attn) if call["checkpoint"] else 0.0
    return out


def step_flops(rec: dict, g: dict, vd: dict, text_delta: float = 0.0) -> dict:
    parts = {"vision": sum(rec["encodes"]) * vision_flops(vd), "reference": 0.0, "plans": 0.0, "knob forward": 0.0,
             "knob backward": 0.0, "knob recompute": 0.0}
    for call in rec["calls"]:
        f = call_flops(call, g, text_delta=text_delta)
        if not call["sites"] and not call["grad"]:
            parts["reference"] += f["forward"]
        elif not call["grad"]:
            parts["plans"] += f["forward"]
        else:
            parts["knob forward"] += f["forward"]
            parts["knob backward"] += f["backward"]
            parts["knob recompute"] += f["recompute"]
    parts["total"] = sum(parts.values())
    return parts


def seven_b():
    import real_shape as rs

    cfg = rs.seven_b_config()
    return cfg, _dims(cfg), _vdims(cfg)


def param_count(config) -> int:
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ projection

def selection_flops(cfg7, g7, vd7, budget: float, search_cfg, n_text: float) -> dict:
    """FLOPs of the selection stage at 7B: every candidate (the policy's mode, its next plans, the corners) is
    one teacher-forced reduced forward per held-out question, the image encoded each time."""
    from diffopsearch import cost
    from diffopsearch.plan import backbone_info
    from diffopsearch.regimes import regime_knobs
    from diffopsearch.search.space import OPS, Planner, corner_choices, make_space

    s = search_cfg
    space = make_space(cfg7)
    planner = Planner(space, backbone_info(cfg7), budget, cfg7.text_config, n_text)
    ratios = []
    if s.select_corners:
        for choice in corner_choices(space):
            named = regime_knobs(OPS[choice.op].regime, OPS[choice.op].score)
            plan = planner.plan(choice, lambda slot, regime, e=named: {k: e[k] for k in
                                                                        ("merge", "sharpness", "locality", "reweight")})
            if plan is not None:
                ratios.append(plan.cost["flops_ratio"])
    n_policy = 1 + int(s.select_samples)
    full = cost.full_flops(g7, 576, n_text, causal=False)
    per_q_policy = vision_flops(vd7) + budget * full        # the policy's plans: at most the budget
    held = int(s.select_questions)
    screen = s.screen_questions
    n_cand = n_policy + len(ratios)
    if held == 0:
        return {"candidates": 1, "corners": 0, "flops": 0.0, "forwards": 0, "held": 0}
    corner_q = [vision_flops(vd7) + r * full for r in ratios]
    if screen is not None and screen < held and n_cand > s.select_finalists + 1:
        flops = (n_policy - 1) * screen * per_q_policy + screen * sum(corner_q)
        flops += (1 + s.select_finalists) * held * max([per_q_policy] + corner_q)
        forwards = (n_cand - 1) * screen + (1 + s.select_finalists) * held
    else:
        flops = held * (n_policy * per_q_policy + sum(corner_q))
        forwards = n_cand * held
    return {"candidates": n_cand, "corners": len(ratios), "flops": flops, "forwards": forwards, "held": held,
            "screen": screen}


# The projection's arithmetic in the order the section explains it (inputs, per-stage figures, totals).
def project(meas: dict, a) -> dict:
    """GPU memory and hours of the default and thorough searches on LLaVA-1.5-7B."""
    from diffopsearch import cost

    cfg7, g7, vd7 = seven_b()
    flop = meas["flops"]
    # the measured step's forwards at 7B widths, their text lengthened to a GQA prompt + answer
    step_text = GQA_TEXT + GQA_ANSWER
    padded_toy = sum(c["T"] - 576 for c in flop["calls"]) / len(flop["calls"])
    delta = step_text - padded_toy
    step7 = step_flops(flop, g7, vd7, text_delta=delta)
    s_def = flop["settings"]
    per_sample = {k: v / s_def["batch_size"] for k, v in step7.items() if k != "total"}
    # the worst knob plans there are: both cut at layer 0 (merge/cls at the budget's keep, solved at 7B widths),
    # so every decoder layer is in the graph: the same step with its knob forwards replaced by that plan
    from diffopsearch.plan import backbone_info
    from diffopsearch.search.policy import Knobs
    from diffopsearch.search.space import Planner, make_space

    space7 = make_space(cfg7)
    planner7 = Planner(space7, backbone_info(cfg7), a.budget, cfg7.text_config, step_text)
    k = Knobs()
    worst_sites = planner7.hard_sites(worst_choice(space7), k.floats)
    worst_calls = [dict(c, sites=[x.to_dict() for x in worst_sites]) if c["grad"] else c for c in flop["calls"]]
    worst7 = step_flops(dict(flop, calls=worst_calls), g7, vd7, text_delta=delta)
    worst_knob_ps = sum(worst7[x] for x in ("knob forward", "knob backward", "knob recompute")) / s_def["batch_size"]
    params = param_count(cfg7)
    weights_gb = params * BYTES_BF16 / 1e9
    act = meas["act"]
    out = {"params": params, "weights_gb": weights_gb, "step7_default": step7, "text_delta": delta, "searches": {}}
    full = cost.full_flops(g7, 576, step_text, causal=False)
    for name, overrides in (("default", []), ("default, checkpointing off", ["search.checkpoint_layers=false"]),
                            ("thorough", ["search=thorough"])):
        settings, cfg = search_settings(a.budget, overrides)
        s = cfg.search
        B, M, K = settings.batch_size, settings.plans_per_step, settings.knob_plans
        # per-sample parts scale with the batch; plans with the number of plans, knob parts with knob plans
        step = B * (per_sample["vision"] + per_sample["reference"]
                    + per_sample["plans"] * M / s_def["plans_per_step"]
                    + (per_sample["knob forward"] + per_sample["knob backward"] + per_sample["knob recompute"])
                    * K / s_def["knob_plans"])
        worst_step = step + B * (worst_knob_ps - per_sample["knob forward"] - per_sample["knob backward"]
                                 - per_sample["knob recompute"]) * K / s_def["knob_plans"]
        if settings.checkpoint_layers is False:
            step -= B * per_sample["knob recompute"] * K / s_def["knob_plans"]
            worst_step -= B * worst7["knob recompute"] / s_def["batch_size"] * K / s_def["knob_plans"]
        loop_flops = settings.steps * step
        sel = selection_flops(cfg7, g7, vd7, a.budget, s, step_text)
        eval_prefill = GQA_TESTDEV * (vision_flops(vd7) + a.budget * cost.full_flops(g7, 576, GQA_TEXT, causal=False))
        eval_batches = math.ceil(GQA_TESTDEV / int(cfg.batch_size))
        decode_reads = eval_batches * int(cfg.max_new_tokens) * weights_gb  # GB read from HBM, one pass per token
        # memory: the knob backward (micro_batch rows at once), the largest no-grad forward, weights
        rows = settings.micro_batch or B
        ckpt = settings.checkpoint_layers
        if ckpt is None:
            ckpt = 576 * g7["L"] >= 4096  # loop.auto_checkpoint's rule at 7B
        mem = act_memory_gb(act, g7, rows, step_text + 576, ckpt)
        sel_rows = 32  # plan_scores' batch
        nograd = nograd_peak_gb(g7, max(sel_rows, B, int(cfg.batch_size)), step_text + 576)
        peak = weights_gb + max(mem["with_pairs"], nograd) + CUDA_OVERHEAD_GB
        peak_flash = weights_gb + max(mem["no_pairs"], nograd) + CUDA_OVERHEAD_GB
        # the evaluation: greedy generation at the eval batch, the unreduced KV cache as an upper bound
        eb = int(cfg.batch_size)
        kv = eb * g7["L"] * 2 * (GQA_TEXT + 576 + int(cfg.max_new_tokens)) * g7["Hkv"] * g7["dh"] * BYTES_BF16 / 1e9
        eval_peak = weights_gb + kv + nograd_peak_gb(g7, eb, GQA_TEXT + 576) + CUDA_OVERHEAD_GB
        gpu = {}
        for gname, spec in GPUS.items():
            rate = a.utilisation * spec["tflops"] * 1e12
            t_loop = loop_flops / rate
            t_sel = sel["flops"] / rate
            t_eval = eval_prefill / rate + decode_reads / (spec["bw_tbs"] * 1e3)
            gpu[gname] = {"step_s": step / rate, "loop_h": t_loop / 3600, "select_h": t_sel / 3600,
                          "worst_search_h": (settings.steps * worst_step + sel["flops"]) / rate / 3600,
                          "search_h": (t_loop + t_sel) / 3600, "eval_h": t_eval / 3600,
                          "command_h": (t_loop + t_sel + t_eval) / 3600}
        out["searches"][name] = {"steps": settings.steps, "batch": B, "plans": M, "knob_plans": K,
                                 "micro_batch": settings.micro_batch, "checkpoint": ckpt,
                                 "select": sel, "step_flops": step, "loop_flops": loop_flops,
                                 "worst_step_flops": worst_step, "worst_plan": "; ".join(
                                     f"L{x.layer}: {x.keep} {x.score}/{x.anchors}" for x in worst_sites),
                                 "eval_flops": eval_prefill, "decode_gb": decode_reads, "act": mem,
                                 "nograd_gb": nograd, "peak_gb": peak, "peak_flash_gb": peak_flash, "gpu": gpu,
                                 "eval_peak_gb": eval_peak, "kv_gb": kv,
                                 "full_flops": full, "overrides": overrides}
    return out


def scaled_units(act: dict, kind: str, g: dict, T: float, bytes_per: float) -> dict:
    """Bytes per sample per layer at widths ``g`` and length ``T`` from the measured units (element sizes per
    token per d / m / H*T element count), each element at ``bytes_per`` bytes."""
    u = act["kinds"][kind]["units"]
    fp = 4.0  # measured in float32
    d_b = u["d"] / fp * g["d"] * bytes_per * T
    m_b = u["m"] / fp * g["m"] * bytes_per * T
    p_b = u["pairs"] / fp * g["H"] * T * bytes_per * T
    h_b = u.get("dh", 0.0) / fp * g["dh"] * bytes_per * T
    o_b = u["other"] / fp * bytes_per * T
    return {"d": d_b, "m": m_b, "pairs": p_b, "other": o_b + h_b, "total": d_b + m_b + p_b + o_b + h_b,
            "no_pairs": d_b + m_b + o_b + h_b}


def act_memory_gb(act: dict, g: dict, rows: int, T: float, ckpt: bool) -> dict:
    """Activation memory of one knob backward at 7B (every layer in the graph, the full length: an upper
    bound), in bf16, with the attention probabilities saved (eager / math attention) or not (SDPA kernels)."""
    per = scaled_units(act, "ckpt=off", g, T, BYTES_BF16)
    L = g["L"]
    if ckpt:
        inputs = rows * L * T * g["d"] * BYTES_BF16          # each layer's input, kept for the recomputation
        with_pairs, no_pairs = inputs + rows * per["total"], inputs + rows * per["no_pairs"]
    else:
        with_pairs, no_pairs = rows * L * per["total"], rows * L * per["no_pairs"]
    return {"with_pairs": with_pairs / 1e9, "no_pairs": no_pairs / 1e9, "per_sample_layer_mb": per["total"] / 1e6,
            "per_sample_layer_no_pairs_mb": per["no_pairs"] / 1e6}


def nograd_peak_gb(g: dict, rows: int, T: float) -> float:
    """The largest transient of a no-grad forward: one layer's hidden states, q/k/v/o and MLP activations."""
    return rows * T * (6 * g["d"] + 3 * g["m"]) * BYTES_BF16 / 1e9


# ------------------------------------------------------------------------------------------ document

def machine() -> dict:
    """scripts/bench.py's machine description (CPU, cores, versions, commit, date), plus the torch threads
    under the name this section prints."""
    import torch
    from bench import machine_info

    info = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    return {**info, "threads": info["torch_threads"]}


def _g(x: float) -> str:
    return f"{x / 1e12:.2f}"


# A report template: one block per part of the section, in the document's order.
def document(meas: dict, proj: dict, a, command: str) -> str:
    mi = meas["machine"]
    act = meas["act"]
    cfg7, g7, vd7 = seven_b()
    L = []
    w = L.append
    w("## Real size: the search at LLaVA-1.5-7B's shape, measured on a CPU and projected to one GPU")
    w("")
    w(f"Written by `scripts/real_size.py` (issue 16); every number in this section comes from that run. Regenerate with:")
    w("")
    w("```")
    w(command)
    w("```")
    w("")
    w(f"- machine: {mi['cpu']}, {mi['cores']} logical cores, torch threads {mi['threads']}, "
      f"{'GPU ' + mi['gpu'] if mi['gpu'] else 'no GPU'}; Python {mi['python']}, torch {mi['torch']}, "
      f"transformers {mi['transformers']}; diffopsearch commit {mi['commit']}; {mi['date']}; "
      f"wall time of the run {meas['seconds'] / 60:.1f} min")
    tv = meas["flops"]["text"]
    vv = meas["flops"]["vision_cfg"]
    w(f"- backbone: `tests/real_shape.py`, LLaVA-1.5-7B's geometry with small widths and random weights: CLIP "
      f"336 px / patch 14 ({vv['N'] - 1} visual tokens on 24 x 24, feature layer -2, `default` strategy; CLIP d = "
      f"{vv['d']}, {vv['L']} layers), LLaVA's GELU projector, a {tv['L']}-layer Llama decoder with d = {tv['d']}, "
      f"MLP {tv['m']}, {tv['H']} heads; LLaVA-1.5's processor and prompt; float32 on the CPU")
    w(f"- data: a toy world (GQA's schema, {meas['n_train']} search questions, images resized to 336 px), "
      f"{meas['flops']['n_text']:.1f} text tokens per prompt on average; budget {a.budget} (the search's default)")
    step_set = meas["flops"]["settings"]
    dflt = meas.get("default_settings", step_set)
    ck = dflt["checkpoint_layers"]
    w(f"- search settings: `diffopsearch search`'s defaults as composed at the time of the run ({dflt['steps']} steps, "
      f"batch {dflt['batch_size']}, {dflt['plans_per_step']} plans per step, {dflt['knob_plans']} knob plans, "
      f"checkpoint_layers {'null (auto: on at 576 x 32)' if ck is None else ck}, micro_batch {dflt['micro_batch']}); "
      "the measurements below override only what they name")
    w("")
    w("### Peak resident memory of one search step (CPU, real shape)")
    w("")
    w("Each row is a fresh process: the backbone and data loaded, the peak reset (`/proc/self/clear_refs`), then "
      f"one step of the loop (`search.loop.search`, 1 step, batch {a.batch}), then the peak reset again and the "
      "worst knob backward there is at this budget (a merge site at layer 0 keeping what the budget allows, so "
      "all 32 layers are in the graph). 'before' is the resident set after loading.")
    w("")
    w("| checkpoint_layers | micro_batch | before (MB) | one step: peak (MB) | step time (s) | the step's knob plans "
      "| worst knob backward: plan | peak (MB) | time (s) |")
    w("|---|---|---|---|---|---|---|---|---|")
    for r in meas["mem"]:
        w(f"| {r['ckpt']} | {r['micro'] or 'off (whole batch)'} | {r['base_mb']:.0f} | {r['step_peak_mb']:.0f} | "
          f"{r['step_s']:.1f} | {', '.join(r['knob_plans'])} | {r['worst_plan']} keep {r['worst_keep']} | "
          f"{r['worst_peak_mb']:.0f} | {r['worst_s']:.1f} |")
    if any(r.get("workaround") for r in meas["mem"]):
        w("")
        w("Micro-batch rows: `search.loop.search` with `micro_batch` > 0 fails at its second micro-batch on this "
          "checkout (\"Trying to backward through the graph a second time\": a knob plan's tensor knobs are built once, "
          "and `Knobs.value`'s `row[i] * scale` saves a wrapped number the first backward frees). These rows ran with "
          "the knob scale as an autograd function that saves nothing (same values and gradients; what building the "
          "knob tensors once per micro-batch would do).")
    cli = meas.get("cli")
    if cli:
        w("")
        w(f"`diffopsearch search {' '.join(cli['args'])}` (the whole command: load, {cli['steps']} search steps at the "
          f"default batch, selection, evaluation): peak resident set **{cli['peak_mb']:.0f} MB**, {cli['seconds']:.0f} s"
          + ("" if cli["rc"] == 0 else f" (exit code {cli['rc']})") + ". Target: under 3 GB "
          f"({'met' if cli['peak_mb'] < 3000 and cli['rc'] == 0 else 'NOT met'}); the soft-forward search this "
          "replaced was killed above 24 GB at batch 8 and peaked at 10.4 GB at batch 2.")
    w("")
    w("### Activation memory per sample per layer")
    w("")
    w(f"Every tensor autograd saves for a knob backward (`torch.autograd.graph.saved_tensors_hooks`, weights "
      f"excluded, storages counted once), at batch {act['B']}, for a plan that drops one token at layer 0 so the full "
      "sequence runs through all 32 layers in the graph; the mean over the inner decoder layers, per sample. Classed "
      "by size per token: multiples of the hidden size d (hidden states, q / k / v / o, norms' inputs), of the MLP "
      "size, and token pairs (H x T attention probabilities per token). The knob forward always has a float "
      "attention mask (the reweight knob is a tensor in the graph, so the visual keys carry a bias even at 0), and "
      "CPU SDPA with a float mask runs as plain matmuls that save the probabilities; on CUDA the memory-efficient "
      "SDPA kernel takes a float mask without saving them (not measured here: no GPU), so the projection below gives "
      "both.")
    w("")
    w(f"| checkpointing | T | measured (MB / sample / layer, d = {act['d']}) | of which d-sized | MLP-sized "
      "| token pairs | at 7B widths, bf16 (MB) | of which token pairs |")
    w("|---|---|---|---|---|---|---|---|")
    for key, k in act["kinds"].items():
        T = k["T"]
        u = k["units"]
        sc = scaled_units(act, key, g7, T, BYTES_BF16)
        w(f"| {key.split('=')[1]} | {T} | {k['bytes_per_sample_layer'] / 1e6:.2f} | "
          f"{u['d'] * act['d'] * T / 1e6:.2f} | {u['m'] * act['m'] * T / 1e6:.2f} | "
          f"{u['pairs'] * act['H'] * T * T / 1e6:.2f} | "
          f"{sc['total'] / 1e6:.1f} | {sc['pairs'] / 1e6:.1f} |")
    w("")
    w("With checkpointing a layer keeps only its input (T x d) until the backward recomputes it, one layer at a time. "
      "Scaling: each class's element count per token is measured, then taken at 7B's d = 4096, MLP 11008, 32 heads "
      "and 2 bytes per element (the rest - rotary cos / sin, per-token norm statistics - scaled by the head size or "
      "not at all). Nothing that grows "
      "with T^2 is held for more than one layer at a time with checkpointing on; without it, the token-pair tensors "
      "are held for every layer in the graph where the attention path materialises them.")
    w("")
    fl = meas["flops"]
    a64 = step_flops(fl, _dims_from(fl["text"]), fl["vision_cfg"])
    w("### FLOPs of one search step")
    w("")
    w(f"One step at the default settings (batch {step_set['batch_size']}), counted with "
      "`torch.utils.flop_counter.FlopCounterMode` (eager attention, which it counts; 2 FLOPs per multiply-add, no "
      "causal halving) on the real-shape model, and the analytic model of the same step: each forward the step made "
      "(recorded: batch, padded length, sites) costed by `diffopsearch.cost.plan_cost(causal=False)` plus the LM head; "
      "a knob forward's backward as input gradients only (the weights are frozen: 1x the linear layers, 2x the "
      "attention matmuls) and its recomputation under checkpointing (1x the layers in the graph); the CLIP tower and "
      "projector per encoded batch. The 7B column is the same forwards at LLaVA-1.5-7B's widths "
      f"(and its CLIP ViT-L/14-336), the text lengthened by {proj['text_delta']:+.1f} tokens to a GQA prompt "
      f"({GQA_TEXT:.0f} text tokens) with its answer.")
    w("")
    w("| part | analytic, d = 64 (GFLOPs) | analytic, LLaVA-1.5-7B (TFLOPs) |")
    w("|---|---|---|")
    s7 = proj["step7_default"]
    for k in ("vision", "reference", "plans", "knob forward", "knob backward", "knob recompute", "total"):
        w(f"| {k} | {a64[k] / 1e9:.2f} | {s7[k] / 1e12:.1f} |")
    ratio = fl["counted_total"] / a64["total"]
    w(f"| **counted by FlopCounterMode** | **{fl['counted_total'] / 1e9:.2f}** (analytic / counted = "
      f"{a64['total'] / fl['counted_total']:.3f}; vision counted {fl['counted_vision'] / 1e9:.2f}) | |")
    w("")
    w(f"Counted and analytic agree to {abs(ratio - 1) * 100:.1f}% at d = 64; the 7B column is the analytic model "
      f"alone. The step's plans: {', '.join(fl['record']['plans'])}.")
    w("")
    w("### Projection: LLaVA-1.5-7B on one GPU")
    w("")
    w(f"LLaVA-1.5-7B: {proj['params'] / 1e9:.2f} B parameters ({proj['weights_gb']:.1f} GB in bf16). Time = FLOPs / "
      f"({a.utilisation:.0%} of the dense bf16 peak: A100 312 TFLOPS, H100 SXM 989 TFLOPS); decoding in the "
      "evaluation is bandwidth-bound and counted as one read of the weights per generated token per batch "
      "(A100-80GB 2.04 TB/s, H100 SXM 3.35 TB/s; at most max_new_tokens per batch, an upper bound). Memory = weights + "
      f"the larger of the knob backward's activations (upper bound: every layer in the graph at the full length, "
      f"from the measured per-layer figure above) and the largest no-grad transient (one layer at batch 32, the "
      f"selection's batch) + {CUDA_OVERHEAD_GB:.0f} GB for the CUDA context and allocator slack; the evaluation's: "
      "weights + the unreduced KV cache at the eval batch + one layer's transient + the same slack. Search = the loop "
      "+ the selection (data loading and model loading not counted); the command also evaluates the plan on GQA "
      f"test-dev balanced ({GQA_TESTDEV} questions, prefill at the budget + decoding).")
    w("")
    w("| search | steps x batch x plans (knob plans) | checkpointing / micro_batch | selection: candidates, forwards "
      "| step TFLOPs | search PFLOPs | GPU memory, peak (GB): search; evaluation "
      "| A100-80GB: step s / search h / command h | H100: step s / search h / command h |")
    w("|---|---|---|---|---|---|---|---|---|")
    for name, s in proj["searches"].items():
        A, Hh = s["gpu"]["A100-80GB"], s["gpu"]["H100 (SXM)"]
        w(f"| `{name}` | {s['steps']} x {s['batch']} x {s['plans']} ({s['knob_plans']}) | "
          f"{'on' if s['checkpoint'] else 'off'} / {s['micro_batch'] or 'off'} | {s['select']['candidates']} "
          f"({s['select']['corners']} corners), {s['select']['forwards']} | {s['step_flops'] / 1e12:.0f} | "
          f"{(s['loop_flops'] + s['select']['flops']) / 1e15:.1f} | {s['peak_gb']:.1f} (efficient SDPA: "
          f"{s['peak_flash_gb']:.1f}); {s['eval_peak_gb']:.1f} | "
          f"{A['step_s']:.1f} / {A['search_h']:.2f} / {A['command_h']:.2f} | "
          f"{Hh['step_s']:.2f} / {Hh['search_h']:.2f} / {Hh['command_h']:.2f} |")
    d = proj["searches"]["default"]
    ok_mem = max(d["peak_gb"], d["eval_peak_gb"]) < GPUS["A100-80GB"]["mem_gb"]
    ok_time = d["gpu"]["A100-80GB"]["search_h"] < 1.0
    w("")
    w(f"Targets (default search, one A100-80GB): fits in 80 GB - **{'yes' if ok_mem else 'no'}** "
      f"({d['peak_gb']:.1f} GB; its evaluation {d['eval_peak_gb']:.1f} GB); "
      f"under 1 GPU-hour - **{'yes' if ok_time else 'no'}** "
      f"({d['gpu']['A100-80GB']['search_h']:.2f} h for the search, {d['gpu']['A100-80GB']['command_h']:.2f} h with "
      f"the evaluation). Of the default search's FLOPs, the loop is "
      f"{d['loop_flops'] / (d['loop_flops'] + d['select']['flops']):.0%} and the selection "
      f"{d['select']['flops'] / (d['loop_flops'] + d['select']['flops']):.0%}.")
    w("")
    w(f"The step's cost depends on where its knob plans cut: the measured step's cut late ("
      f"{', '.join(meas['mem'][0]['knob_plans'])}). If every step's knob plans cut at layer 0 (merge/cls keeping "
      f"what the budget allows at 7B: {d['worst_plan']}; every layer in the graph), a default step is "
      f"{d['worst_step_flops'] / 1e12:.0f} TFLOPs and the default search "
      f"{d['gpu']['A100-80GB']['worst_search_h']:.2f} h on an A100-80GB ({d['gpu']['H100 (SXM)']['worst_search_h']:.2f} h "
      "on an H100); the memory column already assumes that graph.")
    w("")
    w("Assumptions: the plans of the measured step keep their token counts at 7B (the planner at 7B widths keeps "
      "slightly fewer at the same budget, so the loop figure is a little high); the policy's plans in the selection "
      "cost the budget, the corners their own 7B ratio; utilisation is not measured here (no GPU): "
      "`scripts/gpu_check.py` measures step time on a GPU.")
    w("")
    w("### GPU check")
    w("")
    gc = meas.get("gpu_check")
    if gc:
        w(gc)
    else:
        w("Not run on a GPU: the machine that wrote this section has none. `python scripts/gpu_check.py` (real-shape "
          "test backbone) or `python scripts/gpu_check.py model.path=DIR` (real LLaVA-1.5-7B weights) on a CUDA machine "
          "checks bf16 + SDPA, the empty plan against plain `generate`, FastV at 0.5, a 20-step search, and prints step "
          "time, prefill latency ratio vs FLOPs ratio and peak memory.")
    return "\n".join(L)


def _dims_from(t: dict) -> dict:
    return dict(t)


def write_section(path: Path, body: str) -> None:
    from diffopsearch.io import replace_block

    replace_block(path, BEGIN, END, f"{BEGIN}\n{body}\n{END}")


# ------------------------------------------------------------------------------------------ main

def run_child(kind: str, a, extra: list[str]) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--model", str(a.model),
            "--world", str(a.world), "--budget", str(a.budget), "--batch", str(a.batch), *extra]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"real_size.py: child {kind} {' '.join(extra)} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file whose real-size section is written")
    p.add_argument("--work", default=str(ROOT / "runs" / "real_size"), help="where the backbone, world and runs go")
    p.add_argument("--budget", type=float, default=None, help="search budget (default: the search command's)")
    p.add_argument("--batch", type=int, default=None, help="batch of the measured step (default: the search's)")
    p.add_argument("--utilisation", type=float, default=0.4, help="fraction of the GPU's dense bf16 peak assumed")
    p.add_argument("--cli-steps", type=int, default=2, help="steps of the measured `diffopsearch search` (0: skip it)")
    p.add_argument("--quick", action="store_true", help="fewer rows (checkpointing on/off at the whole batch only)")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the section from --work's measurements.json (the last run's) without measuring")
    p.add_argument("--gpu-check", default=None, help="gpu_check.md written by scripts/gpu_check.py on a GPU, to include")
    # internal: the measurement children
    p.add_argument("--child", choices=("step", "act", "flops", "cli"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--world", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default="on", help=argparse.SUPPRESS)
    p.add_argument("--micro", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cwd", default=".", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.budget is None or a.batch is None:
        settings, _ = search_settings(a.budget or 0.6)
        a.budget = a.budget if a.budget is not None else float(settings.budget)
        a.batch = a.batch if a.batch is not None else int(settings.batch_size)
    if not 0 < a.utilisation <= 1:
        p.error("--utilisation must lie in (0, 1]")
    return a


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    raw = list(sys.argv[1:] if argv is None else argv)
    a = parse(raw)
    if a.child:
        fn = {"step": child_step, "act": child_act, "flops": child_flops, "cli": child_cli}[a.child]
        print(json.dumps(fn(a)))
        return 0
    t0 = time.time()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    a.model, a.world = setup(work)
    if a.render_only:
        saved = json.loads((work / "measurements.json").read_text())
        meas = saved["measurements"]
        if a.gpu_check:
            meas["gpu_check"] = Path(a.gpu_check).read_text().strip()
        proj = project(meas, a)
        body = document(meas, proj, a, saved.get("command", "python scripts/real_size.py"))
        print(body) if a.no_write else write_section(Path(a.out), body)
        return 0
    import dataclasses

    meas = {"machine": machine(), "default_settings": dataclasses.asdict(search_settings(a.budget)[0])}
    from diffopsearch.data.datasets import load_qa

    meas["n_train"] = len(load_qa("toy", str(a.world), "train"))
    rows = [("on", 0), ("off", 0)] if a.quick else [("on", 0), ("off", 0), ("on", 2), ("off", 2)]
    meas["mem"] = []
    for ckpt, micro in rows:
        print(f"[real_size] step memory: checkpoint {ckpt}, micro_batch {micro or 'off'}", flush=True)
        r = run_child("step", a, ["--ckpt", ckpt, "--micro", str(micro)])
        r.update(ckpt=ckpt, micro=micro)
        meas["mem"].append(r)
    print("[real_size] saved activations per layer", flush=True)
    meas["act"] = run_child("act", a, [])
    print("[real_size] FLOPs of one step (FlopCounterMode)", flush=True)
    meas["flops"] = run_child("flops", a, ["--ckpt", "on" if _default_ckpt() else "off"])
    if a.cli_steps > 0:
        print(f"[real_size] diffopsearch search, {a.cli_steps} steps", flush=True)
        run = work / "cli_search"
        rest = ["--", "model=llava", f"model.path={a.model}", "model.dtype=float32", "model.device=cpu",
                f"dataset.path={a.world}", f"budget={a.budget}", f"search.steps={a.cli_steps}", "limit=8",
                "max_new_tokens=4", "search.select_questions=16", "search.select_corners=false",
                f"hydra.run.dir={run}"]
        r = run_child("cli", a, ["--cwd", str(work), *rest])
        r["steps"] = a.cli_steps
        meas["cli"] = r
    if a.gpu_check:
        meas["gpu_check"] = Path(a.gpu_check).read_text().strip()
    meas["seconds"] = time.time() - t0
    proj = project(meas, a)
    shown = [x for x in raw if x not in ("--no-write",)]
    command = ("OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python scripts/real_size.py " +
               " ".join(shlex.quote(x) for x in shown)).strip()
    (work / "measurements.json").write_text(json.dumps({"measurements": meas, "projection": proj, "command": command},
                                                       indent=1, default=str))
    body = document(meas, proj, a, command.strip())
    if a.no_write:
        print(body)
    else:
        write_section(Path(a.out), body)
        print(f"[real_size] wrote the real-size section of {a.out} ({meas['seconds'] / 60:.1f} min); "
              f"measurements in {work / 'measurements.json'}")
    return 0


def _default_ckpt() -> bool:
    settings, _ = search_settings(0.6)
    return True if settings.checkpoint_layers is None else bool(settings.checkpoint_layers)  # auto: on at 576 x 32


if __name__ == "__main__":
    sys.exit(main())
