"""cost=latency (diffopsearch/latency.py): the latency model, its cache, and plans sized by it.

Profiling runs on a tiny random LLaVA of the real classes (its numbers are whatever this machine
measures: no test asserts a time); the budget tests use a hand-made model, so they are exact."""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch
from transformers import LlamaConfig

import fixtures as fx
from diffopsearch import latency as lat
from diffopsearch.baselines import make_plan, method_site
from diffopsearch.errors import UserError
from diffopsearch.plan import Plan, backbone_info

N_VIS, N_TEXT = 144, 20.0


def hand_model(layers: int = 8, fixed: float = 10.0) -> lat.LatencyModel:
    """Layer time linear in the length (1 ms + 0.05 ms per token), 10 ms that no plan shortens, and
    operator costs per token in (ToMe's the dearest)."""
    lengths = [20, 60, 100, 164]
    return lat.LatencyModel(key={"format": lat.FORMAT, "device": "hand"}, lengths=lengths,
                            layer_ms=[1.0 + 0.05 * n for n in lengths], num_layers=layers, fixed_ms=fixed,
                            op_ms={"attn/prune": 0.002, "norm/prune": 0.001, "random/prune": 0.0005,
                                   "cls/prune": 0.001, "cls/merge": 0.004, "grid": 0.001, "iqr": 0.003,
                                   "dominant": 0.003, "bipartite": 0.01},
                            n_visual=N_VIS, n_text=N_TEXT)


TEXT8 = LlamaConfig(num_hidden_layers=8, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2)


# ---------------------------------------------------------------- the model's arithmetic

def test_prediction_is_fixed_plus_layers_plus_operators():
    m = hand_model()
    full = 10.0 + 8 * (1.0 + 0.05 * (N_TEXT + N_VIS))
    assert m.plan_ms(None, N_TEXT) == pytest.approx(full)
    plan = Plan(sites=[method_site("fastv", 2, 44)], backbone={"num_layers": 8, "visual_tokens": N_VIS})
    expect = 10.0 + 2 * (1 + 0.05 * 164) + 6 * (1 + 0.05 * 64) + 0.002 * N_VIS
    assert m.plan_ms(plan, N_TEXT) == pytest.approx(expect)
    assert m.ratio(plan, N_TEXT) == pytest.approx(expect / full)


def test_the_set_up_of_a_forward_with_sites_is_counted_once():
    base, m = hand_model(), dataclasses.replace(hand_model(), setup_ms=0.5)
    bb = {"num_layers": 8, "visual_tokens": N_VIS}
    one = Plan(sites=[method_site("fastv", 2, 44)], backbone=bb)
    two = Plan(sites=[method_site("fastv", 2, 44), method_site("fastv", 5, 20)], backbone=bb)
    assert m.plan_ms(None, N_TEXT) == base.plan_ms(None, N_TEXT)  # the unreduced forward has no set-up
    for plan in (one, two):
        assert m.plan_ms(plan, N_TEXT) - base.plan_ms(plan, N_TEXT) == pytest.approx(0.5)


def test_layer_time_interpolates_and_extrapolates_linearly():
    m = hand_model()
    for n in (10, 20, 42, 100, 130, 200):
        assert m.layer_time(n) == pytest.approx(1.0 + 0.05 * n)


def test_layer_times_are_fitted_non_decreasing():
    """A dip in the measured curve is pooled with its neighbours (least squares); a rising curve is kept."""
    assert lat.nondecreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert lat.nondecreasing([1.0, 3.0, 2.0, 4.0]) == pytest.approx([1.0, 2.5, 2.5, 4.0])
    assert lat.nondecreasing([0.6, 1.7, 1.4, 1.3, 2.0]) == pytest.approx([0.6, 1.4666667, 1.4666667, 1.4666667, 2.0])
    fit = lat.nondecreasing([3.0, 1.0, 2.0])
    assert fit == sorted(fit) and sum(fit) == pytest.approx(6.0)


# ---------------------------------------------------------------- plans sized by it

@pytest.mark.parametrize("budget", [0.6, 0.75, 0.9])
@pytest.mark.parametrize("name", ["fastv", "pool", "tome", "visionzip", "random"])
def test_baselines_sized_by_latency_are_under_budget_and_maximal(name, budget):
    m = hand_model()
    plan = make_plan(name, budget, TEXT8, N_VIS, (12, 12), N_TEXT, latency=m)
    r = m.ratio(plan, N_TEXT)
    assert r <= budget + 1e-12
    assert plan.cost["metric"] == "latency" and plan.cost["latency_ratio_predicted"] == pytest.approx(r, abs=1e-5)
    assert plan.cost["latency_model"] == m.key
    if name in ("fastv", "visionzip", "random"):  # one more token would not fit
        (site,) = plan.sites
        bigger = Plan(sites=[method_site(name, site.layer, site.keep + 1)], backbone=plan.backbone)
        assert site.keep + 1 >= N_VIS or m.ratio(bigger, N_TEXT) > budget


def test_a_latency_budget_below_the_reachable_minimum_names_it():
    m = hand_model()
    floor = m.ratio(Plan(sites=[method_site("random", 0, 1)], backbone={"num_layers": 8, "visual_tokens": N_VIS}),
                    N_TEXT)
    with pytest.raises(UserError, match=r"raise the budget to >= 0\.\d+") as e:
        make_plan("random", floor - 0.05, TEXT8, N_VIS, (12, 12), N_TEXT, latency=m)
    assert "time predicted on this device" in str(e.value)


def test_the_search_planner_sizes_every_plan_by_the_latency_model(tiny4):
    from diffopsearch.search.policy import Knobs
    from diffopsearch.search.space import Planner, corner_choices, make_space

    model, _ = tiny4
    space = make_space(model.config)
    backbone = backbone_info(model.config)
    n = space.n_visual
    lengths = [10, 30, 80]
    m = lat.LatencyModel(key={"format": lat.FORMAT, "device": "hand"}, lengths=lengths,
                         layer_ms=[1 + 0.1 * x for x in lengths], num_layers=len(model.model.language_model.layers),
                         fixed_ms=2.0, op_ms={"attn/prune": 0.01, "norm/prune": 0.01, "cls/merge": 0.02,
                                              "cls/prune": 0.01, "grid": 0.01}, n_visual=n, n_text=N_TEXT)
    planner = Planner(space, backbone, 0.6, model.config.text_config, N_TEXT, latency=m)
    k = Knobs()
    plans = [planner.plan(c, k.floats) for c in corner_choices(space)]
    assert any(p is not None for p in plans)
    for p in plans:
        if p is not None:
            assert m.ratio(p, N_TEXT) <= 0.6 + 1e-12 and p.cost["metric"] == "latency"


def test_search_refuses_a_latency_budget_it_cannot_reach(tiny4, tmp_path):
    from diffopsearch.data.datasets import load_qa
    from diffopsearch.search import search_plan
    from diffopsearch.search.loop import SearchSettings
    from diffopsearch.search.space import make_space

    model, proc = tiny4
    space = make_space(model.config)
    m = lat.LatencyModel(key={"format": lat.FORMAT, "device": "hand"}, lengths=[10, 80], layer_ms=[1.0, 8.0],
                         num_layers=len(model.model.language_model.layers), fixed_ms=50.0, op_ms={},
                         n_visual=space.n_visual, n_text=N_TEXT)
    with pytest.raises(UserError, match=r"Use budget >= 0\.\d{3}") as e:
        search_plan(model, proc, load_qa("toy", split="train", limit=8), space, SearchSettings(budget=0.3, steps=1),
                    N_TEXT, progress=False, latency=m)
    assert "predicted on this device" in str(e.value) and "cost=flops" in str(e.value)


# ---------------------------------------------------------------- profiling and the cache

def _inputs(model, proc, batch: int):
    from PIL import Image

    from diffopsearch.data.datasets import make_eval_batch

    recs = [{"id": str(i), "question": "what color is the circle ?", "answer": "red", "type": "attribute"}
            for i in range(batch)]
    return make_eval_batch(proc, recs, [Image.new("RGB", (64, 64), (40 * i % 255, 30, 30)) for i in range(batch)])


def test_profile_measures_every_part_and_a_second_call_reads_the_cache(tmp_path):
    model, proc = fx.tiny_model()
    model.requires_grad_(False)
    inputs = _inputs(model, proc, 2)
    m, path, profiled = lat.latency_model(model, inputs, 6.0, root=tmp_path, progress=False)
    assert profiled and path.is_file() and path.parent == tmp_path / "latency"
    assert len(m.lengths) >= 2 and all(x > 0 for x in m.layer_ms) and m.fixed_ms >= 0
    assert m.layer_ms == sorted(m.layer_ms)  # the fit of m.measured["layer_ms_raw"]
    assert len(m.measured["layer_ms_raw"]) == len(m.lengths)
    assert {"attn/prune", "norm/prune", "grid", "bipartite"} <= set(m.op_ms)
    assert all(math.isfinite(v) and v >= 0 for v in m.op_ms.values())
    assert m.setup_ms > 0  # timed in the forward with a site, once
    # at the profiled length the unreduced prediction is the measured reference itself (the offset closes the
    # model's sum on it, whatever the fixed part's estimate)
    full_length_text = m.lengths[-1] - m.n_visual
    assert m.plan_ms(None, full_length_text) + m.reference_offset_ms == pytest.approx(m.measured["full_prefill_ms"])
    assert m.key["batch_size"] == 2 and m.key["dtype"] == "float32"
    again, path2, profiled2 = lat.latency_model(model, inputs, 6.0, root=tmp_path, progress=False)
    assert not profiled2 and path2 == path and again == m


def test_the_cache_is_keyed_by_batch_size_and_dtype():
    model, _ = fx.tiny_model()
    k = lat.model_key(model, 2)
    assert lat.model_key(model, 2) == k
    assert lat.model_key(model, 4) != k and lat.cache_path(lat.model_key(model, 4)) != lat.cache_path(k)
    assert lat.model_key(model.to(torch.float64), 2)["dtype"] == "float64"
    assert lat.cache_path(lat.model_key(model, 2)) != lat.cache_path(lat.model_key(model.to(torch.float32), 4))


@pytest.mark.parametrize("damage", ["truncated", "other key", "negative time"])
def test_a_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    m = hand_model()
    path = tmp_path / "m.json"
    d = m.to_dict()
    if damage == "truncated":
        path.write_text(json.dumps(d)[:50])
    elif damage == "other key":
        path.write_text(json.dumps({**d, "key": {"device": "another"}}))
    else:
        path.write_text(json.dumps({**d, "fixed_ms": -3.0}))
    with caplog.at_level(logging.WARNING, logger="diffopsearch"):
        assert lat.load_cached(path, m.key) is None
    assert "profiling again" in caplog.text
    path.write_text(json.dumps(d))
    assert lat.load_cached(path, m.key) == m  # an intact file for the key is read back


# ---------------------------------------------------------------- the commands, in-process

pytestmark = pytest.mark.usefixtures("clean_cli_env")


def test_profile_then_eval_and_search_with_cost_latency(capsys, monkeypatch, tmp_path, assets):
    """`diffopsearch profile` builds and prints the model once; `eval cost=latency` sizes a baseline by it and
    reports the measured ratio beside the predicted one; `search cost=latency` writes a plan that records
    the metric and fits the latency budget; a latency budget below the reachable minimum exits 2 naming it."""
    from fixtures import run_cli

    monkeypatch.setenv("DIFFOPSEARCH_CACHE", str(tmp_path / "cache"))
    common = [f"model.path={assets.model}", "model.device=cpu", f"dataset.path={assets.world}", "batch_size=2"]
    code, out, err = run_cli(capsys, "profile", *common)
    assert code == 0, err
    assert "latency model:" in out and "profiled now" in out and "one decoder layer" in out
    code, out, err = run_cli(capsys, "profile", *common)
    assert code == 0 and "read from the cache" in out  # the second run does not profile again

    # budgets from what this machine measured: a tiny model is mostly fixed cost, so what is reachable varies
    (cached,) = (tmp_path / "cache" / "latency").glob("*.json")
    m = lat.LatencyModel(**json.loads(cached.read_text()))
    backbone = {"num_layers": m.num_layers, "visual_tokens": m.n_visual}

    def floor(layer):  # the cheapest plan: one random token left before ``layer``
        return m.ratio(Plan(sites=[method_site("random", layer, 1)], backbone=backbone), m.n_text)

    ok = round(floor(1) + 0.7 * (1 - floor(1)), 3)
    code, _, err = run_cli(capsys, "eval", *common, "plan=random", "cost=latency", f"budget={ok}", "limit=2",
                           "max_new_tokens=2", f"hydra.run.dir={tmp_path / 'eval'}")
    assert code == 0, err
    r = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert r["cost"] == "latency" and r["plan"]["cost"]["metric"] == "latency"
    assert 0 < r["plan"]["cost"]["latency_ratio_predicted"] <= ok
    assert r["latency"]["ratio_predicted"] == r["plan"]["cost"]["latency_ratio_predicted"]
    assert r["latency"]["ratio_measured"] > 0

    run = tmp_path / "search"
    args = [a for a in fx.SEARCH_ARGS if not a.startswith("budget=")]
    code, _, err = run_cli(capsys, "search", *args, *common, "cost=latency", f"budget={ok}",
                           f"hydra.run.dir={run}")
    assert code == 0, err
    plan = json.loads((run / "plan.json").read_text())
    assert plan["cost"]["metric"] == "latency" and plan["cost"]["latency_ratio_predicted"] <= ok

    low = round(floor(0) / 2, 4)
    code, _, err = run_cli(capsys, "eval", *common, "plan=random", "cost=latency", f"budget={low}", "limit=2",
                           f"hydra.run.dir={tmp_path / 'low'}")
    assert code == 2 and "Traceback" not in err and "raise the budget to >= " in err
