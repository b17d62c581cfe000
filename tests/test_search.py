"""The search (diffopsearch/search/): the space and its budget, the policy, the loop's gradients, resume,
selection, memory. Tiny random LLaVAs of the real classes; the trained toy backbone is not needed."""
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
from diffopsearch.search import search_plan
from diffopsearch.search.checkpoint import CKPT_DIR
from diffopsearch.search.loop import (LOG_NAME, SearchSettings, leave_one_out, plan_losses, plan_reward,
                                      policy_objective, question_reward, reference_logprobs, scaled_steps)
from diffopsearch.search.policy import ArchState, Knobs, Policy
from diffopsearch.search.space import OPS, Choice, Planner, SearchSpace, corner_choices, make_space

ROOT = Path(__file__).resolve().parent.parent
N_TEXT = 20.0


@pytest.fixture(scope="module")
def train():
    from diffopsearch.data.datasets import load_qa

    return load_qa("toy", split="train", limit=24)


def _space(model, layers=None, two_sites=True):
    return make_space(model.config, layers, two_sites)


def _backbone(model):
    from diffopsearch.plan import backbone_info

    return backbone_info(model.config)


def _planner(model, budget=0.5, space=None):
    return Planner(space or _space(model), _backbone(model), budget, model.config.text_config, N_TEXT)


def _settings(**kw):
    base = dict(budget=0.5, steps=4, batch_size=4, plans_per_step=4, checkpoint_every=2)
    base.update(kw)
    return SearchSettings(**base)


def _op(name):
    return [o.name for o in OPS].index(name)


def _batch(model, proc, train, n=4):
    from diffopsearch.data.datasets import make_train_batch

    recs, imgs = train.batch(list(range(n)))
    return make_train_batch(proc, recs, imgs)


# ---------------------------------------------------------------- the space and the budget

def test_every_plan_of_the_space_fits_the_budget_with_the_most_first_site_tokens(tiny4):
    """The first keep is solved from the budget: the plan fits, one more token would not; the second site
    keeps its ratio of the first; the counts never increase."""
    model, _ = tiny4
    for budget in (0.7, 0.5, 0.3):
        pl = _planner(model, budget)
        k = Knobs()
        choices = corner_choices(pl.space) + [Choice(li, oi, (l2, o2, r)) for li in range(2) for oi in (0, 3, 6)
                                              for l2 in (2, 3) for o2 in (_op("prune/norm"), _op("merge/cls"))
                                              for r in range(len(pl.space.ratios))]
        fitted = 0
        for c in choices:
            plan = pl.plan(c, k.floats)
            if plan is None:
                continue
            fitted += 1
            assert plan.cost["flops_ratio"] <= budget + 1e-9
            keeps = [s.keep for s in plan.sites]
            assert keeps == sorted(keeps, reverse=True) and len(set(keeps)) == len(keeps)
            run, k1 = pl.fit(c, k.floats)
            if OPS[c.op].regime != "pool" and k1 + 1 < pl.space.n_visual:
                assert pl.cost(pl.sites(run, k.floats, k1 + 1)) > budget
            if run.second is not None and len(plan.sites) == 2:
                assert keeps[1] == max(1, round(pl.space.ratios[run.second[2]] * keeps[0]))
        assert fitted >= 20  # the space is far from empty at these budgets


def test_attn_is_never_offered_before_layer_0_and_pool_only_first(tiny4):
    model, _ = tiny4
    space = _space(model)
    assert not space.op_allowed(0, _op("prune/attn"), 0) and space.op_allowed(1, _op("prune/attn"), 0)
    assert space.op_allowed(0, _op("pool"), 0) and not space.op_allowed(2, _op("pool"), 1)


# ---------------------------------------------------------------- the policy

def test_policy_probabilities_sum_to_one_and_the_mode_is_the_most_probable(tiny4):
    model, _ = tiny4
    pl = _planner(model)
    feasible = torch.ones(len(pl.space.layers), len(OPS), dtype=torch.bool)
    feasible[:, _op("prune/attn")] = False
    pol = Policy(pl.space, feasible)
    with torch.no_grad():
        for p in pol.parameters():
            p.normal_(generator=torch.Generator().manual_seed(3))
    ranked = pol.ranked(100000)
    total = sum(torch.tensor([lp for _, lp in ranked], dtype=torch.float64).exp())
    assert float(total) == pytest.approx(1.0, abs=1e-4)
    assert all(OPS[c.op].name != "prune/attn" for c, _ in ranked)
    assert pol.mode() == ranked[0][0]
    for c, lp in ranked[:20]:
        assert float(pol.log_prob(c).detach()) == pytest.approx(lp, abs=1e-4)
    draws = [pol.sample(torch.Generator().manual_seed(7)).choice for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]  # a function of the generator's seed


def test_the_paired_reward_counts_a_question_as_a_question():
    """Per question, a plan that gets one of eight questions badly wrong and the rest exactly right beats one
    that is a little off on all eight; by the batch mean (the first site's reward) it is the other way."""
    one_bad = torch.tensor([0.0] * 7 + [2.0], dtype=torch.float64)
    all_off = torch.full((8,), 0.1, dtype=torch.float64)
    assert float(question_reward(one_bad).mean()) > float(question_reward(all_off).mean())
    assert float(plan_reward(one_bad.mean()[None])) < float(plan_reward(all_off.mean()[None]))


def test_leave_one_out_advantages():
    adv = leave_one_out(torch.tensor([1.0, 2.0, 3.0]))
    assert adv.tolist() == pytest.approx([-1.5, 0.0, 1.5])
    assert leave_one_out(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]


def test_keeping_more_tokens_lowers_the_loss_and_the_signal_says_keep_more(tiny4, train):
    """A constructed case on the real forward: the same two sites, the second keeping 70% or 10% of the
    first. Keeping more lowers the KL to the unreduced model, and one step of the search's own objective
    on these plans (paired with the first site alone) moves the policy's ratio towards 0.7 (a signal the old
    straight-through relaxation did not have)."""
    model, proc = tiny4
    pl = _planner(model, budget=0.95)
    b = _batch(model, proc, train)
    ref = reference_logprobs(model, b)
    space, k = pl.space, Knobs()
    r_more, r_less = space.ratios.index(0.7), space.ratios.index(0.1)
    alone = Choice(1, _op("prune/attn"))
    more = Choice(1, _op("prune/attn"), (2, _op("prune/norm"), r_more))
    less = Choice(1, _op("prune/attn"), (2, _op("prune/norm"), r_less))
    sites_more, sites_less = pl.hard_sites(more, k.floats), pl.hard_sites(less, k.floats)
    assert sites_more[0].keep == sites_less[0].keep and sites_more[1].keep > sites_less[1].keep
    with torch.no_grad():
        loss = [float(plan_losses(model, b, pl.hard_sites(c, k.floats), ref).mean()) for c in (alone, more, less)]
    assert loss[1] < loss[2]
    state = ArchState(space, torch.ones(len(space.layers), len(OPS), dtype=torch.bool))
    opt = torch.optim.Adam(state.policy.parameters(), lr=0.1)
    before = state.policy.factors()["ratio"].exp().detach()[_op("prune/norm")]
    r = {c: -math.log(x + 1e-3) for c, x in zip((alone, more, less), loss)}
    policy_objective(state.policy, [(alone, more), (alone, less)], r, r, 0.0).backward()
    opt.step()
    after = state.policy.factors()["ratio"].exp().detach()[_op("prune/norm")]
    assert after[r_more] > before[r_more] and after[r_less] < before[r_less]


def test_a_second_site_that_helps_raises_its_probability_and_one_that_hurts_lowers_it():
    """The "second site follows" decision moves by the paired difference of the decoded first site alone and
    with its greedy second site (``decided``), and by nothing else: drawn pairs leave it alone."""
    space = SearchSpace(layers=(0, 1, 2), n_visual=16, grid=(4, 4), num_layers=3)
    one = Choice(0, _op("merge/cls"))
    two = Choice(0, _op("merge/cls"), (1, _op("prune/attn"), 0))
    for gain, sign in ((+0.5, 1), (-0.5, -1)):
        state = ArchState(space, torch.ones(3, len(OPS), dtype=torch.bool))
        r = {one: 1.0, two: 1.0 + gain}
        policy_objective(state.policy, [(one, two)], r, r, 0.0, (one, two)).backward()
        g = float(state.policy.two.grad[0])
        assert sign * g < 0  # minimising: a helpful second site gets a negative gradient, i.e. a rising logit
        assert g == pytest.approx(-gain / (abs(gain) / math.sqrt(2) + 1e-6), rel=1e-3)
        assert float(state.policy.two.grad[1:].abs().sum()) == 0.0
    state = ArchState(space, torch.ones(3, len(OPS), dtype=torch.bool))
    r = {one: 1.0, two: 1.5}
    policy_objective(state.policy, [(one, two)], r, r, 0.0).backward()  # before the decision learns
    assert state.policy.two.grad is None or float(state.policy.two.grad.abs().sum()) == 0.0


def test_decode_pair_is_the_decoded_first_site_with_its_greedy_second_site():
    space = SearchSpace(layers=(0, 1, 2), n_visual=16, grid=(4, 4), num_layers=3)
    state = ArchState(space, torch.ones(3, len(OPS), dtype=torch.bool))
    p = state.policy
    with torch.no_grad():
        p.layer1[1] = 3.0
        p.op1[1, _op("merge/cls")] = 3.0
        p.layer2[2] = 3.0
        p.op2[2, _op("prune/attn")] = 3.0
        p.ratio[_op("prune/attn"), 1] = 3.0
        p.two[1] = -2.0
    one, two = p.decode_pair()
    assert one == Choice(1, _op("merge/cls")) and two == Choice(1, _op("merge/cls"), (2, _op("prune/attn"), 1))
    assert p.decode() == one  # "a second site follows" is below even odds: the plan is the first site alone
    with torch.no_grad():
        p.two[1] = 2.0
    assert p.decode() == two


# ---------------------------------------------------------------- the loop

def test_steps_scale_below_budget_0_6_and_a_preset_can_turn_it_off():
    from diffopsearch.commands.search import settings_from
    from diffopsearch.config import compose

    assert [scaled_steps(80, b) for b in (1.0, 0.8, 0.6, 0.4, 0.25, 0.2, 0.05)] == [80, 80, 80, 120, 192, 240, 240]
    assert scaled_steps(80, 0.25, scale=False) == 80
    assert settings_from(compose("search", ["budget=0.4"])).steps == 120
    assert settings_from(compose("search", ["budget=0.4", "search.scale_steps=false"])).steps == 80
    assert settings_from(compose("search", ["budget=0.25", "search=thorough"])).steps == 150  # what it measured


def test_below_budget_0_3_the_default_preset_runs_as_thorough_with_the_users_overrides_on_top():
    from diffopsearch.commands.search import settings_from
    from diffopsearch.config import compose

    def shape(*overrides):
        cfg = compose("search", list(overrides))
        st = settings_from(cfg)
        return cfg.search.preset, st.steps, st.batch_size, st.plans_per_step, cfg.search.select_questions

    thorough = ("thorough", 150, 16, 12, 512)  # exactly the settings BENCHMARKS.md measured for the preset
    assert shape("budget=0.25") == shape("budget=0.25", "search=thorough") == thorough
    assert shape("budget=0.25", "search.steps=100") == ("thorough", 100, 16, 12, 512)  # the user's value wins
    assert shape("budget=0.25", "search.low_budget_preset=null") == ("default", 192, 8, 8, 384)
    assert shape("budget=0.3") == ("default", 160, 8, 8, 384)
    assert shape("budget=0.4", "search=thorough") == ("thorough", 150, 16, 12, 512)


def test_search_gives_a_plan_under_budget_deterministic_for_a_seed(tmp_path, tiny4, train):
    model, proc = tiny4
    space = _space(model)
    runs = []
    for d in ("a", "b"):
        plan, res = search_plan(model, proc, train, space, _settings(steps=3), N_TEXT, out_dir=tmp_path / d,
                                progress=False)
        runs.append((plan, res))
        assert plan.cost["flops_ratio"] <= 0.5 and plan.sites and plan.search["gradient_plan"]["sites"]
        assert res.forwards == 3 * (4 + 2)  # 4 plans per step, then the 2 best again for the knobs
        log = [json.loads(x) for x in (tmp_path / d / LOG_NAME).read_text().splitlines()]
        assert [r["step"] for r in log] == [0, 1, 2] and all(len(r["plans"]) == 4 for r in log)
        assert all(r["mode_cost"] <= 0.5 and 0.0 <= r["p_second_site"] <= 1.0 for r in log)
    (a, ra), (b, rb) = runs
    assert a.to_dict()["sites"] == b.to_dict()["sites"] and a.search["knobs"] == b.search["knobs"]
    assert [r["losses"] for r in ra.history] == [r["losses"] for r in rb.history]


def test_the_knobs_learn_and_the_policy_moves(tmp_path, tiny4, train):
    model, proc = tiny4
    plan, res = search_plan(model, proc, train, _space(model), _settings(steps=3, knob_lr=0.05), N_TEXT,
                            progress=False)
    init = Knobs().to_dict()
    assert res.state.knobs.to_dict() != init  # backpropagation reached the knobs
    ranked = res.state.policy.ranked(2)
    fresh = ArchState(res.state.space, res.state.policy.mask1).policy.ranked(2)
    assert [lp for _, lp in ranked] != pytest.approx([lp for _, lp in fresh])


def test_a_frozen_knob_search_keeps_the_named_regimes(tiny4, train):
    model, proc = tiny4
    _, res = search_plan(model, proc, train, _space(model), _settings(steps=2, learn_knobs=False), N_TEXT,
                         progress=False)
    assert res.state.knobs.to_dict() == Knobs().to_dict()


def test_resume_ends_at_the_plan_of_an_uninterrupted_run(tmp_path, tiny4, train):
    model, proc = tiny4
    space = _space(model, layers=[1, 2])
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
        search_plan(model, proc, train, space, _settings(steps=5, lr=0.3), 20.0, out_dir=tmp_path / "b",
                    progress=False, resume=True)


def test_infeasible_budget_is_a_user_error_before_the_search(tiny4, train):
    model, proc = tiny4
    with pytest.raises(UserError, match="below what any plan can reach"):
        search_plan(model, proc, train, _space(model), _settings(budget=0.01), N_TEXT, progress=False)
    with pytest.raises(UserError, match="candidate_layers"):
        _space(model, layers=[0, 9])


def test_saved_activations_of_a_knob_backward_are_bounded_by_the_shapes(tiny4, train):
    """Memory ceiling: what autograd keeps for the knobs' backward of one plan, counted by saved-tensor hooks.
    With activation checkpointing it is at most a few (B, T, d) tensors per layer plus the site's own
    (B, n, n) similarity; without, more (so a quadratic blow-up or a leak fails here, not on a GPU)."""
    from diffopsearch.operators.reduce import SearchSite

    model, proc = tiny4
    b = _batch(model, proc, train)
    ref = reference_logprobs(model, b)
    B, T = b["input_ids"].shape
    tc = model.config.text_config
    d, L, n = tc.hidden_size, tc.num_hidden_layers, _space(model).n_visual
    saved = {}
    for ckpt in (True, False):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        s = SearchSite(layer=1, keep=n // 2, score="attn", anchors="topk", merge=torch.tensor(1.0, requires_grad=True),
                       sharpness=torch.tensor(50.0, requires_grad=True), locality=torch.tensor(0.0, requires_grad=True),
                       reweight=torch.tensor(1.0, requires_grad=True))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            plan_losses(model, b, [s], ref, checkpoint=ckpt).mean().backward()
        saved[ckpt] = total[0]
    vocab = tc.vocab_size
    bound = 4 * (4 * L * B * T * d + 4 * B * n * n + 4 * B * T * vocab)
    assert saved[True] <= bound, (saved, bound)
    assert saved[False] > saved[True]


# ---------------------------------------------------------------- the command, 1 and 2 processes

CLI_ARGS = ["budget=0.5", "limit=6", "batch_size=3", "max_new_tokens=2", "search.steps=3", "search.batch_size=4",
            "search.plans_per_step=3", "search.train_limit=16", "search.checkpoint_every=2",
            "search.candidate_layers=[0,1,2]", "search.select_questions=4", "model.device=cpu"]


@pytest.mark.slow
def test_cli_search_one_and_two_processes(tmp_path):
    model_dir = fx.tiny_model_dir(tmp_path / "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = CLI_ARGS + [f"model.path={model_dir}"]
    one = subprocess.run([sys.executable, "-m", "diffopsearch", "search", f"hydra.run.dir={tmp_path / 'one'}",
                          "search.eval_baselines=true", *args], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    plan = json.loads((tmp_path / "one" / "plan.json").read_text())
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert plan["cost"]["flops_ratio"] <= 0.5 and plan["search"]["steps"] == scaled_steps(3, 0.5) == 4
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
    assert [r["step"] for r in log] == [0, 1, 2, 3]  # one writer
    # the two halves of each step's batch average to the single-process gradient: same trajectory
    log1 = [json.loads(x) for x in (tmp_path / "one" / LOG_NAME).read_text().splitlines()]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in log1], rel=1e-4)
    assert [r["plans"] for r in log] == [r["plans"] for r in log1]


# ---------------------------------------------------------------- selection: the reported safety net

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


@pytest.mark.parametrize("sites, seed", [
    ([{"layer": 0, "keep": 9, "score": "norm", "merge": 1.0, "sharpness": 50.0, "reweight": 1.0},
      {"layer": 2, "keep": 4, "score": "attn"}], 0),
    ([{"layer": 1, "keep": 5, "score": "random"}], 3),  # the plan's seed reaches the random score
])
def test_plan_scores_on_prepared_questions_match_the_plan_as_eval_runs_it(tiny4, train, sites, seed):
    """Selection scores candidates on questions prepared once (decoded, vision tower run): per question,
    the same CE as the plan's own forward (apply_plan, what eval runs) on the raw data set."""
    from diffopsearch.data.datasets import make_train_batch
    from diffopsearch.patch.llava import apply_plan
    from diffopsearch.plan import Plan, Site
    from diffopsearch.search.loop import answer_terms, encode_questions, plan_scores

    model, proc = tiny4
    plan = Plan(sites=[Site(**s) for s in sites], backbone=_backbone(model), seed=seed)
    enc = encode_questions(model, proc, train, batch_size=4)
    got = plan_scores(model, proc, plan, enc, per_question=True)
    assert len(enc) == len(train) and got["n"] == len(train)
    recs, imgs = train.batch(list(range(len(train))))
    b = make_train_batch(proc, recs, imgs)
    labels = b.pop("labels")
    width = int((labels != -100).sum(1).max()) + 1
    with torch.no_grad():
        logits = apply_plan(model, plan)(**b, logits_to_keep=width).logits[:, :-1].float()
    want = answer_terms(logits, labels[:, -width + 1:])[3].double()
    assert torch.allclose(got["per_question"], want, rtol=1e-4, atol=1e-6)
    assert got == {**plan_scores(model, proc, plan, train, batch_size=4, per_question=True),
                   "per_question": got["per_question"]}


def test_selection_records_whether_the_gradient_plan_won(tiny4, train):
    from diffopsearch.search import hold_out

    model, proc = tiny4
    rest, held = hold_out(train, 6, seed=0)
    plan, res = search_plan(model, proc, rest, _space(model), _settings(steps=2), N_TEXT, progress=False,
                            heldout=held, select_samples=2, select_corners=True, screen_questions=3, finalists=1)
    sel = plan.search["selection"]
    table = sel["candidates"]
    assert table[0]["origin"] == "gradient" and sel["gradient_plan_won"] == (sel["chosen"] == 0)
    assert any(r["origin"].startswith("corner") for r in table)
    assert all(r["flops_ratio"] <= 0.5 for r in table) and plan.cost["flops_ratio"] <= 0.5
    scored = [r for r in table if r["ce"] is not None]
    assert len(scored) == 2 and table[sel["chosen"]]["ce"] == min(r["ce"] for r in scored)
    assert all(r.get("screen_ce") is not None for r in table[1:])


def test_a_prune_site_that_learned_to_merge_past_the_budget_runs_without_the_merge(tiny4):
    """The policy's first sites are feasible with the regimes' knobs; if a prune site's learned merge knob
    switches on a merge overhead the budget cannot carry, the planner runs it with merge 0 (under budget)
    instead of failing."""
    model, _ = tiny4
    space = _space(model)
    k = Knobs()
    # the tightest budget a prune by norm at layer 1 meets (keep 1, no merge overhead)
    choice = Choice(space.layers.index(1), _op("prune/norm"))
    floor = _planner(model, budget=1.0, space=space).cost(
        _planner(model, budget=1.0, space=space).sites(choice, k.floats, 1))
    pl = _planner(model, budget=floor, space=space)
    assert pl.keep1(choice, k.floats) == 1

    def merging(slot, regime):
        return {**k.floats(slot, regime), "merge": 0.5}

    assert pl.keep1(choice, merging) is None  # the merge's own overhead does not fit
    (site,) = pl.hard_sites(choice, merging)
    assert site.keep == 1 and site.merge == 0.0 and pl.cost([site]) <= floor + 1e-12
    plan = pl.plan(choice, merging)
    assert plan is not None and plan.sites[0].merge == 0.0


def test_paired_difference_is_the_mean_and_its_standard_error():
    from diffopsearch.runtime import Procs
    from diffopsearch.search.select import paired_difference

    a = torch.tensor([0.5, 0.2, 0.9, 0.4], dtype=torch.float64)
    b = torch.tensor([0.4, 0.4, 0.6, 0.4], dtype=torch.float64)
    d = a - b
    mean, se = paired_difference(a, b, Procs())
    assert mean == pytest.approx(float(d.mean())) and se == pytest.approx(float(d.std() / 2.0))


@pytest.mark.parametrize("gain, replaced", [(0.002, False), (0.2, True)])
def test_a_challenger_replaces_the_gradient_plan_only_by_more_than_the_margin(monkeypatch, gain, replaced):
    """Selection's rule on fixed per-question losses (plan_scores stands in for the model): a challenger
    whose CE is lower by less than one paired standard error keeps the gradient plan; by more, wins."""
    from diffopsearch.search import loop, select

    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, generator=g, dtype=torch.float64)
    noise = 0.05 * torch.randn(64, generator=g, dtype=torch.float64)
    noise -= noise.mean()  # the difference is exactly -gain on average, its spread ~0.05
    per_q = {"gradient": base, "challenger": base - gain + noise}

    def fake_scores(model, processor, plan, data, batch_size=32, procs=None, per_question=False):
        pq = per_q[plan]
        return {"accuracy": 0.5, "ce": float(pq.mean()), "n": len(pq), "per_question": pq}

    monkeypatch.setattr(loop, "plan_scores", fake_scores)
    monkeypatch.setattr(loop, "encode_questions", lambda model, processor, data, *a: data)
    monkeypatch.setattr(select, "_row", lambda origin, plan: {"origin": origin})
    held = type("Held", (), {"__len__": lambda self: 64, "split": "held"})()
    (origin, _), best, table = select.select_plan(None, None, [("gradient", "gradient"), ("c", "challenger")],
                                                  held, screen=None, margin=1.0)
    assert table[1]["ce"] < table[0]["ce"]  # the challenger is lower either way
    assert (best == 1) == replaced and (origin == "c") == replaced
    assert abs(table[1]["paired_diff"]) > table[1]["paired_se"] if replaced else \
        abs(table[1]["paired_diff"]) < table[1]["paired_se"]
