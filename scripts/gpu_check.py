"""Check the CUDA path on one GPU: bf16 + SDPA, the unreduced model and FastV, a short search, and a table.

    python scripts/gpu_check.py                                   # the real-shape test backbone (random weights)
    python scripts/gpu_check.py model.path=/data/llava-1.5-7b-hf   # real LLaVA-1.5-7B weights
    python scripts/gpu_check.py model.path=DIR dataset=gqa dataset.path=/data/GQA
    python scripts/gpu_check.py --cpu --steps 2 --limit 8 search.batch_size=2   # a smoke run without a GPU

Without CUDA it stops at once (exit code 2) unless ``--cpu`` is given. In one process, with the model loaded
once (bf16 and SDPA on CUDA):

1. **the empty plan is the model**: ``apply_plan(model, <no sites>).generate`` against plain
   ``model.generate`` (greedy) on the first ``--generate-questions`` questions: every token identical;
2. **eval** of the unreduced model and of FastV at ``--budget`` (``diffopsearch.evaluate.evaluate``, the eval
   command's body) on the first ``--limit`` questions: accuracy, FLOPs ratio;
3. **a search** of ``--steps`` steps at ``--budget`` (``diffopsearch.search.search_plan``, the search command's
   body, its defaults except the steps and what the command line overrides), then eval of its plan;
4. **prefill latency** of FastV and the searched plan against the unreduced model (the plain transformers
   forward) at batch 1 and 16, ``--rounds`` rounds in alternating order, median ratio;

and prints one table: step time, prefill latency ratio against the FLOPs ratio, peak memory (CUDA: max
allocated per phase; CPU: the process's peak resident set). ``--out`` gets gpu_check.json and gpu_check.md
(the table with the device named: ``scripts/real_size.py --gpu-check <out>/gpu_check.md`` puts it in
BENCHMARKS.md). Extra ``key=value`` arguments are the search command's overrides (model.*, dataset.*,
search.*, batch_size, max_new_tokens, seed). Exit code 0 when every check passed, 1 when one failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def parse(argv=None):
    p = argparse.ArgumentParser(description="Check the CUDA path of diffopsearch on one GPU.",
                                epilog="Extra key=value arguments are `diffopsearch search` overrides.")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke run; no GPU needed)")
    p.add_argument("--steps", type=int, default=20, help="search steps (default 20)")
    p.add_argument("--budget", type=float, default=0.5, help="FLOPs budget of FastV and the search (default 0.5)")
    p.add_argument("--limit", type=int, default=64, help="evaluation questions (default 64)")
    p.add_argument("--generate-questions", type=int, default=32, help="questions of the generate() identity check")
    p.add_argument("--latency-batches", default="1,16", help="batch sizes of the latency timing (default 1,16)")
    p.add_argument("--rounds", type=int, default=5, help="latency rounds (default 5)")
    p.add_argument("--out", default=None, help="output directory (default: a new temporary one)")
    p.add_argument("overrides", nargs="*", help="search command overrides, e.g. model.path=DIR search.batch_size=4")
    a = p.parse_args(argv)
    bad = [o for o in a.overrides if "=" not in o]
    if bad:
        p.error(f"not key=value: {' '.join(bad)}")
    if not 0 < a.budget <= 1:
        p.error("--budget must lie in (0, 1]")
    a.latency_batches = [int(x) for x in str(a.latency_batches).split(",") if x.strip()]
    return a


def merged(defaults: list[str], user: list[str]) -> list[str]:
    """Hydra overrides: the user's win over the script's defaults for the same key."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in user}
    return [o for o in defaults if o.split("=", 1)[0] not in keys] + list(user)


def peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # the process's peak resident set (VmHWM; reset per phase where Linux allows it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def check_generate(model, processor, dataset, n: int, batch_size: int, max_new_tokens: int) -> dict:
    """The empty plan's greedy tokens against plain ``model.generate``'s, batch by batch."""
    import torch

    from diffopsearch.baselines import make_plan
    from diffopsearch.data.datasets import make_eval_batch
    from diffopsearch.evaluate import visual_token_count
    from diffopsearch.runtime import to_device
    from diffopsearch.patch.llava import apply_plan

    n_visual, grid = visual_token_count(model.config)
    empty = make_plan("none", 1.0, model.config.text_config, n_visual, grid, 0.0)
    assert not empty.sites
    reduced = apply_plan(model, empty)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = same = 0
    first_diff = None
    for s in range(0, min(n, len(dataset)), batch_size):
        recs, imgs = dataset.batch(list(range(s, min(s + batch_size, n, len(dataset)))))
        if not recs:
            continue
        inputs = to_device(make_eval_batch(processor, recs, imgs), device, dtype)
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad)
        with torch.inference_mode():
            plain = model.generate(**inputs, **kw)
            ours = reduced.generate(**inputs, **kw)
        for i in range(plain.shape[0]):
            rows += 1
            a, b = plain[i], ours[i]
            ok = a.shape == b.shape and bool(torch.equal(a, b))
            same += ok
            if not ok and first_diff is None:
                first_diff = {"question": recs[i]["question"], "plain": tok.decode(a[inputs["input_ids"].shape[1]:]),
                              "empty_plan": tok.decode(b[inputs["input_ids"].shape[1]:])}
    return {"rows": rows, "identical": same, "ok": rows > 0 and same == rows, "first_difference": first_diff}


def latency_ratios(model, processor, dataset, plans: dict, batch_sizes, rounds: int) -> dict:
    """Median over rounds of (plan's prefill time / the plain model's, same batch, same round)."""
    import random

    from diffopsearch.data.datasets import make_eval_batch
    from diffopsearch.evaluate import prefill, to_device
    from diffopsearch.patch.llava import apply_plan

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    variants = {"unreduced": model, **{k: apply_plan(model, p) for k, p in plans.items()}}
    out = {}
    for bs in batch_sizes:
        recs, imgs = dataset.batch(list(range(min(bs, len(dataset)))))
        inputs = to_device(make_eval_batch(processor, recs, imgs), device, dtype)
        for v in variants.values():  # warm-up: kernels, allocator
            prefill(v, inputs)
        ms = {k: [] for k in variants}
        rng = random.Random(bs)
        for _ in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for k in order:
                _sync(device)
                t0 = time.perf_counter()
                prefill(variants[k], inputs)
                _sync(device)
                ms[k].append((time.perf_counter() - t0) * 1000)
        out[bs] = {k: {"ms": statistics.median(v),
                       "ratio": statistics.median(x / y for x, y in zip(v, ms["unreduced"]))} for k, v in ms.items()}
    return out


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(res: dict) -> str:
    L = []
    w = L.append
    dev = res["device"]
    w(f"GPU check on **{dev['name']}** ({dev['type']}; torch {res['torch']}, transformers {res['transformers']}, "
      f"dtype {res['dtype']}, attention `{res['attn']}`), backbone `{res['backbone']}`, data "
      f"`{res['dataset']}` (first {res['limit']} questions of `{res['split']}`), budget {res['budget']}; command: "
      f"`{res['command']}`")
    w("")
    g = res["generate"]
    w(f"- empty plan vs plain `model.generate` (greedy, {g['rows']} questions): "
      f"**{'identical' if g['ok'] else 'DIFFERENT'}** ({g['identical']} / {g['rows']} rows token for token)"
      + ("" if g["ok"] or not g["first_difference"] else f"; first difference: {g['first_difference']}"))
    s = res["search"]
    w(f"- search: {s['steps']} steps, batch {s['batch_size']}, {s['plans_per_step']} plans per step, checkpointing "
      f"{s['checkpoint_layers']}, micro_batch {s['micro_batch'] or 'off'}: "
      f"step time median **{s['step_s_median']:.2f} s** "
      f"(first step {s['step_s_first']:.2f} s), loop {s['loop_s']:.1f} s, whole search with selection "
      f"{s['search_s']:.1f} s, peak memory {s['peak_mb']:.0f} MB; plan: {s['plan']}")
    w("")
    bss = res["latency_batches"]
    head = "| method | accuracy | FLOPs ratio | " + " | ".join(f"prefill latency ratio, batch {b}" for b in bss) + \
        " | eval peak memory (MB) |"
    w(head)
    w("|" + "---|" * (4 + len(bss)))
    for name, r in res["evals"].items():
        lat = " | ".join(f"{res['latency'][str(b)][name]['ratio']:.3f} ({res['latency'][str(b)][name]['ms']:.1f} ms)"
                         if name in res["latency"].get(str(b), {}) else "-" for b in bss)
        w(f"| {name} | {100 * r['accuracy']:.1f}% | {r['flops_ratio']:.3f} | {lat} | {r['peak_mb']:.0f} |")
    w("")
    w(f"Peak memory: {res['memory_kind']}. Latency: median over {res['rounds']} rounds of the variant's prefill time "
      "over the plain model's in the same round (the prompt's one forward, the last position's logits).")
    return "\n".join(L)


# The check's procedure in the order it runs on the GPU (load, forward checks, search, timings, report).
def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    a = parse(raw)
    import torch

    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}). This script checks the CUDA path: "
              "run it on a machine with a GPU and a CUDA build of torch, or pass --cpu for a smoke run on the CPU.",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.baselines import make_plan
    from diffopsearch.config import compose, validate
    from diffopsearch.data.datasets import load_from_config, load_qa
    from diffopsearch.evaluate import evaluate, mean_prompt_text_tokens, visual_token_count
    from diffopsearch.commands.search import settings_from
    from diffopsearch.search import hold_out, search_plan
    from diffopsearch.search.space import make_space

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    out.mkdir(parents=True, exist_ok=True)
    user_keys = {o.split("=", 1)[0] for o in a.overrides}
    defaults = ["model=llava", "model.attn_implementation=sdpa",
                f"model.dtype={'float32' if a.cpu else 'bfloat16'}", f"model.device={'cpu' if a.cpu else 'cuda'}",
                f"budget={a.budget}", f"search.steps={a.steps}", f"limit={a.limit}"]
    t_all = time.time()
    if "model.path" not in user_keys:  # the real-shape test backbone (LLaVA-1.5-7B's geometry, small widths)
        import real_shape as rs

        print(f"[gpu_check] building the real-shape test backbone in {out / 'backbone'}", flush=True)
        rs.build_real_shape(out / "backbone")
        defaults.append(f"model.path={out / 'backbone'}")
    if "dataset" not in user_keys and "dataset.path" not in user_keys:  # a small toy world of its own
        from diffopsearch.data import world

        if not (out / "world").exists():
            world.write_world(out / "world", seed=0, sizes={"train": 200, "test": max(8, a.limit)})
        defaults.append(f"dataset.path={out / 'world'}")
    overrides = merged(defaults, a.overrides)
    cfg = compose("search", overrides)
    validate(cfg)
    torch.manual_seed(int(cfg.seed))

    print("[gpu_check] loading", cfg.model.path, flush=True)
    model, processor = load_backbone(cfg.model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    attn = getattr(model.config, "_attn_implementation", None) or cfg.model.attn_implementation
    problems = []
    if not a.cpu and (device.type != "cuda" or dtype != torch.bfloat16 or attn != "sdpa"):
        problems.append(f"expected bf16 + SDPA on CUDA, got {dtype} + {attn} on {device}")
    evalset = load_from_config(cfg.dataset, limit=int(cfg.limit))
    ds = cfg.dataset
    train = load_qa(ds.name, ds.path or None, ds.search_split, ds.search_questions_config or ds.questions_config,
                    ds.search_images_config or ds.images_config, cfg.search.train_limit)
    train, heldout = hold_out(train, int(cfg.search.select_questions), int(cfg.seed))
    bs, mnt = int(cfg.batch_size), int(cfg.max_new_tokens)

    print("[gpu_check] empty plan vs model.generate", flush=True)
    gen = check_generate(model, processor, evalset, a.generate_questions, bs, mnt)
    if not gen["ok"]:
        problems.append(f"the empty plan's answers differ from model.generate on {gen['rows'] - gen['identical']} rows")

    n_text = mean_prompt_text_tokens(processor, evalset)
    n_visual, grid = visual_token_count(model.config)
    plans = {"unreduced": None,
             f"fastv @ {a.budget}": make_plan("fastv", a.budget, model.config.text_config, n_visual, grid, n_text)}
    evals = {}

    def run_eval(name, plan):
        print(f"[gpu_check] eval {name}", flush=True)
        reset_peak(device)
        r = evaluate(model, processor, plan, evalset, batch_size=bs, max_new_tokens=mnt, out_dir=out / "eval" /
                     name.replace(" ", "").replace("@", "_"), show=False, resume=False)
        evals[name] = {"accuracy": r["accuracy"], "flops_ratio": r["flops_ratio"], "n": r["n"],
                       "peak_mb": peak_mb(device)}

    for name, plan in plans.items():
        run_eval(name, plan)

    print(f"[gpu_check] search, {cfg.search.steps} steps", flush=True)
    settings = settings_from(cfg)
    space = make_space(model.config, cfg.search.candidate_layers, bool(cfg.search.two_sites))
    n_text_train = mean_prompt_text_tokens(processor, train)
    reset_peak(device)
    t0 = time.time()
    plan, res = search_plan(model, processor, train, space, settings, n_text_train, out_dir=out / "search",
                            progress=False, model_name=str(cfg.model.path), heldout=heldout,
                            select_samples=int(cfg.search.select_samples),
                            select_corners=bool(cfg.search.select_corners),
                            screen_questions=cfg.search.screen_questions,
                            finalists=int(cfg.search.select_finalists))
    search_s = time.time() - t0
    search_peak = peak_mb(device)
    plan.save(out / "search" / "plan.json")
    steps = [r["step_s"] for r in res.history]
    losses = [r["loss"] for r in res.history]
    if not all(math.isfinite(x) for x in losses):
        problems.append("a search step's loss is not finite")
    if plan.cost["flops_ratio"] > a.budget + 1e-9:
        problems.append(f"the searched plan costs {plan.cost['flops_ratio']:.4f} > budget {a.budget}")
    ckpt = settings.checkpoint_layers
    if ckpt is None:
        from diffopsearch.search.loop import auto_checkpoint

        ckpt = f"auto ({'on' if auto_checkpoint(space, device) else 'off'})"
    searched = f"searched @ {a.budget}"
    plans[searched] = plan
    run_eval(searched, plan)

    print("[gpu_check] prefill latency", flush=True)
    lat = latency_ratios(model, processor, evalset, {k: p for k, p in plans.items() if p is not None},
                         a.latency_batches, a.rounds)
    result = {
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else (platform.processor() or "cpu")},
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "dtype": str(dtype).replace("torch.", ""), "attn": attn, "backbone": str(cfg.model.path),
        "dataset": f"{ds.name}:{ds.path or '(prepared toy world)'}", "split": ds.split, "limit": int(cfg.limit),
        "budget": a.budget, "command": "python scripts/gpu_check.py " + " ".join(raw), "rounds": a.rounds,
        "generate": gen, "evals": evals, "latency": {str(k): v for k, v in lat.items()},
        "latency_batches": a.latency_batches,
        "memory_kind": "torch.cuda.max_memory_allocated per phase" if device.type == "cuda"
        else "the process's peak resident set (VmHWM, reset per phase)",
        "search": {"steps": res.steps, "batch_size": settings.batch_size, "plans_per_step": settings.plans_per_step,
                   "checkpoint_layers": ckpt, "micro_batch": settings.micro_batch,
                   "step_s_median": statistics.median(steps[1:] or steps), "step_s_first": steps[0],
                   "loop_s": res.seconds, "search_s": search_s, "peak_mb": search_peak, "losses": losses,
                   "plan": "; ".join(f"L{s.layer}: {s.keep} {s.score}/{s.anchors}" for s in plan.sites) or "no sites"},
        "problems": problems, "seconds": time.time() - t_all,
    }
    md = table(result)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu_check.md").write_text(md + "\n")
    print()
    print(md)
    print()
    for p in problems:
        print(f"gpu_check: FAILED: {p}", file=sys.stderr)
    print(f"[gpu_check] {'all checks passed' if not problems else f'{len(problems)} check(s) failed'} in "
          f"{result['seconds']:.0f} s; wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
