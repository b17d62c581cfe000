"""The `diffopsearch` command: dispatch, Hydra behaviour, exit codes, sweeps.

The command bodies (search / evaluate / report / prepare_toy) are replaced by fakes here (the
``bodies`` fixture, tests/conftest.py), so these tests check the CLI alone, in seconds."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import diffopsearch
from diffopsearch import cli
from diffopsearch.errors import UserError
from fixtures import run_cli  # tests/fixtures.py: the in-process runner

REPO = Path(diffopsearch.__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("clean_cli_env")  # tests/conftest.py


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_no_arguments_or_help_lists_the_subcommands(capsys, argv):
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    for command in ("search", "eval", "report", "prepare"):
        assert f"\n  {command}" in out


def test_unknown_subcommand_exits_2(capsys):
    code, _, err = run_cli(capsys, "serch")
    assert code == 2 and "unknown command 'serch'" in err and "search" in err


def test_subcommand_help_is_hydras_with_our_groups(capsys, bodies):
    code, out, _ = run_cli(capsys, "search", "--help")
    assert code == 0
    assert "diffopsearch search" in out and "model: llava, llava13b, toy" in out
    assert "dataset: gqa, toy, vqav2" in out and "budget: 0.6" in out
    assert bodies.calls == []


def test_cfg_job_prints_the_composed_config_without_running(capsys, bodies, tmp_path):
    code, out, _ = run_cli(capsys, "eval", "--cfg", "job", "model=llava", "budget=0.5")
    assert code == 0 and bodies.calls == []
    cfg = yaml.safe_load(out)
    assert cfg["model"]["path"] == "llava-hf/llava-1.5-7b-hf" and cfg["budget"] == 0.5
    assert not (tmp_path / "outputs").exists()


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("diffopsearch ")


def test_task_functions_are_importable_by_name_for_launchers():
    """submitit pickles the task function by reference: it must be the module attribute itself."""
    for command in cli.COMMANDS:
        task = getattr(cli, f"{command}_task")
        assert getattr(sys.modules[task.__module__], task.__qualname__) is task


# --------------------------------------------------------------------------- running


@pytest.mark.parametrize("command,extra", [("search", ["budget=0.4", "search=thorough"]), ("eval", ["plan=fastv"])])
def test_run_calls_the_body_with_the_config_in_hydra_run_dir(capsys, bodies, tmp_path, command, extra):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, command, *extra, f"hydra.run.dir={out_dir}")
    assert code == 0, err
    ((called, cfg),) = bodies.calls
    assert called == command
    if command == "search":
        assert cfg.budget == 0.4 and cfg.search.steps == 150
    else:
        assert cfg.plan.name == "fastv" and cfg.budget == 1.0
    assert json.loads((out_dir / "results.json").read_text())["command"] == command
    assert (out_dir / ".hydra" / "config.yaml").exists()  # Hydra's own record of the run


def test_below_budget_0_3_a_search_job_runs_the_thorough_preset_in_a_sweep_too(capsys, bodies, tmp_path):
    """The switch is made per job (a sweep's budgets differ) and keeps the user's search.* overrides."""
    code, _, err = run_cli(capsys, "search", "-m", "budget=0.6,0.25", "search.select_margin=2",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 0, err
    jobs = {cfg.budget: cfg.search for _, cfg in bodies.calls}
    assert jobs[0.6].preset == "default" and jobs[0.6].plans_per_step == 8
    assert jobs[0.25].preset == "thorough" and jobs[0.25].plans_per_step == 12 and jobs[0.25].steps == 150
    assert jobs[0.6].select_margin == jobs[0.25].select_margin == 2
    assert sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/results.json")) == ["0", "1"]


def test_default_run_dir_is_under_outputs_of_the_cwd(capsys, bodies, tmp_path):
    code, _, _ = run_cli(capsys, "eval")
    assert code == 0
    (results,) = (tmp_path / "outputs").glob("*/*_eval/results.json")
    assert results.is_file()


def test_report_runs_in_place_and_leaves_no_hydra_files(capsys, bodies, tmp_path):
    (tmp_path / "runs").mkdir()
    code, _, err = run_cli(capsys, "report", "dir=runs")
    assert code == 0, err
    ((called, cfg),) = bodies.calls
    assert called == "report" and cfg.report.dir == "runs"
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


def test_prepare_prints_backbone_and_dataset(capsys, monkeypatch, tmp_path):
    import diffopsearch.backbone.load as load

    monkeypatch.setattr(load, "prepare_toy", lambda: (tmp_path / "bb", tmp_path / "ds"))
    code, out, _ = run_cli(capsys, "prepare")
    assert code == 0
    assert f"backbone: {tmp_path / 'bb'}\ndataset: {tmp_path / 'ds'}\n" in out
    assert not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv,needle", [
    (["search", "model=foo"], "Available options in 'model'"),
    (["eval", "dataset=coco"], "Available options in 'dataset'"),
    (["search", "budget=abc"], "could not be converted to Float"),
    (["eval", "foo=1"], "Key 'foo' not in 'EvalApp'"),
    (["search", "budget=1.5"], "budget=1.5 is not valid"),
    (["eval", "budget=0"], "budget=0.0 is not valid"),
    (["search", "model.dtype=int8"], "model.dtype='int8'"),
    (["report"], "report needs a directory"),
])
def test_bad_input_exits_2_with_one_message_and_no_traceback(capsys, bodies, argv, needle):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert bodies.calls == []


def test_user_error_from_the_body_exits_2_without_traceback(capsys, bodies, tmp_path):
    bodies.fail["eval"] = UserError("backbone directory '/x' is incomplete: missing config.json.")
    code, _, err = run_cli(capsys, "eval", f"hydra.run.dir={tmp_path / 'r'}")
    assert code == 2
    assert err.strip() == "diffopsearch eval: error: backbone directory '/x' is incomplete: missing config.json."


@pytest.mark.parametrize("how", ["env", "debug"])
def test_traceback_on_request(capsys, bodies, monkeypatch, tmp_path, how):
    bodies.fail["eval"] = UserError("bad thing")
    argv = ["eval", f"hydra.run.dir={tmp_path / 'r'}"]
    if how == "env":
        monkeypatch.setenv("DIFFOPSEARCH_TRACEBACK", "1")
    else:
        argv.append("debug=true")
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" in err and "error: bad thing" in err


def test_a_bug_in_the_body_exits_1_with_its_stack(capsys, bodies, tmp_path):
    bodies.fail["search"] = ZeroDivisionError("oops")
    code, _, err = run_cli(capsys, "search", f"hydra.run.dir={tmp_path / 'r'}")
    assert code == 1 and "ZeroDivisionError: oops" in err and "Traceback" in err


def test_hydra_full_error_shows_the_stack_and_still_exits_2(capsys, bodies, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    code, _, err = run_cli(capsys, "search", "model=foo")
    assert code == 2 and "Traceback" in err and "model/foo" in err


def test_hydra_usage_errors_exit_2(capsys, bodies):
    code, _, err = run_cli(capsys, "search", "-m", "--cfg", "job")
    assert code == 2 and "Only one of" in err and "Traceback" not in err


# --------------------------------------------------------------------------- sweeps


def test_multirun_over_two_budgets_makes_two_job_dirs(capsys, bodies, tmp_path):
    sweep = tmp_path / "sweep"
    code, _, err = run_cli(capsys, "search", "-m", "budget=0.8,0.6", f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    assert [cfg.budget for _, cfg in bodies.calls] == [0.8, 0.6]
    for num, budget in ((0, 0.8), (1, 0.6)):
        assert json.loads((sweep / str(num) / "results.json").read_text())["budget"] == budget
        assert (sweep / str(num) / ".hydra" / "overrides.yaml").exists()


def test_default_sweep_dir_is_under_multirun_of_the_cwd(capsys, bodies, tmp_path):
    code, _, _ = run_cli(capsys, "eval", "-m", "plan=none,random")
    assert code == 0
    assert len(list((tmp_path / "multirun").glob("*/*_eval/*/results.json"))) == 2


def test_a_failed_sweep_job_does_not_stop_the_others(capsys, bodies, tmp_path):
    sweep = tmp_path / "sweep"
    code, _, err = run_cli(capsys, "search", "-m", "budget=1.5,0.6", f"hydra.sweep.dir={sweep}")
    assert code == 2  # every failure was bad input
    assert [cfg.budget for _, cfg in bodies.calls] == [0.6]  # the valid job still ran
    error = json.loads((sweep / "0" / "error.json").read_text())
    assert error["user_error"] and "budget=1.5" in error["error"] and error["overrides"] == ["budget=1.5"]
    assert (sweep / "1" / "results.json").exists()
    assert "1 sweep job(s) failed" in err and "budget=1.5" in err and "Traceback" not in err


def test_a_crashing_sweep_job_is_reported_and_the_sweep_goes_on(capsys, bodies, tmp_path):
    sweep = tmp_path / "sweep"
    bodies.fail["search"] = lambda cfg: RuntimeError("nan loss") if cfg.budget == 0.8 else None
    code, _, err = run_cli(capsys, "search", "-m", "budget=0.8,0.6,0.4", f"hydra.sweep.dir={sweep}")
    assert code == 1
    assert [cfg.budget for _, cfg in bodies.calls] == [0.8, 0.6, 0.4]
    error = json.loads((sweep / "0" / "error.json").read_text())
    assert not error["user_error"] and "RuntimeError: nan loss" in error["traceback"]
    assert (sweep / "1" / "results.json").exists() and (sweep / "2" / "results.json").exists()


# --------------------------------------------------------------------------- accelerate relaunch


def test_relaunch_rule():
    from omegaconf import OmegaConf

    def cfg(acc):
        return OmegaConf.create({"launch": {"accelerate": acc, "num_processes": None, "args": []}})

    assert not cli._should_relaunch(cfg(None), {})
    assert cli._should_relaunch(cfg(None), {"SUBMITIT_EXECUTOR": "slurm"})
    assert not cli._should_relaunch(cfg(None), {"SUBMITIT_EXECUTOR": "local"})
    assert cli._should_relaunch(cfg(True), {})
    assert not cli._should_relaunch(cfg(False), {"SUBMITIT_EXECUTOR": "slurm"})
    for worker in ("DIFFOPSEARCH_LAUNCHED", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        assert not cli._should_relaunch(cfg(True), {worker: "1", "SUBMITIT_EXECUTOR": "slurm"})
    assert not cli._should_relaunch(OmegaConf.create({"dir": "x"}), {"SUBMITIT_EXECUTOR": "slurm"})


def test_accelerate_command_reruns_the_job_in_its_own_dir():
    argv = cli.accelerate_argv("search", ["budget=0.6", "model=llava"], "/sweep/it's/0", 8,
                               ["--mixed_precision", "bf16"])
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert argv[argv.index("--num_processes") + 1] == "8" and "--multi_gpu" in argv
    tail = argv[argv.index("-m", 3):]
    assert tail[:3] == ["-m", "diffopsearch", "search"]
    assert tail[3:5] == ["budget=0.6", "model=llava"]
    assert "hydra.run.dir='/sweep/it\\'s/0'" in tail
    assert "--multi_gpu" not in cli.accelerate_argv("eval", [], "/r", 1)
    # the quoted override parses back to the same path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (parsed,) = OverridesParser.create().parse_overrides([a for a in tail if a.startswith("hydra.run.dir")])
    assert parsed.value() == "/sweep/it's/0"


def test_the_job_relaunches_itself_when_asked(capsys, bodies, monkeypatch, tmp_path):
    seen = {}

    def fake_call(argv, env):
        seen["argv"], seen["env"] = argv, env
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    code, _, err = run_cli(capsys, "search", "budget=0.4", "launch.accelerate=true", "launch.num_processes=2",
                           f"hydra.run.dir={tmp_path / 'r'}")
    assert code == 0, err
    assert bodies.calls == []  # the parent only relaunches
    assert seen["env"]["DIFFOPSEARCH_LAUNCHED"] == "1"
    assert "budget=0.4" in seen["argv"] and f"hydra.run.dir='{tmp_path / 'r'}'" in seen["argv"]


@pytest.mark.slow
def test_the_cli_tears_down_a_process_group_before_it_exits(tmp_path):
    """A multi-process run's gloo group is destroyed when the command returns: exiting with its threads alive
    aborted a rank once in CI ("terminate called without an active exception")."""
    import torch.distributed as dist

    from diffopsearch.runtime import close_process_group

    close_process_group()  # nothing set up: a no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert cli.main(["eval", "budget=7"]) == 2 and not dist.is_initialized()  # bad input, exit 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_exit_process_exits_with_the_code_and_skips_finalization_only_after_a_process_group(tmp_path):
    """A rank of a multi-process run leaves with os._exit after its group is closed (gloo's threads can abort
    the interpreter's finalization); its printed output still arrives. A plain run exits normally."""
    def run(group: bool):  # in a child: os._exit would end this test process
        script = ("import atexit, torch.distributed as dist\n"
                  "from diffopsearch.runtime import exit_process\n"
                  "atexit.register(lambda: print(' finalized', end=''))\n")
        if group:
            store = f"file://{tmp_path / 'store'}"
            script += f"dist.init_process_group('gloo', init_method={store!r}, rank=0, world_size=1)\n"
        script += "print('answered', end='')\nexit_process(5)\n"
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert out.returncode == 5, out.stderr[-2000:]
        return out.stdout

    assert run(group=False) == "answered finalized"
    assert run(group=True) == "answered"


def test_launch_accelerate_really_relaunches_with_two_processes(tmp_path, assets):
    """No mock: `eval launch.accelerate=true launch.num_processes=2` re-runs itself under `accelerate launch`
    (two CPU processes, gloo; a free port through accelerate's own default is not guaranteed, so one is
    passed in launch.args), and the results say two processes answered."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DIFFOPSEARCH_LAUNCHED", None)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "diffopsearch", "eval", f"model.path={assets.model}", "model.device=cpu",
                        f"dataset.path={assets.world}", "limit=4", "batch_size=2", "max_new_tokens=2",
                        "launch.accelerate=true", "launch.num_processes=2",
                        f"launch.args=[--main_process_port,'{port}']", f"hydra.run.dir={run}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["throughput"]["processes"] == 2 and results["n"] == 4


# --------------------------------------------------------------------------- as a subprocess


def _subprocess(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_python_dash_m_help(tmp_path):
    r = _subprocess([sys.executable, "-m", "diffopsearch", "--help"], tmp_path)
    assert r.returncode == 0 and "prepare" in r.stdout and "report" in r.stdout


def test_python_dash_m_eval_cfg_job(tmp_path):
    r = _subprocess([sys.executable, "-m", "diffopsearch", "eval", "--cfg", "job"], tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["model"]["name"] == "toy" and cfg["plan"]["name"] == "none"


def test_subprocess_bad_budget_exits_2_without_traceback(tmp_path):
    r = _subprocess([sys.executable, "-m", "diffopsearch", "search", "budget=2"], tmp_path)
    assert r.returncode == 2
    assert "budget=2.0 is not valid" in r.stderr and "Traceback" not in r.stderr


def test_subprocess_unknown_model_exits_2(tmp_path):
    r = _subprocess([sys.executable, "-m", "diffopsearch", "eval", "model=gpt"], tmp_path)
    assert r.returncode == 2 and "Could not find 'model/gpt'" in r.stderr and "Traceback" not in r.stderr


def test_console_script_when_installed(tmp_path):
    exe = shutil.which("diffopsearch") or (Path(sys.executable).parent / "diffopsearch")
    if not Path(exe).exists():
        pytest.skip("the console script is not installed in this environment")
    r = _subprocess([str(exe), "eval", "--cfg", "job", "budget=0.25"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["budget"] == 0.25
