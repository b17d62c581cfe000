"""Interruption: a run killed (SIGKILL) or stopped by Ctrl-C keeps what it had done and its rerun finishes.

A search killed after a checkpoint resumes (``resume=true``) to the plan of a run never interrupted; an
eval killed midway recomputes only the answers it had not cached; Ctrl-C stops a search (during its
steps, its selection or its final eval) or an eval with exit code 130, no traceback, and one line saying
how to continue. The SIGKILL tests really kill a ``python -m diffopsearch`` subprocess and rerun it; the
Ctrl-C tests raise KeyboardInterrupt inside the real command run in process. Models are the tiny
random-weight LLaVAs of the real classes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fixtures as fx  # tests/fixtures.py
from diffopsearch import evaluate as ev
from diffopsearch.errors import Interrupted
from diffopsearch.search import checkpoint as ck
from diffopsearch.search import loop
from fixtures import SEARCH_ARGS, cli_message, interrupt_on_call, plan_without_run, run_cli

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("clean_cli_env")  # tests/conftest.py


# --------------------------------------------------------------------------- a kill (SIGKILL) and the rerun

def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _two_processes() -> list:
    """``accelerate launch`` of two CPU processes (gloo) on a free port: a launcher prefix."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # accelerate 1.15: `--multi_gpu` starts two processes through torchrun; without CUDA they run on the CPU
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port)]


def _diffopsearch(args: list, cwd: Path, timeout: int = 300, launcher=None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "diffopsearch", *args]
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _kill_tree(proc) -> None:
    """SIGKILL ``proc`` and every process below it (torchrun's workers start sessions of their own, so a
    process-group kill would leave them running)."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    for p in tree:
        p.kill()
    os.killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)


def _kill_when(args: list, cwd: Path, ready, timeout: float = 300, launcher=None) -> None:
    """Start `python -m diffopsearch ARGS` (under ``launcher``: every process it starts), SIGKILL its whole
    process group as soon as ``ready()`` is true."""
    log = cwd / f"killed-{time.monotonic_ns()}.stderr"
    with open(log, "wb") as err:  # a file, not a pipe: a full pipe would stall the run before its kill
        proc = subprocess.Popen((launcher or [sys.executable]) + ["-m", "diffopsearch", *args], cwd=cwd,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        t0 = time.time()
        try:
            while not ready():
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed: "
                                f"{log.read_text()[-2000:]}")
                if time.time() - t0 > timeout:
                    pytest.fail("the run never reached the point where it is killed")
                time.sleep(0.01)
            _kill_tree(proc)
        finally:
            if proc.poll() is None:
                _kill_tree(proc)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _killed_and_resumed_equals_straight(tmp_path, assets, steps: int, launcher=None) -> None:
    """A search run straight through, and the same search SIGKILLed after its first checkpoint and resumed
    (every run under ``launcher``): the same plan and step log."""
    args = [a for a in SEARCH_ARGS if not a.startswith("search.steps=")] + [
        f"search.steps={steps}", f"model.path={assets.model}", f"dataset.path={assets.world}"]
    launch = (lambda: _two_processes()) if launcher == "two" else (lambda: None)  # a fresh port per launch
    _diffopsearch(["search", *args, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path, launcher=launch())
    killed = tmp_path / "killed"
    ckpt = killed / ck.CKPT_DIR / ck.CKPT_META
    _kill_when(["search", *args, f"hydra.run.dir={killed}"], tmp_path, ckpt.exists, launcher=launch())
    assert not (killed / "plan.json").exists()
    step = json.loads(ckpt.read_text())["step"]
    assert step < steps  # killed mid-search
    _diffopsearch(["search", *args, f"hydra.run.dir={killed}", "resume=true"], tmp_path, launcher=launch())
    straight, resumed = tmp_path / "straight" / "plan.json", killed / "plan.json"
    assert plan_without_run(resumed) == plan_without_run(straight)
    assert json.loads(resumed.read_text())["run"]["resumed_from"] == step
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "step_s"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    assert strip(killed / loop.LOG_NAME) == strip(tmp_path / "straight" / loop.LOG_NAME)


@pytest.mark.slow
def test_a_search_killed_after_its_first_checkpoint_resumes_to_the_same_plan(tmp_path, assets):
    _killed_and_resumed_equals_straight(tmp_path, assets, steps=8)


@pytest.mark.slow
def test_a_two_process_search_killed_after_a_checkpoint_resumes_to_the_same_plan(tmp_path, assets):
    """Data parallel (2 processes, gloo): every process killed after the first checkpoint, the run resumed
    with 2 processes ends at the plan and the step log of a 2-process run never interrupted."""
    _killed_and_resumed_equals_straight(tmp_path, assets, steps=6, launcher="two")


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


# --------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_in_a_search_stops_cleanly_and_says_how_to_resume(capsys, monkeypatch, tmp_path, assets):
    interrupt_on_call(monkeypatch, loop, "reference_logprobs", 3)  # step 2 (one reference per step), just after
    # its checkpoint
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "search", *SEARCH_ARGS, f"model.path={assets.model}",
                           f"dataset.path={assets.world}", f"hydra.run.dir={run}")
    assert code == 130 and "Traceback" not in err
    assert cli_message(err) == (f"diffopsearch search: interrupted at step 2 of 4 (last checkpoint: step 2); "
                                f"rerun with resume=true (same hydra.run.dir='{run}') to continue from the last "
                                f"checkpoint")
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
            interrupt_on_call(mp, loop, "plan_scores", 2)
        else:
            interrupt_on_call(mp, ev, "generate_answers", 1)
        code, _, err = run_cli(capsys, "search", *args, f"hydra.run.dir={run}")
    assert code == 130 and "Traceback" not in err and "resume=true" in cli_message(err)
    assert json.loads((run / ck.CKPT_DIR / ck.CKPT_META).read_text())["step"] == 4  # training was done
    assert run_cli(capsys, "search", *args, f"hydra.run.dir={run}", "resume=true")[0] == 0
    a, b = (json.loads((d / "plan.json").read_text()) for d in (straight, run))
    assert {k: v for k, v in a.items() if k != "run"} == {k: v for k, v in b.items() if k != "run"}
    assert b["run"]["resume"] is True and b["run"]["resumed_from"] == 4
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (straight, run))
    assert rb["n"] == ra["n"] and rb["accuracy"] == ra["accuracy"]


def test_ctrl_c_in_an_eval_stops_cleanly_and_keeps_the_answers(capsys, monkeypatch, tmp_path, assets):
    interrupt_on_call(monkeypatch, ev, "generate_answers", 3)
    code, _, err = run_cli(capsys, "eval", f"model.path={assets.model}", "model.device=cpu", "dataset=gqa",
                           f"dataset.path={assets.gqa}", "batch_size=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 130 and "Traceback" not in err
    assert cli_message(err).startswith("diffopsearch eval: interrupted after 4 of 6 answers (4 new in this run); "
                                       "rerun the same command")
    assert len(_cached(tmp_path)) == 4 and not (tmp_path / "run" / ev.RESULTS_NAME).exists()


def test_interrupted_is_a_keyboard_interrupt():
    err = Interrupted("at step 3 of 6")
    assert isinstance(err, KeyboardInterrupt) and err.where == "at step 3 of 6" and err.exit_code == 130
