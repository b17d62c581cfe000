"""Does the gradient phase find the plan? The search's own benchmark, written into BENCHMARKS.md between
``<!-- search:begin -->`` and ``<!-- search:end -->`` (scripts/bench.py keeps that section).

    OMP_NUM_THREADS=2 python scripts/bench_search.py            # budgets 0.6 0.4 0.25, seeds 0 1 2 (~1 h, 2 cores)
    OMP_NUM_THREADS=2 python scripts/bench_search.py --preset thorough --budgets 0.25   # its own section (~30 min)
    python scripts/bench_search.py --budgets 0.4 --seeds 0 --limit 200 --out /tmp/B.md   # a quick look

At every budget and seed, on the toy backbone, with the ``search`` command's defaults (or a preset's settings):

(a) the gradient phase's own plan (the policy's most probable plan with its learned knobs; no selection);
(b) corner enumeration alone: the space's single-site corners through the same two-stage selection;
(c) random search: plans drawn from the space (the untrained policy: uniform per factor, every plan under
    budget), screened and finalised like (b), with as many reduced forwards of one question as (d) used;
(d) the default search (gradient phase + selection: what ``diffopsearch search`` writes);
(e) the best baseline at the budget; (f) the unreduced model.

Accuracy is teacher-forced on the whole test split (``search.loop.plan_scores``: a question counts when
every answer token and the eos are the argmax, i.e. exactly when greedy decoding answers it; checked
against ``diffopsearch eval``'s generated answers on the unreduced model, reported below the table).
Work is checkpointed under ``--work``: a rerun skips what is done.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- search:begin -->", "<!-- search:end -->"
BASELINES = ("fastv", "tome", "pool", "prumerge", "visionzip", "random")
TRACK_EVERY, TRACK_QUESTIONS = 5, 128


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", default="0.6,0.4,0.25")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, default=None, help="test questions (default: the whole split)")
    p.add_argument("--work", default=None, help="where pieces are kept (default runs/bench_search, "
                   "runs/bench_search_PRESET with --preset: pieces are keyed by budget and seed, not settings)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--figure", default=str(ROOT / "docs" / "search_curve.png"))
    p.add_argument("--preset", default=None, help="a shipped search preset (conf/search/NAME.yaml, e.g. thorough) "
                   "instead of the defaults: its own section of --out, no figure")
    p.add_argument("--search", action="append", default=[], metavar="KEY=VALUE", help="search.* overrides")
    p.add_argument("--note", default="", help="a sentence on how the run was made (e.g. pieces measured side by "
                                               "side), printed under the header")
    return p.parse_args(argv)


CACHE = {"hits": 0, "runs": 0}  # pieces read from --work / measured by this run


def cached(work: Path, key: str, fn):
    path = work / f"{key}.json"
    if path.exists():
        CACHE["hits"] += 1
        return json.loads(path.read_text())
    CACHE["runs"] += 1
    out = fn()
    from diffopsearch.io import atomic_write_json

    atomic_write_json(path, out)
    return out


def plan_key(plan) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([s.to_dict() for s in plan.sites], sort_keys=True).encode()).hexdigest()[:16]


def question_forwards(table: list[dict], screen: int, heldout: int) -> int:
    """Reduced forwards of one question that a selection table cost."""
    return sum((screen if r.get("screen_ce") is not None else 0) + (heldout if r.get("ce") is not None else 0)
               for r in table)


# The benchmark's procedure in the order it runs, (budget, seed) by (budget, seed); every measured piece is
# cached under --work, so a rerun resumes.
def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    a = parse_args(argv)
    import torch

    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.baselines import make_plan
    from diffopsearch.config import compose
    from diffopsearch.data.datasets import load_from_config, load_qa
    from diffopsearch.evaluate import mean_prompt_text_tokens, visual_token_count
    from diffopsearch.plan import FORMAT, Plan, backbone_info
    from diffopsearch.commands.search import settings_from
    from diffopsearch.search import hold_out, search_plan
    from diffopsearch.search.loop import first_site_feasibility, plan_scores, seed_for
    from diffopsearch.search.policy import ArchState
    from diffopsearch.search.select import select_plan
    from diffopsearch.search.space import Planner, corner_choices, describe, make_space

    t_all = time.time()
    budgets = [float(x) for x in a.budgets.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    work = Path(a.work or ROOT / "runs" / ("bench_search" + (f"_{a.preset}" if a.preset else "")))
    work.mkdir(parents=True, exist_ok=True)
    preset = [f"search={a.preset}"] if a.preset else []
    cfg0 = compose("search", preset + [f"search.{kv}" for kv in a.search])
    model, proc = load_backbone(cfg0.model)
    model.requires_grad_(False)
    test = load_from_config(cfg0.dataset, limit=a.limit)
    n_visual, grid = visual_token_count(model.config)
    n_text_test = mean_prompt_text_tokens(proc, test)
    backbone = backbone_info(model.config, name="toy")

    def test_score(plan):
        key = "test-" + (plan_key(plan) if plan is not None else "none") + f"-{len(test)}"
        return cached(work, key, lambda: plan_scores(model, proc, plan, test))

    def plan_of(sites):
        return Plan.from_dict({"format": FORMAT, "backbone": backbone, "sites": sites})

    rows, curves, steps_at = {}, {}, {}
    for budget in budgets:
        for seed in seeds:
            tag = f"b{budget}-s{seed}"
            cfg = compose("search", preset + [f"budget={budget}", f"seed={seed}"] + [f"search.{kv}" for kv in a.search])
            train = load_qa("toy", None, "train", None, None, None)
            # the selection's sizes per budget too: below 0.3 the default runs search=thorough's (config.for_budget)
            s = cfg.search
            screen, finalists, n_held = int(s.screen_questions), int(s.select_finalists), int(s.select_questions)
            train, held = hold_out(train, n_held, seed)
            space = make_space(model.config)
            settings = settings_from(cfg)
            steps_at[budget] = (settings.steps, settings.plans_per_step, settings.batch_size, s.preset)
            n_text = mean_prompt_text_tokens(proc, train)
            planner = Planner(space, backbone, budget, model.config.text_config, n_text)

            def run_search():
                track, track_s = [], [0.0]
                few = held.subset(range(TRACK_QUESTIONS), split="track") if seed == seeds[0] else None

                def on_step(rec, state):
                    if few is None or (rec["step"] + 1) % TRACK_EVERY:
                        return
                    t = time.time()
                    p = planner.plan(state.policy.decode(), state.knobs.floats)
                    track.append({"step": rec["step"] + 1, "ce": plan_scores(model, proc, p, few)["ce"],
                                  "plan": rec["mode"]})
                    track_s[0] += time.time() - t

                t0 = time.time()
                plan, res = search_plan(model, proc, train, space, settings, n_text, progress=False, heldout=held,
                                        select_samples=int(s.select_samples), select_corners=bool(s.select_corners),
                                        screen_questions=screen, finalists=finalists, on_step=on_step,
                                        margin=float(s.select_margin))
                total = time.time() - t0 - track_s[0]
                sel = plan.search["selection"]
                return {"default": [x.to_dict() for x in plan.sites], "gradient": plan.search["gradient_plan"]["sites"],
                        "gradient_choice": plan.search["gradient_plan"]["choice"], "chosen": sel["chosen_origin"],
                        "gradient_won": sel["gradient_plan_won"], "search_s": res.seconds - track_s[0],
                        "total_s": total, "loop_forwards": res.forwards * settings.batch_size,
                        "select_forwards": question_forwards(sel["candidates"], screen, len(held)), "track": track}

            srch = cached(work, f"search-{tag}", run_search)
            if srch["track"]:
                curves[budget] = srch["track"]

            def run_corners():
                t0 = time.time()
                cands = []
                from diffopsearch.regimes import regime_knobs
                from diffopsearch.search.space import OPS

                for c in corner_choices(space):
                    ex = regime_knobs(OPS[c.op].regime, OPS[c.op].score)
                    p = planner.plan(c, lambda slot, r, e=ex: {k: e[k] for k in ("merge", "sharpness", "locality",
                                                                                  "reweight")})
                    if p is not None:
                        cands.append((f"corner {describe(c, space)}", p))
                (origin, plan), _, table = select_plan(model, proc, cands, held, screen, finalists, margin=0.0)
                return {"plan": [x.to_dict() for x in plan.sites], "origin": origin, "s": time.time() - t0,
                        "forwards": question_forwards(table, screen, len(held))}

            corners = cached(work, f"corners-{tag}", run_corners)

            def run_random():
                t0 = time.time()
                budget_fwd = srch["loop_forwards"] + srch["select_forwards"]
                state = ArchState(space, first_site_feasibility(space, planner))
                gen = torch.Generator().manual_seed(seed_for(seed, 0, 41))
                cands, seen, spent = [], set(), finalists * len(held)  # the finalists' rescoring, reserved
                tries = 0
                while spent + screen <= budget_fwd and tries < 10000:
                    tries += 1
                    c = state.policy.sample(gen).choice
                    p = planner.plan(c, state.knobs.floats)
                    if p is None or plan_key(p) in seen:
                        continue
                    seen.add(plan_key(p))
                    cands.append((f"random {describe(c, space)}", p))
                    spent += screen
                # every candidate is screened (select_plan always finalises the first: put a screened one first)
                few = held.subset(range(screen), split="screen")
                sc = [plan_scores(model, proc, p, few)["ce"] for _, p in cands]
                order = sorted(range(len(cands)), key=lambda i: (sc[i], i))[:finalists]
                best = min(order, key=lambda i: (plan_scores(model, proc, cands[i][1], held)["ce"], i))
                return {"plan": [x.to_dict() for x in cands[best][1].sites], "origin": cands[best][0],
                        "candidates": len(cands), "s": time.time() - t0,
                        "forwards": len(cands) * screen + len(order) * len(held)}

            rand = cached(work, f"random-{tag}", run_random)
            r = rows.setdefault(budget, {k: [] for k in "abcd"})
            r["a"].append({**test_score(plan_of(srch["gradient"])), "s": srch["search_s"],
                           "fwd": srch["loop_forwards"], "plan": srch["gradient_choice"]})
            r["d"].append({**test_score(plan_of(srch["default"])), "s": srch["total_s"],
                           "fwd": srch["loop_forwards"] + srch["select_forwards"], "plan": srch["chosen"],
                           "won": srch["gradient_won"]})
            r["b"].append({**test_score(plan_of(corners["plan"])), "s": corners["s"], "fwd": corners["forwards"],
                           "plan": corners["origin"]})
            r["c"].append({**test_score(plan_of(rand["plan"])), "s": rand["s"], "fwd": rand["forwards"],
                           "plan": rand["origin"]})
            print(f"[bench_search] {tag}: a {r['a'][-1]['accuracy']:.4f} b {r['b'][-1]['accuracy']:.4f} "
                  f"c {r['c'][-1]['accuracy']:.4f} d {r['d'][-1]['accuracy']:.4f}", flush=True)

    base = {}
    for budget in budgets:
        best = None
        for name in BASELINES:
            try:
                p = make_plan(name, budget, model.config.text_config, n_visual, grid, n_text_test)
            except Exception:
                continue
            sc = test_score(p)
            if best is None or sc["accuracy"] > best[1]["accuracy"]:
                best = (name, sc)
        base[budget] = best
    none = test_score(None)
    check = cached(work, f"check-generate-{min(len(test), 500)}", lambda: _generate_check(model, proc, test, 500))
    doc = _document(a, argv, budgets, seeds, rows, base, none, check, len(test), time.time() - t_all,
                    settings_from(cfg0), steps_at)
    _write_section(Path(a.out), doc, a.preset)
    if curves and not a.preset:
        _figure(curves, Path(a.figure))
    print(doc)
    return 0


def _generate_check(model, proc, test, n):
    """The unreduced model's teacher-forced accuracy vs ``diffopsearch eval``'s generated answers."""
    from diffopsearch.evaluate import evaluate
    from diffopsearch.search.loop import plan_scores

    sub = test.subset(range(min(n, len(test))), split="first")
    gen = evaluate(model, proc, None, sub, batch_size=16, max_new_tokens=8, show=False, latency_batches=0)
    return {"n": len(sub), "generated": gen["accuracy"], "teacher_forced": plan_scores(model, proc, None, sub)["accuracy"]}


def _stat(xs):
    xs = [100 * x for x in xs]
    return f"{statistics.mean(xs):.2f} ± {statistics.pstdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def _document(a, argv, budgets, seeds, rows, base, none, check, n_test, total_s, settings, steps_at) -> str:
    shown = [x for i, x in enumerate(argv or []) if x != "--note" and (i == 0 or (argv or [])[i - 1] != "--note")]
    cmd = "OMP_NUM_THREADS=2 python scripts/bench_search.py " + " ".join(shlex.quote(x) for x in shown)
    se = 100 * math.sqrt(none["accuracy"] * (1 - none["accuracy"]) / n_test)
    begin, end = markers(a.preset)
    title = "## Does the gradient phase find the plan?" + (f" With `search={a.preset}`" if a.preset else "")
    what = f"Search settings (`search={a.preset}`)" if a.preset else "Search defaults"
    shapes = set(steps_at.values())  # (steps, plans per step, questions per step, preset) per budget
    if len(shapes) == 1:
        (n, k, q, _), = shapes
        steps = f"{n} steps of {k} plans on {q} questions"
    else:
        steps = ", ".join(f"{n} steps of {k} plans on {q} questions at budget {b:g}"
                          + (f" (`search={p}`, what the default runs below budget 0.3)" if p != "default" else "")
                          for b, (n, k, q, p) in steps_at.items())
        steps += "; below 0.6 the steps scale (`search.scale_steps`)"
    out = [begin, "", title, "",
           f"Made by `{cmd.strip()}` on this machine (2 CPU cores): this run took {total_s / 60:.0f} min, measured "
           f"{CACHE['runs']} pieces and read {CACHE['hits']} from `--work` (measured there by earlier runs of the same "
           f"procedure). {a.note + ' ' if a.note else ''}The toy backbone, "
           f"the whole test split ({n_test} questions), budgets {', '.join(f'{b:g}' for b in budgets)}, search seeds "
           f"{', '.join(map(str, seeds))}; mean ± spread (population std) over seeds. {what}: "
           f"{steps}, loss `{settings.loss}`. One standard error of an accuracy here is about {se:.2f} points. "
           "\"question-forwards\": reduced forwards of one question each method spent choosing its plan; "
           "\"s\": its wall time (loading and the test-split evaluation excluded).", ""]
    for budget in budgets:
        r, (bname, bsc) = rows[budget], base[budget]
        out += [f"### Budget {budget:g}", "", "| | method | test accuracy (%) | seconds | question-forwards | plans (per seed) |",
                "|---|---|---|---|---|---|"]
        names = {"a": "gradient phase's own plan (no selection)", "b": "corner enumeration + selection",
                 "c": "random search + selection",
                 "d": f"{'the' if a.preset else 'default'} search (gradient phase + selection)"}
        for k in "abcd":
            xs = r[k]
            out.append(f"| ({k}) | {names[k]} | {_stat([x['accuracy'] for x in xs])} | "
                       f"{statistics.mean(x['s'] for x in xs):.0f} | {statistics.mean(x['fwd'] for x in xs):.0f} | "
                       + "; ".join(str(x["plan"]) for x in xs) + " |")
        out.append(f"| (e) | best baseline: {bname} | {100 * bsc['accuracy']:.2f} | | | |")
        out.append(f"| (f) | unreduced | {100 * none['accuracy']:.2f} | | | |")
        a_acc, d_acc = [x["accuracy"] for x in r["a"]], [x["accuracy"] for x in r["d"]]
        won = sum(bool(x.get("won")) for x in r["d"])
        out += ["", f"(a) >= (e) in {sum(x >= bsc['accuracy'] for x in a_acc)} of {len(a_acc)} seeds; "
                f"(d) - (e) = {100 * (statistics.mean(d_acc) - bsc['accuracy']):+.2f} points; "
                f"(d) - (b) = {100 * (statistics.mean(d_acc) - statistics.mean(x['accuracy'] for x in r['b'])):+.2f}; "
                f"(d) - (c) = {100 * (statistics.mean(d_acc) - statistics.mean(x['accuracy'] for x in r['c'])):+.2f}; "
                f"(d) - (f) = {100 * (statistics.mean(d_acc) - none['accuracy']):+.2f}. "
                f"The gradient phase's own plan won the selection in {won} of {len(d_acc)} seeds.", ""]
    out += [f"Teacher-forced vs generated accuracy of the unreduced model on the first {check['n']} test questions: "
            f"{100 * check['teacher_forced']:.2f}% vs {100 * check['generated']:.2f}% (`diffopsearch eval`).", ""]
    if not a.preset:
        out += ["![held-out CE of the gradient phase's plan over the steps](docs/search_curve.png)", ""]
    out.append(end)
    return "\n".join(out) + "\n"


def markers(preset: str | None) -> tuple[str, str]:
    """The section's markers in BENCHMARKS.md: one section for the defaults, one per preset."""
    return (BEGIN, END) if not preset else (f"<!-- search-{preset}:begin -->", f"<!-- search-{preset}:end -->")


def _write_section(path: Path, section: str, preset: str | None = None) -> None:
    from diffopsearch.io import replace_block

    replace_block(path, *markers(preset), section)


def _figure(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for budget, track in sorted(curves.items()):
        ax.plot([t["step"] for t in track], [t["ce"] for t in track], marker="o", label=f"budget {budget:g}")
    ax.set_xlabel("search step")
    ax.set_ylabel(f"held-out answer CE ({TRACK_QUESTIONS} questions)")
    ax.set_title("the gradient phase's current plan (policy mode, learned knobs)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
