"""The differentiable search: state, relaxation, discretize/repair, loop (resume, gradients), CLI."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fixtures as fx  # tests/fixtures.py
from diffopsearch.errors import UserError
from diffopsearch.search import make_space, search_plan
from diffopsearch.search import discretize as dz
from diffopsearch.search import relax
from diffopsearch.search.loop import CKPT_DIR, LOG_NAME, SearchSettings, search
from diffopsearch.search.state import REGIMES, ArchState, SearchSpace, gumbel

ROOT = Path(__file__).resolve().parent.parent
LADDER = (1.0, 0.75, 0.5, 0.25)
TEXT4 = {**fx.TINY_TEXT, "num_hidden_layers": 4}


@pytest.fixture(scope="module")
def tiny4():
    from diffopsearch.backbone import toy

    model = toy.build_model(0, vision={**fx.TINY_VISION, "initializer_range": 0.5},
                            text={**TEXT4, "initializer_range": 0.5})
    model.requires_grad_(False)
    return model, toy.build_processor()


@pytest.fixture(scope="module")
def train():
    from diffopsearch.data.datasets import load_qa

    return load_qa("toy", split="train", limit=24)


def _space(model, operator="continuous", layers=None, ladder=LADDER):
    return make_space(model.config, {"operator": operator, "candidate_layers": layers, "ladder": list(ladder)})


def _backbone(model):
    from diffopsearch.plan import backbone_info

    return backbone_info(model.config)


def _settings(**kw):
    base = dict(budget=0.5, steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, lr=0.1)
    base.update(kw)
    return SearchSettings(**base)


# ---------------------------------------------------------------- state and relaxation

def test_noise_is_a_function_of_seed_and_step():
    a, b = gumbel((3, 4), 0, 5, 0), gumbel((3, 4), 0, 5, 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, gumbel((3, 4), 0, 6, 0)) and not torch.equal(a, gumbel((3, 4), 1, 5, 0))
    assert not torch.equal(a, gumbel((3, 4), 0, 5, 1))


def test_expected_tokens_multiply_the_fractions_of_stacked_sites(tiny4):
    model, _ = tiny4
    state = ArchState(_space(model, "mixture", layers=[1, 3]))
    with torch.no_grad():
        state.ladder_logits.fill_(-50.0)
        state.ladder_logits[0, 2] = 50.0  # layer 1 keeps 0.5
        state.ladder_logits[1, 3] = 50.0  # layer 3 keeps 0.25 of that
        state.regime_logits.zero_()
        state.regime_logits[:, REGIMES.index("reweight")] = -50.0
    tokens = state.expected_tokens()
    assert tokens.tolist() == pytest.approx([144, 72, 72, 18], abs=1e-3)
    with torch.no_grad():
        state.regime_logits[0, REGIMES.index("reweight")] = 50.0  # reweight keeps every token
    assert state.expected_tokens().tolist() == pytest.approx([144, 144, 144, 36], abs=1e-3)


def test_expected_cost_of_a_one_hot_state_is_the_hard_plan_cost(tiny4):
    from diffopsearch.cost import plan_cost

    model, _ = tiny4
    state = ArchState(_space(model, "mixture", layers=[0, 2]))
    with torch.no_grad():
        state.ladder_logits.fill_(-60.0)
        state.ladder_logits[0, 1] = 60.0
        state.ladder_logits[1, 2] = 60.0
        state.regime_logits.fill_(-60.0)
        state.regime_logits[:, REGIMES.index("prune")] = 60.0
    soft = float(relax.expected_cost_ratio(state, model.config.text_config, 20.0).detach())
    plan = dz.make_plan(state, dz.argmax_choices(state), _backbone(model), 1.0, model.config.text_config, 20.0)
    assert [(s.layer, s.keep) for s in plan.sites] == [(0, 108), (2, 54)]
    hard = plan_cost(model.config.text_config, plan, 144, 20.0)
    # the relaxation leaves out only the operators' own overhead (pruning: attn score only)
    assert soft == pytest.approx(hard["flops_ratio"] - hard["overhead_flops"] / hard["flops_full"], rel=1e-5)


def test_identity_sample_gives_the_unreduced_logits(tiny4, train):
    from diffopsearch.data.datasets import make_train_batch
    from diffopsearch.patch.llava import soft_forward

    model, proc = tiny4
    recs, imgs = train.batch(range(3))
    b = make_train_batch(proc, recs, imgs)
    kw = dict(attention_mask=b["attention_mask"], pixel_values=b["pixel_values"], position_ids=b["position_ids"])
    for op in ("mixture", "continuous"):
        state = ArchState(_space(model, op, layers=[0, 2]))
        with torch.no_grad():
            state.ladder_logits.fill_(-60.0)
            state.ladder_logits[:, 0] = 60.0  # keep 1.0 everywhere
            if op == "mixture":
                state.regime_logits.fill_(-60.0)
                state.regime_logits[:, REGIMES.index("merge")] = 60.0
        sites = relax.build_sites(state, state.sample(0, 1.0, 0), skip_identity=False)
        with torch.no_grad():
            soft = soft_forward(model, b["input_ids"], sites=sites, **kw)
            ref = soft_forward(model, b["input_ids"], sites=(), **kw)
        real = b["attention_mask"].bool()  # left-padding rows attend to nothing: garbage either way
        assert torch.allclose(soft[real], ref[real], atol=1e-4), (op, (soft - ref)[real].abs().max())


def test_a_one_hot_state_runs_exactly_the_hard_plan(tiny4, train):
    """No relaxation gap at the end of annealing: the soft forward of a one-hot state (dropped keys
    at log(eps), constant regime knobs exact) gives the hard plan's answer distribution."""
    from diffopsearch.data.datasets import make_train_batch
    from diffopsearch.patch.llava import apply_plan, soft_forward

    model, proc = tiny4
    recs, imgs = train.batch(range(4))
    b = make_train_batch(proc, recs, imgs)
    labels = b.pop("labels")
    width = int((labels != -100).sum(1).max()) + 1
    for regimes in (("pool", "prune"), ("merge", "merge")):
        state = ArchState(_space(model, "mixture", layers=[0, 2]))
        with torch.no_grad():
            state.ladder_logits.fill_(-60.0)
            state.ladder_logits[0, 1], state.ladder_logits[1, 2] = 60.0, 60.0  # 0.75 then 0.5 of that
            state.regime_logits.fill_(-60.0)
            for i, r in enumerate(regimes):
                state.regime_logits[i, REGIMES.index(r)] = 60.0
        plan = dz.make_plan(state, dz.argmax_choices(state), _backbone(model), 1.0, model.config.text_config, 20.0)
        assert [s.keep for s in plan.sites] == [108, 54]
        sites = relax.build_sites(state, state.sample(3, 0.1, 0, hard=True))
        with torch.no_grad():
            soft = soft_forward(model, b["input_ids"], sites=sites, attention_mask=b["attention_mask"],
                                pixel_values=b["pixel_values"], position_ids=b["position_ids"], logits_to_keep=width,
                                query_index=b["query_index"])
            hard = apply_plan(model, plan)(**b, logits_to_keep=width).logits
        assert torch.allclose(soft, hard, atol=1e-4), (regimes, (soft - hard).abs().max())


def test_teacher_forced_scores_rank_by_the_last_prompt_token_as_generation_does(tiny4, train):
    """Regression: the search and the selection score a plan on prompt + answer; an ``attn`` site
    must rank visual tokens by the last *prompt* token's attention (what generation sees), not by
    the last position's, which reads the answer. The soft and the hard forward of a train batch
    then predict the first answer token exactly as the prompt alone does."""
    from diffopsearch.data.datasets import make_eval_batch, make_train_batch
    from diffopsearch.patch.llava import apply_plan, soft_forward
    from diffopsearch.search.loop import answer_losses

    model, proc = tiny4
    recs, imgs = train.batch(range(1))
    b = make_train_batch(proc, recs, imgs)
    ev = make_eval_batch(proc, recs, imgs)
    q = int(b["query_index"][0])
    back = q - b["input_ids"].shape[1]  # from the end: the hard forward's sequence is shorter
    assert q == ev["input_ids"].shape[1] - 1 and int(b["labels"][0, q]) == -100 and int(b["labels"][0, q + 1]) >= 0
    state = ArchState(_space(model, "mixture", layers=[2]))
    with torch.no_grad():
        state.ladder_logits.fill_(-60.0)
        state.ladder_logits[0, 3] = 60.0  # keep 0.25
        state.regime_logits.fill_(-60.0)
        state.regime_logits[0, REGIMES.index("prune")] = 60.0
    plan = dz.make_plan(state, dz.argmax_choices(state), _backbone(model), 1.0, model.config.text_config, 20.0)
    assert [(s.layer, s.score) for s in plan.sites] == [(2, "attn")]
    fwd = apply_plan(model, plan)
    with torch.no_grad():
        want = fwd(**ev).logits[0, -1]
        hard = fwd(**{k: v for k, v in b.items() if k != "labels"}).logits[0, back]
        sites = relax.build_sites(state, state.sample(0, 0.1, 0, hard=True))
        soft = soft_forward(model, b["input_ids"], sites=sites, attention_mask=b["attention_mask"],
                            pixel_values=b["pixel_values"], position_ids=b["position_ids"],
                            query_index=b["query_index"])[0, q]
        blind = fwd(**{k: v for k, v in b.items() if k not in ("labels", "query_index")}).logits[0, back]
    assert torch.allclose(hard, want, atol=1e-4) and torch.allclose(soft, want, atol=1e-4)
    assert not torch.allclose(blind, want, atol=1e-4)  # the last position's attention ranks differently
    assert torch.isfinite(answer_losses(model, b, sites, kl_weight=0.0)["ce"])


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("operator", ["mixture", "continuous"])
def test_gradient_reaches_every_kind_of_state_parameter(tiny4, train, operator, hard):
    from diffopsearch.data.datasets import make_train_batch
    from diffopsearch.search.loop import answer_losses

    model, proc = tiny4
    state = ArchState(_space(model, operator, layers=[1, 2]), init_keep=0.01)  # a sample that reduces
    if operator == "continuous":
        with torch.no_grad():  # and ranks (with grid anchors the score does not matter)
            state.anchor_logits[:, 0] = 3.0
    recs, imgs = train.batch(range(4))
    sites = relax.build_sites(state, state.sample(0, 1.0, 0, hard=hard))
    loss = answer_losses(model, make_train_batch(proc, recs, imgs), sites, kl_weight=0.5)
    (loss["ce"] + loss["kl"]).backward()
    for name, p in state.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())  # the backbone stays frozen


def test_budget_term_pulls_the_expected_cost_down(tiny4):
    model, _ = tiny4
    state = ArchState(_space(model, "continuous"))
    cost = relax.expected_cost_ratio(state, model.config.text_config, 20.0)
    torch.relu(cost - 0.3).pow(2).backward()
    # d cost / d logit of "keep 1.0" is positive at every layer, of the smallest entry negative
    assert (state.ladder_logits.grad[:, 0] > 0).all() and (state.ladder_logits.grad[:, -1] < 0).all()


# ---------------------------------------------------------------- discretize and repair

@pytest.mark.parametrize("operator", ["mixture", "continuous"])
def test_plan_cost_never_exceeds_the_budget(tiny4, operator):
    model, _ = tiny4
    tc, backbone = model.config.text_config, _backbone(model)
    space = _space(model, operator, ladder=(1.0, 0.9, 0.7, 0.5, 0.3, 0.1))
    floor = dz.min_cost_ratio(tc, backbone, 20.0, space.layers)
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        state = ArchState(space)
        with torch.no_grad():
            for p in state.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 3)
            state.ladder_logits[:, 0] += 4.0  # mostly "keep all": the argmax plan is over budget
        for budget in (1.0, 0.8, 0.6, 0.4, 0.25, 0.15, floor + 1e-3):
            plan, log = dz.discretize(state, backbone, budget, tc, 20.0, fill=trial % 2 == 1)
            assert plan.cost["flops_ratio"] <= budget + 1e-12, (trial, budget, plan.sites)
            plan.validate_for(model.config)
            from diffopsearch.cost import plan_cost

            assert plan_cost(tc, plan, 144, 20.0)["flops_ratio"] == pytest.approx(plan.cost["flops_ratio"])
    with pytest.raises(UserError, match="budget"):
        dz.discretize(ArchState(space), backbone, floor * 0.5, tc, 20.0)


def test_argmax_plan_that_fits_is_left_alone(tiny4):
    model, _ = tiny4
    state = ArchState(_space(model, "mixture", layers=[0, 1, 2, 3]))
    with torch.no_grad():
        state.ladder_logits.fill_(-9.0)
        state.ladder_logits[:, 0] = 9.0
        state.ladder_logits[0, 0], state.ladder_logits[0, 3] = -9.0, 9.0   # layer 0: pool to 0.25
        state.ladder_logits[2, 0], state.ladder_logits[2, 2] = -9.0, 9.0   # layer 2: 0.5 of that
        state.regime_logits.fill_(-9.0)
        state.regime_logits[0, REGIMES.index("pool")] = 9.0
        state.regime_logits[2, REGIMES.index("merge")] = 9.0
        state.regime_logits[[1, 3], REGIMES.index("prune")] = 9.0
    plan, log = dz.discretize(state, _backbone(model), 0.9, model.config.text_config, 20.0)
    assert log == []
    s0, s2 = plan.sites
    assert (s0.layer, s0.keep, s0.anchors, s0.score, s0.merge, s0.locality) == (0, 36, "grid", "none", 1.0, math.inf)
    assert (s2.layer, s2.keep, s2.anchors, s2.score, s2.merge, s2.sharpness, s2.reweight) == \
        (2, 18, "topk", "attn", 1.0, math.inf, 1.0)


def test_repair_tightens_the_site_that_is_cheapest_to_change(tiny4):
    model, _ = tiny4
    state = ArchState(_space(model, "mixture", layers=[1, 2]))
    with torch.no_grad():
        state.regime_logits.fill_(-9.0)
        state.regime_logits[:, REGIMES.index("prune")] = 9.0
        state.ladder_logits.fill_(-20.0)
        state.ladder_logits[0, 0] = 20.0                              # layer 1: sure of 1.0
        state.ladder_logits[1, 0], state.ladder_logits[1, 1] = 5.0, 4.9  # layer 2: 1.0 or 0.75, unsure
    tc, bb = model.config.text_config, _backbone(model)
    full, _ = dz.discretize(state, bb, 1.0, tc, 20.0)
    assert full.sites == []
    plan, log = dz.discretize(state, bb, 0.95, tc, 20.0, top_up=False)
    assert [(s.layer, s.keep) for s in plan.sites] == [(2, 108)] and len(log) == 1
    # top-up: the tightened site gets back the tokens that still fit, and not one more
    plan, log = dz.discretize(state, bb, 0.95, tc, 20.0)
    (site,) = plan.sites
    assert site.layer == 2 and 108 < site.keep < 144 and log[-1]["top_up"]
    assert plan.cost["flops_ratio"] <= 0.95
    more = dz.make_plan(state, dz.argmax_choices(state), bb, 0.95, tc, 20.0, overrides={1: site.keep + 1})
    assert more.cost["flops_ratio"] > 0.95


def test_fill_spends_what_is_left_of_the_budget(tiny4):
    model, _ = tiny4
    tc, bb = model.config.text_config, _backbone(model)
    state = ArchState(_space(model, "mixture", layers=[0, 1, 2, 3], ladder=(1.0, 0.9, 0.7, 0.5, 0.3, 0.1)))
    with torch.no_grad():
        state.ladder_logits.copy_(torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]).expand(4, 6))  # all at 0.1
        state.regime_logits.fill_(-9.0)
        state.regime_logits[:, REGIMES.index("prune")] = 9.0
    lean, log = dz.discretize(state, bb, 0.6, tc, 20.0)
    assert log == [] and lean.cost["flops_ratio"] < 0.3
    full, log = dz.discretize(state, bb, 0.6, tc, 20.0, fill=True)
    assert 0.6 - 0.01 < full.cost["flops_ratio"] <= 0.6 and any(e.get("fill") for e in log)
    # every layer gives up the same log-probability per step; layer 0's step buys the most FLOPs
    assert log[0]["layer"] == 0
    assert dz.discretize(state, bb, 0.6, tc, 20.0, fill=True)[0].to_dict() == full.to_dict()  # deterministic


def test_grid_after_a_non_grid_site_falls_back_to_topk(tiny4):
    model, _ = tiny4
    state = ArchState(_space(model, "continuous", layers=[1, 2]))
    with torch.no_grad():
        state.ladder_logits.fill_(-9.0)
        state.ladder_logits[:, 2] = 9.0
        state.anchor_logits.copy_(torch.tensor([[5.0, -5.0], [-5.0, 5.0]]))  # topk at 1, grid at 2
        state.score_logits.copy_(torch.tensor([[5.0, 0, 0], [0, 0, 5.0]]))   # attn at 1, norm at 2
    plan, _ = dz.discretize(state, _backbone(model), 1.0, model.config.text_config, 20.0)
    assert [(s.layer, s.keep, s.anchors, s.score) for s in plan.sites] == [(1, 72, "topk", "attn"), (2, 36, "topk", "norm")]
    with torch.no_grad():
        state.anchor_logits.copy_(torch.tensor([[-5.0, 5.0], [-5.0, 5.0]]))  # grid twice: a grid of a grid
    plan, _ = dz.discretize(state, _backbone(model), 1.0, model.config.text_config, 20.0)
    assert [(s.layer, s.keep, s.anchors) for s in plan.sites] == [(1, 72, "grid"), (2, 36, "grid")]
    plan.validate_for(model.config)


# ---------------------------------------------------------------- the loop

@pytest.mark.parametrize("operator", ["mixture", "continuous"])
def test_search_runs_and_writes_a_valid_plan_log_and_checkpoint(tmp_path, tiny4, train, operator):
    model, proc = tiny4
    space = _space(model, operator, layers=[0, 1, 2])
    plan, res = search_plan(model, proc, train, space, _settings(operator=operator), 20.0, out_dir=tmp_path,
                            progress=False)
    assert plan.cost["flops_ratio"] <= 0.5 and plan.method == "search"
    plan.validate_for(model.config)
    s = plan.to_dict()["search"]
    assert s["steps"] == 4 and s["seed"] == 0 and math.isfinite(s["final_loss"])
    assert len(s["distributions"]["ladder_probs"]) == 3
    lines = [json.loads(x) for x in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    assert {"loss", "cost", "budget", "lambda", "tau"} <= set(lines[0])
    assert lines[0]["tau"] == 1.0 and lines[-1]["tau"] == pytest.approx(_settings().tau_end)
    assert (tmp_path / CKPT_DIR / "search_state.safetensors").exists()
    assert json.loads((tmp_path / CKPT_DIR / "search_state.json").read_text())["step"] == 4


def test_dual_ascent_raises_lambda_only_while_over_budget(tiny4, train):
    model, proc = tiny4
    over = search(model, proc, train, _space(model, "mixture", layers=[1]), _settings(budget=0.3, warmup_steps=2),
                  20.0, progress=False)
    lams = [r["lambda"] for r in over.history]
    assert lams[0] == lams[1] == lams[2] == 1.0 and lams[3] > lams[2]  # warm-up: no budget term, no ascent
    assert all(r["penalty"] == 0 for r in over.history[:2]) and over.history[2]["penalty"] > 0
    free = search(model, proc, train, _space(model, "mixture", layers=[1]), _settings(budget=1.0), 20.0, progress=False)
    assert all(r["lambda"] == 1.0 and r["penalty"] == 0 for r in free.history)


def test_resume_ends_at_the_plan_of_an_uninterrupted_run(tmp_path, tiny4, train):
    model, proc = tiny4
    space = _space(model, "continuous", layers=[1, 2])
    st = _settings(steps=5, checkpoint_every=2)
    full, rf = search_plan(model, proc, train, space, st, 20.0, out_dir=tmp_path / "a", progress=False)
    # interrupted after 3 steps: the last checkpoint is at step 2
    search_plan(model, proc, train, space, st, 20.0, out_dir=tmp_path / "b", progress=False, stop_after=3)
    assert json.loads((tmp_path / "b" / CKPT_DIR / "search_state.json").read_text())["step"] == 2
    resumed, rr = search_plan(model, proc, train, space, st, 20.0, out_dir=tmp_path / "b", progress=False, resume=True)
    assert rr.resumed_from == 2 and [r["step"] for r in rr.history] == [2, 3, 4]
    for (name, a), (_, b) in zip(rf.state.named_parameters(), rr.state.named_parameters()):
        assert torch.equal(a, b), name
    assert [s.to_dict() for s in full.sites] == [s.to_dict() for s in resumed.sites]
    assert full.search["final_loss"] == resumed.search["final_loss"]
    log_a = [json.loads(x) for x in (tmp_path / "a" / LOG_NAME).read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / LOG_NAME).read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_s"} for r in rows]  # noqa: E731
    assert strip(log_a) == strip(log_b)
    # a finished run resumes to the same plan without training again
    again, ra = search_plan(model, proc, train, space, st, 20.0, out_dir=tmp_path / "b", progress=False, resume=True)
    assert ra.history == [] and [s.to_dict() for s in again.sites] == [s.to_dict() for s in full.sites]
    # other settings: refuse rather than continue someone else's trajectory
    with pytest.raises(UserError, match="different settings"):
        search_plan(model, proc, train, space, _settings(steps=5, lr=0.2), 20.0, out_dir=tmp_path / "b",
                    progress=False, resume=True)


def test_infeasible_budget_is_a_user_error_before_the_search(tiny4, train):
    model, proc = tiny4
    with pytest.raises(UserError, match="below what any plan can reach"):
        search_plan(model, proc, train, _space(model), _settings(budget=0.01), 20.0, progress=False)
    with pytest.raises(UserError, match="candidate_layers"):
        _space(model, layers=[0, 9])


# ---------------------------------------------------------------- the command, 1 and 2 processes

def _tiny_model_dir(path: Path) -> Path:
    from diffopsearch.backbone import toy

    # two CLIP layers: the LLaVA feature layer (-2) is then a layer's output, so the CLS score exists
    model = toy.build_model(0, vision={**fx.TINY_VISION, "num_hidden_layers": 2, "initializer_range": 0.5},
                            text={**TEXT4, "initializer_range": 0.5})
    model.save_pretrained(path)
    toy.build_processor().save_pretrained(path)
    return path


CLI_ARGS = ["budget=0.5", "limit=6", "batch_size=3", "max_new_tokens=2", "search.steps=3", "search.batch_size=4",
            "search.train_limit=16", "search.warmup_steps=1", "search.checkpoint_every=2",
            "search.candidate_layers=[0,1,2]", "search.ladder=[1.0,0.5,0.25]", "model.device=cpu"]


@pytest.mark.slow
def test_cli_search_one_and_two_processes(tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = CLI_ARGS + [f"model.path={model_dir}"]
    one = subprocess.run([sys.executable, "-m", "diffopsearch", "search", f"hydra.run.dir={tmp_path / 'one'}",
                          "search.eval_baselines=true", *args], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    plan = json.loads((tmp_path / "one" / "plan.json").read_text())
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert plan["cost"]["flops_ratio"] <= 0.5 and plan["search"]["steps"] == 3
    assert results["n"] == 6 and results["flops_ratio"] <= 0.5
    assert [r["method"] for r in results["baselines"]][:2] == ["search", "none"]
    assert "search vs baselines" in one.stdout

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # accelerate 1.15: `--cpu --num_processes 2` starts one process; `--multi_gpu` starts two
    # through torchrun, and without CUDA they run on the CPU (gloo), as tests/test_evaluate.py notes.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "diffopsearch", "search", f"hydra.run.dir={tmp_path / 'two'}", *args]
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    plan2 = json.loads((tmp_path / "two" / "plan.json").read_text())
    res2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert plan2["cost"]["flops_ratio"] <= 0.5 and res2["n"] == 6 and res2["throughput"]["processes"] == 2
    log = [json.loads(x) for x in (tmp_path / "two" / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]  # one writer
    # the two halves of each step's batch average to the single-process gradient: same trajectory
    log1 = [json.loads(x) for x in (tmp_path / "one" / LOG_NAME).read_text().splitlines()]
    assert [r["cost"] for r in log] == pytest.approx([r["cost"] for r in log1], abs=1e-4)


# ---------------------------------------------------------------- selection among derived plans

def test_hold_out_is_disjoint_seeded_and_at_most_a_quarter(train):
    from diffopsearch.search import hold_out

    rest, held = hold_out(train, 5, seed=0)
    assert len(held) == 5 and len(rest) == len(train) - 5
    assert set(held.ids).isdisjoint(rest.ids) and set(held.ids) | set(rest.ids) == set(train.ids)
    assert hold_out(train, 5, seed=0)[1].ids == held.ids and hold_out(train, 5, seed=1)[1].ids != held.ids
    assert len(hold_out(train, 1000, seed=0)[1]) == len(train) // 4
    assert hold_out(train, 0, seed=0) == (train, None)


def test_plan_scores_of_no_plan_and_an_empty_plan_agree(tiny4, train):
    from diffopsearch.plan import Plan
    from diffopsearch.search.loop import plan_scores

    model, proc = tiny4
    a = plan_scores(model, proc, None, train, batch_size=7)
    b = plan_scores(model, proc, Plan(sites=[], backbone=_backbone(model)), train, batch_size=5)
    assert a["n"] == b["n"] == len(train) and 0 <= a["accuracy"] <= 1
    assert a["accuracy"] == b["accuracy"] and a["ce"] == pytest.approx(b["ce"], rel=1e-5)


@pytest.mark.parametrize("operator", ["mixture", "continuous"])
def test_selection_picks_the_best_held_out_candidate_within_budget(tiny4, train, operator):
    from diffopsearch.search import hold_out
    from diffopsearch.search.loop import plan_scores
    from diffopsearch.search.select import candidate_plans, sample_choices

    model, proc = tiny4
    rest, held = hold_out(train, 6, seed=0)
    space = _space(model, operator, layers=[0, 1, 2])
    plan, res = search_plan(model, proc, rest, space, _settings(operator=operator), 20.0, progress=False,
                            heldout=held, select_samples=6)
    sel = plan.search["selection"]
    assert sel["questions"] == 6 and 1 <= len(sel["candidates"]) <= 7
    assert sel["candidates"][0]["origin"] == "argmax"
    assert all(c["flops_ratio"] <= 0.5 for c in sel["candidates"]) and plan.cost["flops_ratio"] <= 0.5
    best = sel["candidates"][sel["chosen"]]
    assert best["ce"] == min(c["ce"] for c in sel["candidates"])
    assert best["sites"] == [f"L{s.layer}:{s.keep}:{s.score}/{s.anchors}" for s in plan.sites]
    assert plan_scores(model, proc, plan, held)["ce"] == pytest.approx(best["ce"], abs=1e-4)
    # the samples are a function of the seed
    assert sample_choices(res.state, 0, 3) == sample_choices(res.state, 0, 3)
    cands = candidate_plans(res.state, _backbone(model), 0.5, model.config.text_config, 20.0, 6, seed=0)
    assert [[f"L{s.layer}:{s.keep}:{s.score}/{s.anchors}" for s in p.sites] for _, p, _ in cands] == \
        [c["sites"] for c in sel["candidates"]]


def test_corners_are_single_named_regime_sites_that_fill_the_budget(tiny4):
    """Every corner is one site of a named regime at a candidate layer, fits the budget, and keeps
    the most tokens that fit (one more does not, for pool: the next realisable grid); no attention
    score before layer 0; a layer where one token left already costs too much gives none."""
    from diffopsearch.cost import plan_cost
    from diffopsearch.plan import Plan, Site
    from diffopsearch.search.select import corner_plans
    from diffopsearch.search.state import regime_knobs

    model, _ = tiny4
    tc, bb = model.config.text_config, _backbone(model)
    space = _space(model, layers=[0, 1, 2, 3])
    corners = corner_plans(space, bb, 0.5, tc, 20.0)
    layers = {p.sites[0].layer for _, p, _ in corners}
    assert layers and layers <= {0, 1} and 0 in layers  # layers 2, 3 of 4 cannot reach half the FLOPs
    for origin, plan, _ in corners:
        (site,) = plan.sites
        assert plan.cost["flops_ratio"] <= 0.5 and not (site.layer == 0 and site.score == "attn")
        regime = origin.split()[1].split("/")[0]
        assert {k: getattr(site, k) for k in ("score", "anchors", "merge", "sharpness", "locality", "reweight")} \
            == regime_knobs(regime, site.score)
        if regime != "pool":
            more = Plan(sites=[Site(layer=site.layer, keep=site.keep + 1, **regime_knobs(regime, site.score))],
                        backbone=bb)
            assert plan_cost(tc, more, space.n_visual, 20.0)["flops_ratio"] > 0.5
    assert len({o for o, _, _ in corners}) == len(corners)
    assert corner_plans(space, bb, 0.01, tc, 20.0) == []


def test_two_stage_selection_screens_the_corners_and_samples_then_scores_finalists(tiny4, train):
    from diffopsearch.search import hold_out

    model, proc = tiny4
    rest, held = hold_out(train, 6, seed=0)
    space = _space(model, layers=[0, 1, 2])
    plan, _ = search_plan(model, proc, rest, space, _settings(), 20.0, progress=False, heldout=held,
                          select_samples=2, select_corners=True, screen_questions=4, finalists=2)
    sel = plan.search["selection"]
    cands = sel["candidates"]
    assert sel["screen_questions"] == 4 and cands[0]["origin"] == "argmax" and "screen_ce" not in cands[0]
    assert any(c["origin"].startswith("corner ") for c in cands) and len(cands) > 4
    screened = sorted(range(1, len(cands)), key=lambda i: (cands[i]["screen_ce"], i))
    finalists = {0, *screened[:2]}
    assert {i for i, c in enumerate(cands) if c["ce"] is not None} == finalists
    assert sel["chosen"] in finalists
    assert cands[sel["chosen"]]["ce"] == min(cands[i]["ce"] for i in finalists)
    assert all(c["flops_ratio"] <= 0.5 for c in cands) and plan.cost["flops_ratio"] <= 0.5


def test_straight_through_ladder_gradients_stay_bounded(tiny4, train):
    """Regression: dropped anchors' log-weights used to send 1e6-1e19-sized gradients into the
    keep-ladder logits (then Adam froze them); with bounded logs every step's gradient is small."""
    from diffopsearch.data.datasets import make_train_batch
    from diffopsearch.search.loop import answer_losses

    model, proc = tiny4
    state = ArchState(_space(model, "continuous", layers=[1, 2, 3]), init_keep=0.2)
    recs, imgs = train.batch(range(8))
    batch = make_train_batch(proc, recs, imgs)
    worst = 0.0
    for step in range(6):
        state.zero_grad()
        sites = relax.build_sites(state, state.sample(step, 0.5, 0, hard=True), skip_identity=True)
        loss = answer_losses(model, batch, sites, 0.0)["ce"]
        if loss.requires_grad:
            loss.backward()
            worst = max(worst, float(state.ladder_logits.grad.abs().max()))
    assert 0 < worst < 1e3
