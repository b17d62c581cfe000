"""Shared test set-up: no test ever reaches a model or dataset hub; parallel workers share the CPUs."""
from __future__ import annotations

import os

import pytest

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
