"""`diffopsearch show ckpt=PATH`: the plan card (in words, per-layer chart, cost, evaluation), in-process."""
from __future__ import annotations

import json
import math

import pytest

from diffopsearch import cli
from diffopsearch import evaluate as ev
from diffopsearch import show as sh
from diffopsearch.baselines import make_plan
from diffopsearch.errors import UserError
from diffopsearch.plan import Plan, Site

N_TEXT = 20.0


@pytest.fixture(scope="module")
def text_config():
    from transformers import AutoConfig

    from diffopsearch.backbone.toy import ASSET_DIR

    return AutoConfig.from_pretrained(ASSET_DIR).text_config  # the shipped toy: 8 layers, 144 tokens


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns when it is not on a terminal


def baseline(text_config, name, budget=0.5):
    return make_plan(name, budget, text_config, 144, (12, 12), N_TEXT, backbone_name="toy")


def results_for(plan: Plan, accuracy=0.61) -> dict:
    """A results.json as `diffopsearch eval` writes it (the fields show reads)."""
    per_layer = plan.visual_tokens_per_layer()
    return {"accuracy": accuracy, "n": 90, "n_questions": 100, "metric": "gqa", "dataset": "toy", "split": "test",
            "model": "toy", "flops_ratio": 0.497,
            "per_type": {"count": {"accuracy": 0.5, "n": 40}, "exist": {"accuracy": 0.7, "n": 50}},
            "visual_tokens": {"image": 144, "llm_input": per_layer[0], "per_layer": per_layer,
                              "avg": sum(per_layer) / len(per_layer), "grid": [12, 12]},
            "latency": {"prefill_ms_per_sample": 1.25, "batch_size": 16, "device": "cpu"}, "plan": plan.to_dict()}


def run_show(capsys, *argv):
    code = cli.main(["show", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def chart(out: str) -> dict[int, str]:
    """layer -> its row of the per-layer table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) >= 3 and cells[0].isdigit():
            rows[int(cells[0])] = line
    return rows


# ------------------------------------------------------------------------------------------ regimes


@pytest.mark.parametrize("name", ["fastv", "tome", "pool", "prumerge", "visionzip", "random"])
def test_every_baseline_is_named_by_its_regime(text_config, name):
    plan = baseline(text_config, name)
    n, names = 144, []
    for s in plan.sites:
        names.append(sh.regime(s, n))
        n = s.keep
    assert names and set(names) == {name}


def test_design_regimes_and_hybrids():
    assert sh.regime(Site(layer=2, keep=50, score="norm"), 144) == "prune"
    assert sh.regime(Site(layer=2, keep=50, score="attn", merge=1.0, sharpness=math.inf, reweight=1.0), 144) == "merge"
    assert sh.regime(Site(layer=2, keep=144, score="attn", reweight=1.0), 144) == "reweight"
    assert sh.regime(Site(layer=2, keep=144), 144) == "no-op"
    hybrid = Site(layer=3, keep=50, score="attn", merge=0.5, sharpness=3.0, locality=1.0, reweight=0.25)
    assert sh.regime(hybrid, 144) == "hybrid"
    line = sh.describe_site(hybrid, 144)
    assert "keeps 50 of 144" in line and "hybrid" in line
    assert "merge=0.5 sharpness=3 locality=1 reweight=0.25" in line


# ------------------------------------------------------------------------------------------ the command


def test_show_a_run_dir_with_its_results(capsys, tmp_path, text_config):
    plan = baseline(text_config, "fastv")
    (site,) = plan.sites
    plan.save(tmp_path / "plan.json")
    (tmp_path / "results.json").write_text(json.dumps(results_for(plan)))
    code, out, err = run_show(capsys, f"ckpt={tmp_path}")
    assert code == 0, err
    assert f"before layer 2: keeps {site.keep} of 144 visual tokens" in out and "fastv" in out
    assert "method fastv, budget 0.5; backbone toy: 8 decoder layers, 144 visual tokens on a 12 x 12 grid" in out
    assert f"FLOPs ratio {plan.cost['flops_ratio']:.3f} at 20.0 text tokens" in out
    per_layer = plan.visual_tokens_per_layer()
    assert f"144 entering the LLM, {sum(per_layer) / 8:.1f} layer-averaged equivalent" in out
    rows = chart(out)
    assert sorted(rows) == list(range(8))
    assert rows[0].count("█") == sh.BAR_WIDTH and rows[1].count("█") == sh.BAR_WIDTH
    assert all(rows[k].count("█") == round(sh.BAR_WIDTH * site.keep / 144) for k in range(2, 8))
    assert f"fastv 144→{site.keep}" in rows[2] and "fastv" not in rows[3]
    assert "accuracy 61.00% (gqa) on 90 of 100 questions of toy/test" in out
    assert "prefill 1.25 ms / sample" in out and "count 50.0% (n=40)" in out


def test_show_a_searched_hybrid_plan_file(capsys, tmp_path, text_config):
    sites = [Site(layer=1, keep=100, score="attn", merge=0.5, sharpness=3.0, locality=1.0, reweight=0.25),
             Site(layer=4, keep=36, score="none", anchors="bipartite", merge=1.0, reweight=1.0)]
    plan = Plan(sites=sites, backbone={"name": "toy", "num_layers": 8, "visual_tokens": 144, "grid": [12, 12]},
                budget=0.6, method="search", search={"steps": 120, "final_loss": 0.4321, "seed": 0,
                                                      "config": {"search": {"preset": "thorough"}}})
    with pytest.raises(UserError):
        plan.validate()  # ToMe merges at most half of what reaches it (100 -> 50)
    sites[1] = Site(layer=4, keep=60, score="none", anchors="bipartite", merge=1.0, reweight=1.0)
    plan.save(tmp_path / "plan.json")
    code, out, err = run_show(capsys, f"ckpt={tmp_path / 'plan.json'}")
    assert code == 0, err
    assert "before layer 1: keeps 100 of 144 visual tokens (69%), hybrid" in out
    assert "before layer 4: keeps 60 of 100 visual tokens (60%), tome" in out
    assert "searched: preset thorough, steps 120, final_loss 0.4321, seed 0" in out
    assert "FLOPs ratio not recorded in the plan" in out
    assert "no results.json beside plan.json" in out
    assert [chart(out)[k].split("│")[1].strip() for k in range(8)] == ["144", "100", "100", "100", "60", "60", "60", "60"]


def test_results_of_another_plan_are_not_shown_as_this_ones(capsys, tmp_path, text_config):
    baseline(text_config, "pool").save(tmp_path / "plan.json")
    (tmp_path / "results.json").write_text(json.dumps(results_for(baseline(text_config, "fastv"))))
    code, out, _ = run_show(capsys, f"ckpt={tmp_path}")
    assert code == 0 and "for another plan" in out and "accuracy 61" not in out


def test_an_unreduced_plan(capsys, tmp_path, text_config):
    make_plan("none", 1.0, text_config, 144, (12, 12), N_TEXT).save(tmp_path / "plan.json")
    code, out, _ = run_show(capsys, f"ckpt={tmp_path}")
    assert code == 0 and "No reduction sites" in out and "FLOPs ratio 1.000" in out


def test_bad_ckpt_gives_evals_messages(capsys, tmp_path):
    def eval_message(path):
        with pytest.raises(UserError) as e:
            ev.find_plan_file(str(path))
        return str(e.value)

    for bad in (tmp_path / "missing", tmp_path):  # no such path; a directory without a plan.json
        code, _, err = run_show(capsys, f"ckpt={bad}")
        assert code == 2 and f"diffopsearch show: error: {eval_message(bad)}" in err and "Traceback" not in err
    (tmp_path / "plan.json").write_text('{"format": "diffopsearch.plan/1", "sites": [')
    code, _, err = run_show(capsys, f"ckpt={tmp_path}")
    assert code == 2 and "not valid JSON" in err and "truncated" in err
    code, _, err = run_show(capsys)
    assert code == 2 and "show needs a plan" in err


def test_help_and_cfg(capsys):
    code, out, _ = run_show(capsys, "--help")
    assert code == 0 and "ckpt=PATH" in out
    code, out, _ = run_show(capsys, "--cfg", "job", "ckpt=x")
    assert code == 0 and "ckpt: x" in out


def test_learned_knobs_near_a_regime_are_named_after_it_and_the_selection_is_told(capsys, tmp_path):
    near_merge = Site(layer=0, keep=47, score="cls", merge=0.98, sharpness=49.3, locality=0.02, reweight=1.0)
    assert sh.regime(near_merge, 144) == "merge"
    assert sh.regime(Site(layer=0, keep=47, score="cls", merge=0.04, sharpness=50.0), 144) == "prune"
    assert sh.regime(Site(layer=0, keep=47, score="cls", merge=0.8, sharpness=49.3, reweight=1.0), 144) == "hybrid"
    table = [{"origin": "gradient", "ce": 0.12}, {"origin": "corner merge/cls@L0", "ce": 0.08}]
    for won, needle in ((False, "Selection replaced the gradient phase's own plan (merge/cls@L0, held-out CE 0.12) "
                                "by corner merge/cls@L0 (held-out CE 0.08)"),
                        (True, "The gradient phase's own plan (merge/cls@L0) won the selection")):
        sel = {"questions": 384, "chosen": 0 if won else 1, "gradient_plan_won": won, "candidates": table,
               "screen_questions": None}
        plan = Plan(sites=[near_merge], backbone={"name": "toy", "num_layers": 8, "visual_tokens": 144, "grid": [12, 12]},
                    budget=0.4, method="search",
                    search={"steps": 3, "seed": 0, "selection": sel, "gradient_plan": {"choice": "merge/cls@L0"}})
        plan.save(tmp_path / "plan.json")
        code, out, err = run_show(capsys, f"ckpt={tmp_path / 'plan.json'}")
        assert code == 0, err
        assert needle in " ".join(out.split())
