"""The plan format (plan.py): round trips, and a clear UserError naming the field for every kind of
bad input, before any model work."""
from __future__ import annotations

import copy
import json
import math

import pytest

from diffopsearch.errors import UserError
from diffopsearch.plan import FORMAT, Plan, Site, backbone_info, load_plan

BACKBONE = {"name": "toy", "num_layers": 8, "visual_tokens": 144, "grid": [12, 12]}


def good() -> dict:
    return {"format": FORMAT, "method": "custom", "backbone": dict(BACKBONE), "budget": 0.6, "seed": 0,
            "sites": [{"layer": 2, "keep": 72, "score": "attn", "anchors": "topk", "merge": 0.8,
                       "sharpness": 12.0, "locality": 0.0, "reweight": 0.5},
                      {"layer": 5, "keep": 36, "score": "norm", "anchors": "topk", "merge": 1.0,
                       "sharpness": "inf", "locality": 0.0, "reweight": 1.0}],
            "cost": {"flops_ratio": 0.5}, "search": {"steps": 3}}


def test_round_trip_through_a_file(tmp_path):
    plan = load_plan(good())
    assert plan.sites[1].sharpness == math.inf and plan.sites[0] == Site(2, 72, "attn", "topk", 0.8, 12.0, 0.0, 0.5)
    path = plan.save(tmp_path / "run" / "plan.json")
    text = path.read_text()
    assert '"sharpness": "inf"' in text and "Infinity" not in text  # strict JSON
    again = load_plan(str(path))
    assert again == plan and again.to_dict() == plan.to_dict()
    assert not list((tmp_path / "run").glob(".*.tmp"))  # atomic write left nothing behind
    assert plan.visual_tokens_per_layer() == [144, 144, 72, 72, 72, 36, 36, 36]


def mutate(path, value):
    d = good()
    obj = d
    for key in path[:-1]:
        obj = obj[key]
    if value is KeyError:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return d


BAD = [
    (("format",), "diffopsearch.plan/2", "format"),
    (("format",), "something/1", "format"),
    (("format",), KeyError, "format"),
    (("sites",), KeyError, "sites"),
    (("backbone",), KeyError, "backbone"),
    (("backbone", "grid"), [12, 11], "backbone.grid"),
    (("backbone", "num_layers"), "8", "backbone.num_layers"),
    (("sites", 0, "keep"), 72.5, "sites[0].keep"),
    (("sites", 0, "keep"), 145, "sites[0].keep"),
    (("sites", 1, "keep"), 73, "sites[1].keep"),   # more than the 72 the previous site left
    (("sites", 0, "keep"), 0, "sites[0].keep"),
    (("sites", 0, "layer"), True, "sites[0].layer"),
    (("sites", 0, "layer"), 8, "sites[0].layer"),
    (("sites", 1, "layer"), 2, "sites[1].layer"),  # not increasing
    (("sites", 0, "score"), "entropy", "sites[0].score"),
    (("sites", 0, "anchors"), "kmeans", "sites[0].anchors"),
    (("sites", 0, "merge"), 1.5, "sites[0].merge"),
    (("sites", 0, "reweight"), -0.1, "sites[0].reweight"),
    (("sites", 0, "merge"), "0.5", "sites[0].merge"),
    (("sites", 0, "sharpness"), -1.0, "sites[0].sharpness"),
    (("sites", 0, "locality"), -0.5, "sites[0].locality"),
    (("sites", 0, "locality"), float("nan"), "sites[0].locality"),
    (("sites", 0, "reweight"), KeyError, "sites[0].reweight"),
    (("sites", 0, "colour"), "red", "sites[0].colour"),
    (("budget",), 1.5, "budget"),
    (("extra",), 1, "extra"),
]


@pytest.mark.parametrize("path,value,field", BAD, ids=[f"{'.'.join(map(str, p))}={v!r}" for p, v, _ in BAD])
def test_bad_fields_are_named(path, value, field):
    with pytest.raises(UserError) as e:
        load_plan(mutate(path, value))
    assert field in str(e.value)


def test_semantic_rules():
    d = good()
    d["sites"][0]["layer"] = 0
    with pytest.raises(UserError, match=r"sites\[0\].score = 'attn' is not valid at layer 0"):
        load_plan(d)
    d = good()
    d["sites"][0].update(anchors="bipartite", score="none", keep=71)  # ToMe merges at most 144 // 2
    with pytest.raises(UserError, match="bipartite"):
        load_plan(d)
    d["sites"][0]["keep"] = 72
    load_plan(d)
    d = good()
    d["sites"][1].update(anchors="grid", score="none", keep=36)  # after a non-grid prune: no grid left
    with pytest.raises(UserError, match=r"sites\[1\].anchors = 'grid'"):
        load_plan(d)
    d = good()
    d["sites"] = [dict(d["sites"][0], layer=0, score="none", anchors="grid", keep=37)]
    with pytest.raises(UserError, match=r"sites\[0\].keep = 37"):
        load_plan(d)
    d["sites"][0]["keep"] = 36
    assert load_plan(d).sites[0].keep == 36
    d["sites"][0]["anchors"] = "topk"
    with pytest.raises(UserError, match="score = 'none'"):
        load_plan(d)


def test_malformed_and_missing_files(tmp_path):
    p = tmp_path / "plan.json"
    text = json.dumps(good())
    p.write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match="not valid JSON.*truncated"):
        load_plan(p)
    p.write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        load_plan(p)
    with pytest.raises(UserError, match="does not exist"):
        load_plan(tmp_path / "nope.json")


def test_validate_for_rejects_another_backbone():
    from diffopsearch.backbone.toy import build_config

    config = build_config()
    info = backbone_info(config, "toy")
    assert info == {"name": "toy", "num_layers": config.text_config.num_hidden_layers,
                    "visual_tokens": 144, "grid": [12, 12]}
    plan = load_plan(good())
    plan.validate_for(config)
    other = copy.deepcopy(good())
    other["backbone"].update(visual_tokens=576, grid=[24, 24])
    with pytest.raises(UserError, match="backbone.visual_tokens"):
        load_plan(other).validate_for(config)
    other = good()
    other["backbone"]["num_layers"] = 32
    with pytest.raises(UserError, match="backbone.num_layers"):
        load_plan(other).validate_for(config)
    small = build_config(text={"num_hidden_layers": 4})
    with pytest.raises(UserError, match="backbone.num_layers"):
        plan.validate_for(small)


def test_plans_built_in_python_are_checked_too():
    plan = Plan(sites=[Site(1, 50, merge=2.0)], backbone=dict(BACKBONE))
    with pytest.raises(UserError, match=r"sites\[0\].merge"):
        plan.validate()
    with pytest.raises(UserError, match="plan field"):
        Plan(sites=[Site(1, 50)], backbone={"name": "x"}).save("/nonexistent/never-written.json")
