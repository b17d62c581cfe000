"""Budgets in measured time: is the latency model right? Written into BENCHMARKS.md between
``<!-- latency:begin -->`` and ``<!-- latency:end -->`` (scripts/bench.py keeps that section).

    OMP_NUM_THREADS=2 python scripts/bench_latency.py                 # budgets 0.8 0.6 0.4 0.25, batch 1 and 16
    OMP_NUM_THREADS=2 python scripts/bench_latency.py --search        # + a cost=latency search per budget (batch 16)

For each batch size the toy backbone's latency model is profiled afresh (its wall time is reported), every
baseline is sized by it at each budget (``cost=latency``), and each plan's *predicted* latency ratio is set
beside its *measured* one: scripts/bench.py's protocol (the plain transformers forward as reference, the
same batches, rounds in a fresh random order, the median ratio over rounds). Run it alone on the machine.
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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", default="0.8,0.6,0.4,0.25")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--search", action="store_true", help="also search with cost=latency at every budget (batch 16)")
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
    blocks = []
    for bs in sizes:
        lm, _, _ = for_dataset(model, proc, test, bs, n_text, progress=False, refresh=True)
        plans = {}
        for budget in budgets:
            for name in BASELINES:
                try:
                    plans[f"{name}@{budget:g}"] = (budget, name, make_plan(name, budget, model.config.text_config,
                                                                           n_visual, grid, n_text, latency=lm))
                except UserError:
                    plans[f"{name}@{budget:g}"] = (budget, name, None)
            if a.search and bs == max(sizes):
                plans[f"searched@{budget:g}"] = (budget, "searched", _search(budget, bs, work))
        variants = {"unreduced (transformers)": model}
        variants.update({k: apply_plan(model, p) for k, (_, _, p) in plans.items() if p is not None})
        ns = SimpleNamespace(work=work / f"bs{bs}", fresh=True, seed=0, rounds=a.rounds, latency_batch_sizes=[bs])
        ns.work.mkdir(parents=True, exist_ok=True)
        measured = bench.measure_latency(ns, model, proc, test, variants, key=f"bs{bs}")["by_batch"][str(bs)]
        blocks.append((bs, lm, plans, measured))
    doc = _document(a, argv, budgets, blocks, bench.machine_info("cpu"), time.time() - t_all, torch.get_num_threads())
    _write_section(Path(a.out), doc)
    print(doc)
    return 0


def _search(budget: float, bs: int, work: Path):
    """``diffopsearch search cost=latency`` (its own body) at ``budget``, the latency model for batch ``bs``."""
    from diffopsearch.commands import search as search_cmd
    from diffopsearch.config import compose
    from diffopsearch.errors import UserError
    from diffopsearch.fingerprint import code_fingerprint
    from diffopsearch.plan import load_plan

    out = work / f"search-{code_fingerprint()[:12]}-b{budget:g}"  # a search made by other code is not reused
    if not (out / "plan.json").exists():
        try:
            search_cmd.run(compose("search", [f"budget={budget}", "cost=latency", f"latency_batch_size={bs}",
                                              "limit=100"]), out_dir=out)
        except UserError:  # below the reachable minimum in measured time: a row that says so
            return None
    return load_plan(str(out / "plan.json"))


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
    for bs, lm, plans, measured in blocks:
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
        n_ok = n_under = n_all = 0
        for key, (budget, name, plan) in plans.items():
            if plan is None:
                out.append(f"| {budget:g} | {name} | - | unreachable | - | - | - | - | - |")
                continue
            m = measured["variants"][key]
            pred = lm.ratio(plan, lm.n_text)
            err = abs(pred - m["ratio"]) / m["ratio"]
            ok, under = err <= TOLERANCE, m["ratio"] <= OVER * budget
            n_all, n_ok, n_under = n_all + 1, n_ok + ok, n_under + under
            label = f"**{name}**" if name == "searched" else name
            out.append(f"| {budget:g} | {label} | {plan.cost['flops_ratio']:.3f} | {pred:.3f} | {m['ratio']:.3f} | "
                       f"{100 * err:.1f}% | {'yes' if ok else 'no'} | {'yes' if under else 'no'} | "
                       f"{100 * m['op_share']:.1f} |")
        out += ["", f"Prediction within 5%: {n_ok} of {n_all}; measured within 1.05 x budget: {n_under} of {n_all}. "
                    f"While timing, the process got {100 * measured['cpu_share']:.0f}% of the CPU time its threads "
                    f"could use (load average {measured['loadavg']:.1f}).", ""]
    out.append(END)
    return "\n".join(out)


def _write_section(path: Path, section: str) -> None:
    from diffopsearch.io import atomic_write_text

    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, text)


if __name__ == "__main__":
    raise SystemExit(main())
