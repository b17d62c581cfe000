"""`diffopsearch eval`: results, scoring, resume, image errors, bad input, and 1 vs 2 processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fixtures as fx  # tests/fixtures.py (pytest puts tests/ on sys.path)
from diffopsearch import evaluate as ev
from diffopsearch.commands import eval as eval_cmd
from diffopsearch.data.datasets import load_qa
from diffopsearch.errors import UserError
from diffopsearch.runtime import Procs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    return fx.tiny_model()


def _answers(run_dir: Path) -> dict:
    out = {}
    for line in open(run_dir / ev.CACHE_NAME):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the torn line of an interrupted run
            continue
        out[row["qid"]] = row["prediction"]
    return out


class _Clock:
    """A perf_counter that only moves when told to: evaluate's timing arithmetic becomes exact."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def _timed(monkeypatch, prefill_seconds: list[float], generate_seconds: float) -> _Clock:
    """Real prefill and generation, each followed by a known step of evaluate's clock: the i-th prefill
    call takes prefill_seconds[i], every generate_answers call generate_seconds."""
    clock, calls = _Clock(), iter(prefill_seconds)
    real_prefill, real_generate = ev.prefill, ev.generate_answers

    def prefill(reduced, inputs):
        real_prefill(reduced, inputs)
        clock.now += next(calls)

    def generate(reduced, processor, inputs, max_new_tokens):
        out = real_generate(reduced, processor, inputs, max_new_tokens)
        clock.now += generate_seconds
        return out

    monkeypatch.setattr(ev, "time", clock)  # evaluate.py's own `time` module reference only
    monkeypatch.setattr(ev, "prefill", prefill)
    monkeypatch.setattr(ev, "generate_answers", generate)
    return clock


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def test_results_json_has_the_promised_fields(tmp_path, tiny, monkeypatch):
    model, proc = tiny
    ds = load_qa("gqa", str(fx.write_gqa(tmp_path / "GQA", n_images=3, per_image=2, broken=("n1001",))))
    # the warm-up prefill (untimed) takes 1 s, the two timed batches of 2 questions 10 ms and 30 ms,
    # each of the 2 generation steps with questions 0.25 s
    _timed(monkeypatch, [1.0, 0.010, 0.030], 0.25)
    rss_before = _rss_mb()
    r = ev.evaluate(model, proc, None, ds, batch_size=2, max_new_tokens=3, out_dir=tmp_path / "run", show=False)
    rss_after = _rss_mb()
    on_disk = json.loads((tmp_path / "run" / ev.RESULTS_NAME).read_text())
    assert on_disk == json.loads(json.dumps(r))
    assert r["n"] == 4 and r["n_questions"] == 6 and 0.0 <= r["accuracy"] <= 1.0
    assert r["image_errors"]["count"] == 2 and set(r["image_errors"]["examples"]) == {"20000002", "20000003"}
    assert "0x" not in r["image_errors"]["examples"]["20000002"]
    assert sum(v["n"] for v in r["per_type"].values()) == 4 and set(r["per_type"]) <= set(fx.GQA_STRUCTURAL)
    assert r["flops_ratio"] == 1.0 and r["plan"] is None
    assert r["visual_tokens"]["llm_input"] == 144 and r["visual_tokens"]["per_layer"] == [144, 144]
    assert r["visual_tokens"]["avg"] == 144.0 and r["mean_text_tokens"] > 5
    lat = r["latency"]
    assert lat["batch_size"] == 2 and lat["batches_timed"] == 2  # 4 good questions in batches of 2
    # the median of the timed batches (the warm-up is not among them), and per sample: batch time / 2
    assert lat["prefill_ms_per_batch"] == pytest.approx(20.0) and lat["prefill_ms_per_sample"] == pytest.approx(10.0)
    assert lat["warmup_batches"] == 1 and lat["device"] == "cpu"
    # 4 answers generated in 2 x 0.25 s (the step whose two images are broken generates nothing)
    assert r["throughput"] == {"samples_per_s": pytest.approx(8.0), "generated": 4, "cached": 0, "processes": 1}
    # the process's peak RSS in MB: at least what it was before the run, at most what it is after it
    assert r["peak_memory_kind"] == "process_peak_rss" and rss_before <= r["peak_memory_mb"] <= rss_after
    assert (r["dataset"], r["split"], r["metric"]) == ("gqa", "testdev", "gqa")
    assert len(_answers(tmp_path / "run")) == 4


def test_batched_left_padded_answers_equal_one_by_one(tmp_path, tiny):
    from diffopsearch.data import world

    model, proc = tiny
    world.write_world(tmp_path / "w", seed=0, sizes={"test": 4})
    ds = load_qa("toy", str(tmp_path / "w"))  # questions of different lengths -> real padding
    for bs in (1, 6):
        ev.evaluate(model, proc, None, ds, batch_size=bs, max_new_tokens=3, out_dir=tmp_path / f"bs{bs}",
                    show=False, latency_batches=0)
    one, six = _answers(tmp_path / "bs1"), _answers(tmp_path / "bs6")
    assert len(one) == len(ds) and one == six
    assert len(set(one.values())) > 3  # the answers do depend on the input


def _key_of(run_dir: Path) -> str:
    return json.loads(open(run_dir / ev.CACHE_NAME).readline())["key"]


def _counting(monkeypatch):
    calls = []
    real = ev.generate_answers

    def wrapped(reduced, processor, inputs, max_new_tokens):
        out = real(reduced, processor, inputs, max_new_tokens)
        calls.append(len(out))
        return out

    monkeypatch.setattr(ev, "generate_answers", wrapped)
    return calls


def test_resume_only_computes_what_is_missing(tmp_path, tiny, monkeypatch):
    model, proc = tiny
    ds = load_qa("gqa", str(fx.write_gqa(tmp_path / "GQA", n_images=4, per_image=2)))
    run = tmp_path / "run"
    first = ev.evaluate(model, proc, None, ds, batch_size=3, max_new_tokens=3, out_dir=run, show=False)
    full = _answers(run)
    lines = (run / ev.CACHE_NAME).read_text().splitlines()
    # an interrupted run: three answers made it to disk, then a torn line
    (run / ev.CACHE_NAME).write_text("\n".join(lines[:3]) + '\n{"key": "' + lines[3][9:20])
    calls = _counting(monkeypatch)
    again = ev.evaluate(model, proc, None, ds, batch_size=2, max_new_tokens=3, out_dir=run, show=False)
    assert sum(calls) == 5 and again["throughput"]["generated"] == 5 and again["throughput"]["cached"] == 3
    assert again["n"] == first["n"] == 8 and again["accuracy"] == first["accuracy"]
    assert _answers(run) == full and ev.read_cache(run / ev.CACHE_NAME, _key_of(run)) == full
    calls.clear()
    ev.evaluate(model, proc, None, ds, batch_size=4, max_new_tokens=3, out_dir=run, show=False)
    assert sum(calls) == 0  # everything cached
    ev.evaluate(model, proc, None, ds, batch_size=4, max_new_tokens=2, out_dir=run, show=False)
    assert sum(calls) == 8  # other settings, other answers
    calls.clear()
    ev.evaluate(model, proc, None, ds, batch_size=4, max_new_tokens=2, out_dir=run, show=False, resume=False)
    assert sum(calls) == 8


def _stub_answers(monkeypatch, answer_for):
    """Replace generation by a function of the question records of the batch."""
    seen = {}

    def fake_batch_inputs(processor, recs, imgs):
        seen["recs"] = recs
        import torch

        return {"input_ids": torch.zeros((len(recs), 1), dtype=torch.long)}

    monkeypatch.setattr("diffopsearch.data.datasets.make_eval_batch", fake_batch_inputs)
    monkeypatch.setattr(ev, "generate_answers", lambda reduced, processor, inputs, n: [answer_for(r) for r in seen["recs"]])


def test_gqa_scoring_and_per_type(tmp_path, tiny, monkeypatch):
    model, proc = tiny
    ds = load_qa("gqa", str(fx.write_gqa(tmp_path / "GQA", n_images=5, per_image=2)))
    _stub_answers(monkeypatch, lambda r: f" {r['answer'].upper()}." if int(r["id"]) % 2 == 0 else "zzz")
    r = ev.evaluate(model, proc, None, ds, batch_size=3, out_dir=tmp_path / "run", show=False, latency_batches=0)
    assert r["n"] == 10 and r["accuracy"] == pytest.approx(0.5)
    # structural types cycle with period 5 over 10 questions: each type has one even and one odd id
    assert r["per_type"] == {t: {"accuracy": 0.5, "n": 2} for t in sorted(fx.GQA_STRUCTURAL)}
    assert r["latency"]["batches_timed"] == 0 and r["latency"]["prefill_ms_per_batch"] is None


# One prediction per question of fx.VQA_CASES, and its VQA accuracy worked out by hand: each of the 10
# annotators scores min(1, (matches among the other 9) / 3), averaged. The two modes agree on these.
VQA_PREDICTIONS = (
    ("Yes.", 1.0),      # yes x10: "Yes." normalises to "yes"; every annotator sees 9 matches
    ("two", 1.0),       # 2 x7, two x2, 3: "two" -> "2"; every annotator sees >= 6 "2"s
    ("dark red", 0.9),  # red x4, dark red x3, maroon x3: the 3 "dark red"s see 2 (2/3), the 7 others 3 (1)
    ("yes", 0.3),       # no x9, yes: the "yes" annotator sees none, the 9 others one (1/3): 9 / 3 / 10
    ("desk", 1.0),      # table x2, desk x8: everyone sees >= 7 "desk"s
    ("one", 1.0),       # 1 x10: "one" -> "1"
)


@pytest.mark.parametrize("mode", ["official", "lmms"])
def test_vqav2_scoring(tmp_path, tiny, monkeypatch, mode):
    model, proc = tiny
    ds = load_qa("vqav2", str(fx.write_vqav2(tmp_path / "VQAv2", n=6)))
    _stub_answers(monkeypatch, lambda r: VQA_PREDICTIONS[int(r["id"]) - 262148000][0])
    r = ev.evaluate(model, proc, None, ds, batch_size=4, out_dir=tmp_path / "run", show=False, vqa_mode=mode,
                    latency_batches=0)
    assert r["n"] == 6 and r["accuracy"] == pytest.approx(5.2 / 6)
    assert r["metric"] == f"vqa/{mode}"
    assert r["per_type"] == {"yes/no": {"accuracy": pytest.approx(0.65), "n": 2},     # (1.0 + 0.3) / 2
                             "number": {"accuracy": pytest.approx(1.0), "n": 2},
                             "other": {"accuracy": pytest.approx(0.95), "n": 2}}      # (0.9 + 1.0) / 2


def _layer_flops(n: float) -> float:
    """One decoder layer of fx.TINY_TEXT (d 64, MLP 128, 4 heads of 16, 2 kv heads) on n tokens, by hand in
    cost.py's convention (2 FLOPs per multiply-add, matmuls only, causal attention pairs n (n + 1) / 2):
    q, o 2 n 64 64 each, k, v 2 n 64 32 each, MLP 3 x 2 n 64 128, scores and AV 2 x 2 pairs 64."""
    return 2 * n * 64 * (64 + 64 + 32 + 32) + 3 * 2 * n * 64 * 128 + 2 * 2 * (n * (n + 1) / 2) * 64


def test_a_plan_goes_through_apply_plan_and_has_its_own_cache_key(tmp_path, tiny, monkeypatch):
    from diffopsearch.data.datasets import make_eval_batch
    from diffopsearch.patch import llava as P
    from diffopsearch.plan import Plan, Site, backbone_info

    model, proc = tiny
    applied = []
    real_apply = P.apply_plan
    monkeypatch.setattr(P, "apply_plan", lambda m, p: applied.append(p) or real_apply(m, p))
    ds = load_qa("gqa", str(fx.write_gqa(tmp_path / "GQA", n_images=3, per_image=1)))
    # 144 -> 64 visual tokens at the LLM input (norm), -> 16 before layer 1 (FastV's attention score)
    plan = Plan(sites=[Site(layer=0, keep=64, score="norm"), Site(layer=1, keep=16, score="attn")],
                backbone=backbone_info(model.config), budget=0.5, method="two-site")
    # what the plan answers, straight from the reduced model (no evaluate in between)
    recs, imgs = ds.batch(range(len(ds)))
    direct = ev.generate_answers(real_apply(model, plan), proc, make_eval_batch(proc, recs, imgs), 2)
    want = {rec["id"]: a for rec, a in zip(recs, direct)}
    calls = _counting(monkeypatch)
    ev.evaluate(model, proc, None, ds, batch_size=2, max_new_tokens=2, out_dir=tmp_path / "run", show=False)
    unreduced = _answers(tmp_path / "run")
    r = ev.evaluate(model, proc, plan, ds, batch_size=2, max_new_tokens=2, out_dir=tmp_path / "run", show=False)
    assert applied == [plan] and sum(calls) == 6  # the plan's answers are generated, not read from the cache
    assert _answers(tmp_path / "run") == want and want != unreduced  # the plan's own (different) answers
    assert r["plan"] == plan.to_dict() and r["plan"]["method"] == "two-site"
    assert r["visual_tokens"] == {"image": 144, "llm_input": 64, "per_layer": [64, 16], "avg": 40.0, "grid": [12, 12]}
    n = r["mean_text_tokens"]
    attn_score = 2 * 64 * 64 + 2 * 64 * (n + 64)  # q of the last token, its dot products with the n + 64 keys
    expected = (_layer_flops(n + 64) + _layer_flops(n + 16) + attn_score) / (2 * _layer_flops(n + 144))
    assert r["flops_ratio"] == pytest.approx(expected, rel=1e-12) and 0.2 < expected < 0.5
    keys = {json.loads(line)["key"] for line in open(tmp_path / "run" / ev.CACHE_NAME)}
    assert len(keys) == 2


# ---------------------------------------------------------------- run(cfg)

def _cfg(data: Path, **over):
    from omegaconf import OmegaConf

    cfg = {"model": {"name": "toy", "path": "", "device": "cpu", "dtype": "auto"},
           "dataset": {"name": "gqa", "path": str(data), "questions_config": None, "images_config": None,
                       "split": "testdev", "metric": "gqa", "vqa_mode": "official"},
           "plan": {"name": "none", "layer": None, "seed": 0}, "ckpt": None, "budget": 1.0, "limit": None,
           "batch_size": 2, "max_new_tokens": 2, "seed": 0, "resume": False}
    for k, v in over.items():
        cfg[k] = v
    return OmegaConf.create(cfg)


@pytest.fixture
def patched_backbone(monkeypatch, tiny):
    import diffopsearch.backbone.load as load

    loaded = []
    monkeypatch.setattr(load, "load_backbone", lambda model_cfg, device=None: loaded.append(model_cfg) or tiny)
    return loaded


def test_run_writes_results_in_the_out_dir(tmp_path, patched_backbone):
    data = fx.write_gqa(tmp_path / "GQA", n_images=3, per_image=2)
    r = eval_cmd.run(_cfg(data, limit=4), out_dir=tmp_path / "run")
    assert patched_backbone and r["n"] == 4 and r["limit"] == 4 and r["model"] == "toy"
    assert r["plan"]["method"] == "none" and r["plan"]["sites"] == []  # plan=none: same reduced forward, no site
    assert json.loads((tmp_path / "run" / ev.RESULTS_NAME).read_text())["n"] == 4


def test_a_rerun_in_a_new_run_dir_only_computes_what_is_missing(tmp_path, monkeypatch, patched_backbone):
    monkeypatch.chdir(tmp_path)  # the shared answer cache lives under ./outputs/.answers
    data = fx.write_gqa(tmp_path / "GQA", n_images=3, per_image=2)
    first = eval_cmd.run(_cfg(data, limit=4), out_dir=tmp_path / "run1")
    second = eval_cmd.run(_cfg(data, limit=6), out_dir=tmp_path / "run2")
    assert first["throughput"]["cached"] == 0
    assert second["throughput"]["cached"] == 4 and second["throughput"]["generated"] == 2
    assert _answers(tmp_path / "run2").items() >= _answers(tmp_path / "run1").items()
    assert list((tmp_path / "outputs" / ".answers").glob("*.jsonl"))


def test_run_a_baseline_then_its_plan_file(tmp_path, monkeypatch):
    import diffopsearch.backbone.load as load
    from diffopsearch.backbone import toy
    from diffopsearch.plan import load_plan

    deep = (toy.build_model(0, vision={**fx.TINY_VISION, "initializer_range": 0.5},
                            text={**fx.TINY_TEXT, "num_hidden_layers": 4, "initializer_range": 0.5}),
            toy.build_processor())
    monkeypatch.setattr(load, "load_backbone", lambda model_cfg, device=None: deep)
    data = fx.write_gqa(tmp_path / "GQA", n_images=3, per_image=2)
    r = eval_cmd.run(_cfg(data, plan={"name": "fastv", "layer": None, "seed": 0}, budget=0.8), out_dir=tmp_path / "a")
    per_layer = r["visual_tokens"]["per_layer"]
    assert r["plan"]["method"] == "fastv" and r["flops_ratio"] <= 0.8 and r["budget"] == 0.8
    assert per_layer[:2] == [144, 144] and per_layer[2] == per_layer[3] < 144  # FastV K=2
    assert r["visual_tokens"]["avg"] == pytest.approx(sum(per_layer) / 4)
    load_plan(r["plan"]).save(tmp_path / "search" / "plan.json")
    again = eval_cmd.run(_cfg(data, ckpt=str(tmp_path / "search")), out_dir=tmp_path / "b")
    assert again["flops_ratio"] == pytest.approx(r["flops_ratio"]) and again["ckpt"] == str(tmp_path / "search")
    assert _answers(tmp_path / "b") == _answers(tmp_path / "a")


@pytest.mark.parametrize("limit", [0, -3])
def test_run_refuses_a_non_positive_limit(tmp_path, limit, patched_backbone):
    with pytest.raises(UserError, match="limit"):
        eval_cmd.run(_cfg(tmp_path, limit=limit), out_dir=tmp_path / "run")
    assert not patched_backbone  # refused before anything is loaded


def test_ckpt_errors(tmp_path, patched_backbone):
    data = fx.write_gqa(tmp_path / "GQA", n_images=1, per_image=1)
    with pytest.raises(UserError, match="does not exist"):
        eval_cmd.run(_cfg(data, ckpt=str(tmp_path / "missing.json")), out_dir=tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without a plan.json"):
        eval_cmd.run(_cfg(data, ckpt=str(tmp_path / "empty")), out_dir=tmp_path / "run")
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "plan.json").write_text("{}")
    with pytest.raises(UserError, match="not both"):
        eval_cmd.run(_cfg(data, ckpt=str(tmp_path / "both"), plan={"name": "fastv", "layer": None, "seed": 0}),
               out_dir=tmp_path / "run")
    assert not patched_backbone  # all refused before the model is loaded


def test_find_plan_file(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "plan.json").write_text("{}")
    assert ev.find_plan_file(str(tmp_path / "run")) == tmp_path / "run" / "final" / "plan.json"
    (tmp_path / "run" / "plan.json").write_text("{}")
    assert ev.find_plan_file(str(tmp_path / "run")) == tmp_path / "run" / "plan.json"
    assert ev.find_plan_file(str(tmp_path / "run" / "plan.json")) == tmp_path / "run" / "plan.json"


# ---------------------------------------------------------------- 1 vs 2 processes

MP_SCRIPT = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import fixtures as fx
from diffopsearch.data.datasets import load_qa
from diffopsearch.evaluate import evaluate
from diffopsearch.runtime import Procs, exit_process, make_accelerator

acc = make_accelerator("auto")  # what `diffopsearch eval` uses
model, proc = fx.tiny_model()
ds = Procs(acc).main_first(lambda: load_qa("gqa", sys.argv[1]))  # as `diffopsearch eval` does
r = evaluate(model, proc, None, ds, batch_size=int(sys.argv[3]), max_new_tokens=1, accelerator=acc,
             out_dir=sys.argv[2], show=False, latency_batches=1)
# one file per process: the processes' stdout lines can interleave in the launcher's pipe
with open(sys.argv[2] + f".rank{{acc.process_index}}.json", "w") as f:
    json.dump({{"result": {{"n": r["n"], "accuracy": r["accuracy"], "errors": r["image_errors"]["count"],
                         "processes": r["throughput"]["processes"]}},
               "share": sorted(ds.image_errors)}}, f)  # share: this process's own image failures
exit_process(0)  # as the CLI does
"""


@pytest.mark.slow
def test_two_processes_give_the_same_n_and_accuracy(tmp_path, tiny):
    model, proc = tiny
    # Answers equal to what the model says for half of the questions, so the accuracy is not trivially 0.
    probe = fx.write_gqa(tmp_path / "probe", n_images=7, per_image=1)
    ev.evaluate(model, proc, None, load_qa("gqa", str(probe)), batch_size=1, max_new_tokens=1,
                out_dir=tmp_path / "probe_run", show=False, latency_batches=0)
    said = _answers(tmp_path / "probe_run")
    gold = {qid: (said[qid] if i % 2 == 0 else "zzz") for i, qid in enumerate(sorted(said))}
    data = fx.write_gqa(tmp_path / "GQA", n_images=7, per_image=1, broken=("n1003",), answers=gold)
    one = ev.evaluate(model, proc, None, load_qa("gqa", str(data)), batch_size=2, max_new_tokens=1,
                      out_dir=tmp_path / "one", show=False, latency_batches=1)
    assert one["n"] == 6 and 0.3 < one["accuracy"] < 0.9

    script = tmp_path / "mp_eval.py"
    script.write_text(MP_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous, not a fixed one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # accelerate 1.15: `launch --cpu --num_processes 2` starts ONE process unless mpirun is set up;
    # `--multi_gpu` starts two through torchrun, and on a machine without CUDA they run on CPU (gloo).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(script), str(data), str(tmp_path / "two"), "2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["result"] == ranks[1]["result"]  # every process returns the main process's results
    # questions are dealt by index (rank r takes r::2): only rank 1 meets the broken image (index 3)
    assert [r["share"] for r in ranks] == [[], ["20000003"]]
    two = ranks[0]["result"]
    assert two["processes"] == 2 and two["errors"] == 1
    assert (two["n"], two["accuracy"]) == (one["n"], one["accuracy"])
    assert _answers(tmp_path / "two") == _answers(tmp_path / "one")
    assert (tmp_path / "two" / ev.RESULTS_NAME).exists()


class _TwoProcs(Procs):
    """A rank of a two-process run whose broadcasts return the main process's value (``main_says``)."""

    def __init__(self, rank, main_says=None):
        super().__init__(None)
        self.world, self.rank, self.is_main = 2, rank, rank == 0
        self.main_says, self.sent = main_says, []

    def broadcast(self, obj):
        self.sent.append(obj)
        return obj if self.is_main else self.main_says


def test_main_first_loads_on_the_main_process_then_stops_the_others_if_it_failed():
    """Two processes building one `datasets` cache at once race on it (a rank then aborted at exit in CI):
    the main process loads first; if it fails, the others raise instead of waiting for it."""
    calls = []
    main = _TwoProcs(0)
    assert main.main_first(lambda: calls.append("main") or "data") == "data" and main.sent == [False]
    assert _TwoProcs(1, main_says=False).main_first(lambda: calls.append("other") or "data") == "data"
    assert calls == ["main", "other"]

    def bad():
        raise UserError("dataset.path 'nowhere' does not exist")

    main = _TwoProcs(0)
    with pytest.raises(UserError, match="nowhere"):
        main.main_first(bad)
    assert main.sent == [True]  # the others are told before the main process raises
    with pytest.raises(UserError, match="main process could not load"):
        _TwoProcs(1, main_says=True).main_first(lambda: calls.append("never"))
    assert "never" not in calls
