"""The reduced LLaVA forward (patch/llava/): hard sites, scores, cached decoding, the search's forward, FLOPs.

Every test runs a tiny random LLaVA of the real classes (CLIP 96 px / patch 16 = 6 x 6 = 36 visual
tokens, a 4-layer GQA Llama: ``tiny`` in tests/fixtures.py) on a left-padded batch, so per-sample offsets
differ.
"""
from __future__ import annotations

import math

import pytest
import torch

from diffopsearch.patch import llava as P
from diffopsearch.plan import Plan, Site, backbone_info
from fixtures import N_VIS, batch, embeddings, tiny  # tests/fixtures.py: the tiny LLaVA and its batches


def real(inputs, length):
    """(B, length) True at non-padding positions of a (possibly reduced) left-padded sequence. Padding
    queries see no key at all: SDPA's boolean and the additive float masks legitimately differ there."""
    pads = (inputs["attention_mask"] == 0).sum(1, keepdim=True)
    return torch.arange(length)[None] >= pads


def site(layer, keep, score="attn", **knobs):
    return Site(layer=layer, keep=keep, score=score, **knobs)


def reduced(model, sites, seed=0):
    return P.apply_plan(model, Plan(sites=list(sites), backbone=backbone_info(model.config), seed=seed))


def capture_scores(monkeypatch):
    """Record the scores every hard site receives."""
    seen = []
    real = P.forward.hard_reduce

    def spy(x, keys, scores, pos, coords, sizes, s):
        seen.append(dict(scores=scores, pos=pos, keys=keys, coords=coords))
        return real(x, keys, scores, pos, coords, sizes, s)

    monkeypatch.setattr(P.forward, "hard_reduce", spy)
    return seen


# ------------------------------------------------------------------------------------------ hard sites

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_layer0_prune_equals_running_the_shortened_sequence(impl):
    """A site before layer 0 is the same as feeding the language model only the kept tokens with their
    original position ids: an independent reference through transformers' own LlamaModel."""
    m = tiny(impl)
    inputs, pos = batch(m)
    r = reduced(m, [site(0, 9, "norm")])
    with torch.no_grad():
        out = r(**inputs, position_ids=pos, use_cache=False).logits
        kept = r.last_kept_positions                                     # (B, 9)
        emb = embeddings(m, inputs)
        is_vis = inputs["input_ids"] == m.config.image_token_id
        keep = torch.stack([~is_vis[b] | (is_vis[b] & torch.isin(pos[b], kept[b])) for b in range(len(pos))])
        idx = torch.stack([keep[b].nonzero()[:, 0] for b in range(len(pos))])
        ref_h = m.model.language_model(inputs_embeds=emb.gather(1, idx[..., None].expand(-1, -1, emb.shape[-1])),
                                       attention_mask=inputs["attention_mask"].gather(1, idx),
                                       position_ids=pos.gather(1, idx), use_cache=False).last_hidden_state
        ref = m.lm_head(ref_h)
    assert out.shape == ref.shape == (3, inputs["input_ids"].shape[1] - (N_VIS - 9), m.config.text_config.vocab_size)
    real = inputs["attention_mask"].gather(1, idx).bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    # norm scores: the kept tokens really are the 9 largest embedding norms, in position order
    top = emb[is_vis].view(3, N_VIS, -1).norm(dim=-1).topk(9, dim=1).indices.sort(1).values
    assert torch.equal(kept, pos[is_vis].view(3, N_VIS).gather(1, top))


def test_attn_score_is_fastv_signal_from_eager_attentions(monkeypatch):
    """The attn score equals layer l-1's attention of the last token to the visual tokens (mean over
    heads), as transformers' eager attention reports it, for every sample of a padded batch."""
    m = tiny("eager")
    inputs, pos = batch(m)
    seen = capture_scores(monkeypatch)
    with torch.no_grad():
        reduced(m, [site(2, 12, "attn")])(**inputs, position_ids=pos)
        att = m(**inputs, position_ids=pos, output_attentions=True).attentions[1]   # layer 1
    is_vis = inputs["input_ids"] == m.config.image_token_id
    ref = att[:, :, -1, :].mean(1)[is_vis].view(3, N_VIS)
    torch.testing.assert_close(seen[0]["scores"], ref, atol=1e-6, rtol=1e-5)


def test_cls_score_is_clip_cls_attention_at_the_feature_layer(monkeypatch):
    m = tiny("eager")
    inputs, pos = batch(m)
    seen = capture_scores(monkeypatch)
    with torch.no_grad():
        reduced(m, [site(1, 12, "cls")])(**inputs)
        vt = m.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    # vision_feature_layer -2 = hidden_states[-2] = output of the second-to-last CLIP layer
    ref = vt.attentions[-2][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(seen[0]["scores"], ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sites", [
    [site(1, 18, "attn"), site(3, 6, "attn")],
    [site(1, 18, "norm", merge=1.0, sharpness=math.inf, reweight=1.0),
     site(2, 12, "none", anchors="bipartite", merge=1.0, reweight=1.0), site(3, 6, "attn")],
])
def test_sites_reduce_per_sample_and_batch_equals_single(sites):
    """Left padding shifts each sample's image; every sample keeps its own tokens, and a padded batch
    gives what each sample gives alone. (The batch splices by per-row gathers, a sample alone by slices:
    the two paths of the reduced forward agree.)"""
    m = tiny()
    inputs, pos = batch(m)
    r = reduced(m, sites)
    with torch.no_grad():
        full = r(**inputs, position_ids=pos).logits[:, -1]
        kept = r.last_kept_positions
        assert kept.shape == (3, 6)
        assert len({tuple(k.tolist()) for k in kept - kept.min(1, keepdim=True).values}) > 1   # per-sample choices
        for b in range(3):
            real = inputs["attention_mask"][b].bool()
            one = {k: v[b:b + 1][:, real] if k != "pixel_values" else v[b:b + 1] for k, v in inputs.items()}
            single = r(**one).logits[:, -1]
            assert torch.equal(r.last_kept_positions, kept[b:b + 1])
            torch.testing.assert_close(single, full[b:b + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("knobs", [dict(), dict(merge=1.0, sharpness=5.0, reweight=1.0)])
def test_decoding_on_reduced_cache_equals_recomputing(knobs):
    """Decoding on the reduced KV cache (each layer its own cache length and mask) gives the same tokens
    and logits as re-running the whole reduced prefill each step (norm scores do not depend on later
    tokens, so both must agree)."""
    m = tiny()
    inputs, _ = batch(m)
    r = reduced(m, [site(2, 10, "norm", **knobs)])
    steps = 5
    with torch.no_grad():
        gen = r.generate(**inputs, max_new_tokens=steps, do_sample=False)
        ids, am = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(steps):
            pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
            logits = r(input_ids=ids, attention_mask=am, pixel_values=inputs["pixel_values"], position_ids=pos,
                       use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        assert torch.equal(gen, ids)
        # the cache really is shorter after the site
        pos = (inputs["attention_mask"].cumsum(-1) - 1).masked_fill(inputs["attention_mask"] == 0, 0)
        out = r(**inputs, position_ids=pos, use_cache=True)
        lens = [layer.keys.shape[-2] for layer in P.cache_of(out).layers]
        T = inputs["input_ids"].shape[1]
        assert lens == [T, T, T - (N_VIS - 10), T - (N_VIS - 10)]
        # one cached step equals the recomputed logits
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        am2 = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        step = r(input_ids=nxt, attention_mask=am2, past_key_values=P.cache_of(out),
                 position_ids=pos[:, -1:] + 1).logits[:, -1]
        ids2 = torch.cat([inputs["input_ids"], nxt], 1)
        pos2 = (am2.cumsum(-1) - 1).masked_fill(am2 == 0, 0)
        ref = r(input_ids=ids2, attention_mask=am2, pixel_values=inputs["pixel_values"], position_ids=pos2,
                use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


def _recompute_greedy(r, inputs, steps):
    """Greedy decoding by re-running the whole reduced prefill at every step, with the reduction decided
    as at generation's prefill: ``query_index`` = the last prompt token (left padding: T - 1 in every
    row), so an attention-scored site ranks by the prompt's end, not by the newest generated token."""
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    q = torch.full((ids.shape[0],), ids.shape[1] - 1)
    for _ in range(steps):
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        logits = r(input_ids=ids, attention_mask=am, pixel_values=inputs["pixel_values"], position_ids=pos,
                   use_cache=False, query_index=q).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
    return ids


def _stop_at(ids, T, eos, pad):
    """What generate returns for greedy tokens ``ids`` (prompt of length T) with ``eos``: a row's tokens after
    its first eos become pad, and decoding stops once every row has finished."""
    out = ids.clone()
    for b in range(out.shape[0]):
        hits = (out[b, T:] == eos).nonzero()
        if len(hits):
            out[b, T + int(hits[0]) + 1:] = pad
    finished = [T + int((row[T:] == eos).nonzero()[0]) + 1 if bool((row[T:] == eos).any()) else row.shape[0]
                for row in ids]
    return out[:, :max(finished)]


KV_PLANS = {
    # FastV: scored by layer 1's attention of the last prompt token
    "attn": [site(2, 10, "attn")],
    # two attention-scored sites: the cache is three lengths long (T, T - 18, T - 30)
    "stacked": [site(1, 18, "attn"), site(3, 6, "attn")],
    # merges with a soft assignment, reweighted keys (rho * log size as a key bias in every later layer,
    # carried into decoding), stacked, the second one local
    "merge+reweight": [site(1, 18, "attn", merge=1.0, sharpness=4.0, reweight=1.0),
                       site(3, 8, "cls", merge=0.5, locality=1.0, reweight=0.5)],
    # ToMe: one bipartite merge before every layer, sizes carried, proportional attention
    "tome": [site(layer, keep, "none", anchors="bipartite", merge=1.0, reweight=1.0)
             for layer, keep in ((0, 30), (1, 24), (2, 18), (3, 12))],
    # 2 x 2 pooling at the LLM input
    "pool": [site(0, 9, "none", anchors="grid", merge=1.0, locality=float("inf"))],
}


@pytest.mark.parametrize("name", list(KV_PLANS))
def test_generate_on_the_reduced_cache_equals_recomputing_with_eos_in_the_batch(name):
    """For every kind of site: greedy generation on the reduced KV cache gives exactly the tokens of
    recomputing the reduced prefill at every step; with an eos that one row emits mid-way, that row stops
    and is padded while the others decode on (the batch's cache rows stay independent)."""
    m = tiny()
    inputs, pos = batch(m)
    plan = Plan(sites=KV_PLANS[name], backbone=backbone_info(m.config))
    r = P.apply_plan(m, plan)
    T, steps, pad = inputs["input_ids"].shape[1], 6, m.config.pad_token_id
    with torch.no_grad():
        # the prefill's cache really is shorter, layer by layer, by what the plan removed before that layer
        cache = P.cache_of(r(**inputs, position_ids=pos, use_cache=True))
        assert [layer.keys.shape[-2] for layer in cache.layers] == [T - (N_VIS - v) for v in
                                                                    plan.visual_tokens_per_layer()]
        ref = _recompute_greedy(r, inputs, steps)
        # no eos at all: every row decodes all steps
        gen = r.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None)
        assert torch.equal(gen, ref), (gen[:, T:], ref[:, T:])
        # an eos from the batch's own output: a token one row emits at step 1..steps-2 and some other row never does
        new = ref[:, T:]
        eos = next((int(new[b, k]) for k in range(1, steps - 1) for b in range(len(new))
                    if any(int(new[b, k]) not in new[o].tolist() for o in range(len(new)) if o != b)), None)
        assert eos is not None and eos != pad, new
        want = _stop_at(ref, T, eos, pad)
        gen = r.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(gen, want), (eos, gen[:, T:], want[:, T:])
    assert (gen[:, T:] == pad).any() and (gen[:, -1] != pad).any()  # a row stopped early, another ran on


def test_reweight_takes_effect_and_sdpa_equals_eager():
    """rho * log(size) is a real key bias (logits change), taken identically by SDPA and eager."""
    inputs, pos = batch(tiny())
    sites = [site(1, 12, "attn", merge=1.0, sharpness=4.0, reweight=1.0), site(3, 6, "norm")]
    outs = {}
    for impl in ("sdpa", "eager"):
        m = tiny(impl)
        with torch.no_grad():
            outs[impl] = reduced(m, sites)(**inputs, position_ids=pos).logits
            outs[impl + "-no-rw"] = reduced(m, [site(1, 12, "attn", merge=1.0, sharpness=4.0), sites[1]])(
                **inputs, position_ids=pos).logits
    ok = real(inputs, outs["sdpa"].shape[1])
    torch.testing.assert_close(outs["sdpa"][ok], outs["eager"][ok], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["sdpa-no-rw"][ok], outs["eager-no-rw"][ok], atol=1e-5, rtol=1e-5)
    assert (outs["sdpa"][:, -1] - outs["sdpa-no-rw"][:, -1]).abs().max() > 1e-3


def test_random_scores_do_not_depend_on_the_batch(monkeypatch):
    m = tiny()
    inputs, pos = batch(m)
    r = reduced(m, [site(1, 8, "random")], seed=3)
    with torch.no_grad():
        r(**inputs, position_ids=pos)
        together = r.last_kept_positions
        b = 2
        one = {k: v[b:b + 1] for k, v in inputs.items()}
        r(**one, position_ids=pos[b:b + 1])
        assert torch.equal(r.last_kept_positions, together[b:b + 1])
        r2 = reduced(m, [site(1, 8, "random")], seed=4)
        r2(**inputs, position_ids=pos)
        assert not torch.equal(r2.last_kept_positions, together)
        # a random site after another one (the running sequence is shorter than the input by then)
        r3 = reduced(m, [site(1, 18, "norm"), site(3, 6, "random")], seed=3)
        r3(**inputs, position_ids=pos)
        together = r3.last_kept_positions
        r3(**one, position_ids=pos[b:b + 1])
        assert torch.equal(r3.last_kept_positions, together[b:b + 1])


def test_bad_visual_segment_is_a_clear_error():
    from diffopsearch.errors import UserError

    m = tiny()
    inputs, pos = batch(m)
    img = m.config.image_token_id
    r = reduced(m, [site(1, 8, "norm")])
    # same total (so LLaVA's own check passes), but one sample has 37 image tokens and another 35
    ids = inputs["input_ids"].clone()
    ids[0, -1] = img
    ids[1, (ids[1] == img).nonzero()[0, 0]] = 7
    with pytest.raises(UserError, match="same size"):
        r(**{**inputs, "input_ids": ids})
    # 36 each, but not contiguous
    ids = inputs["input_ids"].clone()
    ids[1, (ids[1] == img).nonzero()[0, 0]] = 7
    ids[1, -1] = img
    with pytest.raises(UserError, match="contiguous"):
        r(**{**inputs, "input_ids": ids})


# ------------------------------------------------------------------------------------------ the search's forward

def knob_site(layer, keep, score="attn", **knobs):
    """A site whose knobs are tensors that require grad (what the search runs)."""
    from diffopsearch.operators.reduce import SearchSite

    fields = dict(anchors="topk", merge=0.0, sharpness=0.0, locality=0.0, reweight=0.0)
    fields.update(knobs)
    return SearchSite(layer=layer, keep=keep, score=score,
                      **{k: (torch.tensor(float(v), requires_grad=True) if k != "anchors" else v)
                         for k, v in fields.items()})


def test_search_forward_is_the_hard_plan_and_shares_one_vision_pass():
    m = tiny()
    inputs, pos = batch(m)
    k1 = dict(merge=0.7, sharpness=3.0, reweight=0.5)
    k2 = dict(merge=0.5, locality=1.0, reweight=1.0)
    sites = [site(1, 18, "attn", **k1), site(3, 8, "cls", **k2)]
    with torch.no_grad():
        hard = reduced(m, sites)(**inputs, position_ids=pos).logits
        mine = P.search_forward(m, sites, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                position_ids=pos)
        vision = P.encode_images(m, inputs["pixel_values"])
        shared = P.search_forward(m, sites, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                  position_ids=pos, vision=vision)
    ok = real(inputs, hard.shape[1])
    torch.testing.assert_close(mine[ok], hard[ok], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[ok], hard[ok], atol=1e-5, rtol=1e-5)


def test_search_forward_is_differentiable_in_the_knobs_even_at_zero_merge():
    """Tensor knobs get finite, non-zero gradients through the really shortened sequence; at merge = 0 (a
    prune) the merge knob's gradient is the first-order value of merging; the backbone gets none."""
    m = tiny()
    inputs, pos = batch(m)
    s1 = knob_site(1, 18, "attn", merge=0.0, sharpness=5.0)
    s2 = knob_site(3, 8, "norm", merge=1.0, sharpness=5.0, locality=0.5, reweight=1.0)
    logits = P.search_forward(m, [s1, s2], inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                              position_ids=pos)
    assert logits.shape[1] == inputs["input_ids"].shape[1] - (N_VIS - 8)
    logits[:, -1].logsumexp(-1).sum().backward()
    for s, names in ((s1, ("merge",)), (s2, ("merge", "sharpness", "locality", "reweight"))):
        for name in names:
            g = getattr(s, name).grad
            assert g is not None and torch.isfinite(g) and g.abs() > 0, name
    assert all(p.grad is None for p in m.parameters())


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    m = tiny()
    inputs, pos = batch(m)
    grads = []
    for ckpt in (False, True):
        s = knob_site(1, 12, "attn", merge=1.0, sharpness=5.0, reweight=1.0)
        out = P.search_forward(m, [s], inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                               position_ids=pos, checkpoint=ckpt)
        loss = out[:, -1].logsumexp(-1).sum()
        loss.backward()
        grads.append((float(loss.detach()), float(s.merge.grad), float(s.sharpness.grad), float(s.reweight.grad)))
    assert grads[0] == pytest.approx(grads[1], rel=1e-5, abs=1e-7)


def test_query_index_scores_the_prompt_end_of_a_teacher_forced_sequence(monkeypatch):
    """With an answer appended (the search's teacher forcing), ``query_index`` = the last prompt token gives
    exactly the scores the hard plan sees at generation time, and the hard forward keeps the same tokens."""
    m = tiny()
    inputs, pos = batch(m)
    seen = capture_scores(monkeypatch)
    r = reduced(m, [site(2, 10)])
    with torch.no_grad():
        r(**inputs, position_ids=pos)
        kept = r.last_kept_positions
        B, T = inputs["input_ids"].shape
        answer = torch.randint(5, m.config.text_config.vocab_size, (B, 4), generator=torch.Generator().manual_seed(1))
        ids = torch.cat([inputs["input_ids"], answer], 1)
        am = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], 1)
        pos2 = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        q = torch.full((B,), T - 1)
        P.search_forward(m, [site(2, 10)], ids, am, inputs["pixel_values"], position_ids=pos2, query_index=q)
        r(input_ids=ids, attention_mask=am, pixel_values=inputs["pixel_values"], position_ids=pos2, query_index=q)
        # stacked sites: the query's index moves when the first site shortens the sequence
        r2 = reduced(m, [site(1, 18), site(3, 6)])
        r2(**inputs, position_ids=pos)
        kept2 = r2.last_kept_positions
        r2(input_ids=ids, attention_mask=am, pixel_values=inputs["pixel_values"], position_ids=pos2, query_index=q)
    torch.testing.assert_close(seen[1]["scores"], seen[0]["scores"], atol=1e-6, rtol=1e-5)
    assert torch.equal(r.last_kept_positions, kept)
    assert torch.equal(r2.last_kept_positions, kept2)


# ------------------------------------------------------------------------------------------ cost

def _decoder_flops(T, cfg):
    """Matmul FLOPs of one Llama layer at T tokens as FlopCounterMode counts eager attention (q k^T and
    p v in full, no causal halving)."""
    d, f, H, Hkv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d // H
    linear = 2 * T * (2 * d * H * hd + 2 * d * Hkv * hd + 3 * d * f)
    return linear + 2 * 2 * H * T * T * hd


def test_hard_plan_really_cuts_flops():
    """Eager attention, because FlopCounterMode does not count CPU SDPA's fused kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    m = tiny("eager")
    inputs, pos = batch(m, prompt_lens=(6, 6, 6))
    B, T = inputs["input_ids"].shape
    cfg = m.config.text_config

    def count(model):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(**inputs, use_cache=False, logits_to_keep=1)
        return fc.get_total_flops()

    full = count(reduced(m, []))
    assert full == count(m)                                # the empty plan does exactly the model's work
    red = count(reduced(m, [site(2, 9, "attn")]))
    T2 = T - (N_VIS - 9)
    expected_saving = B * 2 * (_decoder_flops(T, cfg) - _decoder_flops(T2, cfg))
    fastv_overhead = B * 2 * cfg.num_attention_heads * T * (cfg.hidden_size // cfg.num_attention_heads)
    assert full - red == expected_saving - fastv_overhead
    assert red / full < 0.8


def test_the_reduced_forward_uses_no_deprecated_transformers_argument():
    """Deprecation warnings are errors here: the next rename in transformers fails in CI, not at a user's."""
    import warnings

    m = tiny()
    inputs, pos = batch(m)
    sites = [site(1, 18, "attn", merge=1.0, sharpness=4.0, reweight=1.0), site(3, 6, "norm")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad():
            reduced(m, sites).generate(**inputs, max_new_tokens=3, do_sample=False)
            P.search_forward(m, sites, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                             position_ids=pos)
