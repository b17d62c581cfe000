"""Budget sweeps end to end: `diffopsearch eval -m ...` with the real eval body on a tiny saved LLaVA and
a local GQA copy, a failing job that does not stop the sweep, `diffopsearch report` over the sweep, and
the SLURM launcher's composition for `search -m hydra/launcher=slurm budget=...`.

Hydra 1.3's basic launcher runs every job of a batch (``run_job`` turns an exception into a FAILED
JobReturn) and only then re-raises the first failure, so without cli.py's per-job catch the sweep would
end with one bare traceback and no record of which job failed; a ``SystemExit`` would stop it at once.
These tests pin the behaviour the CLI gives instead."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import fixtures as fx  # tests/fixtures.py
from diffopsearch import cli
from diffopsearch import report as rp


pytestmark = pytest.mark.usefixtures("clean_cli_env")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved random 4-layer toy LLaVA (real classes, loaded by load_backbone from its directory) and a
    GQA fixture with 3 images x 2 questions."""
    from diffopsearch.backbone import toy

    root = tmp_path_factory.mktemp("sweep")
    model = toy.build_model(0, vision={**fx.TINY_VISION, "initializer_range": 0.5},
                            text={**fx.TINY_TEXT, "num_hidden_layers": 4, "initializer_range": 0.5})
    processor = toy.build_processor()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    data = fx.write_gqa(root / "GQA", n_images=3, per_image=2)
    return root / "model", data


def eval_args(world, sweep: Path) -> list[str]:
    model, data = world
    return ["eval", "-m", f"model.path={model}", "model.device=cpu", "dataset=gqa", f"dataset.path={data}",
            f"hydra.sweep.dir={sweep}", "limit=4", "batch_size=4", "max_new_tokens=2"]


def results_of(sweep: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "results.json").read_text()) for d in sweep.iterdir()
            if (d / "results.json").exists()}


def test_eval_sweep_with_a_failing_job_then_report(world, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    # plan=none,fastv x budget=0.8,0.05: fastv cannot reach 0.05 of the FLOPs on this backbone (bad input)
    code = cli.main(eval_args(world, sweep) + ["plan=none,fastv", "budget=0.8,0.05"])
    err = capsys.readouterr().err
    assert code == 2, err  # the only failure was bad input
    done = results_of(sweep)
    assert {(r["budget"], r["plan"]["method"]) for r in done.values()} == {(0.8, "none"), (0.05, "none"), (0.8, "fastv")}  # every other job ran
    (failed,) = [d for d in sweep.iterdir() if (d / "error.json").exists()]
    error = json.loads((failed / "error.json").read_text())
    assert error["user_error"] and error["overrides"][-2:] == ["plan=fastv", "budget=0.05"]
    assert "1 sweep job(s) failed" in err and "budget=0.05" in err and "Traceback" not in err
    (fastv,) = [r for r in done.values() if r["plan"]["method"] == "fastv"]
    assert fastv["flops_ratio"] <= 0.8 and fastv["n"] == 4

    # the report collects the three results and names the failed job
    assert cli.main(["report", f"dir={sweep}"]) == 0
    out = capsys.readouterr().out
    assert "fastv" in out and "failed job" in out
    md = (sweep / "report.md").read_text()
    assert "## Failed jobs" in md and "plan=fastv budget=0.05" in md
    rows, failed_jobs, _ = rp.collect(sweep)
    rp.attach_latency_ratios(rows)
    assert sorted(r.method for r in rows) == ["fastv", "none", "none"] and len(failed_jobs) == 1
    assert all(r.latency_ratio is not None for r in rows)  # an unreduced run of the same setting is there
    assert (sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_crashing_eval_job_is_recorded_and_the_sweep_goes_on(world, tmp_path, capsys, monkeypatch):
    import diffopsearch.evaluate as ev

    real = ev.resolve_plan

    def flaky(model, n_text, **spec):
        if spec["budget"] == 0.8:
            raise RuntimeError("simulated crash")
        return real(model, n_text, **spec)

    monkeypatch.setattr(ev, "resolve_plan", flaky)
    sweep = tmp_path / "sweep"
    code = cli.main(eval_args(world, sweep) + ["plan=random", "budget=0.8,0.6"])
    err = capsys.readouterr().err
    assert code == 1  # a crash, not bad input
    assert json.loads((sweep / "1" / "results.json").read_text())["budget"] == 0.6
    error = json.loads((sweep / "0" / "error.json").read_text())
    assert not error["user_error"] and "simulated crash" in error["traceback"]
    assert "1 sweep job(s) failed" in err
    rows, failed, _ = rp.collect(sweep)
    assert [r.method for r in rows] == ["random"] and failed[0]["error"] == "simulated crash"


# --------------------------------------------------------------------------- SLURM launcher composition


def _sweep_jobs(app: str, overrides: list[str]):
    from hydra import initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    with initialize_config_module(config_module="diffopsearch.conf", version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        master = hydra.compose_config(app, overrides, run_mode=RunMode.MULTIRUN)
        (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
        return master, [hydra.config_loader.load_sweep_config(master, list(job)) for job in batch]


def test_slurm_launcher_submits_one_job_per_budget_that_relaunches_under_accelerate():
    """The README's command composes; the launcher plugin is built from it; every job's config asks
    for the accelerate relaunch inside SLURM, and the relaunch command is the job's own overrides.
    The plugin is part of `[test]`: missing, this test fails (it does not skip)."""
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    overrides = ["hydra/launcher=slurm", "budget=0.8,0.6,0.4,0.25", "model=llava", "dataset=gqa",
                 "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"]
    master, jobs = _sweep_jobs("search", overrides)
    assert [j.budget for j in jobs] == [0.8, 0.6, 0.4, 0.25]
    launcher = master.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (1, 1, 4, "gpu")
    plugin = instantiate(launcher)  # what Hydra does before launching (submitit is only used at submit time)
    assert plugin.params["gpus_per_node"] == 4 and plugin.params["nodes"] == 1
    assert master.hydra.sweep.dir.startswith("multirun/") and launcher.submitit_folder.startswith("multirun/")
    # the task function Hydra hands to submitit is importable by reference (it is pickled by name)
    assert cli.search_task.__module__ == "diffopsearch.cli" and cli.search_task.__qualname__ == "search_task"
    for job in jobs:
        assert job.launch.accelerate is None and job.model.name == "llava"
        assert cli._should_relaunch(job, {"SUBMITIT_EXECUTOR": "slurm"})
        assert not cli._should_relaunch(job, {})  # on a plain machine: no relaunch
    argv = cli.accelerate_argv("search", ["budget=0.6", "model=llava"], "/scratch/multirun/x/1", 4)
    assert "--multi_gpu" in argv and argv[argv.index("--num_processes") + 1] == "4"
    assert argv[-4:-2] == ["budget=0.6", "model=llava"] and "hydra.run.dir='/scratch/multirun/x/1'" in argv
    assert OmegaConf.select(master, "hydra.launcher.timeout_min") > 0


def test_slurm_launcher_without_the_plugin_names_the_extra(monkeypatch):
    """Where hydra-submitit-launcher is missing, composing hydra/launcher=slurm fails naming the
    missing launcher config (the README says: pip install 'diffopsearch[slurm]'). `[test]` installs the
    plugin, so its absence is simulated: its two launcher configs are taken out of Hydra's ConfigStore
    (where the plugin registers them) for this test only."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra.errors import MissingConfigException

    slurm = Path(cli.__file__).parent / "conf" / "hydra" / "launcher" / "slurm.yaml"
    assert "diffopsearch[slurm]" in slurm.read_text() and "- submitit_slurm" in slurm.read_text()
    Plugins.instance()  # discovery imports the plugin, which registers its configs: do it before removing them
    launchers = ConfigStore.instance().repo["hydra"]["launcher"]
    assert "submitit_slurm.yaml" in launchers  # present while installed ...
    _sweep_jobs("search", ["hydra/launcher=slurm", "budget=0.8,0.6"])  # ... and then the sweep composes
    for name in ("submitit_slurm.yaml", "submitit_local.yaml"):
        monkeypatch.delitem(launchers, name)
    with pytest.raises(MissingConfigException, match="Could not load 'hydra/launcher/submitit_slurm'"):
        _sweep_jobs("search", ["hydra/launcher=slurm", "budget=0.8,0.6"])
