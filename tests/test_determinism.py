"""Determinism: the same config and seed give a byte-identical plan.json (but for its ``run`` record),
and the seed is a top-level override. Through the real command in process, on the tiny random-weight
LLaVA and a small toy world."""
from __future__ import annotations

import json

import pytest

from fixtures import SEARCH_ARGS, plan_without_run, run_cli


pytestmark = pytest.mark.usefixtures("clean_cli_env")  # tests/conftest.py


@pytest.mark.slow
def test_the_same_config_and_seed_give_a_byte_identical_plan(capsys, tmp_path, assets):
    args = SEARCH_ARGS + [f"model.path={assets.model}", f"dataset.path={assets.world}", "seed=0"]
    for name in ("a", "b"):
        code, _, err = run_cli(capsys, "search", *args, f"hydra.run.dir={tmp_path / name}")
        assert code == 0, err
    a, b = tmp_path / "a" / "plan.json", tmp_path / "b" / "plan.json"
    assert plan_without_run(a) == plan_without_run(b)
    plan = json.loads(a.read_text())
    assert plan["search"]["seed"] == plan["seed"] == 0 and "resume" not in plan["search"]["config"]
    assert list(plan)[-1] == "run"  # the one field allowed to differ, apart


def test_seed_is_a_top_level_override_defaulting_to_0():
    from diffopsearch.config import compose
    from diffopsearch.commands.search import settings_from

    assert compose("search").seed == 0 and compose("eval").seed == 0
    assert settings_from(compose("search", ["seed=3"])).seed == 3
