"""`diffopsearch show ckpt=PATH`: a plan card.

What the plan does in words (each site: the layer, how many visual tokens it keeps, the named
regime it matches - fastv, random, prune, tome, pool, prumerge, visionzip, merge, reweight - or
"hybrid" with its knobs), a per-layer bar chart of the visual tokens entering each decoder layer,
its cost in both conventions of docs/DESIGN.md section 4 (FLOPs ratio; LLM-input tokens and the
layer-averaged equivalent), and where it was evaluated: the ``results.json`` beside the plan, when
there is one (accuracy, data set and split, per-type accuracy, measured latency).

``ckpt`` is found exactly as ``diffopsearch eval`` finds it (a plan.json, or a run directory holding
one), with the same messages for a bad path. Reads files only: no model, no torch.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .errors import UserError
from .regimes import METHODS

BAR_WIDTH = 40
# A searched site whose learned knobs stay this close to a named regime's is named after it (the search
# starts its knobs at the regimes' values, "large" = 50, and moves them a little).
NEAR, LARGE = 0.05, 20.0


# ---------------------------------------------------------------------------------- regimes

def _named_sites() -> dict:
    """Named method -> a site of it at layer 0 / keep 0 (only the knobs are compared)."""
    from .plan import Site
    from .regimes import METHODS

    return {name: Site(layer=0, keep=0, **m.site) for name, m in METHODS.items() if m.site is not None}


def regime(site, n_in: int) -> str:
    """The named regime ``site`` (reached by ``n_in`` visual tokens) is a point of, or ``hybrid``."""
    knobs = dataclasses.replace(site, layer=0, keep=0)
    if site.keep >= n_in:  # nothing removed: only the reweighting bias can act
        return "reweight" if site.reweight > 0 and site.merge == 0 else "no-op"
    for name, named in _named_sites().items():
        if knobs == named:
            return name
    if site.anchors == "topk" and site.merge <= NEAR and site.reweight <= NEAR:
        return "prune"  # FastV's operator with another score (norm / cls); a learned merge of a few % included
    if (site.anchors == "topk" and site.merge >= 1 - NEAR and site.sharpness >= LARGE and site.locality <= NEAR
            and site.reweight >= 1 - NEAR):
        return "merge"  # the PruMerge-like merge: every dropped token into its most similar anchor
    if (site.anchors == "grid" and site.merge >= 1 - NEAR and site.sharpness <= NEAR and site.locality >= LARGE
            and site.reweight <= NEAR):
        return "pool"
    return "hybrid"


def _num(x) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.3g}"
    return str(x)


def knobs(site) -> str:
    return (f"score={site.score} anchors={site.anchors} merge={_num(site.merge)} sharpness={_num(site.sharpness)} "
            f"locality={_num(site.locality)} reweight={_num(site.reweight)}")


_WHAT = {
    **{name: m.what for name, m in METHODS.items() if m.site is not None},
    "prune": "prunes by the {score} score",
    "merge": "keeps the top {score} tokens and merges each dropped one into its most similar",
    "reweight": "keeps every token and reweights attention by token size (soft mask)",
    "no-op": "does nothing",
    "hybrid": "between the named regimes",
}


def describe_site(site, n_in: int) -> str:
    """One sentence: 'before layer 2: keeps 72 of 144 visual tokens (50%), fastv: prunes by ...'."""
    name = regime(site, n_in)
    what = _WHAT[name].format(score=site.score)
    text = f"before layer {site.layer}: keeps {site.keep} of {n_in} visual tokens ({100 * site.keep / n_in:.0f}%), " \
           f"{name}: {what}"
    if name in ("hybrid", "prune", "merge", "no-op"):
        text += f" ({knobs(site)})"
    return text


def describe(plan) -> list[str]:
    """The plan in words, one line per site; consecutive layers with the same operator (ToMe's
    constant r) share a line."""
    runs: list[dict] = []
    n = plan.visual_tokens
    for site in plan.sites:
        name, same = regime(site, n), dataclasses.replace(site, layer=0, keep=0)
        last = runs[-1] if runs else None
        if last and last["name"] == name and last["knobs"] == same and last["sites"][-1].layer == site.layer - 1:
            last["sites"].append(site)
        else:
            runs.append({"name": name, "knobs": same, "sites": [site], "n_in": n})
        n = site.keep
    lines = []
    for run in runs:
        sites, n_in = run["sites"], run["n_in"]
        if len(sites) == 1:
            lines.append(describe_site(sites[0], n_in))
            continue
        first, last = sites[0], sites[-1]
        text = (f"before layers {first.layer}-{last.layer} ({len(sites)} sites): {n_in} -> {last.keep} visual "
                f"tokens ({100 * last.keep / n_in:.0f}%), {run['name']}: {_WHAT[run['name']].format(score=first.score)}")
        if run["name"] in ("hybrid", "prune", "merge", "no-op"):
            text += f" ({knobs(first)})"
        lines.append(text)
    return lines


# ---------------------------------------------------------------------------------- the card

def find_results(plan_file: Path, plan) -> tuple[dict | None, str | None]:
    """(results.json beside the plan, a note): None when absent; a note when it is unreadable or was
    made with another plan."""
    path = plan_file.parent / "results.json"
    if not path.is_file():
        return None, None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return None, f"{path} is not readable JSON ({e}); the plan has no recorded evaluation"
    if not isinstance(results, dict) or "accuracy" not in results:
        return None, f"{path} is not a diffopsearch results file"
    recorded = (results.get("plan") or {}).get("sites")
    if recorded is not None and recorded != [s.to_dict() for s in plan.sites]:
        return None, f"{path} was written for another plan than {plan_file.name}; not shown"
    return results, None


# Long because it is the card's layout, top to bottom; every line's content comes from the functions above.
def card(plan, plan_file: Path, results: dict | None = None, note: str | None = None, console=None) -> None:
    """Print the plan card (rich)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    b = plan.backbone
    n0 = plan.visual_tokens
    per_layer = plan.visual_tokens_per_layer()
    avg = sum(per_layer) / len(per_layer)
    title = f"plan {plan_file}"
    console.print(Text(title, style="bold"))
    budget = "none" if plan.budget is None else f"{plan.budget:g}"
    console.print(f"method {plan.method}, budget {budget}; backbone {b.get('name') or '(unnamed)'}: "
                  f"{b['num_layers']} decoder layers, {n0} visual tokens on a {b['grid'][0]} x {b['grid'][1]} grid")
    if plan.search:
        s = {**plan.search, **{k: v for k, v in (plan.run or {}).items() if k == "seconds"}}
        bits = [f"{k} {s[k]:.4g}" if isinstance(s.get(k), float) else f"{k} {s[k]}"
                for k in ("steps", "final_loss", "seconds", "seed") if s.get(k) is not None]
        preset = ((s.get("config") or {}).get("search") or {}).get("preset")
        if preset:  # below budget 0.3 the default preset runs as thorough (config.for_budget)
            bits.insert(0, f"preset {preset}")
        sel = s.get("selection")
        if sel:
            chosen = sel["candidates"][sel["chosen"]]["origin"]
            screen = f" (screened on {sel['screen_questions']} first)" if sel.get("screen_questions") else ""
            bits.append(f"chosen ({chosen}) among {len(sel['candidates'])} candidate plans on {sel['questions']} "
                        f"held-out search questions{screen}")
        console.print("searched: " + ", ".join(bits))
        grad = s.get("gradient_plan")
        if sel and grad:
            if sel.get("gradient_plan_won"):
                console.print(f"The gradient phase's own plan ({grad['choice']}) won the selection: this plan is it.")
            else:
                console.print(f"Selection replaced the gradient phase's own plan ({grad['choice']}, held-out CE "
                              f"{_num(sel['candidates'][0].get('ce'))}) by {chosen} (held-out CE "
                              f"{_num(sel['candidates'][sel['chosen']].get('ce'))}).")
        elif grad:
            console.print(f"This is the gradient phase's own plan ({grad['choice']}); no selection ran.")

    # -- in words
    console.print()
    if not plan.sites:
        console.print("No reduction sites: every decoder layer sees all visual tokens (the unreduced model).")
    for line in describe(plan):
        console.print(f"- {line}")

    # -- per-layer picture
    sites = {s.layer: s for s in plan.sites}
    t = Table(title="visual tokens entering each decoder layer", show_edge=False, pad_edge=False)
    t.add_column("layer", justify="right")
    t.add_column("tokens", justify="right")
    t.add_column("", no_wrap=True)
    t.add_column("site", no_wrap=True)
    prev = n0
    for layer, k in enumerate(per_layer):
        width = max(1 if k else 0, round(BAR_WIDTH * k / n0))
        bar = Text("█" * width, style="green" if k == n0 else "yellow")
        site = sites.get(layer)
        t.add_row(str(layer), str(k), bar, f"◀ {regime(site, prev)} {prev}→{site.keep}" if site else "")
        prev = k
    console.print(t)

    # -- cost
    cost = plan.cost or {}
    ratio = cost.get("flops_ratio")
    text_tokens = cost.get("n_text")
    ratio_s = f"{ratio:.3f}" if isinstance(ratio, (int, float)) else "not recorded in the plan"
    at = f" at {text_tokens:.1f} text tokens" if isinstance(text_tokens, (int, float)) and text_tokens else ""
    console.print(f"cost: FLOPs ratio {ratio_s}{at} (prefill, relative to the unreduced model); visual tokens: "
                  f"{per_layer[0]} entering the LLM, {avg:.1f} layer-averaged equivalent, of {n0}")
    if cost.get("metric") == "latency" and isinstance(cost.get("latency_ratio_predicted"), (int, float)):
        lm = cost.get("latency_model") or {}
        console.print(f"sized by measured time (cost=latency): predicted latency ratio "
                      f"{cost['latency_ratio_predicted']:.3f} on {lm.get('device', '?')}, batch "
                      f"{lm.get('batch_size', '?')}, {lm.get('dtype', '?')}")

    # -- evaluation
    if note:
        console.print(f"evaluated: {note}")
    if results is None:
        if not note:
            console.print(f"evaluated: no results.json beside {plan_file.name} "
                          f"(run `diffopsearch eval ckpt={plan_file}`)")
        return
    r = results
    vt = r.get("visual_tokens") or {}
    lat = r.get("latency") or {}
    ms = lat.get("prefill_ms_per_sample")
    console.print(f"evaluated: accuracy {100 * r['accuracy']:.2f}% ({r.get('metric', '?')}) on {r.get('n', '?')} of "
                  f"{r.get('n_questions', '?')} questions of {r.get('dataset', '?')}/{r.get('split', '?')}, "
                  f"model {r.get('model', '?')}")
    measured = f"measured there: FLOPs ratio {r['flops_ratio']:.3f}" if isinstance(r.get("flops_ratio"), (int, float)) \
        else "measured there:"
    if vt.get("avg") is not None:
        measured += f", {vt['avg']:.1f} layer-averaged visual tokens"
    if ms is not None:
        measured += f", prefill {ms:.2f} ms / sample (batch {lat.get('batch_size')}, {lat.get('device')})"
    if isinstance(lat.get("ratio_measured"), (int, float)):
        pred = lat.get("ratio_predicted")
        measured += f", latency ratio {lat['ratio_measured']:.3f}" + (
            f" (predicted {pred:.3f})" if isinstance(pred, (int, float)) else "")
    console.print(measured)
    if r.get("per_type"):
        console.print("per type: " + ", ".join(f"{k} {100 * v['accuracy']:.1f}% (n={v['n']})"
                                               for k, v in r["per_type"].items()))


def show(ckpt, console=None) -> dict:
    """Find, load and print the plan at ``ckpt``; returns what was shown."""
    from .evaluate import find_plan_file
    from .plan import load_plan

    if not ckpt:
        raise UserError("show needs a plan: diffopsearch show ckpt=<a plan.json, or a search run directory "
                        "that holds one>.")
    plan_file = find_plan_file(str(ckpt))
    plan = load_plan(str(plan_file))
    results, note = find_results(plan_file, plan)
    card(plan, plan_file, results, note, console=console)
    n = plan.visual_tokens
    regimes = []
    for s in plan.sites:
        regimes.append(regime(s, n))
        n = s.keep
    return {"plan": str(plan_file), "regimes": regimes, "visual_tokens_per_layer": plan.visual_tokens_per_layer(),
            "results": None if results is None else str(plan_file.parent / "results.json")}
