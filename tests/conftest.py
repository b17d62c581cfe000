"""Shared test set-up: no test ever reaches a model or dataset hub; parallel workers share the CPUs.

And the fixtures several test modules use: ``bodies`` (fake command bodies), ``tiny4`` (a 4-layer tiny
LLaVA), ``assets`` (a saved tiny model, a toy world, GQA copies and damaged plan, model and data files)
and ``world_train``. Plain helpers are in fixtures.py."""
from __future__ import annotations

import json
import os
import shutil
import sys
import types

import pytest

import fixtures as fx  # tests/fixtures.py (imports nothing heavy at module level)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
# Also at import time: huggingface_hub and datasets read these when they are first imported,
# which can happen while test modules are collected, before any fixture runs.
os.environ.update(OFFLINE_ENV)

# Under pytest-xdist (`-n N`, as CI runs the suite) each worker would otherwise start one torch thread per
# core, N x cores threads on the machine's cores. Give each worker its share, before torch is imported
# (conftest is imported before any test module); subprocesses the tests start inherit it. An explicit
# OMP_NUM_THREADS is kept.
_WORKERS = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
if _WORKERS and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, int(_WORKERS))))


@pytest.fixture(scope="session", autouse=True)
def offline_hub():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture
def clean_cli_env(monkeypatch, tmp_path):
    """For tests that run the CLI in-process: no inherited debugging or launcher variables, and the
    working directory is the test's own folder (where Hydra's outputs/ and multirun/ land)."""
    for key in ("HYDRA_FULL_ERROR", "DIFFOPSEARCH_TRACEBACK", "DIFFOPSEARCH_LAUNCHED", "LOCAL_RANK", "RANK",
                "TORCHELASTIC_RUN_ID", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def bodies(monkeypatch):
    """Fake search / evaluate / report modules; `calls` records (command, cfg) and a body may be
    told to fail with `fail[command] = exception or callable(cfg)`."""
    from diffopsearch.config import run_dir

    calls, fail = [], {}

    def make(command):
        def run(cfg):
            calls.append((command, cfg))
            err = fail.get(command)
            if callable(err) and not isinstance(err, BaseException):
                err = err(cfg)
            if err is not None:
                raise err
            out = run_dir()
            (out / "results.json").write_text(json.dumps({"command": command, "budget": cfg.get("budget")}))
            return {"ok": True}
        return run

    for command in ("search", "eval", "report"):
        module = f"diffopsearch.commands.{command}"
        fake = types.ModuleType(module)
        fake.run = make(command)
        monkeypatch.setitem(sys.modules, module, fake)
    return types.SimpleNamespace(calls=calls, fail=fail)


@pytest.fixture(scope="module")
def tiny4():
    """A random 4-layer toy LLaVA (large initial weights, parameters frozen) and its processor."""
    from diffopsearch.backbone import toy

    model = toy.build_model(0, vision={**fx.TINY_VISION, "initializer_range": 0.5},
                            text={**fx.TINY_TEXT4, "initializer_range": 0.5})
    model.requires_grad_(False)
    return model, toy.build_processor()


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tiny model directory, a small toy world, a GQA fixture, and damaged copies of each. Built once;
    the tests only read it."""
    from diffopsearch.data import world

    root = tmp_path_factory.mktemp("assets")
    a = type("Assets", (), {})()
    a.model = fx.tiny_model_dir(root / "tiny")
    world.write_world(root / "world", seed=0, sizes={"train": 16, "test": 4})
    a.world = root / "world"
    a.gqa = fx.write_gqa(root / "GQA", n_images=3, per_image=2)
    a.gqa_no_column = fx.write_gqa(root / "GQA-nocol", drop_question_columns=("imageId",))
    a.gqa_broken = fx.write_gqa(root / "GQA-broken", n_images=2, per_image=2, broken=("n1000", "n1001"))
    a.gqa_empty = fx.write_gqa(root / "GQA-empty", n_images=1, per_image=1)
    fx.empty_parquet(a.gqa_empty / fx.GQA_QUESTIONS_CONFIG / f"{fx.GQA_SPLIT}-00000-of-00001.parquet")
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
    a.plans = fx.write_plan_files(root / "plans", a.model)
    return a


@pytest.fixture(scope="module")
def world_train(assets):
    """The train split of ``assets``' toy world."""
    from diffopsearch.data.datasets import load_qa

    return load_qa("toy", str(assets.world), split="train")
