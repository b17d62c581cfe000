"""Proportional attention in the reduced forward: a token that stands for s original tokens is heard as
s of them, key bias rho * log(s) of its *current* size, however many sites merged it (docs/DESIGN.md
section 2). Checked in the forward, against references that share no code with the project."""
from __future__ import annotations

import math

import pytest
import torch

from diffopsearch.baselines import make_plan
from diffopsearch.patch import llava as P
from diffopsearch.plan import Plan, Site, backbone_info
from fixtures import N_VIS, batch, embeddings, tiny  # tests/fixtures.py: the tiny LLaVA and its batches

GRID = int(math.isqrt(N_VIS))


def masks_seen(model):
    """Record the attention mask every decoder layer receives (forward pre-hooks with kwargs)."""
    seen = {}

    def hook(layer_idx):
        def pre(_mod, _args, kwargs):
            seen[layer_idx] = kwargs.get("attention_mask")
        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.language_model.layers)]
    return seen, handles


def test_stacked_merges_bias_is_log_of_the_current_size(monkeypatch):
    """Three merging sites (reweight 1): every later layer's key bias on a visual token is log(size),
    sizes taken from what the sites returned; their sum over the kept tokens is the original count."""
    m = tiny("eager")
    inputs, pos = batch(m, prompt_lens=(4,))
    sites = [Site(layer=0, keep=24, score="norm", anchors="topk", merge=1.0, sharpness=math.inf, reweight=1.0),
             Site(layer=1, keep=12, score="attn", anchors="topk", merge=1.0, sharpness=math.inf, reweight=1.0),
             Site(layer=2, keep=6, score="norm", anchors="topk", merge=1.0, sharpness=math.inf, reweight=0.0)]
    sizes_after = []
    real_reduce = P.forward.hard_reduce

    def spy(x, keys, scores, p, coords, sizes, s):
        out = real_reduce(x, keys, scores, p, coords, sizes, s)
        sizes_after.append(out.sizes.gather(1, out.pos.argsort(1)))  # position order, as spliced
        return out

    monkeypatch.setattr(P.forward, "hard_reduce", spy)
    seen, handles = masks_seen(m)
    try:
        with torch.no_grad():
            P.apply_plan(m, Plan(sites=sites, backbone=backbone_info(m.config)))(**inputs, position_ids=pos)
    finally:
        for h in handles:
            h.remove()
    T = inputs["input_ids"].shape[1]
    start = int((inputs["input_ids"][0] == m.config.image_token_id).int().argmax())
    for layer, sizes in ((0, sizes_after[0]), (1, sizes_after[1]), (2, sizes_after[2]), (3, sizes_after[2])):
        k = sizes.shape[1]
        mask = seen[layer][0, 0, -1]                     # the last query's row: every key is visible
        assert mask.shape[-1] == T - (N_VIS - k)
        vis_bias = mask[start:start + k].float()
        # the layer-2 site has rho 0: the reweight in effect stays the merges' 1
        torch.testing.assert_close(vis_bias, sizes[0].log(), atol=1e-5, rtol=1e-5)
        assert float(sizes.sum()) == pytest.approx(N_VIS)
        assert float(mask[:start].abs().max()) == 0.0 and float(mask[start + k:].abs().max()) == 0.0
    assert float(sizes_after[2].max()) > 4  # the stack really compounded sizes (a sum of logs would show)


# ------------------------------------------------------------------ an independent ToMe decoder

def _rotate(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def tome_step(tokens, r):
    """ToMe's bipartite soft matching on a position-ordered list of dicts (pos, h, key, size): A = even
    indices, B = odd; each A token's most cosine-similar B token; the r best edges merged by a
    size-weighted mean into the B token, sizes added (facebookresearch/ToMe, tome/merge.py)."""
    A, Bs = tokens[0::2], [dict(t) for t in tokens[1::2]]
    unit = [t["key"] / t["key"].norm() for t in tokens]
    ua, ub = unit[0::2], unit[1::2]
    best = [max(range(len(Bs)), key=lambda j: float(a @ ub[j])) for a in ua]
    sim = [float(a @ ub[j]) for a, j in zip(ua, best)]
    merged = set(sorted(range(len(A)), key=lambda i: -sim[i])[:r])
    for i in sorted(merged):
        b = Bs[best[i]]
        b["h"] = (b["h"] * b["size"] + A[i]["h"] * A[i]["size"]) / (b["size"] + A[i]["size"])
        b["size"] = b["size"] + A[i]["size"]
    out = [a for i, a in enumerate(A) if i not in merged] + Bs
    return sorted(out, key=lambda t: t["pos"])


def tome_decoder(model, inputs, plan):
    """A decoder of its own: transformers' decoder layers, called one sample at a time with a float mask
    built here (causal + log(size) on the visual keys); before each ToMe layer l the visual tokens are
    matched on layer l-1's keys before RoPE, averaged over kv heads (the hidden states at layer 0).
    Returns the last position's logits (1, V)."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    emb = embeddings(model, inputs)[0]
    is_vis = (ids[0] == model.config.image_token_id).tolist()
    toks = [{"pos": p, "h": emb[p], "vis": v, "size": 1.0} for p, v in enumerate(is_vis)]
    r_at, n = {}, sum(is_vis)  # layer -> tokens merged there
    for s in plan.sites:
        r_at[s.layer] = n - s.keep
        n = s.keep
    keys = None
    for l, layer in enumerate(lm.layers):
        if l in r_at:
            vis = [t for t in toks if t["vis"]]
            for t in vis:
                t["key"] = t["h"] if l == 0 else keys[t["pos"]]
            kept = tome_step(vis, r_at[l])
            toks = sorted([t for t in toks if not t["vis"]] + kept, key=lambda t: t["pos"])
        h = torch.stack([t["h"] for t in toks])[None]
        pos = torch.tensor([[t["pos"] for t in toks]])
        T = h.shape[1]
        bias = torch.tensor([math.log(t["size"]) if t["vis"] else 0.0 for t in toks])
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = torch.where(causal, bias[None, :], torch.finfo(h.dtype).min)[None, None]
        cos, sin = lm.rotary_emb(h, position_ids=pos)
        attn = layer.self_attn
        k = attn.k_proj(layer.input_layernorm(h))[0].view(T, -1, attn.head_dim).mean(1)
        keys = {t["pos"]: k[i] for i, t in enumerate(toks)}
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        for i, t in enumerate(toks):
            t["h"] = h[0, i]
    return model.lm_head(lm.norm(torch.stack([t["h"] for t in toks])[None]))[:, -1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tome_plan_matches_an_independent_tome_decoder(seed):
    """The ToMe baseline (r tokens merged before every layer, proportional attention) in the project's
    forward gives the last-position logits and the greedy token of the decoder above."""
    m = tiny("eager", seed=seed)
    inputs, pos = batch(m, prompt_lens=(3 + seed,), seed=seed)
    plan = make_plan("tome", 0.6, m.config.text_config, N_VIS, (GRID, GRID), n_text=8.0)
    assert len(plan.sites) >= 3 and all(s.reweight == 1.0 for s in plan.sites)
    plan.backbone = backbone_info(m.config)
    with torch.no_grad():
        ours = P.apply_plan(m, plan)(**inputs, position_ids=pos).logits[:, -1]
        ref = tome_decoder(m, inputs, plan)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)
    assert int(ours.argmax()) == int(ref.argmax())
