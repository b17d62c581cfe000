"""The public API: ``diffopsearch.apply_plan(model, plan)`` keeps the model's own call conventions, and an
empty plan is exactly the unreduced model (logits and greedy tokens), on a tiny random GQA LLaVA and on
the shipped toy backbone."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

import diffopsearch
from diffopsearch.backbone.toy import ASSET_DIR, build_model
from diffopsearch.errors import UserError
from diffopsearch.patch.llava import ReducedCache, ReducedLlava, cache_of
from diffopsearch.plan import Plan, Site, backbone_info

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 96, "patch_size": 16}
TEXT = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def tiny(impl="sdpa"):
    m = build_model(1, vision=VISION, text=TEXT)
    if impl != "sdpa":
        m.set_attn_implementation(impl)
    return m


def batch(model, lens=(4, 1, 7), seed=0, n_vis=None):
    cfg = model.config
    n_vis = n_vis or cfg.image_seq_length
    g = torch.Generator().manual_seed(seed)
    rows = [[1, 9] + [cfg.image_token_id] * n_vis + torch.randint(5, cfg.text_config.vocab_size, (k,), generator=g).tolist()
            for k in lens]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), cfg.pad_token_id)
    am = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], am[b, T - len(r):] = torch.tensor(r), 1
    size = cfg.vision_config.image_size
    return dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(len(rows), 3, size, size, generator=g))


def plan_for(model, sites=()):
    return Plan(sites=list(sites), backbone=backbone_info(model.config))


def assert_same_model(m, inputs, tokens=6):
    r = diffopsearch.apply_plan(m, plan_for(m))
    with torch.no_grad():
        ref, out = m(**inputs), r(**inputs)
    assert isinstance(out, LlavaCausalLMOutputWithPast)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_hidden_states, ref.image_hidden_states, atol=0, rtol=0)
    g_ref = m.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    g = r.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    assert g.dtype == torch.long and torch.equal(g, g_ref)
    # eos handling: stop a row at its first token, pad it afterwards, as model.generate does
    eos = int(g_ref[0, inputs["input_ids"].shape[1]])
    g_ref = m.generate(**inputs, max_new_tokens=tokens, do_sample=False, eos_token_id=eos)
    g = r.generate(**inputs, max_new_tokens=tokens, do_sample=False, eos_token_id=eos)
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_empty_plan_is_exactly_the_model(impl):
    m = tiny(impl)
    assert_same_model(m, batch(m))
    assert_same_model(m, batch(m, lens=(3, 3)))        # no padding: SDPA's is_causal path


@pytest.mark.skipif(not (ASSET_DIR / "config.json").exists(), reason="the trained toy backbone is not built yet")
def test_empty_plan_is_exactly_the_trained_toy_backbone():
    from transformers import LlavaForConditionalGeneration

    m = LlavaForConditionalGeneration.from_pretrained(ASSET_DIR).eval()
    assert_same_model(m, batch(m, lens=(5, 2)))


def test_reduced_forward_keeps_the_call_conventions():
    m = tiny()
    inputs = batch(m)
    B, T = inputs["input_ids"].shape
    r = diffopsearch.apply_plan(m, plan_for(m, [Site(layer=1, keep=12), Site(layer=3, keep=4, score="norm")]))
    assert isinstance(r, ReducedLlava) and r.config is m.config and r.device == m.device
    assert r.eval() is r and r.to("cpu") is r and r.get_input_embeddings() is m.get_input_embeddings()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == m.config.image_token_id, -100)
    with torch.no_grad():
        out = r(**inputs, labels=labels)
        tup = r(**inputs, return_dict=False, use_cache=False, logits_to_keep=1)
    assert isinstance(out, LlavaCausalLMOutputWithPast)
    assert out.logits.shape == (B, T - (36 - 4), m.config.text_config.vocab_size)     # reduced length
    assert isinstance(cache_of(out), ReducedCache)
    assert [layer.keys.shape[-2] for layer in cache_of(out).layers] == [T, T - 24, T - 24, T - 32]
    assert torch.isfinite(out.loss)
    assert isinstance(tup, tuple) and tup[0].shape == (B, 1, m.config.text_config.vocab_size)
    torch.testing.assert_close(tup[0][:, -1], out.logits[:, -1], atol=1e-5, rtol=1e-5)
    g = r.generate(**inputs, max_new_tokens=3)
    assert g.shape == (B, T + 3) and torch.equal(g[:, :T], inputs["input_ids"])
    from transformers import GenerationConfig

    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    assert torch.equal(r.generate(inputs["input_ids"], GenerationConfig(max_new_tokens=3, eos_token_id=None), **rest),
                       r.generate(**inputs, max_new_tokens=3, eos_token_id=None))


def test_text_only_input_runs_unreduced():
    m = tiny()
    inputs = batch(m)
    text = dict(input_ids=inputs["input_ids"][:, -5:], attention_mask=inputs["attention_mask"][:, -5:])
    r = diffopsearch.apply_plan(m, plan_for(m, [Site(layer=1, keep=12)]))
    with torch.no_grad():
        torch.testing.assert_close(r(**text).logits, m(**text).logits, atol=1e-5, rtol=0)


def test_plan_from_dict_and_path(tmp_path):
    m = tiny()
    plan = plan_for(m, [Site(layer=2, keep=9, score="cls")])
    path = plan.save(tmp_path / "plan.json")
    inputs = batch(m)
    with torch.no_grad():
        a = diffopsearch.apply_plan(m, path)(**inputs).logits
        b = diffopsearch.apply_plan(m, json.loads(path.read_text()))(**inputs).logits
    assert torch.equal(a, b)


def test_bad_plans_and_options_are_clear_errors(tmp_path):
    m = tiny()
    other = Plan(sites=[Site(layer=2, keep=9)], backbone={**backbone_info(m.config), "num_layers": 32})
    with pytest.raises(UserError, match="num_layers"):
        diffopsearch.apply_plan(m, other)
    with pytest.raises(UserError, match="truncated|JSON"):
        (tmp_path / "p.json").write_text('{"format": "diffopsearch.plan/1", "sites": [')
        diffopsearch.apply_plan(m, tmp_path / "p.json")
    r = diffopsearch.apply_plan(m, plan_for(m, [Site(layer=1, keep=12)]))
    inputs = batch(m)
    for bad in (dict(num_beams=2), dict(do_sample=True), dict(repetition_penalty=1.3), dict(streamer=object()),
                dict(max_new_tokens=0), dict(num_return_sequences=2)):
        with pytest.raises(UserError):
            r.generate(**inputs, **bad)
    with pytest.raises(UserError, match="output_attentions"):
        r(**inputs, output_attentions=True)
    # unsupported attention implementations: test_unsupported_attention_is_refused_before_anything_runs


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_unsupported_attention_is_refused_before_anything_runs(impl):
    """The reduced forward runs its own attention masks and key biases for sdpa and eager only; a model
    loaded with flash_attention_2 (accepted by the config, `model.attn_implementation`) or flex_attention
    is refused by apply_plan with a message naming it, not run with wrong masks. Set on the decoder's
    config as from_pretrained(attn_implementation=...) sets it (flash-attn itself is not installed here)."""
    from diffopsearch.config import ATTN_IMPLEMENTATIONS

    assert (impl in ATTN_IMPLEMENTATIONS) == (impl == "flash_attention_2")  # README: "accepted in the config"
    m = tiny()
    m.config.text_config._attn_implementation = impl
    assert m.model.language_model.layers[0].self_attn.config._attn_implementation == impl
    for plan in (plan_for(m), plan_for(m, [Site(layer=1, keep=12)])):
        with pytest.raises(UserError, match=f"attn_implementation '{impl}' is not supported.*'sdpa'.*'eager'"):
            diffopsearch.apply_plan(m, plan)


def test_import_is_cheap():
    code = "import sys, diffopsearch; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
