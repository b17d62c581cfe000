"""Write BENCHMARKS.md: the unreduced model, every baseline and the searched plan, side by side, on the toy world.

    python scripts/bench.py                       # the full benchmark (< 30 min on 2 CPU cores)
    python scripts/bench.py --quick --out /tmp/B.md   # a tiny smoke run on a random-weight model

In one process, at every budget (default 0.8 0.6 0.4 0.25):

1. accuracy of the unreduced model, each baseline (``baselines.make_plan``) and the searched plan
   (``diffopsearch.commands.search.run``, the ``search`` command's own body, with the search defaults) on a fixed
   subset of the toy world's test split (the first ``--limit`` questions);
2. prefill latency at batch 1 and batch 16 against the unreduced model (the plain transformers forward),
   next to the FLOPs ratio, and the operator's own share of the prefill time;
3. search wall time, eval throughput, peak memory;
4. the searched plans projected to LLaVA-1.5-7B by the project's cost model.

Every number in BENCHMARKS.md comes from this run; nothing is typed in. Work is checkpointed under
``--work`` (each evaluation's results.json, each search's run directory, the latency measurements): a
rerun with the same settings skips what is done (``--fresh`` starts over). ``diffopsearch report
dir=<work>`` makes report.md / pareto.png from the same directory; the figure is also copied next to
BENCHMARKS.md (``--figure``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from diffopsearch.errors import UserError  # noqa: E402

BASELINES = ("fastv", "tome", "pool", "prumerge", "visionzip", "random")
DEFAULT_BUDGETS = (0.8, 0.6, 0.4, 0.25)
TARGET_LATENCY_FACTOR = 1.10
TARGET_OVERHEAD = 0.03
# LLaVA-1.5-7B's decoder (Llama-2-7B / Vicuna-7B) and vision tower (CLIP ViT-L/14 at 336 px).
LLAVA7B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    num_hidden_layers=32, head_dim=128)
LLAVA7B_VISUAL, LLAVA7B_GRID = 576, (24, 24)
CLIP_L336 = dict(layers=24, d=1024, m=4096, tokens=577)
QUICK_TINY_TEXT = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                   "num_key_value_heads": 2}
QUICK_TINY_VISION = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}


# ------------------------------------------------------------------------------------------ settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--limit", type=int, default=None, help="test questions evaluated (the first N; default 500, "
                   "--quick 8)")
    p.add_argument("--budgets", type=str, default=None, help="comma-separated FLOPs budgets (default 0.8,0.6,0.4,0.25; "
                   "--quick 0.7)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run: random-weight tiny model, 8 questions, "
                   "one budget, 2 search steps")
    p.add_argument("--out", type=str, default=str(ROOT / "BENCHMARKS.md"), help="the markdown file to write")
    p.add_argument("--figure", type=str, default=None, help="where the Pareto plot is copied (default: "
                   "docs/benchmarks_pareto.png beside --out)")
    p.add_argument("--work", type=str, default=None, help="checkpoint directory (default runs/bench, --quick "
                   "runs/bench-quick)")
    p.add_argument("--model-path", type=str, default="", help="a LLaVA directory (default: the shipped toy backbone)")
    p.add_argument("--random-model", action="store_true", help="benchmark a random-weight toy model (for testing "
                   "the script; implied by --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default 16, --quick 4)")
    p.add_argument("--latency-batch-sizes", type=str, default=None, help="prefill timing batch sizes (default 1,16; "
                   "--quick 1,4)")
    p.add_argument("--rounds", type=int, default=None, help="latency rounds (default 12, --quick 2)")
    p.add_argument("--search", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for the search command, e.g. --search search.steps=100 (repeatable)")
    p.add_argument("--proj-text-tokens", type=float, default=40.0, help="text tokens of a LLaVA-1.5 GQA prompt for "
                   "the 7B projection (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore the checkpoints in --work and redo everything")
    a = p.parse_args(argv)
    q = a.quick
    a.limit = a.limit if a.limit is not None else (8 if q else 500)
    a.budgets = [float(x) for x in (a.budgets or ("0.7" if q else ",".join(map(str, DEFAULT_BUDGETS)))).split(",")]
    a.batch_size = a.batch_size or (4 if q else 16)
    a.latency_batch_sizes = [int(x) for x in (a.latency_batch_sizes or ("1,4" if q else "1,16")).split(",")]
    a.rounds = a.rounds or (2 if q else 12)
    a.work = Path(a.work or (ROOT / "runs" / ("bench-quick" if q else "bench")))
    a.random_model = a.random_model or q
    a.figure = Path(a.figure) if a.figure else Path(a.out).resolve().parent / "docs" / "benchmarks_pareto.png"
    a.max_new_tokens = 2 if q else 16
    a.search_overrides = (["search.steps=2", "search.train_limit=16", "search.batch_size=4",
                           "search.checkpoint_every=1", "search.plans_per_step=2"] if q else []) + list(a.search)
    for b in a.budgets:
        if not 0 < b <= 1:
            raise UserError(f"--budgets: {b} is not a FLOPs budget in (0, 1]")
    if a.limit < 1 or a.rounds < 1 or min(a.latency_batch_sizes) < 1:
        raise UserError("--limit, --rounds and --latency-batch-sizes must be positive")
    return a


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj) -> None:
    from diffopsearch.io import atomic_write_json

    atomic_write_json(path, obj)


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------ the model


def resolve_model(a) -> Path:
    """The backbone directory: --model-path, a random toy model saved under --work, or the shipped one."""
    if a.model_path:
        return Path(a.model_path).expanduser().resolve()
    if a.random_model:
        out = a.work / "random-model"
        if not (out / "config.json").exists():
            from diffopsearch.backbone import toy

            vision = {**QUICK_TINY_VISION, "initializer_range": 0.5} if a.quick else None
            text = {**QUICK_TINY_TEXT, "initializer_range": 0.5} if a.quick else None
            model = toy.build_model(a.seed, vision=vision, text=text)
            tmp = a.work / ".random-model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            toy.build_processor().save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        return out.resolve()
    from diffopsearch.backbone.toy import ASSET_DIR

    if not (ASSET_DIR / "config.json").exists():
        raise UserError(f"the shipped toy backbone is missing ({ASSET_DIR}): train it with scripts/train_toy.py, or "
                        "pass --model-path DIR, or --random-model / --quick to test the script.")
    return ASSET_DIR


def base_overrides(a, model_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", f"limit={a.limit}", f"batch_size={a.batch_size}",
            f"max_new_tokens={a.max_new_tokens}", f"seed={a.seed}"]


# ------------------------------------------------------------------------------------------ evaluations


def run_evaluations(a, model, processor, dataset, n_text: float, settings_key: str, model_name: str) -> dict:
    """results.json of the unreduced model and of every baseline at every budget, under work/eval/."""
    from diffopsearch.baselines import make_plan
    from diffopsearch.evaluate import evaluate, visual_token_count

    n_visual, grid = visual_token_count(model.config)
    out: dict = {"unreachable": {}, "failed": {}}
    jobs = [("none", 1.0)] + [(m, b) for b in a.budgets for m in BASELINES]
    for method, budget in jobs:
        try:
            plan = make_plan(method, budget, model.config.text_config, n_visual, grid, n_text, seed=a.seed)
        except UserError as e:
            out["unreachable"][(method, budget)] = str(e)
            _log(f"{method} @ {budget:g}: unreachable ({e})")
            continue
        run_dir = a.work / "eval" / (method if method == "none" else f"{method}-b{budget:g}")
        key = _key(settings_key, plan.to_dict())
        r = _read_json(run_dir / "results.json")
        if a.fresh or r is None or r.get("bench_key") != key:
            _log(f"eval {method} @ {budget:g} -> {run_dir}")
            t0 = time.perf_counter()
            try:
                r = evaluate(model, processor, plan, dataset, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                             out_dir=run_dir, show=False, resume=not a.fresh, model_name=model_name,
                             extra={"budget": budget, "method": method, "bench_key": key, "limit": a.limit,
                                    "eval_wall_s": None})
            except Exception as e:  # noqa: BLE001 - one failed cell must not end the benchmark; it is reported
                out["failed"][(method, budget)] = f"{type(e).__name__}: {e}"
                _log(f"eval {method} @ {budget:g} FAILED: {type(e).__name__}: {e}")
                continue
            r["eval_wall_s"] = round(time.perf_counter() - t0, 2)
            _write_json(run_dir / "results.json", r)
        else:
            _log(f"eval {method} @ {budget:g}: done before ({run_dir})")
        out.setdefault(method, {})[budget] = r
    return out


def run_searches(a, model_dir: Path, settings_key: str) -> dict:
    """``diffopsearch search`` (its own body) at every budget, each in work/search-b<budget>/."""
    from diffopsearch.commands import search as search_mod
    from diffopsearch.config import compose

    out = {}
    for budget in a.budgets:
        run_dir = a.work / f"search-b{budget:g}"
        overrides = base_overrides(a, model_dir) + [f"budget={budget}", "resume=true"] + a.search_overrides
        key = _key(settings_key, overrides)
        side = _read_json(run_dir / "bench.json") or {}
        r = _read_json(run_dir / "results.json")
        if a.fresh or side.get("key") != key or r is None or not (run_dir / "plan.json").exists():
            # a finished run made with other settings (or --fresh) is cleared; an interrupted one (no
            # bench.json yet) is left for the search's own resume
            if run_dir.exists() and (a.fresh or side):
                shutil.rmtree(run_dir)
            _log(f"search @ {budget:g} -> {run_dir}  ({' '.join(overrides)})")
            cfg = compose("search", overrides)
            t0 = time.perf_counter()
            try:
                r = search_mod.run(cfg, out_dir=run_dir)
            except Exception as e:  # noqa: BLE001 - reported in BENCHMARKS.md, the other budgets go on
                out[budget] = {"results": None, "wall_s": round(time.perf_counter() - t0, 2), "plan": None,
                               "dir": run_dir, "error": f"{type(e).__name__}: {e}"}
                _log(f"search @ {budget:g} FAILED: {type(e).__name__}: {e}")
                continue
            side = {"key": key, "wall_s": round(time.perf_counter() - t0, 2), "overrides": overrides,
                    "peak_rss_mb_after": _peak_rss_mb()}
            _write_json(run_dir / "bench.json", side)
            r = _read_json(run_dir / "results.json") or r
        else:
            _log(f"search @ {budget:g}: done before ({run_dir})")
        out[budget] = {"results": r, "wall_s": side["wall_s"], "plan": _read_json(run_dir / "plan.json"),
                       "dir": run_dir}
    return out


# ------------------------------------------------------------------------------------------ latency


class _Timers:
    def __init__(self):
        self.op = 0.0
        self.vision = 0.0


def kept_sections(path) -> str:
    """The sections other scripts write into the same file between ``<!-- NAME:begin -->`` and
    ``<!-- NAME:end -->`` (scripts/bench_search.py, scripts/real_size.py): kept, in their order."""
    import re

    p = Path(path)
    text = p.read_text() if p.exists() else ""
    blocks = re.findall(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", text, flags=re.S)
    out = [re.search(rf"<!-- {re.escape(n)}:begin -->.*?<!-- {re.escape(n)}:end -->", text, flags=re.S).group(0)
           for n in blocks]
    return "".join("\n" + b + "\n" for b in out)


@contextlib.contextmanager
def instrumented(model, timers: _Timers, sync):
    """Time the reduction step inside the reduced forward (``patch.llava.stage_timer``'s "reduce" and "setup"
    stages: scoring, similarity keys, hard_reduce, the splice back into the sequence and its rotary tables,
    the CLS score from the vision tower's q/k, and finding the visual segment once) and the vision tower +
    projector (transformers' ``get_image_features`` of the model, wrapped on the instance) of any forward."""
    from diffopsearch.patch.llava import stage_timer

    def add(stage, seconds):
        if stage in ("reduce", "setup"):
            timers.op += seconds

    inner = model.model
    real = type(inner).get_image_features.__get__(inner)

    def vision(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            sync()
            timers.vision += time.perf_counter() - t0

    try:
        inner.get_image_features = vision
        with stage_timer(add, sync):
            yield timers
    finally:
        inner.__dict__.pop("get_image_features", None)


def latency_batches(processor, dataset, batch_size: int, n_batches: int, device, dtype) -> list[dict]:
    from diffopsearch.data.datasets import make_eval_batch
    from diffopsearch.runtime import to_device

    out = []
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        if len(idx) < batch_size:
            break
        recs, imgs = dataset.batch(idx)
        if len(recs) == batch_size:
            out.append(to_device(make_eval_batch(processor, recs, imgs), device, dtype))
        if len(out) >= n_batches:
            break
    return out


def measure_latency(a, model, processor, dataset, variants: dict, key: str) -> dict:
    """Per batch size: for every variant the median prefill ms per batch, the median ratio to the plain
    transformers forward timed in the same round, the decoder-only ratio (vision tower time subtracted
    on both sides) and the reduction step's share of the prefill. Rounds visit the variants in a fresh
    random order, so slow drift of a shared machine falls on all of them alike."""
    import torch

    from diffopsearch.evaluate import prefill
    from diffopsearch.runtime import device_of, sync as sync_device

    cached = _read_json(a.work / "latency.json")
    if cached and cached.get("key") == key and not a.fresh:
        _log("latency: measured before (latency.json)")
        return cached
    device = device_of(model)
    dtype = getattr(model, "dtype", torch.float32)
    sync = (lambda: sync_device(device)) if device.type == "cuda" else (lambda: None)
    rng = random.Random(a.seed)
    t_start = time.perf_counter()
    result = {"key": key, "device": str(device), "threads": torch.get_num_threads(), "rounds": a.rounds,
              "by_batch": {}}
    for bs in a.latency_batch_sizes:
        # two small batches (cheap, and their lengths differ), one large one (it dominates the run time)
        batches = latency_batches(processor, dataset, bs, 2 if bs <= 4 else 1, device, dtype)
        if not batches:
            _log(f"latency: fewer than {bs} questions, batch size {bs} skipped")
            continue
        _log(f"latency: batch {bs}, {len(variants)} variants x {a.rounds} rounds x {len(batches)} batches")
        for fwd in variants.values():  # warm-up (kernels, allocator, lazy init)
            for b in batches:
                prefill(fwd, b)
        samples = {name: [] for name in variants}
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.rounds):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                fwd = variants[name]
                for b in batches:
                    t = _Timers()
                    if device.type == "cuda":  # timing hooks synchronise: time the total without them
                        sync()
                        t0 = time.perf_counter()
                        prefill(fwd, b)
                        sync()
                        total = time.perf_counter() - t0
                        with instrumented(model, t, sync):
                            t0 = time.perf_counter()
                            prefill(fwd, b)
                            timed_total = time.perf_counter() - t0
                    else:
                        with instrumented(model, t, sync):
                            t0 = time.perf_counter()
                            prefill(fwd, b)
                            total = timed_total = time.perf_counter() - t0
                    # shares are taken within one (instrumented) forward
                    samples[name].append((total, t.vision / timed_total * total, t.op / timed_total * total))
        # how much CPU this process got while timing: on a shared machine, descheduling inflates latencies
        cpu_share = (time.process_time() - c0) / max((time.perf_counter() - w0) * torch.get_num_threads(), 1e-9)
        ref = samples["unreduced (transformers)"]
        rows = {}
        for name, s in samples.items():
            rows[name] = {
                "ms_per_batch": 1000 * statistics.median(x[0] for x in s),
                "ratio": statistics.median(x[0] / r[0] for x, r in zip(s, ref)),
                "decoder_ratio": statistics.median((x[0] - x[1]) / max(r[0] - r[1], 1e-9) for x, r in zip(s, ref)),
                "vision_ms": 1000 * statistics.median(x[1] for x in s),
                "op_ms": 1000 * statistics.median(x[2] for x in s),
                "op_share": statistics.median(x[2] / x[0] for x in s),
                "op_share_decoder": statistics.median(x[2] / max(x[0] - x[1], 1e-9) for x in s),
            }
        result["by_batch"][str(bs)] = {"batches": len(batches), "tokens_per_prompt": int(batches[0]["input_ids"].shape[1]),
                                        "variants": rows, "cpu_share": cpu_share, "loadavg": os.getloadavg()[0],
                                        "cores": os.cpu_count()}
    result["wall_s"] = round(time.perf_counter() - t_start, 2)
    _write_json(a.work / "latency.json", result)
    return result


# ------------------------------------------------------------------------------------------ projection


def clip_l336_flops() -> float:
    """CLIP ViT-L/14-336 forward on one image plus LLaVA's 2-layer projector, same convention as cost.py
    (2 FLOPs per multiply-add, matmuls only; full attention, plain 2-matmul MLP). Approximate: patch
    embedding and the unused last layer's details are ignored."""
    c = CLIP_L336
    n, d, m = c["tokens"], c["d"], c["m"]
    per_layer = 2 * n * d * 4 * d + 2 * 2 * n * d * m + 4 * n * n * d
    projector = 2 * LLAVA7B_VISUAL * (d * LLAVA7B_TEXT["hidden_size"] + LLAVA7B_TEXT["hidden_size"] ** 2)
    return c["layers"] * per_layer + projector


def project_plan(plan_dict: dict, text_tokens: float) -> dict:
    """The searched plan moved to LLaVA-1.5-7B: each site's layer scaled by 32 / L (rounded), its keep
    count scaled by 576 / n_visual (rounded; the same fraction of the image), knobs unchanged; then the
    project's cost model (cost.plan_cost) on the 7B decoder at ``text_tokens`` text tokens."""
    from diffopsearch.cost import plan_cost
    from diffopsearch.plan import Plan, Site, load_plan

    src = load_plan(plan_dict)
    L_src, n_src = src.num_layers, src.visual_tokens
    L, n = LLAVA7B_TEXT["num_hidden_layers"], LLAVA7B_VISUAL
    sites, last_layer, last_keep = [], -1, n
    for s in src.sites:
        layer = max(last_layer + 1, min(L - 1, round(s.layer * L / L_src)))
        keep = max(1, min(last_keep, round(s.keep * n / n_src)))
        sites.append(Site(layer=layer, keep=keep, score=s.score, anchors=s.anchors, merge=s.merge,
                          sharpness=s.sharpness, locality=s.locality, reweight=s.reweight))
        last_layer, last_keep = layer, keep
    plan = Plan(sites=sites, backbone={"name": "llava-1.5-7b (projected)", "num_layers": L, "visual_tokens": n,
                                       "grid": list(LLAVA7B_GRID)}, budget=src.budget, method=src.method)
    cfg = SimpleNamespace(**LLAVA7B_TEXT)
    cost = plan_cost(cfg, plan, n, text_tokens)
    vision = clip_l336_flops()
    saved = cost["flops_full"] - cost["flops"]
    return {"sites": [s.to_dict() for s in sites], "flops_ratio": cost["flops_ratio"],
            "llm_saving": 1 - cost["flops_ratio"], "end_to_end_saving": saved / (cost["flops_full"] + vision),
            "tflops_full": cost["flops_full"] / 1e12, "tflops_plan": cost["flops"] / 1e12,
            "vision_tflops": vision / 1e12, "avg_tokens": cost["avg_visual_tokens"],
            "tokens_in": cost["entering_tokens"], "src_layers": L_src, "src_visual": n_src}


# ------------------------------------------------------------------------------------------ the figure


def figure(a, latency: dict) -> Path | None:
    """report.py's Pareto plot of the work directory, with the latency panel taken from this script's
    interleaved measurement at the largest batch size (the tables of section 2), not from each
    evaluation's own sequential timing."""
    from diffopsearch import report as rp

    rows, _, _ = rp.collect(a.work)
    by_batch = latency.get("by_batch") or {}
    if not rows or not by_batch:
        return None
    v = by_batch[max(by_batch, key=int)]["variants"]
    for r in rows:
        if r.unreduced:
            r.latency_ratio = v["unreduced (transformers)"]["ratio"]
            continue
        name = f"{'searched' if r.searched else r.method} @ {r.budget:g}" if r.budget is not None else None
        r.latency_ratio = v[name]["ratio"] if name in v else None
        r.prefill_ms = r.prefill_ms if r.latency_ratio is not None else None
    a.figure.parent.mkdir(parents=True, exist_ok=True)
    return rp.plot(rows, a.figure)


# ------------------------------------------------------------------------------------------ the document


def machine_info(device: str) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": affinity, "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": (commit + ("+local changes" if dirty else "")) if commit else "not a git checkout"}


def _pct(x, digits=1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def best_baselines(a, evals) -> dict:
    best = {}
    for b in a.budgets:
        for m in BASELINES:
            r = evals.get(m, {}).get(b)
            if r is not None and (b not in best or r["accuracy"] > best[b][1]["accuracy"]):
                best[b] = (m, r)
    return best


def summary(a, evals, searches, latency) -> list[str]:
    """The issue's targets, checked on this run's numbers."""
    best = best_baselines(a, evals)
    done = [b for b in a.budgets if (searches.get(b) or {}).get("results") and b in best]
    ok = [b for b in done if searches[b]["results"]["accuracy"] >= best[b][1]["accuracy"]]
    below = [f"{b:g}" for b in done if b not in ok]
    out = [f"- accuracy: the searched plan is at least the best baseline at {len(ok)} of {len(done)} budgets"
           + (f" (below it at budget {', '.join(below)})" if below else "") + "."]
    for bs, block in (latency.get("by_batch") or {}).items():
        v = block["variants"]
        rows = [(b, v[f"searched @ {b:g}"], searches[b]["results"]["flops_ratio"]) for b in a.budgets
                if f"searched @ {b:g}" in v]
        if not rows:
            continue
        met = sum(x["ratio"] <= TARGET_LATENCY_FACTOR * fr for _, x, fr in rows)
        low = sum(x["op_share"] <= TARGET_OVERHEAD for _, x, _ in rows)
        out.append(f"- batch {bs}: searched plans with latency ratio <= {TARGET_LATENCY_FACTOR:.2f} x FLOPs ratio: "
                   f"{met} of {len(rows)}; with operator overhead <= {100 * TARGET_OVERHEAD:.0f}% of prefill: "
                   f"{low} of {len(rows)} (max {max(100 * x['op_share'] for _, x, _ in rows):.1f}%).")
    return out


# A report template: one block per section of BENCHMARKS.md, in the document's order.
def document(a, argv, info, model_desc, dataset_desc, evals, searches, latency, projections, total_s, rss) -> str:
    budgets = a.budgets
    none = evals.get("none", {}).get(1.0)
    L = []
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    cmd = env + "python scripts/bench.py" + ("" if not argv else " " + shlex.join(argv))
    L += ["# Benchmarks", "",
          "Written by `scripts/bench.py` from one run; every figure below was measured or computed by that run "
          "(nothing is typed in). Regenerate with:", "", "```", cmd, "```", "",
          f"- machine: {info['cpu']}, {info['cores']} logical cores ({info['usable_cores']} usable), torch threads "
          f"{info['torch_threads']}" + (f", GPU {info['gpu']}" if info["gpu"] else ", no GPU") + f"; device `{info['device']}`",
          f"- software: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"{info['platform']}; diffopsearch commit {info['commit']}",
          f"- date: {info['date']}; total wall time of the run(s) that produced these numbers: {total_s / 60:.1f} min",
          f"- backbone: {model_desc}",
          f"- data: {dataset_desc}; seed {a.seed}; eval batch size {a.batch_size}, greedy, max {a.max_new_tokens} new tokens",
          f"- search: `diffopsearch search` defaults" + (f" plus `{' '.join(a.search_overrides)}`" if a.search_overrides
                                                        else "") + ", trained on the train split; the test questions above are never seen by it", ""]
    if a.quick or a.random_model:
        L += ["> **This is a smoke run on a random-weight model** (`--quick` / `--random-model`): the numbers say "
              "nothing about the method.", ""]

    L += ["## Summary", ""] + summary(a, evals, searches, latency) + [""]

    # 1. accuracy
    L += ["## 1. Accuracy per method and budget", "",
          "Accuracy (%) on the evaluated questions; in brackets the plan's FLOPs ratio (LLM prefill, operator "
          "overhead included). The unreduced model is the reference row.", ""]
    head = "| method | " + " | ".join(f"budget {b:g}" for b in budgets) + " |"
    L += [head, "|---|" + "---|" * len(budgets)]
    if none:
        L.append(f"| unreduced | " + " | ".join(f"{_pct(none['accuracy'])} (1.000)" for _ in budgets) + " |")
    best = best_baselines(a, evals)
    for m in BASELINES:
        cells = []
        for b in budgets:
            r = evals.get(m, {}).get(b)
            if r is None:
                cells.append("failed" if (m, b) in evals["failed"] else "unreachable")
                continue
            cells.append(f"{_pct(r['accuracy'])} ({r['flops_ratio']:.3f})")
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    cells = []
    for b in budgets:
        r = searches.get(b, {}).get("results")
        cells.append("failed" if r is None else f"**{_pct(r['accuracy'])}** ({r['flops_ratio']:.3f})")
    L.append("| **searched** | " + " | ".join(cells) + " |")
    n_eval = (none or {}).get("n") or a.limit
    L += ["", f"Questions per cell: {n_eval} (the first {a.limit} of the test split; per question family in "
          f"the work directory's report.md). One standard error of an accuracy p on n questions is "
          f"sqrt(p(1-p)/n): about {100 * _se(0.5, n_eval):.1f} points at p = 0.5 here.", ""]
    for b in budgets:
        r = searches.get(b, {}).get("results")
        if r is None or b not in best:
            L.append(f"- budget {b:g}: " + ("the search failed" if r is None else "no baseline reaches this budget"))
            continue
        m, br = best[b]
        d = r["accuracy"] - br["accuracy"]
        se = math.sqrt(_se(r["accuracy"], r["n"]) ** 2 + _se(br["accuracy"], br["n"]) ** 2)
        verdict = ("at least the best baseline" if d >= 0 else "**below the best baseline**")
        L.append(f"- budget {b:g}: searched {_pct(r['accuracy'])} vs best baseline {m} {_pct(br['accuracy'])}: "
                 f"{100 * d:+.1f} points ({verdict}; difference / its standard error = {d / se:+.1f})")
    problems = [f"- {m} @ {b:g}: unreachable: {e}" for (m, b), e in evals["unreachable"].items()]
    problems += [f"- {m} @ {b:g}: evaluation failed: {e}" for (m, b), e in evals["failed"].items()]
    problems += [f"- search @ {b:g}: failed: {s['error']}" for b, s in searches.items() if s.get("error")]
    if problems:
        L += ["", "Cells without a number:", ""] + problems
    L.append("")

    # 2. latency
    L += ["## 2. Measured prefill latency against the FLOPs ratio", "",
          "Prefill = one forward over the prompt (vision tower, projector, decoder with the plan's reduction), "
          "the last position's logits only, as generation's first step. Reference: the unreduced model's plain "
          "transformers forward (`LlavaForConditionalGeneration`). Each variant is timed on the same fixed "
          f"batches ({', '.join(str(b) for b in a.latency_batch_sizes)} prompts), after a warm-up, over {a.rounds} "
          "rounds that visit the variants in a fresh random order; a ratio is the median over rounds of the "
          "variant's time divided by the reference's time in the same round, so slow drift on a shared machine "
          "cancels.", "",
          "Operator overhead is timed inside the real forward by `patch.llava.stage_timer`: its `reduce` and "
          "`setup` stages are the reduction step (the site's score: FastV's attention, norms or seeded noise; "
          "similarity keys; `operators.reduce.hard_reduce` plus splicing the kept tokens back into the sequence "
          "and the shortened sequence's rotary tables; the CLS score from the vision tower's q/k; finding the "
          "visual segment, once per forward), and their summed time is divided by the measured forward's total. "
          "Not counted as overhead: the rebuilt attention mask after a site (a few element-wise ops). "
          f"Targets (issue 6): latency ratio <= {TARGET_LATENCY_FACTOR:.2f} x FLOPs ratio, overhead <= "
          f"{100 * TARGET_OVERHEAD:.0f}% of prefill.", ""]
    for bs, block in (latency.get("by_batch") or {}).items():
        v = block["variants"]
        ref = v["unreduced (transformers)"]
        own = v.get("unreduced (reduced forward, no sites)")
        L += [f"### batch {bs} ({block['tokens_per_prompt']} tokens per prompt)", "",
              f"Reference prefill: {ref['ms_per_batch']:.1f} ms per batch, of which vision tower + projector "
              f"{ref['vision_ms']:.1f} ms." + (f" The project's own decoder loop with no sites: latency ratio "
                                               f"{own['ratio']:.3f}." if own else "")
              + (f" While timing, the process got {100 * block['cpu_share']:.0f}% of the CPU time its "
                 f"{latency.get('threads')} thread(s) could use (load average {block['loadavg']:.1f} on "
                 f"{block['cores']} cores)." if "cpu_share" in block else ""), ""]
        if block.get("cpu_share", 1.0) < 0.8:
            L += ["> **The machine was busy during this measurement**: absolute times are inflated and noisy; the "
                  "interleaved ratios are less affected, but rerun on a quiet machine before quoting them.", ""]
        L += ["| budget | method | FLOPs ratio | latency ratio | target (1.10 x FLOPs) | met | decoder-only latency ratio "
              "| operator overhead % of prefill | % of decoder time | prefill ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for b in budgets:
            for m in BASELINES + ("searched",):
                name = f"{m} @ {b:g}"
                if name not in v:
                    continue
                r = searches[b]["results"] if m == "searched" else evals[m][b]
                fr = r["flops_ratio"]
                x = v[name]
                met = x["ratio"] <= TARGET_LATENCY_FACTOR * fr
                mm = f"**{m}**" if m == "searched" else m
                L.append(f"| {b:g} | {mm} | {fr:.3f} | {x['ratio']:.3f} | {TARGET_LATENCY_FACTOR * fr:.3f} | "
                         f"{'yes' if met else 'no'} | {x['decoder_ratio']:.3f} | {_pct(x['op_share'], 2)} | "
                         f"{_pct(x['op_share_decoder'], 2)} | {x['ms_per_batch']:.1f} |")
        L.append("")
    L += ["The FLOPs ratio counts the LLM decoder only (docs/DESIGN.md section 4); the measured prefill also runs the "
          "vision tower, which no plan shortens, and Python overhead per layer that does not shrink with the "
          "sequence. The decoder-only column subtracts the vision tower's measured time on both sides.", ""]

    # 3. search time, throughput, memory
    L += ["## 3. Search wall time, eval throughput, peak memory", "",
          "| budget | search wall time (s) | of which the search loop (s) | steps | s / step | final loss | "
          "searched plan's FLOPs ratio |", "|---|---|---|---|---|---|---|"]
    for b in budgets:
        s = searches.get(b)
        if not s or not s.get("results"):
            L.append(f"| {b:g} | failed | | | | | |")
            continue
        info_s = s["results"].get("search") or {}
        steps, secs = info_s.get("steps"), info_s.get("seconds")
        per = f"{secs / steps:.2f}" if steps and secs else "-"
        loss = info_s.get("final_loss")
        L.append(f"| {b:g} | {s['wall_s']:.1f} | {secs if secs is not None else '-'} | {steps or '-'} | {per} | "
                 f"{'-' if loss is None else f'{loss:.4f}'} | {s['results']['flops_ratio']:.3f} |")
    L += ["", "The wall time covers loading the model and data, the search, discretization and the evaluation of "
          "the searched plan on the test questions (for a search resumed from its checkpoint, the resuming run "
          "only).", "",
          f"Eval throughput (questions per second, batch {a.batch_size}, greedy generation including the prefill):", "",
          "| method | " + " | ".join(f"budget {b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]

    def thr(r):
        t = (r or {}).get("throughput") or {}
        return "-" if not t.get("samples_per_s") else f"{t['samples_per_s']:.1f}"

    if none:
        L.append("| unreduced | " + " | ".join(thr(none) for _ in budgets) + " |")
    for m in BASELINES:
        L.append(f"| {m} | " + " | ".join(thr(evals.get(m, {}).get(b)) for b in budgets) + " |")
    L.append("| **searched** | " + " | ".join(thr(searches.get(b, {}).get("results")) for b in budgets) + " |")
    L += ["", "Throughput of a cell that was resumed from a checkpoint counts only the questions answered in the "
          "resuming run.", "",
          f"Peak memory (resident set of the whole benchmark process, which holds one backbone at a time): "
          f"{rss['after_eval']:.0f} MB after the evaluations, {rss['after_search']:.0f} MB after the searches, "
          f"{rss['end']:.0f} MB at the end" + (f"; CUDA peak allocated {rss['cuda']:.0f} MB" if rss.get("cuda") else "")
          + ".", ""]

    # 4. projection
    L += ["## 4. Projection to LLaVA-1.5-7B", ""]
    if projections:
        p0 = next(iter(projections.values()))
        L += [f"The searched plans, moved to LLaVA-1.5-7B (576 visual tokens on a 24 x 24 grid, 32 decoder layers, "
              f"d = 4096, MLP 11008, 32 heads) and costed by the project's own model (`cost.plan_cost`) at "
              f"{a.proj_text_tokens:g} text tokens per prompt (a LLaVA-1.5 GQA prompt: chat template, question and "
              f"the short-answer instruction). The move: each site's layer l becomes round(l x 32 / "
              f"{p0['src_layers']}) (the same relative depth), its keep count k becomes round(k x 576 / "
              f"{p0['src_visual']}) (the same fraction of the image's tokens; the toy grid's 2 x 2 refinement, so "
              f"grid pooling stays a grid), and the operator knobs are kept. The expected prefill saving is 1 - FLOPs "
              f"ratio of the LLM prefill ({p0['tflops_full']:.2f} TFLOPs unreduced); end to end it also counts the "
              f"CLIP ViT-L/336 tower and projector ({p0['vision_tflops']:.2f} TFLOPs, computed with the same "
              f"convention, unchanged by any plan). These are FLOPs, not measured 7B latencies: on a GPU the "
              f"measured saving is usually smaller at small batch sizes.", "",
              "| budget | projected sites (layer: keep, score/anchors, merge) | visual tokens LLM in / avg | "
              "LLaVA-7B FLOPs ratio | expected LLM prefill saving | end-to-end prefill saving |",
              "|---|---|---|---|---|---|"]
        for b, p in projections.items():
            sites = "; ".join(f"{s['layer']}: {s['keep']}, {s['score']}/{s['anchors']}, mu {float(s['merge']):.2f}"
                              for s in p["sites"]) or "none"
            L.append(f"| {b:g} | {sites} | {p['tokens_in']} / {p['avg_tokens']:.1f} | {p['flops_ratio']:.3f} | "
                     f"{_pct(p['llm_saving'])}% | {_pct(p['end_to_end_saving'])}% |")
        L.append("")
    else:
        L += ["No searched plan finished, so there is nothing to project.", ""]
    if a.figure.exists():
        rel = os.path.relpath(a.figure, Path(a.out).resolve().parent)
        bs = max((int(b) for b in latency.get("by_batch") or {}), default=None)
        L += ["## Figure", "", f"![accuracy against FLOPs ratio and measured latency]({rel})", "",
              f"Accuracy against the FLOPs ratio (left) and against the measured prefill latency ratio at batch {bs} "
              f"of section 2 (right); drawn by `diffopsearch.report.plot`. `diffopsearch report dir={a.work}` "
              "makes the full table (per question family) and the same plot from the run directories, with each "
              "evaluation's own latency timing.", ""]
    return "\n".join(L)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = parse_args(argv)
        return _main(a, argv)
    except UserError as e:
        sys.stderr.write(f"bench: error: {e}\n")
        return 2


def _main(a, argv) -> int:
    import torch

    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.config import compose
    from diffopsearch.data.datasets import load_from_config
    from diffopsearch.evaluate import mean_prompt_text_tokens
    from diffopsearch.io import atomic_write_text
    from diffopsearch.patch.llava import apply_plan
    from diffopsearch.plan import load_plan
    from diffopsearch.report import write_report

    t_start = time.perf_counter()
    a.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    model_dir = resolve_model(a)
    cfg = compose("eval", base_overrides(a, model_dir))
    # the name the CLI gives the model (evaluate.run / search.run), so that report.py sees one setting
    model_name = f"{cfg.model.name}:{cfg.model.path}" if cfg.model.path else str(cfg.model.name)
    from diffopsearch.fingerprint import code_fingerprint

    # the package's source is part of the key: a rerun after a code change measures again
    settings_key = _key(_file_hash(model_dir), a.limit, a.batch_size, a.max_new_tokens, a.seed,
                        dict(cfg.dataset), dict(cfg.model), model_name, code_fingerprint())
    dataset = load_from_config(cfg.dataset, limit=a.limit)
    model, processor = load_backbone(cfg.model)
    n_text = mean_prompt_text_tokens(processor, dataset)
    n_params = sum(p.numel() for p in model.parameters())
    tc = model.config.text_config
    model_desc = (f"`{model_dir}` (weights sha256 {_file_hash(model_dir)}), {n_params / 1e6:.2f}M parameters, "
                  f"{tc.num_hidden_layers}-layer decoder d={tc.hidden_size}, "
                  f"{model.config.image_seq_length} visual tokens; dtype {model.dtype}")
    dataset_desc = (f"the toy world's `{dataset.split}` split at `{dataset.path}`, first {len(dataset)} questions, "
                    f"{n_text:.1f} text tokens per prompt on average")
    setup_s = time.perf_counter() - t_start
    evals = run_evaluations(a, model, processor, dataset, n_text, settings_key, model_name)
    rss = {"after_eval": _peak_rss_mb()}
    searches = run_searches(a, model_dir, settings_key)
    rss["after_search"] = _peak_rss_mb()

    # latency: every plan on the same loaded model
    from diffopsearch.baselines import make_plan
    from diffopsearch.evaluate import visual_token_count

    n_visual, grid = visual_token_count(model.config)
    variants = {"unreduced (transformers)": model,
                "unreduced (reduced forward, no sites)": apply_plan(model, make_plan("none", 1.0, tc, n_visual, grid,
                                                                                      n_text))}
    plans_for_key = []
    for b in a.budgets:
        for m in BASELINES:
            r = evals.get(m, {}).get(b)
            if r is not None:
                plan = load_plan(r["plan"])
                variants[f"{m} @ {b:g}"] = apply_plan(model, plan)
                plans_for_key.append(r["plan"])
        s = searches.get(b)
        if s and s.get("plan"):
            variants[f"searched @ {b:g}"] = apply_plan(model, load_plan(s["plan"]))
            plans_for_key.append(s["plan"])
    latency = measure_latency(a, model, processor, dataset, variants,
                              _key(settings_key, plans_for_key, a.rounds, a.latency_batch_sizes))
    if torch.cuda.is_available():
        rss["cuda"] = torch.cuda.max_memory_allocated() / 2**20
    rss["end"] = _peak_rss_mb()

    projections = {b: project_plan(s["plan"], a.proj_text_tokens) for b, s in searches.items() if s.get("plan")}
    try:
        write_report(a.work, show=False)  # report.md / pareto.png of the work dir (evaluate's own timings)
        figure(a, latency)
    except UserError as e:
        _log(f"report: {e}")
    # the run's cost: this invocation's set-up plus every phase's own wall time (also when a phase was
    # done by an earlier, interrupted invocation and reused from its checkpoint)
    total = setup_s + latency.get("wall_s", 0.0) + sum(s["wall_s"] for s in searches.values()) + sum(
        r.get("eval_wall_s") or 0.0 for m, by_b in evals.items() if m not in ("unreachable", "failed")
        for r in by_b.values())
    text = document(a, argv, machine_info(latency.get("device", "cpu")), model_desc, dataset_desc, evals, searches,
                    latency, projections, total, rss)
    atomic_write_text(a.out, text + "\n" + kept_sections(a.out))
    _log(f"wrote {a.out} (this invocation {time.perf_counter() - t_start:.0f} s; all phases {total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
