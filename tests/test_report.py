"""`diffopsearch report`: collection, table, latency ratios, the Pareto plot, failed jobs, bad dirs.

Everything runs on synthetic results.json files in evaluate's schema (no model)."""
from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest

from diffopsearch import cli
from diffopsearch import report as rp
from diffopsearch.errors import UserError

TYPES = ("attribute", "count", "exist")


def result(method: str, budget: float | None, accuracy: float, flops: float, ms: float, *, searched=False,
           per_layer=(144, 144, 72, 72), model="toy", dataset="toy", split="test", batch_size=16, device="cpu"):
    """A results.json as evaluate writes it (the fields the report reads, plus a few it ignores)."""
    plan = {"format": "diffopsearch.plan/1", "method": method, "budget": budget,
            "sites": [] if method == "none" else [{"layer": 2, "keep": 72, "score": "attn", "anchors": "topk",
                                                   "merge": 0.5, "sharpness": 3.0, "locality": 0.0,
                                                   "reweight": 0.25}],
            "search": {"steps": 10} if searched else None}
    r = {"accuracy": accuracy, "n": 40, "n_questions": 40,
         "per_type": {t: {"accuracy": min(1.0, accuracy + 0.1 * i), "n": 10} for i, t in enumerate(TYPES)},
         "flops_ratio": flops,
         "visual_tokens": {"image": 144, "llm_input": per_layer[0], "per_layer": list(per_layer),
                           "avg": sum(per_layer) / len(per_layer), "grid": [12, 12]},
         "latency": {"prefill_ms_per_batch": ms * batch_size, "prefill_ms_per_sample": ms, "batch_size": batch_size,
                     "batches_timed": 4, "warmup_batches": 1, "device": device},
         "throughput": {"samples_per_s": 1000.0 / ms, "generated": 40, "cached": 0, "processes": 1},
         "peak_memory_mb": 512.0, "model": model, "dataset": dataset, "split": split, "metric": "gqa",
         "plan": plan, "budget": budget}
    if searched:
        r["method"] = "search"
        r["search"] = {"steps": 10, "seconds": 1.0}
    return r


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def sweep(root: Path) -> Path:
    """An unreduced eval, two baselines at two budgets and a search run at each budget, plus one failed job."""
    write(root / "none" / "results.json", result("none", 1.0, 0.60, 1.0, 10.0, per_layer=(144,) * 4))
    for i, (b, fl) in enumerate(((0.8, 0.78), (0.4, 0.39))):
        write(root / f"fastv-{b}" / "results.json", result("fastv", b, 0.55 - 0.1 * i, fl, 8.0 - 3 * i))
        write(root / f"pool-{b}" / "results.json", result("pool", b, 0.50 - 0.1 * i, fl - 0.01, 7.5 - 3 * i))
        write(root / "multirun" / str(i) / "results.json", result("search", b, 0.58 - 0.05 * i, fl, 8.2 - 3 * i,
                                                                   searched=True))
    write(root / "multirun" / "2" / "error.json",
          {"command": "search", "overrides": ["budget=0.1"], "error": "budget=0.1 is below what any plan can reach",
           "type": "UserError", "user_error": True, "traceback": None})
    return root


def is_png(path: Path) -> tuple[int, int]:
    """(width, height) of a valid PNG; every chunk's CRC checked."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc
        chunks.append(kind)
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_report_collects_every_run_and_writes_table_and_plot(tmp_path, capsys):
    root = sweep(tmp_path / "runs")
    res = rp.write_report(root)
    rows = res["rows"]
    assert [(r.method, r.budget) for r in rows] == [("none", 1.0), ("fastv", 0.8), ("fastv", 0.4), ("pool", 0.8),
                                                    ("pool", 0.4), ("search", 0.8), ("search", 0.4)]
    assert [r.searched for r in rows] == [False] * 5 + [True] * 2
    md = (root / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    for col in ("accuracy %", "attribute %", "count %", "exist %", "FLOPs ratio", "latency ratio", "throughput /s",
                "visual tokens (LLM in / avg)", "visual tokens per layer"):
        assert col in header
    line = next(line for line in md.splitlines() if line.startswith("| fastv | 0.4 "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:4] == ["fastv", "0.4", "45.00", "40"]
    assert cells[4:7] == ["45.0", "55.0", "65.0"]  # per type
    assert cells[7] == "0.390" and cells[8] == "0.500"  # FLOPs ratio; latency 5 ms / unreduced 10 ms
    assert cells[11] == "144 / 108.0" and cells[12] == "144x2 72x2" and cells[13] == "fastv-0.4"
    assert "| **search** | 0.8 | 58.00 |" in md
    assert "## Searched plans" in md and "| 2 | 72 | attn | topk | 0.5 | 3.0 | 0.0 | 0.25 |" in md
    assert "## Failed jobs" in md and "budget=0.1" in md and "multirun/2" in md
    w, h = is_png(root / "pareto.png")
    assert w > 2 * h > 600  # two panels side by side
    out = capsys.readouterr().out
    assert "fastv" in out and "search" in out and "failed job" in out and "budget=0.1" in out


def test_latency_ratio_uses_the_matching_unreduced_run_or_stays_blank(tmp_path):
    root = tmp_path / "runs"
    write(root / "a" / "none" / "results.json", result("none", 1.0, 0.6, 1.0, 10.0))
    write(root / "a" / "fastv" / "results.json", result("fastv", 0.5, 0.5, 0.5, 6.0))
    write(root / "b" / "none" / "results.json", result("none", 1.0, 0.6, 1.0, 20.0))
    write(root / "b" / "fastv" / "results.json", result("fastv", 0.5, 0.5, 0.5, 6.0))  # nearest ref: b/none
    write(root / "c" / "results.json", result("fastv", 0.5, 0.5, 0.5, 6.0, batch_size=1))  # no bs-1 reference
    write(root / "d" / "results.json", result("fastv", 0.5, 0.5, 0.5, 6.0, device="cuda:0"))  # other device
    rows, _, _ = rp.collect(root)
    rp.attach_latency_ratios(rows)
    by = {r.source: r for r in rows}
    assert by["a/fastv/results.json"].latency_ratio == pytest.approx(0.6)
    assert by["b/fastv/results.json"].latency_ratio == pytest.approx(0.3)
    assert by["b/fastv/results.json"].reference == "b/none/results.json"
    assert by["a/none/results.json"].latency_ratio == pytest.approx(1.0)
    assert by["c/results.json"].latency_ratio is None and by["d/results.json"].latency_ratio is None


def test_no_unreduced_run_leaves_latency_ratio_blank_and_plots_ms(tmp_path):
    root = tmp_path / "runs"
    write(root / "x" / "results.json", result("pool", 0.5, 0.5, 0.49, 4.0))
    res = rp.write_report(root, show=False)
    assert res["rows"][0].latency_ratio is None
    line = next(line for line in (root / "report.md").read_text().splitlines() if line.startswith("| pool"))
    assert [c.strip() for c in line.strip("|").split("|")][8] == ""  # latency ratio blank
    is_png(root / "pareto.png")


def test_search_file_with_baseline_rows_is_read_without_double_counting(tmp_path):
    root = tmp_path / "run"
    top = result("search", 0.6, 0.58, 0.59, 6.0, searched=True)
    top["baselines"] = [
        {"method": "search", "accuracy": 0.58, "n": 40, "flops_ratio": 0.59, "avg_visual_tokens": 90.0,
         "prefill_ms_per_sample": 6.0, "prefill_ms_per_batch": 96.0},
        {"method": "none", "accuracy": 0.61, "n": 40, "flops_ratio": 1.0, "avg_visual_tokens": 144.0,
         "prefill_ms_per_sample": 12.0, "prefill_ms_per_batch": 192.0},
        {"method": "fastv", "accuracy": 0.52, "n": 40, "flops_ratio": 0.58, "avg_visual_tokens": 88.0,
         "prefill_ms_per_sample": 6.5, "prefill_ms_per_batch": 104.0},
        {"method": "pool", "accuracy": 0.50, "n": 40, "flops_ratio": 0.57, "avg_visual_tokens": 86.0,
         "prefill_ms_per_sample": 6.2, "prefill_ms_per_batch": 99.0},
    ]
    write(root / "results.json", top)
    # the search writes full baseline results too: fastv has one, pool (here) only its summary row
    write(root / "baselines" / "fastv" / "results.json", result("fastv", 0.6, 0.52, 0.58, 6.5))
    rows, _, _ = rp.collect(root)
    got = sorted((r.method, r.summary) for r in rows)
    assert got == [("fastv", False), ("none", True), ("pool", True), ("search", False)]
    rp.attach_latency_ratios(rows)
    by = {r.method: r for r in rows}
    assert by["search"].latency_ratio == pytest.approx(0.5)  # against the summary row of the unreduced model
    assert by["pool"].budget == 0.6 and by["none"].budget == 1.0 and by["pool"].avg_tokens == 86.0
    rp.write_report(root, show=False)
    is_png(root / "pareto.png")


def test_a_multi_method_list_file_is_read(tmp_path):
    write(tmp_path / "results.json", [result("none", 1.0, 0.6, 1.0, 10.0), result("random", 0.5, 0.3, 0.5, 5.0)])
    rows, _, _ = rp.collect(tmp_path)
    assert [(r.method, r.source) for r in rows] == [("none", "results.json#results[0]"),
                                                    ("random", "results.json#results[1]")]


def test_settings_are_kept_apart(tmp_path):
    write(tmp_path / "a" / "results.json", result("fastv", 0.5, 0.5, 0.5, 5.0))
    write(tmp_path / "b" / "results.json", result("fastv", 0.5, 0.4, 0.5, 5.0, dataset="gqa", split="testdev"))
    res = rp.write_report(tmp_path, show=False)
    md = (tmp_path / "report.md").read_text()
    assert "| setting | method |" in md and "toy | gqa/testdev" in md.replace("\\|", "|")
    assert len(res["rows"]) == 2


def test_unreadable_files_are_skipped_and_listed(tmp_path):
    write(tmp_path / "ok" / "results.json", result("pool", 0.5, 0.5, 0.49, 4.0))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "results.json").write_text('{"accuracy": 0.')
    write(tmp_path / "other" / "results.json", {"hello": 1})
    write(tmp_path / ".hydra" / "results.json", {"ignored": True})  # hidden folders are not searched
    res = rp.write_report(tmp_path, show=False)
    assert len(res["rows"]) == 1
    assert sorted(s["file"] for s in res["skipped"]) == ["other/results.json", "torn/results.json"]
    assert "## Skipped files" in (tmp_path / "report.md").read_text()


def test_out_dir_and_rewrite(tmp_path):
    root = sweep(tmp_path / "runs")
    rp.write_report(root, out=tmp_path / "rep", show=False)
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "pareto.png").exists()
    assert not (root / "report.md").exists()
    before = (tmp_path / "rep" / "report.md").read_text()
    rp.write_report(root, out=tmp_path / "rep", show=False)  # a second run reads the same files: same report
    assert (tmp_path / "rep" / "report.md").read_text() == before
    assert not [p for p in (tmp_path / "rep").iterdir() if p.name.endswith(".tmp")]


def test_bad_dirs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        rp.write_report(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        rp.write_report(tmp_path / "file")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="no results"):
        rp.write_report(tmp_path / "empty")
    write(tmp_path / "allfailed" / "0" / "error.json", {"overrides": ["budget=0.01"], "error": "too small"})
    with pytest.raises(UserError, match="1 failed job.*too small"):
        rp.write_report(tmp_path / "allfailed")
    assert not (tmp_path / "empty" / "report.md").exists()


def test_cli_report_command(tmp_path, monkeypatch, capsys):
    root = sweep(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "dir=runs"]) == 0
    assert (root / "report.md").exists() and (root / "pareto.png").exists()
    assert "search" in capsys.readouterr().out
    assert cli.main(["report", "dir=runs", f"report.out={tmp_path / 'elsewhere'}"]) == 0
    assert (tmp_path / "elsewhere" / "pareto.png").exists()
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", "dir=empty"]) == 2
    err = capsys.readouterr().err
    assert "no results" in err and "Traceback" not in err
    assert cli.main(["report", "dir=nope"]) == 2


def test_compact_layers():
    assert rp.compact_layers([144, 144, 72, 72, 72, 36]) == "144x2 72x3 36"
    assert rp.compact_layers([]) == ""


def test_plot_handles_ties_and_rows_without_latency(tmp_path, monkeypatch):
    """Two runs at the same point are both drawn; a row without a latency is drawn in the FLOPs panel
    only, and the latency panel still uses ratios (every timed row has one). Read off the drawn figure."""
    from matplotlib.figure import Figure

    drawn = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: drawn.append(self) or savefig(self, *a, **k))
    rows = [rp.row_from_result(result("none", 1.0, 0.6, 1.0, 10.0), "a/results.json"),
            rp.row_from_result(result("none", 1.0, 0.6, 1.0, 10.0), "b/results.json"),  # same point twice
            rp.row_from_result(result("pool", 0.5, 0.5, 0.5, 5.0), "c/results.json")]
    rows[2].prefill_ms = None
    rp.attach_latency_ratios(rows)
    is_png(rp.plot(rows, tmp_path / "p.png"))
    (fig,) = drawn
    ax_f, ax_l = fig.axes

    def series(ax):
        return {line.get_label(): [(float(x), round(float(y), 9)) for x, y in zip(line.get_xdata(), line.get_ydata())]
                for line in ax.get_lines() if not line.get_label().startswith("_")}

    assert series(ax_f) == {"unreduced (none)": [(1.0, 60.0), (1.0, 60.0)], "pool": [(0.5, 50.0)]}
    assert series(ax_l) == {"unreduced (none)": [(1.0, 60.0), (1.0, 60.0)]}  # pool: no latency, no point
    assert ax_l.get_xlabel().startswith("measured prefill latency ratio")
    # the unreduced accuracy as a reference line across both panels, once per unreduced run
    for ax in (ax_f, ax_l):
        refs = [line for line in ax.get_lines() if line.get_label().startswith("_")]
        assert len(refs) == 2 and all(round(float(line.get_ydata()[0]), 9) == 60.0 for line in refs)
    assert [t.get_text() for t in ax_f.get_legend().get_texts()] == ["unreduced (none)", "pool"]


# --------------------------------------------------------------------------- scripts/bench.py

def _bench(script: str = "bench"):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"diffopsearch_{script}_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_search_writes_a_preset_beside_the_defaults_section(tmp_path):
    """scripts/bench_search.py --preset NAME has its own section: writing it (twice) keeps the defaults' one."""
    mod = _bench("bench_search")
    out = tmp_path / "B.md"
    b, e = mod.markers(None)
    mod._write_section(out, f"{b}\ndefaults\n{e}\n")
    for text in ("first", "second"):
        tb, te = mod.markers("thorough")
        mod._write_section(out, f"{tb}\n{text}\n{te}\n", "thorough")
    md = out.read_text()
    assert "defaults" in md and "second" in md and "first" not in md
    assert md.count("search-thorough:begin") == 1 and md.index("defaults") < md.index("second")


def test_bench_latency_compares_accuracy_at_equal_measured_latency():
    """scripts/bench_latency.py --search: a latency-searched plan against the FLOPs-searched plans' accuracy
    interpolated at its measured latency ratio; outside their range it says so instead of extrapolating."""
    from types import SimpleNamespace

    mod = _bench("bench_latency")
    assert mod.at_equal_latency(0.5, [(0.6, 0.95), (0.4, 0.90)])[0] == pytest.approx(0.925)
    assert mod.at_equal_latency(0.3, [(0.4, 0.90), (0.6, 0.95)]) is None
    plan = object()
    plans = {"searched@0.5": (0.5, "searched", plan), "searched@0.2": (0.2, "searched", plan),
             "searched@0.1": (0.1, "searched", None), "tome@0.5": (0.5, "tome", plan),
             "flops@0.6": (0.6, mod.FLOPS_SEARCHED, plan), "flops@0.4": (0.4, mod.FLOPS_SEARCHED, plan)}
    ratios = {"searched@0.5": 0.5, "searched@0.2": 0.3, "tome@0.5": 0.5, "flops@0.6": 0.6, "flops@0.4": 0.4}
    measured = {"variants": {k: {"ratio": r} for k, r in ratios.items()}}
    accuracy = {"searched@0.5": 0.93, "searched@0.2": 0.8, "flops@0.6": 0.95, "flops@0.4": 0.90}
    lines = mod._equal_latency(SimpleNamespace(limit=500), 16, plans, measured, accuracy)
    rows = [line for line in lines if line.startswith("| 0.")]
    assert rows == ["| 0.5 | 0.500 | 93.0 | 92.5 | +0.5 |",
                    "| 0.2 | 0.300 | 80.0 | outside the FLOPs-searched plans' range | - |",
                    "| 0.1 | unreachable | - | - | - |"]
    assert any("equal measured latency: 1 of 1" in line for line in lines)


def test_bench_projection_to_llava_7b_scales_layers_and_keeps():
    from types import SimpleNamespace

    from diffopsearch.baselines import make_plan

    bench = _bench()
    toy_text = SimpleNamespace(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=4,
                               num_hidden_layers=8)
    plan = make_plan("fastv", 0.6, toy_text, 144, (12, 12), 20.0)
    ((site,),) = [plan.sites]
    p = bench.project_plan(plan.to_dict(), 40.0)
    assert p["src_layers"] == 8 and p["src_visual"] == 144
    assert p["sites"][0]["layer"] == site.layer * 4 and p["sites"][0]["keep"] == round(site.keep * 4)
    # the 7B numbers worked out by hand (not with cost.plan_cost, which project_plan itself calls):
    # LLaVA-1.5-7B's decoder (d 4096, MLP 11008, 32 heads, no GQA), 2 FLOPs per multiply-add, matmuls only,
    # causal pairs n (n + 1) / 2; 40 text + 576 visual tokens; FastV's score: q of the last token and its
    # dot products with every key it sees.
    d, m, L, text = 4096, 11008, 32, 40.0

    def layer(n):
        return 2 * n * d * 4 * d + 3 * 2 * n * d * m + 2 * 2 * (n * (n + 1) / 2) * d

    cut, keep = site.layer * 4, site.keep * 4
    full = L * layer(text + 576)
    flops = cut * layer(text + 576) + (L - cut) * layer(text + keep) + 2 * d * d + 2 * d * (text + 576)
    assert p["tflops_full"] == pytest.approx(full / 1e12) and 8.0 < p["tflops_full"] < 8.2
    assert p["flops_ratio"] == pytest.approx(flops / full) and p["llm_saving"] == pytest.approx(1 - flops / full)
    # CLIP ViT-L/14-336 (24 layers, d 1024, MLP 4096, 577 tokens, full attention) and the 2-layer projector
    vision = 24 * (2 * 577 * 1024 * 4 * 1024 + 2 * 2 * 577 * 1024 * 4096 + 2 * 2 * 577 * 577 * 1024) \
        + 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert p["vision_tflops"] == pytest.approx(vision / 1e12)
    assert p["end_to_end_saving"] == pytest.approx((full - flops) / (full + vision))
    assert p["avg_tokens"] == pytest.approx((cut * 576 + (L - cut) * keep) / L) and p["tokens_in"] == 576


def test_bench_times_the_operator_inside_the_forward():
    import fixtures as fx
    from diffopsearch.backbone import toy
    from diffopsearch.baselines import make_plan
    from diffopsearch.data.datasets import make_eval_batch
    from diffopsearch.evaluate import prefill
    from diffopsearch.patch import llava as P
    from diffopsearch.patch.llava import apply_plan

    bench = _bench()
    model = toy.build_model(0, vision=fx.TINY_VISION, text={**fx.TINY_TEXT, "num_hidden_layers": 4})
    processor = toy.build_processor()
    from PIL import Image

    recs = [{"id": "q", "question": "what color is the circle ?", "answer": "red", "type": "attribute"}]
    batch = make_eval_batch(processor, recs, [Image.new("RGB", (192, 192), (200, 30, 30))])
    plan = make_plan("fastv", 0.7, model.config.text_config, 144, (12, 12), 20.0)
    for fwd, has_op in ((model, False), (apply_plan(model, plan), True)):
        t = bench._Timers()
        with bench.instrumented(model, t, lambda: None):
            prefill(fwd, batch)
        assert t.vision > 0 and (t.op > 0) == has_op
    stages = []  # the stages a forward with one site times: set-up once, the site's reduction, every layer
    with P.stage_timer(lambda stage, seconds: stages.append(stage)):
        prefill(apply_plan(model, plan), batch)
    assert stages.count("setup") == 1 and stages.count("reduce") == 1 and stages.count("layer") == 4
    assert P.forward._RECORD is None and "get_image_features" not in model.model.__dict__  # all restored


def test_bench_arguments():
    bench = _bench()
    a = bench.parse_args([])
    assert a.budgets == [0.8, 0.6, 0.4, 0.25] and a.limit == 500 and a.latency_batch_sizes == [1, 16]
    assert not a.random_model and a.search_overrides == []
    q = bench.parse_args(["--quick", "--budgets", "0.5,0.3", "--search", "search.lr=0.1"])
    assert q.random_model and q.budgets == [0.5, 0.3] and q.search_overrides[-1] == "search.lr=0.1"
    with pytest.raises(UserError, match="budget"):
        bench.parse_args(["--budgets", "1.5"])


@pytest.mark.slow
def test_bench_quick_writes_benchmarks_md_and_resumes(tmp_path):
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    out, work = tmp_path / "B.md", tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [sys.executable, str(script), "--quick", "--out", str(out), "--work", str(work)]
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    md = out.read_text()
    assert f"python scripts/bench.py --quick --out {out} --work {work}" in md
    for needle in ("## 1. Accuracy", "## 2. Measured prefill latency", "### batch 1 ", "### batch 4 ",
                   "## 3. Search wall time", "## 4. Projection to LLaVA-1.5-7B", "torch 2", "transformers ",
                   "smoke run on a random-weight model", "| fastv |", "| pool |"):
        assert needle in md, needle
    searched = next(line for line in md.splitlines() if line.startswith("| **searched** | **"))
    assert "(0." in searched  # the searched plan was evaluated: accuracy and FLOPs ratio
    # the projected plan's row: sites, tokens, FLOPs ratio and the two savings, consistent with each other
    projection = md.split("## 4. Projection to LLaVA-1.5-7B")[1].split("\n## ")[0]
    (row,) = [line for line in projection.splitlines() if line.startswith("| 0.7 | ")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 6, row
    site_re = r"\d+: \d+, [a-z]+/[a-z]+, mu \d\.\d\d"
    assert re.fullmatch(rf"{site_re}(; {site_re})*", cells[1]), row
    tokens_in, avg = cells[2].split(" / ")
    assert 0 < float(avg) <= int(tokens_in) <= 576, row
    ratio, llm, e2e = float(cells[3]), float(cells[4].rstrip("%")), float(cells[5].rstrip("%"))
    assert 0 < ratio < 1 and llm == pytest.approx(100 * (1 - ratio), abs=0.11) and 0 < e2e < llm, row
    is_png(tmp_path / "docs" / "benchmarks_pareto.png")
    assert (work / "report.md").exists() and (work / "latency.json").exists()
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before") == 8 and "measured before" in again.stdout  # nothing redone


def test_method_and_budget_of_a_searched_plan_evaluated_with_eval_ckpt(tmp_path):
    r = result("search", 0.4, 0.5, 0.39, 5.0, searched=True)
    del r["method"], r["search"]
    r["budget"] = 1.0  # `diffopsearch eval ckpt=...` records its own default budget
    row = rp.row_from_result(r, "x/results.json")
    assert row.method == "search" and row.searched and row.budget == 0.4
    unreduced = rp.row_from_result({**result("none", None, 0.6, 1.0, 10.0), "plan": None}, "y/results.json")
    assert unreduced.method == "none" and unreduced.unreduced and unreduced.budget == 1.0
    no_plan = {k: v for k, v in result("pool", 0.5, 0.5, 0.5, 5.0).items() if k != "plan"}
    assert rp.row_from_result(no_plan, "z/results.json").method == "custom"
