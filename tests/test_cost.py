"""The analytic cost model (cost.py): against torch's FlopCounterMode on real forwards of a tiny
random LLaVA, and against FastV's published figure on the LLaVA-1.5-7B configuration."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffopsearch import cost
from diffopsearch.plan import Plan, Site

TINY_TEXT = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2}


def plan_for(sites, L=4, n=144, grid=(12, 12)):
    return Plan(sites=list(sites), backbone={"name": "t", "num_layers": L, "visual_tokens": n, "grid": list(grid)})


@pytest.fixture(scope="module")
def tiny():
    from diffopsearch.backbone.toy import build_model

    model = build_model(0, text=TINY_TEXT)
    model.set_attn_implementation("eager")  # FlopCounterMode counts eager matmuls; CPU SDPA is uncounted
    return model


def measured_lm_flops(model, n_tokens, batch=2):
    x = torch.randn(batch, n_tokens, model.config.text_config.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.model.language_model(inputs_embeds=x)
    return fc.get_total_flops() / batch


def test_layer_flops_takes_floats_and_tensors():
    tc = cost.text_config_of(SimpleConfig())
    f_int = cost.layer_flops(tc, 100)
    assert cost.layer_flops(tc, 100.0) == pytest.approx(f_int)
    n = torch.tensor(100.0, requires_grad=True)
    f_t = cost.layer_flops(tc, n)
    f_t.backward()
    assert float(f_t.detach()) == pytest.approx(f_int) and float(n.grad) > 0
    # causal halving only touches the attention term: n^2 pairs -> n (n + 1) / 2
    qd = 4 * 16
    assert cost.layer_flops(tc, 100, causal=False) - f_int == pytest.approx(4 * qd * (100 * 100 - 100 * 101 / 2))


class SimpleConfig:
    hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads = 64, 128, 4, 4, 2


def test_unreduced_cost_matches_flop_counter(tiny):
    n_text, n_visual = 30, 144
    measured = measured_lm_flops(tiny, n_text + n_visual)
    c = cost.plan_cost(tiny.config, plan_for([]), n_visual, n_text, causal=False)
    assert c["flops_ratio"] == 1.0
    assert abs(c["flops"] - measured) / measured < 0.03


def test_prefix_prune_cost_matches_a_really_shorter_forward(tiny):
    # a hard prune before layer 0 is exactly a language-model run on fewer visual tokens
    n_text, n_visual, keep = 30, 144, 40
    measured_full = measured_lm_flops(tiny, n_text + n_visual)
    measured = measured_lm_flops(tiny, n_text + keep)
    c = cost.plan_cost(tiny.config, plan_for([Site(0, keep, score="random")]), n_visual, n_text, causal=False)
    assert abs(c["flops"] - measured) / measured < 0.03
    assert abs(c["flops_ratio"] - measured / measured_full) < 0.01
    assert c["visual_tokens_per_layer"] == [keep] * 4 and c["entering_tokens"] == keep


def test_fastv_k2_r50_reproduces_the_published_45_percent_on_llava_7b():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=576)
    with torch.device("meta"):  # the real architecture, no weights, no download
        model = LlavaForConditionalGeneration(config)
    from diffopsearch.plan import backbone_info

    bb = backbone_info(model.config, "llava-1.5-7b")
    assert bb["visual_tokens"] == 576 and bb["grid"] == [24, 24] and bb["num_layers"] == 32
    plan = Plan(sites=[Site(2, 288)], backbone=bb)
    for n_text in (32, 64):  # FastV reports "45%" for K=2, R=50% with LLaVA's short prompts
        saved = 1 - cost.plan_cost(model.config, plan, 576, n_text)["flops_ratio"]
        assert abs(saved - 0.45) < 0.03, (n_text, saved)
    c = cost.plan_cost(model.config, Plan(sites=[Site(2, 144)], backbone=bb), 576, 64)
    # the "192 tokens" convention: (576 * 2 + 144 * 30) / 32 = 171 layer-averaged, 576 entering
    assert c["avg_visual_tokens"] == pytest.approx((576 * 2 + 144 * 30) / 32)
    assert c["entering_tokens"] == 576 and c["visual_tokens_per_layer"][:3] == [576, 576, 144]


def test_operator_overhead_is_counted():
    tc = SimpleConfig()
    prune = cost.plan_cost(tc, plan_for([Site(1, 36)]), 144, 20)
    merge = cost.plan_cost(tc, plan_for([Site(1, 36, merge=1.0, sharpness=5.0)]), 144, 20)
    noscore = cost.plan_cost(tc, plan_for([Site(1, 36, score="norm")]), 144, 20)
    assert merge["flops"] > prune["flops"] > noscore["flops"]
    assert merge["overhead_flops"] - prune["overhead_flops"] == pytest.approx(2 * 108 * 36 * (16 + 64))
    noop = cost.plan_cost(tc, plan_for([Site(1, 144, merge=1.0, sharpness=5.0)]), 144, 20)
    assert noop["flops_ratio"] == 1.0 and noop["overhead_flops"] == 0


def _forward_flops(red, batch):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        red(**batch, logits_to_keep=1, use_cache=False)
    return fc.get_total_flops()


def test_hard_forward_flops_match_the_cost_model(tiny):
    from diffopsearch.backbone.toy import build_processor
    from diffopsearch.patch import llava  # an import error must fail this test, not skip it
    from diffopsearch.plan import backbone_info

    proc = build_processor()
    from PIL import Image

    images = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (64, 64), (10, 200, 10))]
    prompts = ["USER: <image>\nwhat colour is the shape ? ASSISTANT:"] * 2
    batch = dict(proc(text=prompts, images=images, return_tensors="pt", padding=True))
    B, T = batch["input_ids"].shape
    bb = backbone_info(tiny.config, "tiny")
    n_visual = bb["visual_tokens"]
    n_text = T - n_visual
    d, V = tiny.config.text_config.hidden_size, tiny.config.text_config.vocab_size
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        tiny.model.get_image_features(pixel_values=batch["pixel_values"])
    vision = fc.get_total_flops()
    plans = [
        [],
        [Site(2, 72)],                                                          # FastV-like prune
        [Site(0, 36, score="none", anchors="grid", merge=1.0, locality=math.inf)],  # 2x2 pool
        [Site(1, 100, merge=1.0, sharpness=10.0, reweight=1.0), Site(3, 50, score="norm")],
        [Site(0, 120, score="none", anchors="bipartite", merge=1.0, reweight=1.0),
         Site(1, 96, score="none", anchors="bipartite", merge=1.0, reweight=1.0)],
    ]
    for sites in plans:
        plan = Plan(sites=sites, backbone=bb)
        measured = _forward_flops(llava.apply_plan(tiny, plan), batch) - vision - 2 * B * d * V
        analytic = B * cost.plan_cost(tiny.config, plan, n_visual, n_text, causal=False)["flops"]
        print(f"{[(s.layer, s.keep, s.anchors) for s in sites]}: analytic/measured = {analytic / measured:.4f}")
        assert abs(analytic - measured) / measured < 0.03, (sites, analytic, measured)
