"""Reliability (issue 7): bad input, interruption, determinism, numerical faults, safe loading.

Every bad input goes through the real command (``cli.main``, in process, the real bodies) and must
end with exit code 2, one message naming the value and what is allowed, no traceback, and no
results.json / plan.json written. The interruption tests really SIGKILL a ``python -m diffopsearch``
subprocess and rerun it. Models are the tiny random-weight LLaVAs of the real classes."""
from __future__ import annotations

import ast
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fixtures as fx  # tests/fixtures.py
from test_cli import run_cli  # the in-process runner
from test_search import _tiny_model_dir, tiny4  # noqa: F401  (tiny4: the 4-layer tiny LLaVA fixture)

from diffopsearch import evaluate as ev
from diffopsearch.errors import Interrupted, NumericalError, UserError
from diffopsearch.search import checkpoint as ck
from diffopsearch.search import loop

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "diffopsearch"

# A search of a few steps on the tiny model and a small toy world; the eval of its plan is 2 questions.
pytestmark = pytest.mark.usefixtures("clean_cli_env")  # tests/conftest.py

SEARCH_ARGS = ["budget=0.6", "limit=2", "batch_size=2", "max_new_tokens=2", "search.steps=4", "search.batch_size=2",
               "search.plans_per_step=2", "search.knob_plans=1", "search.checkpoint_every=2",
               "search.candidate_layers=[1,2]", "search.select_samples=2", "model.device=cpu", "dataset=toy"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model directory, a small toy world, a GQA fixture, and damaged copies of each."""
    import shutil

    from diffopsearch.data import world

    root = tmp_path_factory.mktemp("assets")
    a = type("Assets", (), {})()
    a.model = _tiny_model_dir(root / "tiny")
    world.write_world(root / "world", seed=0, sizes={"train": 16, "test": 4})
    a.world = root / "world"
    a.gqa = fx.write_gqa(root / "GQA", n_images=3, per_image=2)
    a.gqa_no_column = fx.write_gqa(root / "GQA-nocol", drop_question_columns=("imageId",))
    a.gqa_broken = fx.write_gqa(root / "GQA-broken", n_images=2, per_image=2, broken=("n1000", "n1001"))
    a.gqa_empty = fx.write_gqa(root / "GQA-empty", n_images=1, per_image=1)
    _empty_parquet(a.gqa_empty / fx.GQA_QUESTIONS_CONFIG / f"{fx.GQA_SPLIT}-00000-of-00001.parquet")
    for name, drop in (("noweights", "model.safetensors"), ("noprocessor", "processor_config.json")):
        shutil.copytree(a.model, root / name)
        (root / name / drop).unlink()
        setattr(a, name, root / name)
    shutil.copytree(a.model, root / "truncweights")
    w = root / "truncweights" / "model.safetensors"
    os.truncate(w, w.stat().st_size // 2)
    a.truncweights = root / "truncweights"
    (root / "afile").write_text("not a directory\n")
    a.afile = root / "afile"
    a.plans = _plan_files(root / "plans", a.model)
    return a


def _empty_parquet(path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(path).slice(0, 0), path)  # the same columns, no row


def _plan_files(d: Path, model_dir: Path) -> dict:
    """Plan files, one per kind of damage; ``good`` is valid for the tiny model."""
    from transformers import AutoConfig

    from diffopsearch.plan import FORMAT, backbone_info

    d.mkdir(parents=True)
    backbone = backbone_info(AutoConfig.from_pretrained(model_dir), name="tiny")
    good = {"format": FORMAT, "method": "custom", "backbone": backbone, "budget": 0.8, "seed": 0,
            "sites": [{"layer": 1, "keep": 72, "score": "norm", "anchors": "topk", "merge": 0.0, "sharpness": 0.0,
                       "locality": 0.0, "reweight": 0.0}]}

    def variant(**change):
        p = json.loads(json.dumps(good))
        for path, value in change.items():
            obj = p
            *head, last = path.split("__")
            for k in head:
                obj = obj[int(k)] if isinstance(obj, list) else obj[k]
            obj[last] = value
        return json.dumps(p)

    text = json.dumps(good)
    files = {"good": text, "empty": "", "truncated": text[: len(text) // 2], "not_json": "hello, I am a plan\n",
             "binary": b"\x80\x81\x00\xffPK",
             "version": variant(format="diffopsearch.plan/9"),
             "grid": variant(backbone__visual_tokens=576, backbone__grid=[24, 24]),
             "layers": variant(backbone__num_layers=32),
             "keep": variant(sites__0__keep=200),
             "layer": variant(sites__0__layer=9)}
    out = {}
    for name, content in files.items():
        out[name] = d / f"{name}.json"
        (out[name].write_bytes if isinstance(content, bytes) else out[name].write_text)(content)
    (d / "emptydir").mkdir()
    out["dir"] = d / "emptydir"
    out["missing"] = d / "nowhere.json"
    return out


def _written(run: Path) -> list[str]:
    """What the command wrote besides Hydra's own record (.hydra/, the log)."""
    if not run.exists():
        return []
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.is_file() and ".hydra" not in p.parts and not p.name.endswith(".log"))


# --------------------------------------------------------------------------- bad input

def _bad_cases():
    """(id, command, overrides(assets), needle): each must exit 2 naming the value and what is allowed."""
    P = lambda name: (lambda a: [f"ckpt={a.plans[name]}"])  # noqa: E731
    model = lambda d: (lambda a: [f"model.path={getattr(a, d)}"])  # noqa: E731
    gqa = lambda d, *more: (lambda a: ["dataset=gqa", f"dataset.path={getattr(a, d)}", *more])  # noqa: E731
    fixed = lambda *o: (lambda a: list(o))  # noqa: E731
    return [
        ("budget-zero", "search", fixed("budget=0"), "budget=0.0 is not valid"),
        ("budget-negative", "eval", fixed("budget=-0.5"), "budget=-0.5 is not valid"),
        ("budget-above-one", "search", fixed("budget=1.5"), "must lie in (0, 1]"),
        ("budget-not-a-number", "search", fixed("budget=abc"), "could not be converted to Float"),
        ("unknown-model", "eval", fixed("model=gpt"), "Available options in 'model'"),
        ("unknown-dataset", "search", fixed("dataset=coco"), "Available options in 'dataset'"),
        ("unknown-plan", "eval", fixed("plan=magic"), "Available options in 'plan'"),
        ("unknown-launcher", "search", fixed("hydra/launcher=nope"), "Available options in 'hydra/launcher'"),
        ("limit-zero", "eval", fixed("limit=0"), "limit=0 is not valid"),
        ("ckpt-missing", "eval", P("missing"), "does not exist"),
        ("ckpt-dir-without-plan", "eval", P("dir"), "directory without a plan.json"),
        ("ckpt-empty", "eval", P("empty"), "is empty"),
        ("ckpt-truncated", "eval", P("truncated"), "looks truncated"),
        ("ckpt-not-json", "eval", P("not_json"), "is not valid JSON"),
        ("ckpt-binary", "eval", P("binary"), "not UTF-8"),
        ("ckpt-format-version", "eval", P("version"), "'diffopsearch.plan/9'"),
        ("ckpt-other-grid", "eval", lambda a: P("grid")(a) + gqa("gqa")(a) + model("model")(a),
         "backbone.visual_tokens = 576 does not match the model (144)"),
        ("ckpt-other-layer-count", "eval", lambda a: P("layers")(a) + gqa("gqa")(a) + model("model")(a),
         "backbone.num_layers = 32 does not match the model (4)"),
        ("plan-keep-above-tokens", "eval", P("keep"), "keep = 200 is not valid"),
        ("plan-layer-out-of-range", "eval", P("layer"), "layer = 9 is out of range"),
        ("dataset-missing-column", "eval", gqa("gqa_no_column"), "has no column 'imageId'"),
        ("dataset-undecodable-images", "eval", lambda a: gqa("gqa_broken")(a) + model("model")(a),
         "cannot decode"),
        ("dataset-empty-split", "eval", gqa("gqa_empty"), "has no questions"),
        ("dataset-missing-dir", "search", fixed("dataset=gqa", "dataset.path=/nonexistent/GQA"), "does not exist"),
        ("model-missing-weights", "eval", lambda a: gqa("gqa")(a) + model("noweights")(a),
         "missing *.safetensors (the weights)"),
        ("model-missing-processor", "search", lambda a: model("noprocessor")(a) + [f"dataset.path={a.world}"],
         "processor_config.json or preprocessor_config.json"),
        ("model-truncated-weights", "eval", lambda a: gqa("gqa")(a) + model("truncweights")(a), "is damaged"),
        ("model-missing-dir", "eval", lambda a: gqa("gqa")(a) + ["model.path=/nonexistent/llava"], "does not exist"),
        ("output-dir-unwritable", "eval", lambda a: [f"hydra.run.dir={a.afile / 'run'}"], "cannot write"),
        ("search-empty-split", "search", lambda a: gqa("gqa_empty", "dataset.search_split=testdev",
                                                          "dataset.search_questions_config=null",
                                                          "dataset.search_images_config=null")(a),
         "has no questions"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("command,overrides,needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_clear_message_exit_2_and_nothing_written(capsys, tmp_path, assets, command, overrides,
                                                                   needle):
    argv = overrides(assets)
    run = tmp_path / "run"
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={run}")
    code, out, err = run_cli(capsys, command, *argv)
    assert code == 2, (out, err)
    assert needle in err, err
    assert "Traceback" not in err and "Traceback" not in out
    assert _written(run) == []  # no results.json, plan.json, answers, checkpoint
    assert not list(tmp_path.glob("outputs/.answers/*.jsonl"))


def test_the_message_names_the_value_and_what_is_allowed(capsys, assets):
    code, _, err = run_cli(capsys, "eval", f"ckpt={assets.plans['keep']}")
    assert code == 2
    line = _message(err)
    assert line.startswith("diffopsearch eval: error:") and "keep = 200" in line and "keep must be in 1..144" in line


def test_a_good_plan_file_is_accepted(capsys, tmp_path, assets):
    """The control for the ckpt cases above: the undamaged plan evaluates."""
    code, _, err = run_cli(capsys, "eval", f"ckpt={assets.plans['good']}", "dataset=gqa", f"dataset.path={assets.gqa}",
                           f"model.path={assets.model}", "model.device=cpu", "limit=2", "max_new_tokens=1",
                           f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / ev.RESULTS_NAME).read_text())["plan"]["sites"][0]["keep"] == 72


def test_a_few_undecodable_images_are_skipped_and_named_not_fatal(tmp_path, assets, caplog):
    from diffopsearch.data.datasets import load_qa

    model, proc = fx.tiny_model()
    data = fx.write_gqa(tmp_path / "GQA", n_images=3, per_image=1, broken=("n1001",))
    with caplog.at_level("WARNING", logger="diffopsearch"):
        r = ev.evaluate(model, proc, None, load_qa("gqa", str(data)), batch_size=2, max_new_tokens=1,
                        out_dir=tmp_path / "run", show=False, latency_batches=0)
    assert r["n"] == 2 and r["image_errors"]["count"] == 1
    assert "1 of 3 questions skipped" in caplog.text and "20000001" in caplog.text


@pytest.mark.parametrize("how", ["debug", "env"])
def test_the_traceback_is_there_for_developers(capsys, monkeypatch, assets, how):
    argv = ["eval", f"ckpt={assets.plans['truncated']}"]
    if how == "debug":
        argv.append("debug=true")
    else:
        monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" in err and "looks truncated" in err


# --------------------------------------------------------------------------- interruption: SIGKILL

def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _diffopsearch(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "diffopsearch", *args], cwd=cwd, env=_env(), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _kill_when(args: list, cwd: Path, ready, timeout: float = 300) -> None:
    """Start `python -m diffopsearch ARGS`, SIGKILL it as soon as ``ready()`` is true."""
    log = cwd / f"killed-{time.monotonic_ns()}.stderr"
    with open(log, "wb") as err:  # a file, not a pipe: a full pipe would stall the run before its kill
        proc = subprocess.Popen([sys.executable, "-m", "diffopsearch", *args], cwd=cwd, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=err)
        t0 = time.time()
        try:
            while not ready():
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed: "
                                f"{log.read_text()[-2000:]}")
                if time.time() - t0 > timeout:
                    pytest.fail("the run never reached the point where it is killed")
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _without_run(path: Path) -> bytes:
    """plan.json's bytes with the one field that may differ between runs (``run``) taken out."""
    d = json.loads(path.read_text())
    assert {"created", "seconds", "resume", "resumed_from"} <= set(d.pop("run"))
    return json.dumps(d, indent=2).encode()


@pytest.mark.slow
def test_a_search_killed_after_its_first_checkpoint_resumes_to_the_same_plan(tmp_path, assets):
    args = [a for a in SEARCH_ARGS if not a.startswith("search.steps=")] + [
        "search.steps=8", f"model.path={assets.model}", f"dataset.path={assets.world}"]
    _diffopsearch(["search", *args, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path)
    killed = tmp_path / "killed"
    ckpt = killed / ck.CKPT_DIR / ck.CKPT_META
    _kill_when(["search", *args, f"hydra.run.dir={killed}"], tmp_path, ckpt.exists)
    assert not (killed / "plan.json").exists()
    step = json.loads(ckpt.read_text())["step"]
    assert step < 8  # killed mid-search
    _diffopsearch(["search", *args, f"hydra.run.dir={killed}", "resume=true"], tmp_path)
    straight, resumed = tmp_path / "straight" / "plan.json", killed / "plan.json"
    assert _without_run(resumed) == _without_run(straight)
    assert json.loads(resumed.read_text())["run"]["resumed_from"] == step
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "step_s"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    assert strip(killed / loop.LOG_NAME) == strip(tmp_path / "straight" / loop.LOG_NAME)


def _cached(cwd: Path) -> dict:
    (cache,) = (cwd / "outputs" / ".answers").glob("*.jsonl")
    key = json.loads(cache.read_text().splitlines()[0])["key"]
    return ev.read_cache(cache, key)


@pytest.mark.slow
def test_an_eval_killed_midway_recomputes_only_the_missing_answers(capsys, tmp_path, assets):
    data = fx.write_gqa(tmp_path / "GQA", n_images=20, per_image=2)
    args = [f"model.path={assets.model}", "model.device=cpu", "dataset=gqa", f"dataset.path={data}", "batch_size=1",
            "max_new_tokens=3"]
    answers = tmp_path / "outputs" / ".answers"
    lines = lambda: sum(1 for f in answers.glob("*.jsonl") for _ in open(f))  # noqa: E731
    _kill_when(["eval", *args, f"hydra.run.dir={tmp_path / 'killed'}"], tmp_path,
               lambda: answers.exists() and lines() >= 3)
    assert not (tmp_path / "killed" / ev.RESULTS_NAME).exists()
    before = _cached(tmp_path)
    assert 3 <= len(before) < 40
    code, _, err = run_cli(capsys, "eval", *args, f"hydra.run.dir={tmp_path / 'again'}")
    assert code == 0, err
    r = json.loads((tmp_path / "again" / ev.RESULTS_NAME).read_text())
    assert r["n"] == 40 and r["throughput"]["cached"] == len(before) and r["throughput"]["generated"] == 40 - len(before)
    after = _cached(tmp_path)
    assert len(after) == 40 and all(after[q] == p for q, p in before.items())


# --------------------------------------------------------------------------- interruption: atomic writes

# open() for writing outside io.py: the two logs grow by whole JSON lines (readers skip a torn last
# line; evaluate.py's "r+" closes such a line before the next append), and the prepare lock file.
APPEND_ONLY = {("search/loop.py", "a"), ("evaluate.py", "a"), ("evaluate.py", "r+"), ("backbone/train.py", "a"),
               ("backbone/load.py", "w")}
# Other writers outside io.py: the toy world is written into a temporary directory that is renamed
# whole; the toy backbone's training recipe (scripts/train_toy.py, not a command) save_pretrained's
# its final model into the directory it is given.
NON_ATOMIC_OK = {("backbone/train.py", "save_pretrained"), ("data/world.py", "to_parquet"),
                 ("data/world.py", "write_text")}
WRITERS = ("write_text", "write_bytes", "save_pretrained", "to_parquet", "savefig", "save_file", "dump", "save")


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            yield node


def test_every_file_the_tool_writes_goes_through_a_temporary_name():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel == "io.py":
            continue
        for call in _calls(path):
            f = call.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name == "open":
                mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords
                                                                    if k.arg == "mode"), None)
                mode = mode.value if isinstance(mode, ast.Constant) else "r"
                if any(c in mode for c in "wax+") and (rel, mode.replace("b", "")) not in APPEND_ONLY:
                    offenders.append(f"{rel}:{call.lineno} open(..., {mode!r})")
            elif name in WRITERS and (rel, name) not in NON_ATOMIC_OK:
                if any(isinstance(a, ast.Name) and a.id == "tmp" for a in call.args):
                    continue  # writes atomic_write's temporary file (io.atomic_write(path, lambda tmp: ...))
                if name in ("dump", "save") and not (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                                                     and f.value.id in ("json", "torch", "np", "numpy", "pickle")):
                    continue  # plan.save() and the like go through io.py themselves
                offenders.append(f"{rel}:{call.lineno} {name}(...)")
    assert offenders == [], "write through diffopsearch.io (temporary name + rename): " + ", ".join(offenders)


def test_a_kill_between_the_checkpoint_tensors_and_its_json_still_resumes(tmp_path, monkeypatch, tiny4, world_train):
    from diffopsearch import io

    model, proc = tiny4
    straight = _search(model, proc, world_train, tmp_path / "a", steps=3, checkpoint_every=1)
    real = io.atomic_write_json
    _interrupt_on_call(monkeypatch, io, "atomic_write_json", 2)  # the new tensors of step 2 are on disk, not its JSON
    with pytest.raises(Interrupted, match="at step 1 of 3 .last checkpoint: step 1"):
        _search(model, proc, world_train, tmp_path / "b", steps=3, checkpoint_every=1)
    monkeypatch.setattr(io, "atomic_write_json", real)
    d = tmp_path / "b" / ck.CKPT_DIR
    assert json.loads((d / ck.CKPT_META).read_text())["step"] == 1 and (d / ck.CKPT_PREV).exists()
    resumed = _search(model, proc, world_train, tmp_path / "b", steps=3, checkpoint_every=1, resume=True)
    assert resumed.resumed_from == 1
    for (name, x), (_, y) in zip(straight.state.named_parameters(), resumed.state.named_parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("crash_at", ["write", "rename"])
def test_a_crash_while_writing_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, crash_at):
    from diffopsearch import io

    target = tmp_path / "plan.json"
    io.atomic_write_json(target, {"v": 1})

    def half_then_crash(tmp):
        Path(tmp).write_text('{"v": 2, "sit')  # half of the new content
        raise KeyboardInterrupt

    if crash_at == "rename":
        monkeypatch.setattr(io.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("disk gone")))
        with pytest.raises(OSError):
            io.atomic_write_json(target, {"v": 2})
    else:
        with pytest.raises(KeyboardInterrupt):
            io.atomic_write(target, half_then_crash)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_an_unwritable_output_path_is_a_user_error_that_is_still_an_oserror(tmp_path):
    from diffopsearch.errors import UnwritableError
    from diffopsearch.io import atomic_write_json, check_writable_dir

    (tmp_path / "f").write_text("")
    for call in (lambda: atomic_write_json(tmp_path / "f" / "results.json", {}),
                 lambda: check_writable_dir(tmp_path / "f" / "run")):
        with pytest.raises(UnwritableError, match="cannot write") as e:
            call()
        assert isinstance(e.value, OSError) and isinstance(e.value, UserError)


# --------------------------------------------------------------------------- interruption: Ctrl-C

def _interrupt_on_call(monkeypatch, module, name, n):
    """Make ``module.name`` raise KeyboardInterrupt on its n-th call (1-based), as Ctrl-C would."""
    real, calls = getattr(module, name), []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _message(err: str) -> str:
    """The command's own one line on stderr (datasets' progress bars share the stream)."""
    (line,) = [x for x in err.splitlines() if x.startswith("diffopsearch ")]
    return line


def test_ctrl_c_in_a_search_stops_cleanly_and_says_how_to_resume(capsys, monkeypatch, tmp_path, assets):
    _interrupt_on_call(monkeypatch, loop, "plan_losses", 2 * CALLS_PER_STEP + 1)  # step 2, just after its checkpoint
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "search", *SEARCH_ARGS, f"model.path={assets.model}",
                           f"dataset.path={assets.world}", f"hydra.run.dir={run}")
    assert code == 130 and "Traceback" not in err
    assert _message(err) == (f"diffopsearch search: interrupted at step 2 of 4 (last checkpoint: step 2); rerun with "
                             f"resume=true (same hydra.run.dir='{run}') to continue from the last checkpoint")
    assert json.loads((run / ck.CKPT_DIR / ck.CKPT_META).read_text())["step"] == 2
    assert not (run / "plan.json").exists()


@pytest.mark.parametrize("where", ["selection", "final eval"])
def test_ctrl_c_during_selection_or_the_final_eval_resumes_to_the_same_plan(capsys, monkeypatch, tmp_path, assets,
                                                                             where):
    """After the last step: a kill while selection scores the candidates, or while the searched plan is
    evaluated, then ``resume=true`` in the same run dir: the same plan.json (but its ``run`` record) as a
    run never interrupted, and complete results."""
    args = [*SEARCH_ARGS, f"model.path={assets.model}", f"dataset.path={assets.world}"]
    straight = tmp_path / "straight"
    assert run_cli(capsys, "search", *args, f"hydra.run.dir={straight}")[0] == 0
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        if where == "selection":
            _interrupt_on_call(mp, loop, "plan_scores", 2)
        else:
            _interrupt_on_call(mp, ev, "generate_answers", 1)
        code, _, err = run_cli(capsys, "search", *args, f"hydra.run.dir={run}")
    assert code == 130 and "Traceback" not in err and "resume=true" in _message(err)
    assert json.loads((run / ck.CKPT_DIR / ck.CKPT_META).read_text())["step"] == 4  # training was done
    assert run_cli(capsys, "search", *args, f"hydra.run.dir={run}", "resume=true")[0] == 0
    a, b = (json.loads((d / "plan.json").read_text()) for d in (straight, run))
    assert {k: v for k, v in a.items() if k != "run"} == {k: v for k, v in b.items() if k != "run"}
    assert b["run"]["resume"] is True and b["run"]["resumed_from"] == 4
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (straight, run))
    assert rb["n"] == ra["n"] and rb["accuracy"] == ra["accuracy"]


def test_ctrl_c_in_an_eval_stops_cleanly_and_keeps_the_answers(capsys, monkeypatch, tmp_path, assets):
    _interrupt_on_call(monkeypatch, ev, "generate_answers", 3)
    code, _, err = run_cli(capsys, "eval", f"model.path={assets.model}", "model.device=cpu", "dataset=gqa",
                           f"dataset.path={assets.gqa}", "batch_size=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 130 and "Traceback" not in err
    assert _message(err).startswith("diffopsearch eval: interrupted after 4 of 6 answers (4 new in this run); rerun "
                                    "the same command")
    assert len(_cached(tmp_path)) == 4 and not (tmp_path / "run" / ev.RESULTS_NAME).exists()


def test_interrupted_is_a_keyboard_interrupt():
    err = Interrupted("at step 3 of 6")
    assert isinstance(err, KeyboardInterrupt) and err.where == "at step 3 of 6" and err.exit_code == 130


# --------------------------------------------------------------------------- determinism

@pytest.mark.slow
def test_the_same_config_and_seed_give_a_byte_identical_plan(capsys, tmp_path, assets):
    args = SEARCH_ARGS + [f"model.path={assets.model}", f"dataset.path={assets.world}", "seed=0"]
    for name in ("a", "b"):
        code, _, err = run_cli(capsys, "search", *args, f"hydra.run.dir={tmp_path / name}")
        assert code == 0, err
    a, b = tmp_path / "a" / "plan.json", tmp_path / "b" / "plan.json"
    assert _without_run(a) == _without_run(b)
    plan = json.loads(a.read_text())
    assert plan["search"]["seed"] == plan["seed"] == 0 and "resume" not in plan["search"]["config"]
    assert list(plan)[-1] == "run"  # the one field allowed to differ, apart


def test_seed_is_a_top_level_override_defaulting_to_0():
    from diffopsearch.config import compose
    from diffopsearch.search import settings_from

    assert compose("search").seed == 0 and compose("eval").seed == 0
    assert settings_from(compose("search", ["seed=3"])).seed == 3


# --------------------------------------------------------------------------- numerical faults

@pytest.fixture(scope="module")
def world_train(assets):
    from diffopsearch.data.datasets import load_qa

    return load_qa("toy", str(assets.world), split="train")


def _search(model, proc, train, out, **kw):
    from diffopsearch.plan import backbone_info
    from diffopsearch.search.space import Planner, make_space

    space = make_space(model.config, [1, 2])
    resume = kw.pop("resume", False)
    st = loop.SearchSettings(**{**dict(budget=0.6, steps=4, batch_size=2, plans_per_step=2, knob_plans=1,
                                       checkpoint_every=2, lr=0.1), **kw})
    planner = Planner(space, backbone_info(model.config), st.budget, model.config.text_config, 20.0)
    return loop.search(model, proc, train, space, planner, st, 20.0, out_dir=out, progress=False, resume=resume)


CALLS_PER_STEP = 3  # plan_losses calls per step of _search: 2 plans, then the best one again for the knobs


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, tiny4, world_train):
    model, proc = tiny4
    _nan_loss_at_call(monkeypatch, 3 * CALLS_PER_STEP + 1)  # step 3
    with pytest.raises(NumericalError) as e:
        _search(model, proc, world_train, tmp_path)
    msg = str(e.value)
    assert "stopped at step 3" in msg and "task loss is nan" in msg
    assert "last good checkpoint (step 2)" in msg and "search.lr=0.1" in msg and "search.grad_clip=" in msg
    from safetensors.torch import load_file

    assert json.loads((tmp_path / ck.CKPT_DIR / ck.CKPT_META).read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / ck.CKPT_DIR / ck.CKPT_TENSORS).values())
    assert [json.loads(x)["step"] for x in (tmp_path / loop.LOG_NAME).read_text().splitlines()] == [0, 1, 2]


def test_an_inf_in_the_architecture_state_stops_the_search(tmp_path, monkeypatch, tiny4, world_train):
    model, proc = tiny4
    real, calls = torch.optim.Adam.step, []

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    with pytest.raises(NumericalError, match=r"stopped at step 1: the architecture state is inf.*no checkpoint"):
        _search(model, proc, world_train, tmp_path)


def _nan_loss_at_call(monkeypatch, n):
    real, calls = loop.plan_losses, []

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        return out * float("nan") if len(calls) == n else out

    monkeypatch.setattr(loop, "plan_losses", poisoned)


def test_a_nan_search_from_the_command_line_is_one_message_exit_2(capsys, monkeypatch, tmp_path, assets):
    _nan_loss_at_call(monkeypatch, 1)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "search", *SEARCH_ARGS, f"model.path={assets.model}",
                           f"dataset.path={assets.world}", f"hydra.run.dir={run}")
    assert code == 2 and "Traceback" not in err
    line = _message(err)
    assert "stopped at step 0: the task loss is nan" in line and "search.lr=" in line and "search.grad_clip=" in line
    assert not (run / "plan.json").exists()


def test_architecture_gradients_are_clipped_by_default(tmp_path, monkeypatch, tiny4, world_train):
    from diffopsearch.config import compose

    assert loop.SearchSettings().grad_clip == compose("search").search.grad_clip > 0
    g = [torch.tensor([3e20, 4e20]), torch.tensor([0.0])]  # float32 squares overflow; the float64 sum does not
    assert loop.clip_grads_(g, 1.0) == (pytest.approx(5e20), 0)
    assert torch.allclose(torch.cat(g), torch.tensor([0.6, 0.8, 0.0]))
    g = [torch.tensor([float("inf"), 0.5]), torch.tensor([float("nan")])]  # an overflow in the backward pass
    norm, bad = loop.clip_grads_(g, 1.0)
    assert bad == 2 and math.isfinite(norm) and torch.allclose(torch.cat(g), torch.tensor([1.0, 0.0, 0.0]), atol=1e-30)
    g = [torch.tensor([float("inf"), 0.5])]
    assert loop.clip_grads_(g, 0.0) == (float("inf"), 1) and g[0][1] == 0.5  # not clipping: left alone, reported
    # in the loop: the update sees the clipped gradient, the log the norm before clipping
    model, proc = tiny4
    real, norms = torch.optim.Adam.step, []

    def spy(self, *a, **k):
        norms.append(float(torch.cat([p.grad.reshape(-1) for p in self.param_groups[0]["params"]]).norm()))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    res = _search(model, proc, world_train, None, grad_clip=1e-4, steps=3)
    logged = [r["grad_norm"] for r in res.history]
    assert max(logged) > 1e-4 and all(n <= 1e-4 * (1 + 1e-4) for n in norms)


def test_an_inf_gradient_is_clipped_and_stops_the_search_only_with_clipping_off(monkeypatch, tiny4, world_train):
    model, proc = tiny4
    real, calls = loop.Procs.mean_, []

    def overflow_at_step_1(self, tensors):
        real(self, tensors)
        calls.append(1)
        if len(calls) == 4:  # per step: the plans' losses, then the gradients; this is step 1's gradients
            tensors[0].view(-1)[0] = float("inf")  # the first architecture gradient (the policy's logits)

    monkeypatch.setattr(loop.Procs, "mean_", overflow_at_step_1)
    res = _search(model, proc, world_train, None, steps=2)
    assert [r["grad_nonfinite"] for r in res.history] == [0, 1]
    assert all(torch.isfinite(p).all() for p in res.state.parameters())
    calls.clear()
    with pytest.raises(NumericalError, match=r"stopped at step 1: the architecture-state gradient is inf.*"
                                             r"search.grad_clip=0 \(off\)"):
        _search(model, proc, world_train, None, steps=2, grad_clip=0.0)


# --------------------------------------------------------------------------- safe loading

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _sources():
    return sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


def test_no_pickle_and_no_unsafe_torch_load_anywhere():
    offenders = []
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] in UNSAFE_MODULES for n in names):
                    offenders.append(f"{rel}:{node.lineno} imports {names}")
            elif isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                kw = {k.arg: k.value for k in node.keywords}
                if name == "load" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "torch":
                    wo = kw.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        offenders.append(f"{rel}:{node.lineno} torch.load without weights_only=True")
                if name in ("read_pickle", "load_pickle"):
                    offenders.append(f"{rel}:{node.lineno} {name}")
                for key in ("allow_pickle", "trust_remote_code"):
                    v = kw.get(key)
                    if isinstance(v, ast.Constant) and v.value is True:
                        offenders.append(f"{rel}:{node.lineno} {key}=True")
    assert offenders == []


def test_shipped_files_hold_no_pickle():
    pickled = [p for p in PACKAGE.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".npy")]
    assert pickled == []
    assert list((PACKAGE / "assets" / "toy-llava").glob("*.safetensors"))


def test_trust_remote_code_is_off_unless_a_config_turns_it_on(monkeypatch, assets):
    import transformers
    from omegaconf import OmegaConf

    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.config import compose

    for model in ("toy", "llava", "llava13b"):
        assert compose("eval", [f"model={model}"]).model.trust_remote_code is False
    seen = []
    for cls in (transformers.AutoProcessor, transformers.LlavaForConditionalGeneration):
        real = cls.from_pretrained.__func__

        def spy(c, *a, _real=real, **k):
            seen.append(k.get("trust_remote_code"))
            return _real(c, *a, **k)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    base = {"name": "toy", "path": str(assets.model), "dtype": "auto", "device": "cpu"}
    load_backbone(OmegaConf.create(base))
    load_backbone(OmegaConf.create({**base, "trust_remote_code": True}))
    assert seen == [False, False, True, True]
