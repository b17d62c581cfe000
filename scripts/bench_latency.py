"""Budgets in measured time: is the latency model right? Written into BENCHMARKS.md between
``<!-- latency:begin -->`` and ``<!-- latency:end -->`` (scripts/bench.py keeps that section).

    OMP_NUM_THREADS=2 python scripts/bench_latency.py                 # budgets 0.8 0.6 0.4 0.25, batch 1 and 16
    OMP_NUM_THREADS=2 python scripts/bench_latency.py --search        # + searches, and accuracy at equal latency

For each batch size the toy backbone's latency model is profiled afresh (its wall time is reported), every
baseline is sized by it at each budget (``cost=latency``), and each plan's *predicted* latency ratio is set
beside its *measured* one: scripts/bench.py's protocol (the plain transformers forward as reference, the
same batches, rounds in a fresh random order, the median ratio over rounds). Run it alone on the machine.

With ``--search``, at every budget and batch size ``diffopsearch search cost=latency`` (searched for that
batch size) and, once per budget, ``diffopsearch search`` (cost=flops) run too; both are timed beside the
baselines and evaluated on the first ``--limit`` test questions, and each latency-searched plan's accuracy
is set beside the FLOPs-searched plans' accuracy at the same *measured* latency (interpolated between the
two FLOPs-searched plans whose measured latencies bracket it).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

BEGIN, END = "<!-- latency:begin -->", "<!-- latency:end -->"
BASELINES = ("fastv", "tome", "pool", "prumerge", "visionzip", "random")
TOLERANCE = 0.05   # predicted within 5% (relative) of measured
OVER = 1.05        # a latency-sized plan measures at most 1.05 x its budget
FLOPS_SEARCHED = "searched (cost=flops)"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", default="0.8,0.6,0.4,0.25")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--search", action="store_true",
                   help="also search (cost=latency per batch size, and cost=flops) at every budget")
    p.add_argument("--limit", type=int, default=500, help="test questions each searched plan is evaluated on")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_latency"))
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    a = parse_args(argv)
    import torch

    import bench  # scripts/bench.py: the latency protocol and the machine description
    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.baselines import make_plan
    from diffopsearch.config import compose
    from diffopsearch.data.datasets import load_from_config
    from diffopsearch.errors import UserError
    from diffopsearch.evaluate import mean_prompt_text_tokens, visual_token_count
    from diffopsearch.io import replace_block
    from diffopsearch.latency import for_dataset
    from diffopsearch.patch.llava import apply_plan

    t_all = time.time()
    budgets = [float(x) for x in a.budgets.split(",")]
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = compose("eval", [])
    model, proc = load_backbone(cfg.model)
    model.requires_grad_(False)
    test = load_from_config(cfg.dataset, limit=64)
    n_visual, grid = visual_token_count(model.config)
    n_text = mean_prompt_text_tokens(proc, test)
    blocks, flops = [], {}
    if a.search:  # FLOPs-searched plans first: what each batch size measures, away from its profiling
        flops = {budget: _search(budget, work, a.limit) for budget in budgets}
    for bs in sizes:
        lm, _, _ = for_dataset(model, proc, test, bs, n_text, progress=False, refresh=True)
        plans, accuracy = {}, {}  # accuracy: of the searched plans, by the plans' key
        for budget in budgets:
            for name in BASELINES:
                try:
                    plans[f"{name}@{budget:g}"] = (budget, name, make_plan(name, budget, model.config.text_config,
                                                                           n_visual, grid, n_text, latency=lm))
                except UserError:
                    plans[f"{name}@{budget:g}"] = (budget, name, None)
            if a.search:  # the search reads the latency model just profiled (same key, from the cache)
                key = f"searched@{budget:g}"
                plan, accuracy[key] = _search(budget, work, a.limit, latency_bs=bs)
                plans[key] = (budget, "searched", plan)
        for budget, (plan, acc) in flops.items():  # timed at this batch size too
            accuracy[f"flops@{budget:g}"] = acc
            plans[f"flops@{budget:g}"] = (budget, FLOPS_SEARCHED, plan)
        variants = {"unreduced (transformers)": model}
        variants.update({k: apply_plan(model, p) for k, (_, _, p) in plans.items() if p is not None})
        ns = SimpleNamespace(work=work / f"bs{bs}", fresh=True, seed=0, rounds=a.rounds, latency_batch_sizes=[bs])
        ns.work.mkdir(parents=True, exist_ok=True)
        measured = bench.measure_latency(ns, model, proc, test, variants, key=f"bs{bs}")["by_batch"][str(bs)]
        blocks.append((bs, lm, plans, measured, accuracy))
    doc = _document(a, argv, budgets, blocks, bench.machine_info("cpu"), time.time() - t_all, torch.get_num_threads())
    replace_block(Path(a.out), BEGIN, END, doc)
    print(doc)
    return 0


def _search(budget: float, work: Path, limit: int, latency_bs: int | None = None):
    """``diffopsearch search`` (its own body) at ``budget``: with ``cost=latency`` for batch ``latency_bs``,
    else cost=flops. Returns (plan, accuracy on the first ``limit`` test questions), (None, None) when the
    budget is below what measured time can reach."""
    from diffopsearch.commands import search as search_cmd
    from diffopsearch.config import compose
    from diffopsearch.errors import UserError
    from diffopsearch.fingerprint import code_fingerprint
    from diffopsearch.plan import load_plan

    cost = "flops" if latency_bs is None else f"latency-bs{latency_bs}"
    out = work / f"search-{code_fingerprint()[:12]}-{cost}-b{budget:g}"  # one made by other code is not reused
    overrides = [f"budget={budget}", f"limit={limit}"]
    if latency_bs is not None:
        overrides += ["cost=latency", f"latency_batch_size={latency_bs}"]
    if not (out / "results.json").exists():
        try:
            search_cmd.run(compose("search", overrides), out_dir=out)
        except UserError:  # below the reachable minimum in measured time: a row that says so
            return None, None
    return load_plan(str(out / "plan.json")), json.loads((out / "results.json").read_text())["accuracy"]


def at_equal_latency(target: float, points: list[tuple[float, float]]) -> tuple[float, tuple] | None:
    """The accuracy of the (measured latency ratio, accuracy) ``points`` at ``target`` latency, linear between
    the two points that bracket it; None outside their range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= target <= x1:
            return (y0 if x1 == x0 else y0 + (y1 - y0) * (target - x0) / (x1 - x0)), ((x0, y0), (x1, y1))
    return None


def _document(a, argv, budgets, blocks, machine, total_s, threads) -> str:
    cmd = "OMP_NUM_THREADS=2 python scripts/bench_latency.py" + (" " + shlex.join(argv) if argv else "")
    out = [BEGIN, "## Budgets in measured time (`cost=latency`): predicted against measured", "",
           f"Made by `{cmd}` in {total_s / 60:.1f} min on this machine ({machine['cpu']}, {machine['cores']} cores, "
           f"torch threads {threads}; torch {machine['torch']}, transformers {machine['transformers']}; diffopsearch "
           f"{machine['commit']}; {machine['date']}).", "",
           "For each batch size the toy backbone's latency model is profiled afresh (docs/DESIGN.md section 4), every "
           "baseline is sized by it at each budget, and the plan's predicted latency ratio is set beside the measured "
           "one (section 2's protocol: plain transformers forward as reference, same batches, "
           f"{a.rounds} rounds in random order, median ratio). Targets: |predicted - measured| / measured <= "
           f"{100 * TOLERANCE:.0f}%; measured <= {OVER:.2f} x budget.", ""]
    for bs, lm, plans, measured, accuracy in blocks:
        full = lm.reference_ms(lm.n_text)
        out += [f"### batch {bs}", "",
                f"Latency model: profiled in {lm.seconds:.1f} s; unreduced prefill (plain transformers forward) "
                f"{lm.measured.get('full_prefill_ms', 0):.1f} ms per batch, {lm.measured.get('loop_prefill_ms', 0):.1f} ms "
                f"in the reduced forward without sites, of which {lm.fixed_ms:.1f} ms ({100 * lm.fixed_ms / full:.0f}% "
                f"of the unreduced prefill) is fixed (vision tower, projector, embeddings, masks, logits); one decoder "
                f"layer {lm.layer_ms[0]:.2f} ms at {lm.lengths[0]} tokens, {lm.layer_ms[-1]:.2f} ms at "
                f"{lm.lengths[-1]}.", "",
                "| budget | method | FLOPs ratio | predicted latency ratio | measured latency ratio | error | "
                "within 5% | measured <= 1.05 x budget | operator overhead % |",
                "|---|---|---|---|---|---|---|---|---|"]
        n_ok = n_under = n_all = n_sized = 0
        for key, (budget, name, plan) in plans.items():
            if plan is None:
                out.append(f"| {budget:g} | {name} | - | unreachable | - | - | - | - | - |")
                continue
            m = measured["variants"][key]
            pred = lm.ratio(plan, lm.n_text)
            err = abs(pred - m["ratio"]) / m["ratio"]
            ok = err <= TOLERANCE
            n_all, n_ok = n_all + 1, n_ok + ok
            under = "-"  # a FLOPs-searched plan has a FLOPs budget, not a latency one
            if name != FLOPS_SEARCHED:
                fits = m["ratio"] <= OVER * budget
                n_sized, n_under = n_sized + 1, n_under + fits
                under = "yes" if fits else "no"
            label = f"**{name}**" if name == "searched" else name
            out.append(f"| {budget:g} | {label} | {plan.cost['flops_ratio']:.3f} | {pred:.3f} | {m['ratio']:.3f} | "
                       f"{100 * err:.1f}% | {'yes' if ok else 'no'} | {under} | {100 * m['op_share']:.1f} |")
        out += ["", f"Prediction within 5%: {n_ok} of {n_all}; measured within 1.05 x budget: {n_under} of {n_sized} "
                    f"latency-sized plans. While timing, the process got {100 * measured['cpu_share']:.0f}% of the CPU "
                    f"time its threads could use (load average {measured['loadavg']:.1f}).", ""]
        if accuracy:
            out += _equal_latency(a, bs, plans, measured, accuracy)
    out.append(END)
    return "\n".join(out)


def _equal_latency(a, bs: int, plans: dict, measured: dict, accuracy: dict) -> list[str]:
    """Accuracy at equal measured latency: each latency-searched plan against the FLOPs-searched plans'
    accuracy interpolated at its measured latency ratio."""
    ratio = lambda key: measured["variants"][key]["ratio"]  # noqa: E731
    flops = [(ratio(k), accuracy[k]) for k, (_, name, p) in plans.items()
             if name == FLOPS_SEARCHED and p is not None and accuracy.get(k) is not None]
    out = [f"Accuracy at equal measured latency, batch {bs} (the first {a.limit} test questions; latency-searched "
           f"plans searched for batch {bs}; FLOPs-searched plans' measured ratios at this batch size: "
           f"{', '.join(f'{x:.3f}' for x, _ in sorted(flops))}):", "",
           "| budget | latency-searched: measured ratio | its accuracy (%) | FLOPs-searched at that ratio (%) | "
           "difference (points) |", "|---|---|---|---|---|"]
    wins = n = 0
    for key, (budget, name, plan) in plans.items():
        if name != "searched":
            continue
        if plan is None:
            out.append(f"| {budget:g} | unreachable | - | - | - |")
            continue
        m, acc = ratio(key), accuracy[key]
        at = at_equal_latency(m, flops)
        if at is None:
            out.append(f"| {budget:g} | {m:.3f} | {100 * acc:.1f} | outside the FLOPs-searched plans' range | - |")
            continue
        n, wins = n + 1, wins + (acc >= at[0])
        out.append(f"| {budget:g} | {m:.3f} | {100 * acc:.1f} | {100 * at[0]:.1f} | {100 * (acc - at[0]):+.1f} |")
    se = 100 * (0.95 * 0.05 / a.limit) ** 0.5
    out += ["", f"Latency-searched accuracy >= FLOPs-searched at equal measured latency: {wins} of {n}. One standard "
                f"error of an accuracy near 95% on {a.limit} questions is about {se:.1f} points.", ""]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
