"""Shared test set-up: no test ever reaches a model or dataset hub."""
from __future__ import annotations

import os

import pytest

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
# Also at import time: huggingface_hub and datasets read these when they are first imported,
# which can happen while test modules are collected, before any fixture runs.
os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="session", autouse=True)
def offline_hub():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE_ENV.items():
            mp.setenv(key, value)
        yield
