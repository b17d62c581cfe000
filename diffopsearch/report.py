"""`diffopsearch report dir=DIR`: every results.json below DIR as one table and one Pareto plot.

What it reads (``collect``):

- every ``results.json`` below DIR (hidden folders such as ``.hydra`` skipped): an eval run, a search
  run (``method: "search"``), or a search run with ``search.eval_baselines=true``, whose file also holds
  a ``baselines`` list of summary rows (method, accuracy, n, flops_ratio, avg_visual_tokens,
  prefill_ms_*). A summary row is used only where no full results.json of the same method, budget and
  setting lies below that run (the search writes those to ``baselines/NAME/results.json``), so nothing is
  counted twice. A file may also be a list of result dicts, or a dict with a ``results`` list.
- every ``error.json`` (what ``cli.py`` leaves in a failed sweep job; ``failed.json`` too): listed as
  failed jobs with their overrides and message.

What it writes (into ``report.out``, default DIR), each atomically:

- ``report.md``: one row per (method, budget, run): accuracy, per-type accuracy, FLOPs ratio, latency
  ratio, prefill ms per sample, throughput, visual tokens (LLM input / layer average, docs/DESIGN.md section 4,
  and per layer), then the searched plans' sites, the failed jobs and the files that were skipped.
- ``pareto.png``: accuracy against FLOPs ratio (one line per method, searched plans highlighted) and
  accuracy against measured latency.

Latency ratio: a row's median prefill ms per sample divided by that of an unreduced run (method
``none``) of the same model, data, split, device and batch size found in the same collection (the
nearest one in the folder tree when there are several); blank when there is none. Latencies of runs
made on different machines or at different times are not comparable, which is why the reference must
come from the same collection.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import UserError
from .regimes import METHODS

RESULTS_NAME = "results.json"
FAILURE_NAMES = ("error.json", "failed.json")
REPORT_NAME = "report.md"
PLOT_NAME = "pareto.png"
# Table order: the unreduced model, the baselines as regimes.METHODS lists them, then the rest, then search.
METHOD_ORDER = tuple(METHODS)
SEARCHED = "search"
MAX_TYPE_COLUMNS = 8


@dataclass
class Row:
    """One evaluated plan, flattened from a results.json (or one summary row of a multi-method file)."""

    method: str
    budget: float | None
    accuracy: float
    source: str                       # the file (relative to the report dir), "#baselines[i]" for summary rows
    n: int | None = None
    per_type: dict = field(default_factory=dict)  # type -> accuracy (0..1)
    flops_ratio: float | None = None
    prefill_ms: float | None = None   # median prefill ms per sample
    prefill_ms_batch: float | None = None
    batch_size: int | None = None
    device: str | None = None
    throughput: float | None = None   # generated samples per second
    llm_input: int | None = None      # visual tokens entering the LLM
    avg_tokens: float | None = None   # layer-averaged visual tokens (the FLOPs-equivalent count)
    per_layer: list | None = None     # visual tokens entering each decoder layer
    peak_memory_mb: float | None = None
    setting: str = ""                 # model | dataset/split: rows of different settings are not compared
    searched: bool = False
    sites: list = field(default_factory=list)
    summary: bool = False             # from a multi-method file's summary list (fewer fields)
    latency_ratio: float | None = None
    latency_predicted: float | None = None  # cost=latency plans: the latency model's prediction
    reference: str | None = None      # source of the unreduced run the latency ratio divides by

    @property
    def unreduced(self) -> bool:
        return self.method == "none"

    @property
    def run_dir(self) -> str:
        return os.path.dirname(self.source.split("#", 1)[0])


# --------------------------------------------------------------------------- reading


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(x) -> int | None:
    v = _num(x)
    return None if v is None else int(v)


def _setting(r: dict) -> str:
    model = r.get("model") or "?"
    data = r.get("dataset") or "?"
    split = r.get("split")
    return f"{model} | {data}/{split}" if split else f"{model} | {data}"


def _method(r: dict) -> str:
    plan = r.get("plan")
    m = r.get("method") or (plan.get("method") if isinstance(plan, dict) else None)
    if m:
        return str(m)
    # evaluate(plan=None) writes "plan": null for the unreduced model; a plan without sites is one too
    if "plan" in r and (plan is None or (isinstance(plan, dict) and not plan.get("sites"))):
        return "none"
    return "custom"


def row_from_result(r: dict, source: str) -> Row:
    """A full results.json (evaluate's schema) as a Row. KeyError/TypeError/ValueError on a file that
    is not one."""
    acc = _num(r["accuracy"])
    if acc is None:
        raise ValueError("accuracy is not a number")
    plan = r.get("plan") if isinstance(r.get("plan"), dict) else None
    method = _method(r)
    # the plan's own budget first: `eval ckpt=plan.json` records the eval command's budget (1.0 by default)
    budget = _num(plan.get("budget")) if plan is not None else None
    if budget is None:
        budget = _num(r.get("budget"))
    if method == "none":
        budget = 1.0
    lat = r.get("latency") if isinstance(r.get("latency"), dict) else {}
    vt = r.get("visual_tokens") if isinstance(r.get("visual_tokens"), dict) else {}
    thr = r.get("throughput") if isinstance(r.get("throughput"), dict) else {}
    per_type = {}
    for k, v in (r.get("per_type") or {}).items():
        a = _num(v.get("accuracy") if isinstance(v, dict) else v)
        if a is not None:
            per_type[str(k)] = a
    searched = method == SEARCHED or bool(plan and plan.get("search")) or isinstance(r.get("search"), dict)
    return Row(method=method, budget=budget, accuracy=acc, source=source, n=_int(r.get("n")), per_type=per_type,
               flops_ratio=_num(r.get("flops_ratio")), prefill_ms=_num(lat.get("prefill_ms_per_sample")),
               prefill_ms_batch=_num(lat.get("prefill_ms_per_batch")), batch_size=_int(lat.get("batch_size")),
               device=lat.get("device"), throughput=_num(thr.get("samples_per_s")),
               llm_input=_int(vt.get("llm_input")), avg_tokens=_num(vt.get("avg")),
               per_layer=list(vt["per_layer"]) if isinstance(vt.get("per_layer"), list) else None,
               peak_memory_mb=_num(r.get("peak_memory_mb")), setting=_setting(r), searched=searched,
               sites=list(plan.get("sites") or []) if plan else [],
               latency_predicted=_num(lat.get("ratio_predicted")))


def rows_from_summary(parent: dict, parent_row: Row, source: str) -> list[Row]:
    """The ``baselines`` summary rows of a search results.json (the search row itself excluded)."""
    out = []
    for i, b in enumerate(parent.get("baselines") or []):
        if not isinstance(b, dict) or _num(b.get("accuracy")) is None:
            continue
        method = str(b.get("method") or "custom")
        if method == parent_row.method:
            continue  # the file's own row, already read in full
        out.append(Row(method=method, budget=1.0 if method == "none" else parent_row.budget,
                       accuracy=_num(b["accuracy"]), source=f"{source}#baselines[{i}]", n=_int(b.get("n")),
                       flops_ratio=_num(b.get("flops_ratio")), prefill_ms=_num(b.get("prefill_ms_per_sample")),
                       prefill_ms_batch=_num(b.get("prefill_ms_per_batch")), batch_size=parent_row.batch_size,
                       device=parent_row.device, avg_tokens=_num(b.get("avg_visual_tokens")),
                       setting=parent_row.setting, searched=method == SEARCHED, summary=True))
    return out


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name == RESULTS_NAME or name in FAILURE_NAMES:
                yield Path(dirpath) / name


def _same(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-9)


def collect(root: str | os.PathLike) -> tuple[list[Row], list[dict], list[dict]]:
    """(rows, failed jobs, skipped files) below ``root``. Raises UserError when ``root`` is not a
    directory; an empty collection is the caller's business."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"report dir={str(root)!r} does not exist: give a run, outputs/ or multirun/ directory; "
                        "every results.json below it is collected.")
    if not root.is_dir():
        raise UserError(f"report dir={str(root)!r} is not a directory: give a run, outputs/ or multirun/ "
                        "directory; every results.json below it is collected.")
    full: list[Row] = []
    summaries: list[Row] = []
    failed: list[dict] = []
    skipped: list[dict] = []
    for path in _walk(root):
        rel = path.relative_to(root).as_posix()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            skipped.append({"file": rel, "reason": f"unreadable: {e}"})
            continue
        if path.name in FAILURE_NAMES:
            data = data if isinstance(data, dict) else {"error": str(data)}
            failed.append({"dir": os.path.dirname(rel) or ".", "overrides": list(data.get("overrides") or []),
                           "error": str(data.get("error") or data.get("message") or "?"),
                           "type": data.get("type"), "user_error": data.get("user_error")})
            continue
        items = data if isinstance(data, list) else (data.get("results") if isinstance(data, dict)
                                                     and isinstance(data.get("results"), list) else [data])
        for j, item in enumerate(items):
            src = rel if len(items) == 1 and item is data else f"{rel}#results[{j}]"
            try:
                if not isinstance(item, dict):
                    raise TypeError("not a JSON object")
                row = row_from_result(item, src)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                skipped.append({"file": src, "reason": f"not a results file ({type(e).__name__}: {e})"})
                continue
            full.append(row)
            summaries += rows_from_summary(item, row, src)
    # A summary row only where no full result of it lies below the same run.
    for s in summaries:
        base = s.run_dir
        dup = any(f.method == s.method and _same(f.budget, s.budget) and f.setting == s.setting
                  and (base == "" or f.run_dir == base or f.run_dir.startswith(base + "/")) for f in full)
        if not dup:
            full.append(s)
    return sort_rows(full), failed, skipped


def sort_rows(rows: list[Row]) -> list[Row]:
    def key(r: Row):
        if r.method in METHOD_ORDER:
            m = (METHOD_ORDER.index(r.method), "")
        elif r.searched:
            m = (len(METHOD_ORDER) + 1, r.method)
        else:
            m = (len(METHOD_ORDER), r.method)
        return (r.setting, m, -(r.budget if r.budget is not None else 1.0), r.source)

    return sorted(rows, key=key)


def _common_prefix(a: str, b: str) -> int:
    pa, pb = a.split("/"), b.split("/")
    n = 0
    while n < min(len(pa), len(pb)) and pa[n] == pb[n]:
        n += 1
    return n


def attach_latency_ratios(rows: list[Row]) -> None:
    """Fill ``latency_ratio`` / ``reference`` from the nearest unreduced run of the same setting,
    device and batch size (see the module docstring)."""
    refs = [r for r in rows if r.unreduced and r.prefill_ms]
    for r in rows:
        if r.prefill_ms is None:
            continue
        same = [u for u in refs if u.setting == r.setting and u.device == r.device and u.batch_size == r.batch_size]
        if not same:
            continue
        ref = max(same, key=lambda u: (u is r, _common_prefix(u.run_dir, r.run_dir), not u.summary))
        r.latency_ratio = r.prefill_ms / ref.prefill_ms
        r.reference = ref.source


# --------------------------------------------------------------------------- formatting


def _f(x, spec: str, scale: float = 1.0) -> str:
    return "" if x is None else format(x * scale if scale != 1.0 else x, spec)


def compact_layers(per_layer: list | None) -> str:
    """[144, 144, 72, 72, 72] -> '144x2 72x3'."""
    if not per_layer:
        return ""
    out, prev, count = [], per_layer[0], 0
    for v in per_layer + [object()]:
        if v == prev:
            count += 1
            continue
        out.append(f"{prev}x{count}" if count > 1 else f"{prev}")
        prev, count = v, 1
    return " ".join(out)


def type_names(rows: list[Row]) -> list[str]:
    return sorted({t for r in rows for t in r.per_type})


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the report table (shared by report.md and the rich table)."""
    types = type_names(rows)
    wide = len(types) <= MAX_TYPE_COLUMNS
    settings = sorted({r.setting for r in rows})
    header = (["setting"] if len(settings) > 1 else []) + ["method", "budget", "accuracy %", "n"]
    header += [f"{t} %" for t in types] if wide else ["per type %"]
    header += ["FLOPs ratio", "latency ratio", "prefill ms/sample", "throughput /s",
               "visual tokens (LLM in / avg)", "visual tokens per layer", "run"]
    cells = []
    for r in rows:
        name = f"**{r.method}**" if r.searched else r.method
        line = ([r.setting] if len(settings) > 1 else []) + [
            name, "-" if r.unreduced else _f(r.budget, "g"), _f(r.accuracy, ".2f", 100), _f(r.n, "d")]
        if wide:
            line += [_f(r.per_type.get(t), ".1f", 100) for t in types]
        else:
            line.append(" ".join(f"{t}={100 * a:.1f}" for t, a in sorted(r.per_type.items())))
        tokens = "" if r.avg_tokens is None else (
            f"{r.llm_input} / {r.avg_tokens:.1f}" if r.llm_input is not None else f"- / {r.avg_tokens:.1f}")
        lat = _f(r.latency_ratio, ".3f") + (f" (pred. {r.latency_predicted:.3f})"
                                            if r.latency_predicted is not None else "")
        line += [_f(r.flops_ratio, ".3f"), lat, _f(r.prefill_ms, ".2f"),
                 _f(r.throughput, ".1f"), tokens, compact_layers(r.per_layer), r.source.rsplit("/", 1)[0]
                 if "/" in r.source else "."]
        cells.append(line)
    return header, cells


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def markdown(rows: list[Row], failed: list[dict], skipped: list[dict], root: str) -> str:
    header, cells = table(rows)
    lines = [f"# diffopsearch report: {root}", "",
             f"{len(rows)} result(s) from {len({r.source.split('#')[0] for r in rows})} results.json file(s)"
             + (f"; {len(failed)} failed job(s)" if failed else "") + ". Searched plans in **bold**.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in line) + " |" for line in cells]
    lines += ["",
              "- accuracy: the data set's metric on the evaluated questions (n); per-type columns: GQA structural "
              "type, VQAv2 answer type, or the toy world's question family.",
              "- FLOPs ratio: analytic LLM prefill FLOPs relative to the unreduced model on the same prompts, "
              "the operator's own overhead included (docs/DESIGN.md section 4).",
              "- latency ratio: median measured prefill time per sample (vision tower, reduction and decoder) "
              "divided by that of the unreduced run (`none`) of the same model, data, device and batch size in this "
              "collection; blank where there is none. `(pred. x)`: a plan sized with `cost=latency`, the ratio its "
              "latency model predicted.",
              "- visual tokens: entering the LLM / averaged over decoder layers (the FLOPs-equivalent count some "
              "papers report); per layer as `count x layers`.", ""]
    searched = [r for r in rows if r.searched and r.sites]
    if searched:
        lines += ["## Searched plans", ""]
        for r in searched:
            lines += [f"`{r.source}` (budget {_f(r.budget, 'g')}, FLOPs ratio {_f(r.flops_ratio, '.3f')}):", "",
                      "| layer | keep | score | anchors | merge | sharpness | locality | reweight |",
                      "|---|---|---|---|---|---|---|---|"]
            for s in r.sites:
                lines.append("| " + " | ".join(str(s.get(k, "")) for k in (
                    "layer", "keep", "score", "anchors", "merge", "sharpness", "locality", "reweight")) + " |")
            lines.append("")
    if failed:
        lines += ["## Failed jobs", ""]
        for f in failed:
            kind = "bad input" if f.get("user_error") else (f.get("type") or "error")
            lines.append(f"- `{f['dir']}` ({' '.join(f['overrides']) or 'no overrides'}): {kind}: "
                         f"{_md_escape(f['error'])}")
        lines.append("")
    if skipped:
        lines += ["## Skipped files", ""]
        lines += [f"- `{s['file']}`: {_md_escape(s['reason'])}" for s in skipped]
        lines.append("")
    return "\n".join(lines)


def print_table(rows: list[Row], failed: list[dict], title: str, console=None) -> None:
    """The headline columns as a rich table (report.md has them all); per-type columns only when the
    terminal is wide enough for them."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    types = type_names(rows)
    multi = len({r.setting for r in rows}) > 1
    show_types = bool(types) and console.width >= 80 + sum(max(6, len(x) + 4) for x in types)
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False,
              caption="FLOPs: prefill FLOPs ratio; latency: measured prefill latency ratio (vs none); ms: prefill "
                      "ms per sample; samp/s: throughput; tokens: visual tokens entering the LLM / layer average. "
                      "Searched plans in bold; every column in report.md.")
    cols = (["setting"] if multi else []) + ["method", "budget", "acc %", "n"] + \
        ([f"{x} %" for x in types] if show_types else []) + ["FLOPs", "latency", "ms", "samp/s", "tokens"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("setting", "method") else "right",
                     no_wrap=c in ("method", "budget"), overflow="fold")
    for r in rows:
        line = ([r.setting] if multi else []) + [
            r.method, "-" if r.unreduced else _f(r.budget, "g"), _f(r.accuracy, ".2f", 100), _f(r.n, "d")]
        if show_types:
            line += [_f(r.per_type.get(x), ".1f", 100) for x in types]
        line += [_f(r.flops_ratio, ".3f"), _f(r.latency_ratio, ".3f"), _f(r.prefill_ms, ".2f"),
                 _f(r.throughput, ".1f"),
                 "" if r.avg_tokens is None else f"{'-' if r.llm_input is None else r.llm_input}/{r.avg_tokens:.0f}"]
        t.add_row(*line, style="bold" if r.searched else None)
    console.print(t)
    for f in failed:
        console.print(f"[red]failed job[/red] {f['dir']} ({' '.join(f['overrides']) or 'no overrides'}): {f['error']}",
                      markup=True, highlight=False)


# --------------------------------------------------------------------------- plotting


def _labels(rows: list[Row]) -> dict[tuple, list[Row]]:
    multi = len({r.setting for r in rows}) > 1
    lines: dict[tuple, list[Row]] = {}
    for r in rows:
        lines.setdefault((r.method, r.setting if multi else "", r.searched), []).append(r)
    return lines


def plot(rows: list[Row], path: str | os.PathLike) -> Path:
    """pareto.png: accuracy vs FLOPs ratio, and accuracy vs measured latency (ratio to the unreduced run
    where every row has one, else ms per sample). Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_write

    fig = Figure(figsize=(13, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_f, ax_l = fig.subplots(1, 2, sharey=True)
    timed = [r for r in rows if r.prefill_ms is not None]
    use_ratio = bool(timed) and all(r.latency_ratio is not None for r in timed)
    lat_of = (lambda r: r.latency_ratio) if use_ratio else (lambda r: r.prefill_ms)
    cmap = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
            "tab:cyan", "tab:gray")
    colour_i = 0
    order = lambda kv: (kv[0][2], kv[0][0] != "none", kv[0][0], kv[0][1])  # noqa: E731
    for (method, setting, searched), group in sorted(_labels(rows).items(), key=order):
        label = ("unreduced (none)" if method == "none" else method) + (f" ({setting})" if setting else "")
        if method == "none":
            style = dict(color="black", marker="D", markersize=7, linestyle="none", zorder=4)
            for r in group:  # the reference accuracy across both panels
                for ax in (ax_f, ax_l):
                    ax.axhline(100 * r.accuracy, color="black", linestyle=":", linewidth=1, alpha=0.6, zorder=1)
        elif searched:
            style = dict(color="crimson", marker="*", markersize=16, linewidth=2.8, zorder=6)
        else:
            style = dict(color=cmap[colour_i % len(cmap)], marker="o", markersize=5, linewidth=1.3, alpha=0.85,
                         zorder=3)
            colour_i += 1
        for ax, xof in ((ax_f, lambda r: r.flops_ratio), (ax_l, lat_of)):
            pts = sorted(((xof(r), 100 * r.accuracy, r) for r in group if xof(r) is not None),
                         key=lambda p: p[:2])
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
            if searched:
                for x, y, r in pts:
                    if r.budget is not None:
                        ax.annotate(f"{r.budget:g}", (x, y), textcoords="offset points", xytext=(6, 6),
                                    fontsize=8, color="crimson")
    ax_f.set_xlabel("FLOPs ratio (LLM prefill, vs unreduced)")
    ax_f.set_ylabel("accuracy (%)")
    ax_f.set_title("accuracy vs FLOPs")
    if use_ratio:
        ax_l.set_xlabel("measured prefill latency ratio (vs unreduced, same collection)")
    else:
        ax_l.set_xlabel("measured prefill ms per sample")
    ax_l.set_title("accuracy vs measured latency")
    for ax in (ax_f, ax_l):
        ax.grid(alpha=0.3)
    if not timed:
        ax_l.text(0.5, 0.5, "no latency measured", transform=ax_l.transAxes, ha="center", color="gray")
    handles, labels = ax_f.get_legend_handles_labels()
    if handles:
        ax_f.legend(handles, labels, fontsize=8, loc="lower right", framealpha=0.85)
    fig.suptitle("diffopsearch: accuracy / cost trade-off (searched plans: red stars, budget annotated)",
                 fontsize=11)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# --------------------------------------------------------------------------- the command


def write_report(root: str | os.PathLike, out: str | os.PathLike | None = None, show: bool = True) -> dict:
    """Collect ``root``, write report.md and pareto.png into ``out`` (default ``root``), print the
    table; returns {"rows", "failed", "skipped", "report", "plot"}."""
    from .io import atomic_write_text

    rows, failed, skipped = collect(root)
    if not rows:
        extra = ""
        if failed:
            extra = (f" {len(failed)} failed job(s) were found: "
                     + "; ".join(f"{f['dir']}: {f['error']}" for f in failed[:5]) + ".")
        if skipped:
            extra += f" {len(skipped)} results.json file(s) could not be read (e.g. {skipped[0]['file']}: " \
                     f"{skipped[0]['reason']})."
        raise UserError(f"report dir={str(root)!r} holds no results: no readable results.json below it (a finished "
                        f"`diffopsearch eval` or `search` run writes one into its run directory).{extra}")
    attach_latency_ratios(rows)
    out = Path(out if out is not None else root).expanduser()
    report_path = atomic_write_text(out / REPORT_NAME, markdown(rows, failed, skipped, str(root)) + "\n")
    plot_path = plot(rows, out / PLOT_NAME)
    if show:
        print_table(rows, failed, f"diffopsearch report: {root}")
        print(f"wrote {report_path} and {plot_path}")
    return {"rows": rows, "failed": failed, "skipped": skipped, "report": str(report_path), "plot": str(plot_path)}
