"""The baselines (baselines.py): budget solving, and each method's plan, run through the operator,
against a small independent reference of the published algorithm on random tensors."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import LlamaConfig

from diffopsearch import baselines, cost
from diffopsearch.errors import UserError
from diffopsearch.operators.reduce import hard_reduce
from diffopsearch.operators.scores import attn_scores, random_scores

TEXT = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=100)
N, GRID, N_TEXT = 144, (12, 12), 30


def make(name, budget, **kw):
    return baselines.make_plan(name, budget, TEXT, N, GRID, N_TEXT, **kw)


def inputs(B=2, d=8, dk=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g)
    keys = torch.randn(B, N, dk, generator=g)
    s = torch.rand(B, N, generator=g) ** 4  # skewed, like attention: a few outliers
    pos = (torch.arange(N) + 5).expand(B, N).clone()
    rr, cc = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    coords = torch.stack([rr.flatten(), cc.flatten()], -1).float().expand(B, N, 2).clone()
    return x, keys, s, pos, coords


def ratio(plan):
    return cost.plan_cost(TEXT, plan, N, N_TEXT)["flops_ratio"]


# ------------------------------------------------------------------------------ budget solving

@pytest.mark.parametrize("name", ["fastv", "random", "prumerge", "visionzip"])
@pytest.mark.parametrize("budget", [0.45, 0.6, 0.85])
def test_keep_is_the_largest_that_fits(name, budget):
    plan = make(name, budget)
    (site,) = plan.sites
    assert ratio(plan) <= budget and plan.cost["flops_ratio"] == pytest.approx(ratio(plan))
    bigger = baselines.method_site(name, site.layer, site.keep + 1)
    plan.sites = [bigger]
    assert ratio(plan) > budget


def test_tome_r_is_the_smallest_that_fits_and_pool_the_finest_grid():
    for budget in (0.4, 0.7):
        plan = make("tome", budget)
        r = N - plan.sites[0].keep
        assert ratio(plan) <= budget and all(s.anchors == "bipartite" and s.reweight == 1.0 for s in plan.sites)
        assert [s.layer for s in plan.sites] == list(range(8))
        plan.sites = baselines.tome_sites(0, 8, N, r - 1)
        assert ratio(plan) > budget
        plan = make("pool", budget)
        keep = plan.sites[0].keep
        finer = [k for k in baselines.pool_keeps(GRID) if k > keep]
        assert ratio(plan) <= budget
        plan.sites = [baselines.method_site("pool", 0, finer[0])]
        assert ratio(plan) > budget
    assert make("pool", ratio(make("pool", 0.3)) + 1e-9).sites[0].keep == make("pool", 0.3).sites[0].keep


def test_budget_edges():
    for name in baselines.METHODS:
        assert make(name, 1.0).sites == []
    assert make("none", 0.5).budget is None  # the reference ignores the budget
    with pytest.raises(UserError, match="below what fastv can reach"):
        make("fastv", 0.3)  # layers 0 and 1 alone are 25% of an 8-layer model, plus the text
    assert make("fastv", 0.3, layer=1).sites[0].layer == 1
    with pytest.raises(UserError, match="budget"):
        make("pool", 0.0)
    with pytest.raises(UserError, match="plan.layer"):
        make("fastv", 0.5, layer=0)
    with pytest.raises(UserError, match="plan.layer"):
        make("random", 0.5, layer=8)
    with pytest.raises(UserError, match="not a known baseline"):
        make("sparsevlm", 0.5)


def test_plan_configs_exist_for_every_baseline():
    conf = Path(baselines.__file__).parent / "conf" / "plan"
    for name in baselines.METHODS:
        d = yaml.safe_load((conf / f"{name}.yaml").read_text())
        assert d["name"] == name and set(d) <= {"name", "layer", "seed"}
        make(name, 0.6, layer=d.get("layer"), seed=d.get("seed", 0))


def test_plans_serialise(tmp_path):
    from diffopsearch.plan import load_plan

    for name in baselines.METHODS:
        plan = make(name, 0.5)
        again = load_plan(str(plan.save(tmp_path / f"{name}.json")))
        assert again.sites == plan.sites and again.method == name


# ------------------------------------------------------------------------------ references

def test_fastv_matches_the_reference():
    plan = make("fastv", 0.5)
    (site,) = plan.sites
    assert (site.layer, site.score, site.anchors, site.merge) == (2, "attn", "topk", 0.0)
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, dh, S, start = 2, 4, 2, 16, N + N_TEXT, 10
    q, k = torch.randn(B, H, dh, generator=g), torch.randn(B, Hkv, S, dh, generator=g)
    x, keys, _, pos, coords = inputs(seed=1)
    vis = (torch.arange(N) + start).expand(B, N)
    s = attn_scores(q, k, H // Hkv, visual_index=vis)
    out = hard_reduce(x, keys, s, pos, coords, None, site)
    for b in range(B):  # FastV: last-token attention of all heads, averaged, image slice, top-k
        att = torch.softmax(torch.einsum("hd,hsd->hs", q[b], k[b].repeat_interleave(2, 0)) / 4.0, -1).mean(0)
        top = att[start:start + N].topk(site.keep).indices.sort().values
        torch.testing.assert_close(out.x[b], x[b, top])
        assert out.pos[b].tolist() == (top + 5).tolist()


def tome_reference(items, r):
    """One ToMe step on a position-ordered list of (pos, vec, size): A = even, B = odd, cosine of
    the vectors, best B per A, r best edges merged by size-weighted mean."""
    A, Bs = items[0::2], items[1::2]
    unit = lambda v: v / v.norm()  # noqa: E731
    best = [max(range(len(Bs)), key=lambda j: float(unit(a[1]) @ unit(Bs[j][1]))) for a in A]
    sim = [float(unit(a[1]) @ unit(Bs[j][1])) for a, j in zip(A, best)]
    merged = sorted(range(len(A)), key=lambda i: -sim[i])[:r]
    Bs = [list(b) for b in Bs]
    for i in merged:
        b = Bs[best[i]]
        b[1] = (b[1] * b[2] + A[i][1] * A[i][2]) / (b[2] + A[i][2])
        b[2] = b[2] + A[i][2]
    out = [a for i, a in enumerate(A) if i not in merged] + [tuple(b) for b in Bs]
    return sorted(out, key=lambda t: t[0])


def test_tome_matches_the_reference_over_stacked_layers():
    plan = make("tome", 0.6)
    x, _, _, pos, coords = inputs(B=1, seed=2)
    sizes = None
    ref = [(int(p), v, 1.0) for p, v in zip(pos[0], x[0])]
    for site in plan.sites[:4]:
        r = len(ref) - site.keep
        out = hard_reduce(x, x, None, pos, coords, sizes, site)  # metric: the tokens themselves
        x, pos, coords, sizes = out.x, out.pos, out.coords, out.sizes
        ref = tome_reference(ref, r)
        assert pos[0].tolist() == [t[0] for t in ref]
        torch.testing.assert_close(x[0], torch.stack([t[1] for t in ref]))
        assert sizes[0].tolist() == [t[2] for t in ref]
        torch.testing.assert_close(out.bias, sizes.log())  # proportional attention


def test_pool_is_llava_2x2_average_pooling():
    budget = ratio(baselines.Plan(sites=[baselines.method_site("pool", 0, 36)], backbone=make("none", 1).backbone))
    (site,) = make("pool", budget).sites
    assert site.keep == 36 and site.layer == 0
    x, keys, _, pos, coords = inputs(seed=3)
    out = hard_reduce(x, keys, None, pos, coords, None, site)
    ref = F.avg_pool2d(x.view(2, 12, 12, -1).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(2, 36, -1)
    torch.testing.assert_close(out.x, ref)


def prumerge_reference(x, keys, s, keep):
    """PruMerge(+) from the papers: IQR outliers of CLS attention (numpy percentiles), filled to
    ``keep`` by evenly spaced non-outliers; every pruned token joins its most key-similar kept
    token; clusters averaged. Returns {kept index: vector}."""
    a = s.numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    out = [i for i in range(len(a)) if a[i] > q3 + 1.5 * (q3 - q1)]
    if len(out) >= keep:
        kept = sorted(np.argsort(-a, kind="stable")[:keep].tolist())
    else:
        rest = [i for i in range(len(a)) if i not in out]
        m, R = keep - len(out), len(rest)
        fill = [rest[t] for t in range(R) if ((t + 1) * m) // R > (t * m) // R]
        kept = sorted(out + fill)
    kn = F.normalize(keys, dim=-1)
    groups = {i: [i] for i in kept}
    for j in range(len(a)):
        if j not in groups:
            groups[max(kept, key=lambda i: float(kn[j] @ kn[i]))].append(j)
    return {i: x[g].mean(0) for i, g in groups.items()}, len(out)


def test_prumerge_matches_the_reference():
    (site,) = make("prumerge", 0.5).sites
    assert (site.score, site.anchors, site.merge, site.sharpness) == ("cls", "iqr", 1.0, math.inf)
    for seed in range(3):
        x, keys, s, pos, coords = inputs(seed=10 + seed)
        spiky = s.clone()
        spiky[:, 3::7] += 5.0  # 21 clear outliers
        # fewer outliers than keep (spatial fill), and more outliers than keep (the best of them)
        for scores, keep, fill in ((s, site.keep, True), (spiky, 5, False)):
            out = hard_reduce(x, keys, scores, pos, coords, None, baselines.method_site("prumerge", 0, keep))
            for b in range(2):
                ref, n_out = prumerge_reference(x[b], keys[b], scores[b], keep)
                assert (n_out < keep) == fill
                assert out.index[b].tolist() == sorted(ref)
                torch.testing.assert_close(out.x[b], torch.stack([ref[i] for i in sorted(ref)]))


def visionzip_reference(x, keys, s, keep):
    """VisionZip's selection as its code does it: dominant = top (keep - c) CLS attention; the rest
    in order, every (R // c)-th is a contextual target (first c); each other token is assigned to
    its most similar target by normalised keys; each target becomes the mean of its group."""
    c = int(math.floor(keep * 5 / 32 + 0.5))
    dom = torch.topk(s, keep - c).indices.tolist()
    rest = [i for i in range(len(s)) if i not in dom]
    step = max(1, len(rest) // c)
    targets = rest[::step][:c]
    others = [i for i in rest if i not in targets]
    kn = F.normalize(keys, dim=-1)
    sim = kn[others] @ kn[targets].T
    assign = sim.argmax(-1)
    out = {i: x[i] for i in dom}
    for t, i in enumerate(targets):
        members = [others[j] for j in range(len(others)) if assign[j] == t]
        out[i] = (x[members].sum(0) + x[i]) / (1 + len(members))
    return out, c


def test_visionzip_matches_the_reference():
    (site,) = make("visionzip", 0.5).sites
    assert (site.score, site.anchors, site.merge, site.sharpness) == ("cls", "dominant", 1.0, math.inf)
    for keep in (site.keep, 64):
        x, keys, s, pos, coords = inputs(seed=20 + keep)
        out = hard_reduce(x, keys, s, pos, coords, None, baselines.method_site("visionzip", 0, keep))
        for b in range(2):
            ref, c = visionzip_reference(x[b], keys[b], s[b], keep)
            assert out.index[b].tolist() == sorted(ref)
            torch.testing.assert_close(out.x[b], torch.stack([ref[i] for i in sorted(ref)]))
            assert float(out.sizes[b].sum()) == N  # every token counted once
        if keep == 64:
            assert c == 10  # VisionZip's 54 + 10


def test_random_pruning_is_seeded_and_uniform():
    (site,) = make("random", 0.5, seed=7).sites
    assert (site.score, site.anchors, site.merge, site.layer) == ("random", "topk", 0.0, 0)
    assert make("random", 0.5, seed=7).seed == 7
    x, keys, _, pos, coords = inputs(B=1, seed=4)
    hits = torch.zeros(N)
    for seed in range(300):
        out = hard_reduce(x, keys, random_scores((1, N), seed), pos, coords, None, site)
        assert out.index.shape == (1, site.keep) and len(set(out.index[0].tolist())) == site.keep
        hits[out.index[0]] += 1
        torch.testing.assert_close(out.x[0], x[0, out.index[0]])
    a = hard_reduce(x, keys, random_scores((1, N), 3), pos, coords, None, site).index
    b = hard_reduce(x, keys, random_scores((1, N), 4), pos, coords, None, site).index
    # seeded: one seed, one set of kept tokens (a fresh draw of seed 3 keeps what seed 3 kept); another
    # seed keeps another set
    assert torch.equal(a, hard_reduce(x, keys, random_scores((1, N), 3), pos, coords, None, site).index)
    assert not torch.equal(a, b)
    p = site.keep / N  # every token kept with the same probability
    assert float(((hits / 300 - p).abs()).max()) < 5 * math.sqrt(p * (1 - p) / 300)
