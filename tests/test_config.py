"""The shipped Hydra configs: they compose, they type-check, bad values are refused."""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import zipfile
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from diffopsearch import config as C
from diffopsearch.errors import UserError

CONF = importlib.resources.files("diffopsearch.conf")
REPO = Path(__file__).resolve().parent.parent


def options(group: str) -> list[str]:
    return sorted(p.name[:-5] for p in (CONF / group).iterdir() if p.name.endswith(".yaml"))


def compose_with_hydra(app: str, overrides=()):
    with initialize_config_module(config_module="diffopsearch.conf", version_base="1.3"):
        return hydra_compose(config_name=app, overrides=list(overrides), return_hydra_config=True)


def app_overrides(app: str, tmp_path) -> list[str]:
    return [f"dir={tmp_path}"] if app == "report" else []


# --------------------------------------------------------------------------- composition


def test_shipped_groups_have_the_documented_options():
    assert options("model") == ["llava", "llava13b", "toy"]
    assert options("dataset") == ["gqa", "toy", "vqav2"]
    assert options("search") == ["default", "thorough"]
    assert set(options("plan")) >= set(C.PLAN_NAMES)
    assert "slurm" in options("hydra/launcher")


@pytest.mark.parametrize("app", C.APPS)
def test_every_app_composes_validates_and_becomes_its_dataclass(app, tmp_path):
    cfg = C.compose(app, app_overrides(app, tmp_path))
    C.validate(cfg)
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, C.SCHEMAS[app])


@pytest.mark.parametrize("group,schema,apps", [
    ("model", C.ModelConfig, ("search", "eval")),
    ("dataset", C.DatasetConfig, ("search", "eval")),
    ("search", C.SearchConfig, ("search",)),
    ("plan", C.PlanConfig, ("eval",)),
])
def test_every_group_option_instantiates_into_its_dataclass(group, schema, apps):
    for app in apps:
        for option in options(group):
            cfg = C.compose(app, [f"{group}={option}"])
            node = OmegaConf.to_object(cfg[group])
            assert isinstance(node, schema), (app, group, option)
            C.validate(cfg)  # every shipped option is also a valid one
            if group in ("model", "dataset", "plan"):
                assert node.name == option


def test_shipped_values_match_the_schema_in_helpers():
    llava = C.compose("eval", ["model=llava"]).model
    assert (llava.path, llava.dtype) == ("llava-hf/llava-1.5-7b-hf", "bfloat16")
    assert C.compose("eval", ["model=llava13b"]).model.path == "llava-hf/llava-1.5-13b-hf"
    toy = C.compose("eval").model
    assert (toy.name, toy.path, toy.dtype) == ("toy", "", "float32")
    gqa = C.compose("eval", ["dataset=gqa"]).dataset
    assert (gqa.path, gqa.questions_config, gqa.images_config, gqa.split, gqa.metric) == (
        "lmms-lab-encoder/GQA", "testdev_balanced_instructions", "testdev_balanced_images", "testdev", "gqa")
    vqa = C.compose("eval", ["dataset=vqav2"]).dataset
    assert (vqa.path, vqa.split, vqa.metric) == ("lmms-lab-encoder/VQAv2", "validation[4000:]", "vqa")
    tds = C.compose("eval").dataset
    assert (tds.path, tds.split, tds.search_split) == ("", "test", "train")
    assert C.compose("search").budget == 0.6 and C.compose("eval").budget == 1.0
    default, thorough = C.compose("search").search, C.compose("search", ["search=thorough"]).search
    assert (default.loss, default.two_sites, default.learn_knobs) == ("kl", True, True)
    assert thorough.steps > default.steps and thorough.plans_per_step > default.plans_per_step
    assert thorough.loss == default.loss and thorough.select_corners == default.select_corners


def test_report_dir_is_reachable_both_ways(tmp_path):
    assert C.compose("report", [f"dir={tmp_path}"]).report.dir == str(tmp_path)
    assert C.compose("report", [f"report.dir={tmp_path}"]).report.dir == str(tmp_path)


def test_run_outputs_are_relative_to_the_working_directory():
    for app in ("search", "eval"):
        hc = compose_with_hydra(app).hydra
        assert hc.run.dir.startswith("outputs/") and hc.run.dir.endswith(f"_{app}")
        assert hc.sweep.dir.startswith("multirun/")
        assert hc.job.name == app
        assert not hc.job.chdir


def sweep_jobs(app: str, overrides: list[str]):
    """The per-job configs Hydra's sweeper hands to the launcher for `-m <overrides>`."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    with initialize_config_module(config_module="diffopsearch.conf", version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        master = hydra.compose_config(app, overrides, run_mode=RunMode.MULTIRUN)
        (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
        return master, [hydra.config_loader.load_sweep_config(master, list(job)) for job in batch]


def test_slurm_launcher_config_composes_with_a_budget_sweep():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    master, jobs = sweep_jobs("search", ["hydra/launcher=slurm", "budget=0.8,0.6,0.4", "model=llava",
                                         "dataset=gqa", "hydra.launcher.partition=gpu"])
    assert [job.budget for job in jobs] == [0.8, 0.6, 0.4]  # one SLURM job per budget
    for job in jobs:
        assert job.model.name == "llava" and job.dataset.name == "gqa"
        assert job.launch.accelerate is None  # auto: relaunch under accelerate inside the SLURM job
        C.validate(job)
    launcher = master.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, 8)
    assert launcher.partition == "gpu" and launcher.timeout_min > 0
    assert launcher.name == "search"  # resolves through ${hydra.job.name}
    assert launcher.submitit_folder.startswith("multirun/")
    # Hydra instantiates the launcher from this node (submitit is imported lazily: no cluster needed).
    from hydra.utils import instantiate

    plugin = instantiate(launcher)
    assert type(plugin).__name__ == "SlurmLauncher"
    assert plugin.params["gpus_per_node"] == 8 and plugin.params["partition"] == "gpu"


def test_a_local_budget_sweep_makes_one_job_per_budget():
    master, jobs = sweep_jobs("search", ["budget=0.8,0.6,0.4,0.25"])
    assert [job.budget for job in jobs] == [0.8, 0.6, 0.4, 0.25]
    assert master.hydra.launcher._target_.endswith("BasicLauncher")


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("override,needle", [
    ("model=foo", "Available options in 'model'"),
    ("dataset=coco", "Available options in 'dataset'"),
    ("search=nope", "Available options in 'search'"),
])
def test_unknown_group_option_is_refused_with_the_options(override, needle):
    with pytest.raises(MissingConfigException) as err:
        C.compose("search", [override])
    assert needle in str(err.value)


@pytest.mark.parametrize("override", [
    "budget=abc", "search.steps=1.5", "model.trust_remote_code=maybe", "limit=few", "search.two_sites=perhaps",
])
def test_wrong_type_is_refused(override):
    with pytest.raises(ConfigCompositionException):
        C.compose("search", [override])


@pytest.mark.parametrize("override", ["foo=1", "model.bar=1", "search.nope=3", "plan.name=x"])
def test_unknown_key_is_refused(override):
    with pytest.raises(ConfigCompositionException):
        C.compose("search", [override])


def test_a_group_file_with_an_unknown_key_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "typo.yaml").write_text("name: typo\npth: x\n")
    with pytest.raises(ConfigCompositionException):
        C.compose("search", [f"hydra.searchpath=[file://{tmp_path}]", "model=typo"])


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.0001, 1.5, 7, float("nan"), float("inf")])
def test_budget_outside_zero_one_is_refused_naming_the_value(budget):
    with pytest.raises(UserError) as err:
        C.check_budget(budget)
    assert repr(budget) in str(err.value) and "(0, 1]" in str(err.value)


@pytest.mark.parametrize("budget", [1.0, 0.6, 0.25, 1e-3])
def test_budget_inside_is_accepted(budget):
    assert C.check_budget(budget) == budget


def test_validate_refuses_budget_from_an_override():
    with pytest.raises(UserError, match=r"budget=1\.5"):
        C.validate(C.compose("search", ["budget=1.5"]))
    with pytest.raises(UserError, match=r"budget=0\.0"):
        C.validate(C.compose("eval", ["budget=0"]))


@pytest.mark.parametrize("override,needle", [
    ("model.dtype=int8", "model.dtype='int8'"),
    ("model.device=tpu", "model.device='tpu'"),
    ("dataset.metric=bleu", "dataset.metric='bleu'"),
    ("dataset.path=", "dataset.path is empty"),
    ("search.loss=magic", "search.loss='magic'"),
    ("search.steps=0", "search.steps=0"),
    ("search.plans_per_step=1", "search.plans_per_step=1"),
    ("search.knob_lr=-1", "search.knob_lr=-1"),
    ("search.entropy=nan", "search.entropy=nan"),
    ("search.candidate_layers=[]", "candidate_layers"),
    ("limit=0", "limit=0"),
    ("batch_size=0", "batch_size=0"),
    ("search.lr=0", "search.lr=0"),
    ("search.decide_after=1.5", "search.decide_after=1.5"),
])
def test_validate_names_the_bad_value(override, needle):
    extra = ["dataset=gqa"] if override.startswith("dataset.path") else []
    cfg = C.compose("search", extra + [override])
    with pytest.raises(UserError) as err:
        C.validate(cfg)
    assert needle in str(err.value)


def test_validate_refuses_an_unknown_plan_name():
    with pytest.raises(UserError, match="plan.name='magic'"):
        C.validate(C.compose("eval", ["plan.name=magic"]))


def test_report_without_dir_or_with_a_missing_dir_is_refused(tmp_path):
    with pytest.raises(UserError, match="dir=<"):
        C.validate(C.compose("report"))
    with pytest.raises(UserError, match="not a directory"):
        C.validate(C.compose("report", [f"dir={tmp_path / 'absent'}"]))


def test_schema_fields_cover_helpers_md():
    fields = {f.name for f in dataclasses.fields(C.SearchConfig)}
    assert fields >= {"steps", "lr", "knob_lr", "batch_size", "plans_per_step", "knob_plans", "loss", "entropy",
                      "candidate_layers", "two_sites", "learn_knobs", "micro_batch", "checkpoint_layers",
                      "checkpoint_every", "eval_baselines", "train_limit"}
    top = {f.name for f in dataclasses.fields(C.EvalApp)}
    assert top >= {"model", "dataset", "plan", "budget", "ckpt", "limit", "batch_size", "max_new_tokens",
                   "seed", "resume", "num_workers"}


def test_to_dict_is_json_ready():
    import json

    d = C.to_dict(C.compose("search"))
    assert json.loads(json.dumps(d))["search"]["candidate_layers"] is None
    assert json.loads(json.dumps(C.to_dict(C.compose("search", ["search.candidate_layers=[0,2]"]))))[
        "search"]["candidate_layers"] == [0, 2]


# --------------------------------------------------------------------------- packaging


def test_the_wheel_ships_every_config(tmp_path):
    """A wheel (not only an editable install) must carry conf/**/*.yaml."""
    import importlib.util
    import shutil
    import subprocess
    import sys

    # Build from a clean copy: an in-tree build/ folder could carry stale files into the wheel.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "diffopsearch", src / "diffopsearch", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    # Never skipped: where this environment has setuptools (the build backend) the wheel is built with it,
    # offline; where it has none (venvs of Python >= 3.12 come without), pip builds in an isolated
    # environment and installs pyproject's build-system.requires there, which needs the package index.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out),
                            str(src)], cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, ("pip wheel failed" + ("" if isolation else " (no setuptools here: pip had to "
                                   "fetch it from the package index)") + f":\n{built.stderr[-3000:]}")
    (wheel,) = out.glob("diffopsearch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"diffopsearch/conf/{p.relative_to(REPO / 'diffopsearch' / 'conf')}"
               for p in (REPO / "diffopsearch" / "conf").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "diffopsearch/conf/__init__.py" in names
    assets = REPO / "diffopsearch" / "assets"
    if assets.is_dir():
        for p in assets.rglob("*"):
            if p.is_file():
                assert f"diffopsearch/{p.relative_to(REPO / 'diffopsearch')}" in names
    entry = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry[0]).decode()
    assert "diffopsearch = diffopsearch.cli:console_main" in text


def test_ci_runs_the_readmes_test_command():
    """README's "Tests" section states CI's command exactly (the last line of .ci/run): a fresh venv, the
    quickstart's install, the suite on 2 xdist workers, the slowest tests listed."""
    import re

    readme = (REPO / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2, commands  # the quickstart: run the main job, run the tests
    run_cmd, quick_test_cmd = commands
    assert run_cmd.endswith("diffopsearch search") and "torch==2.13.0" in run_cmd
    assert "pytest" in quick_test_cmd and "[test]" in quick_test_cmd
    section = readme.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    assert len(blocks) == 1 and "\n" not in blocks[0], blocks
    (ci_cmd,) = blocks
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == ci_cmd, (ci[-1], ci_cmd)
    assert ci_cmd.startswith("rm -rf .venv && python3 -m venv .venv && ")  # fresh, every time
    install = quick_test_cmd.split(" && python -m pytest")[0].split(" && ", 1)[1]  # after `python3 -m venv .venv`
    assert f" && {install} && " in ci_cmd  # the quickstart's install, exactly
    assert ci_cmd.endswith(" && python -m pytest -q -n 2 --durations=15")
