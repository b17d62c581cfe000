"""The operator maths (operators/): scores, the five-knob hard operator against small independent
references of the named regimes, gradients through tensor knobs, ToMe's matching."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from diffopsearch.operators import grid_shape, reduce, scores, tome
from diffopsearch.operators.reduce import hard_reduce

INF = math.inf


def site(keep, anchors="topk", merge=0.0, sharpness=0.0, locality=0.0, reweight=0.0, layer=1, score="attn"):
    return SimpleNamespace(layer=layer, keep=keep, anchors=anchors, merge=merge, sharpness=sharpness,
                           locality=locality, reweight=reweight, score=score)


def grid_inputs(B=2, H=6, W=6, d=8, dk=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = H * W
    x = torch.randn(B, n, d, generator=g)
    keys = torch.randn(B, n, dk, generator=g)
    s = torch.rand(B, n, generator=g)
    pos = (torch.arange(n) + 7).expand(B, n).clone()  # the visual segment starts at position 7
    rr, cc = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    coords = torch.stack([rr.flatten(), cc.flatten()], -1).float().expand(B, n, 2).clone()
    return x, keys, s, pos, coords


# ---------------------------------------------------------------------------------------- scores

def test_attn_scores_match_a_plain_attention_reference_with_gqa_and_padding():
    g = torch.Generator().manual_seed(1)
    B, Hkv, groups, S, dh = 2, 2, 3, 11, 4
    q = torch.randn(B, Hkv * groups, dh, generator=g)
    k = torch.randn(B, Hkv, S, dh, generator=g)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding in sample 1
    vis = torch.tensor([[2, 3, 4, 5], [5, 6, 7, 8]])
    got = scores.attn_scores(q, k, groups, visual_index=vis, key_mask=key_mask)
    for b in range(B):
        rows = []
        for h in range(Hkv * groups):
            kk = k[b, h // groups]  # GQA: query head h reads kv head h // groups
            logit = (kk @ q[b, h]) / math.sqrt(dh)
            logit[~key_mask[b]] = -float("inf")
            rows.append(torch.softmax(logit, 0))
        ref = torch.stack(rows).mean(0)[vis[b]]
        torch.testing.assert_close(got[b], ref)
    assert got.shape == (B, 4)
    assert float(got.sum()) < B  # softmax over all keys, not over the visual ones only


def test_cls_scores_softmax_over_all_keys_then_patches():
    g = torch.Generator().manual_seed(2)
    B, H, n, dh = 2, 3, 9, 4
    q, k = torch.randn(B, H, dh, generator=g), torch.randn(B, H, 1 + n, dh, generator=g)
    got = scores.cls_scores(q, k)
    ref = torch.softmax(torch.einsum("bhd,bhsd->bhs", q, k) / 2.0, -1)[..., 1:].mean(1)
    torch.testing.assert_close(got, ref)
    assert got.shape == (B, n)


def test_norm_and_random_scores():
    x = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    assert scores.norm_scores(x).tolist() == [[5.0, 1.0]]
    a, b = scores.random_scores((2, 50), seed=3), scores.random_scores((2, 50), seed=3)
    assert torch.equal(a, b) and not torch.equal(a, scores.random_scores((2, 50), seed=4))


# ---------------------------------------------------------------------------------------- hard

def test_prune_is_topk_in_position_order():
    x, keys, s, pos, coords = grid_inputs()
    out = hard_reduce(x, keys, s, pos, coords, None, site(10))
    for b in range(2):
        keep = sorted(torch.topk(s[b], 10).indices.tolist())
        assert out.index[b].tolist() == keep
        torch.testing.assert_close(out.x[b], x[b, keep])
        assert out.pos[b].tolist() == [p + 7 for p in keep]
    assert torch.all(out.pos[:, 1:] > out.pos[:, :-1]) and torch.all(out.sizes == 1)
    assert torch.all(out.bias == 0)


@pytest.mark.parametrize("anchors,keep,merge", [("topk", 10, 0.0), ("topk", 10, 1.0), ("grid", 9, 1.0),
                                                 ("bipartite", 20, 1.0), ("iqr", 10, 1.0), ("dominant", 10, 1.0)])
def test_every_anchor_rule_returns_its_tokens_in_position_order(anchors, keep, merge):
    """The reduced forward splices a site's output back without sorting it again: every rule must return
    increasing positions, and index / coords / sizes in the same order."""
    x, keys, s, pos, coords = grid_inputs(seed=5)
    out = hard_reduce(x, keys, s, pos, coords, None, site(keep, anchors, merge=merge, sharpness=INF))
    assert out.pos.shape == (2, keep) and torch.all(out.pos[:, 1:] > out.pos[:, :-1])
    assert torch.equal(out.pos, pos.gather(1, out.index))


def test_merge_regime_matches_a_nearest_anchor_average_reference():
    x, keys, s, pos, coords = grid_inputs(seed=4)
    k = 9
    out = hard_reduce(x, keys, s, pos, coords, None, site(k, merge=1.0, sharpness=INF, reweight=1.0))
    for b in range(2):
        anchors = sorted(torch.topk(s[b], k).indices.tolist())
        kn = F.normalize(keys[b], dim=-1)
        groups = {a: [a] for a in anchors}
        for j in range(36):
            if j not in groups:
                sims = [float(kn[j] @ kn[a]) for a in anchors]
                groups[anchors[max(range(k), key=lambda i: sims[i])]].append(j)
        for i, a in enumerate(anchors):
            torch.testing.assert_close(out.x[b, i], x[b, groups[a]].mean(0))
            assert out.sizes[b, i] == len(groups[a])
            torch.testing.assert_close(out.bias[b, i], torch.tensor(math.log(len(groups[a]))))
    assert float(out.sizes.sum()) == 2 * 36


@pytest.mark.parametrize("locality", [INF, 30.0])
def test_pool_regime_is_2x2_average_pooling(locality):
    H = W = 6
    x, keys, s, pos, coords = grid_inputs(H=H, W=W, seed=5)
    out = hard_reduce(x, keys, None, pos, coords, None, site(9, anchors="grid", merge=1.0, locality=locality))
    ref = F.avg_pool2d(x.view(2, H, W, -1).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(2, 9, -1)
    torch.testing.assert_close(out.x, ref)
    assert torch.all(out.sizes == 4)
    # each pooled token keeps its window's first (top-left) position; coordinates are window centres
    assert out.pos[0].tolist() == [7 + r * W + c for r in (0, 2, 4) for c in (0, 2, 4)]
    assert out.coords[0, 0].tolist() == [0.5, 0.5] and out.coords[0, 4].tolist() == [2.5, 2.5]


def test_grid_uneven_bands_and_stacked_pools_stay_true_averages():
    x, keys, s, pos, coords = grid_inputs(H=8, W=8, seed=6)
    first = hard_reduce(x, keys, None, pos, coords, None, site(16, anchors="grid", merge=1.0, locality=INF))
    second = hard_reduce(first.x, None, None, first.pos, first.coords, first.sizes,
                         site(4, anchors="grid", merge=1.0, locality=INF, layer=3))
    ref = F.avg_pool2d(x.view(2, 8, 8, -1).permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1).reshape(2, 4, -1)
    torch.testing.assert_close(second.x, ref)
    assert torch.all(second.sizes == 16)
    # 6 x 6 grid into 4 x 4 cells: bands floor(r * 4 / 6) of 2 or 1 rows/cols, a partition
    x, keys, s, pos, coords = grid_inputs(H=6, W=6, seed=7)
    out = hard_reduce(x, keys, None, pos, coords, None, site(16, anchors="grid", merge=1.0, locality=INF))
    bands = [[0, 1], [2], [3, 4], [5]]
    refs = [x[:, [r * 6 + c for r in rb for c in cb]].mean(1) for rb in bands for cb in bands]
    torch.testing.assert_close(out.x, torch.stack(refs, 1))
    assert float(out.sizes.sum()) == 2 * 36


def test_grid_shape_prefers_the_grid_aspect():
    assert grid_shape(144, 24, 24) == (12, 12)
    assert grid_shape(12, 24, 24) == (4, 3)
    assert grid_shape(97, 24, 24) is None  # prime > 24: no grid
    assert grid_shape(8, 2, 8) == (2, 4)


def test_even_merge_spreads_dropped_mass_equally():
    x, keys, s, pos, coords = grid_inputs(seed=8)
    out = hard_reduce(x, keys, s, pos, coords, None, site(4, merge=1.0))  # sharpness = locality = 0
    assert torch.allclose(out.sizes, torch.full_like(out.sizes, 1 + 32 / 4))
    out_half = hard_reduce(x, keys, s, pos, coords, None, site(4, merge=0.5))
    assert torch.allclose(out_half.sizes, torch.full_like(out.sizes, 1 + 0.5 * 32 / 4))


def test_keep_all_is_a_no_op_and_bad_keep_fails():
    x, keys, s, pos, coords = grid_inputs()
    out = hard_reduce(x, keys, s, pos, coords, None, site(36, merge=1.0, reweight=1.0))
    assert torch.equal(out.x, x) and torch.all(out.bias == 0)
    with pytest.raises(ValueError):
        hard_reduce(x, keys, s, pos, coords, None, site(37))
    with pytest.raises(ValueError):
        hard_reduce(x, keys, None, pos, coords, None, site(5))  # topk needs scores


def test_bfloat16_hidden_states_keep_their_dtype():
    x, keys, s, pos, coords = grid_inputs()
    out = hard_reduce(x.bfloat16(), keys.bfloat16(), s, pos, coords, None, site(10, merge=1.0, sharpness=5.0))
    assert out.x.dtype == torch.bfloat16 and out.x.shape == (2, 10, 8)


# ---------------------------------------------------------------------------------------- ToMe

def tome_reference(x, metric, r):
    """One ToMe step, straight from the paper: alternate A/B split, cosine, each A to its best B,
    the r best edges merged by size-weighted mean (sizes start at 1). Returns {B index: (vector,
    size)} plus the unmerged A indices."""
    n = x.shape[0]
    A, Bs = list(range(0, n, 2)), list(range(1, n, 2))
    mn = F.normalize(metric, dim=-1)
    best = {a: max(Bs, key=lambda bb: float(mn[a] @ mn[bb])) for a in A}
    score = {a: float(mn[a] @ mn[best[a]]) for a in A}
    merged = sorted(A, key=lambda a: -score[a])[:r]
    groups = {bb: [bb] for bb in Bs}
    for a in merged:
        groups[best[a]].append(a)
    out = {a: (x[a], 1) for a in A if a not in merged}
    out.update({bb: (x[g].mean(0), len(g)) for bb, g in groups.items()})
    return out


def test_tome_step_matches_reference_and_keeps_position_order():
    x, keys, s, pos, coords = grid_inputs(seed=9)
    r = 11
    y, sz, p, c, idx = tome.bipartite_merge(x, keys, torch.ones(2, 36), pos, coords, r)
    assert y.shape == (2, 25, 8) and torch.all(p[:, 1:] > p[:, :-1])
    for b in range(2):
        ref = tome_reference(x[b], keys[b], r)
        assert sorted(ref) == idx[b].tolist()
        for i, t in enumerate(idx[b].tolist()):
            torch.testing.assert_close(y[b, i], ref[t][0])
            assert sz[b, i] == ref[t][1]
            assert p[b, i] == t + 7 and c[b, i].tolist() == coords[b, t].tolist()


def test_tome_via_hard_reduce_caps_r_and_stacks():
    x, keys, s, pos, coords = grid_inputs(seed=10)
    with pytest.raises(ValueError):
        hard_reduce(x, keys, None, pos, coords, None, site(17, anchors="bipartite", merge=1.0))
    a = hard_reduce(x, keys, None, pos, coords, None, site(18, anchors="bipartite", merge=1.0, reweight=1.0))
    b = hard_reduce(a.x, a.x[..., :5], None, a.pos, a.coords, a.sizes,
                    site(9, anchors="bipartite", merge=1.0, reweight=1.0, layer=2))
    assert torch.allclose(b.sizes.sum(1), torch.full((2,), 36.0))
    torch.testing.assert_close(b.bias, b.sizes.log())
    # size-weighted averages: the size-weighted mean of the outputs is the mean of the inputs
    torch.testing.assert_close((b.x * b.sizes[..., None]).sum(1) / 36, x.mean(1))


# ---------------------------------------------------------------------------------------- learnable knobs

def test_hard_reduce_is_differentiable_in_tensor_knobs_and_exact_at_their_values():
    """The search's knobs are 0-d tensors: the output equals the float-knob operator's and every knob gets
    a finite gradient; a learnable merge of 0 still runs the merge branch (its gradient: whether to merge)."""
    x, keys, s, pos, coords = grid_inputs()
    floats = dict(merge=0.6, sharpness=4.0, locality=0.5, reweight=0.7)
    ref = hard_reduce(x, keys, s, pos, coords, None, site(12, **floats))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in floats.items()}
    out = hard_reduce(x, keys, s, pos, coords, None, SimpleNamespace(keep=12, anchors="topk", **t))
    torch.testing.assert_close(out.x, ref.x)
    torch.testing.assert_close(out.sizes, ref.sizes)
    (out.x.square().sum() + out.bias.sum()).backward()
    assert all(v.grad is not None and torch.isfinite(v.grad) and v.grad.abs() > 0 for v in t.values())
    mu = torch.tensor(0.0, requires_grad=True)
    pruned = hard_reduce(x, keys, s, pos, coords, None, SimpleNamespace(keep=12, anchors="topk", merge=mu,
                                                                       sharpness=4.0, locality=0.0, reweight=0.0))
    torch.testing.assert_close(pruned.x, hard_reduce(x, keys, s, pos, coords, None, site(12)).x)
    pruned.x.square().sum().backward()
    assert torch.isfinite(mu.grad) and mu.grad.abs() > 0


def test_row_gathers_and_adds_equal_gather_and_scatter_add_and_carry_gradients():
    """operators/rows.py replaces gather / scatter_add with an expanded index (10x slower on CPU): same values,
    and gradients flow to the input and the added rows."""
    from diffopsearch.operators.rows import add_rows, take_rows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, 4, 2, generator=g, requires_grad=True)
    idx = torch.randint(0, 9, (3, 5), generator=g)
    ref = x.gather(1, idx[..., None, None].expand(-1, -1, 4, 2))
    assert torch.equal(take_rows(x, idx), ref)
    assert torch.equal(take_rows(x[..., 0, 0], idx), x[..., 0, 0].gather(1, idx))
    src = torch.randn(3, 5, 4, 2, generator=g, requires_grad=True)
    want = x.scatter_add(1, idx[..., None, None].expand(-1, -1, 4, 2), src)
    got = add_rows(x, idx, src)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got.square().sum().backward()
    assert x.grad is not None and src.grad is not None and bool(src.grad.abs().sum() > 0)
