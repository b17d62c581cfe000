"""Every command at LLaVA-1.5-7B's true shape (issue 16), on a random-weight backbone of its exact geometry.

The backbone (tests/real_shape.py): CLIP at 336 px / patch 14 (576 visual tokens on 24 x 24), feature layer
-2, ``default`` strategy, LLaVA's projector, a 32-layer Llama decoder, LLaVA-1.5's processor and prompt;
only the widths are small (d = 64), so it runs on a CPU. Through the real CLI in-process:

- ``eval`` of every baseline at budget 0.5 (a sweep), on a small toy world (the processor resizes its
  192 px images to 336, so every image gives 576 tokens);
- a short ``search`` (2 steps, 2 plans per step, selection among the policy's plans and the 200-odd corners
  of the 32-layer space on a few held-out questions), ``show`` of its plan, ``report`` over it.

Every plan (the baselines', the searched one, every corner of the search space, the baselines solved on the
7B config itself) validates against ``llava-hf/llava-1.5-7b-hf``'s config (tests/fixtures/
llava-1.5-7b-hf.config.json) and its cost there is consistent with what the plan claims: the same visual
tokens in every layer, the same FLOPs ratio on the backbone it was made for, and on the 7B config the ratio of
those very token counts under the 7B widths. The FLOPs ratio itself differs between the two widths (at d = 64
attention is a larger share of a layer, so dropping tokens saves relatively more): it is a function of the
widths, not of the plan alone, which the test pins rather than hides.

Also: the search's knob gradients are the same with and without activation checkpointing and micro-batching
at this shape, and (where lmms-eval is installed) the lmms-eval model answers as ``eval`` does.

~1 to 2 minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import math
import pytest

import real_shape as rs  # tests/real_shape.py
from diffopsearch import cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_cli_env")]  # fixture: tests/conftest.py

BUDGET = 0.5
BASELINES = ("none", "fastv", "tome", "pool", "prumerge", "visionzip", "random")




@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(model dir, toy world dir, work dir): the real-shape backbone saved as a llava-hf checkpoint, and a
    small toy world (48 search questions, 6 test questions) in GQA's schema."""
    from diffopsearch.data import world

    root = tmp_path_factory.mktemp("real_shape")
    model_dir = rs.build_real_shape(root / "model")
    world.write_world(root / "world", seed=0, sizes={"train": 48, "test": 6})
    return model_dir, root / "world", root


def common(real) -> list[str]:
    model_dir, world_dir, _ = real
    return [f"model.path={model_dir}", "model=llava", "model.dtype=float32", "model.device=cpu",
            f"dataset.path={world_dir}", "max_new_tokens=2", "batch_size=4"]


def seven_b_checks(plan, n_text: float, claimed: dict, own_config) -> dict:
    """``plan`` fits LLaVA-1.5-7B and costs there what its token counts say; returns the 7B cost."""
    from diffopsearch import cost
    from diffopsearch.plan import load_plan

    plan = load_plan(plan)
    seven = rs.seven_b_config()
    plan.validate_for(seven)                                    # layers, 576 tokens, 24 x 24 grid
    assert plan.backbone["num_layers"] == 32 and plan.backbone["visual_tokens"] == 576
    assert list(plan.backbone["grid"]) == [24, 24]
    own = cost.plan_cost(own_config, plan, 576, n_text)
    big = cost.plan_cost(seven, plan, 576, n_text)
    # what the plan claims is the cost model's on the backbone it was made for
    assert own["flops_ratio"] == pytest.approx(claimed["flops_ratio"], rel=1e-9, abs=1e-12)
    # the same tokens in every layer at 7B widths: the plan means the same thing there
    for key in ("visual_tokens_per_layer", "entering_tokens", "avg_visual_tokens", "n_visual"):
        assert big[key] == own[key], key
    if "visual_tokens_per_layer" in claimed:
        assert big["visual_tokens_per_layer"] == claimed["visual_tokens_per_layer"]
    # and the 7B ratio is those token counts under the 7B widths (an independent sum over layers)
    layers = sum(cost.layer_flops(seven, n_text + v) for v in big["visual_tokens_per_layer"])
    full = 32 * cost.layer_flops(seven, n_text + 576)
    assert big["flops_ratio"] == pytest.approx((layers + big["overhead_flops"]) / full, rel=1e-9)
    assert 0 < big["flops_ratio"] <= 1
    return big


def test_the_backbone_has_llava_1_5_7b_geometry(real):
    from PIL import Image

    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.data.prompts import format_prompt
    from diffopsearch.evaluate import visual_token_count
    from diffopsearch.plan import backbone_info

    model, processor = load_backbone(str(real[0]), dtype="float32", device="cpu")
    seven = rs.seven_b_config()
    rs.check_shape(model.config)
    rs.check_shape(seven)
    assert visual_token_count(seven) == (576, (24, 24))
    assert {k: v for k, v in backbone_info(model.config).items() if k != "name"} == \
        {k: v for k, v in backbone_info(seven).items() if k != "name"}
    t7, v7 = seven.text_config, seven.vision_config
    assert (t7.num_hidden_layers, t7.hidden_size, t7.intermediate_size, t7.num_attention_heads,
            t7.num_key_value_heads, t7.vocab_size) == (32, 4096, 11008, 32, 32, 32064)
    assert (v7.hidden_size, v7.num_hidden_layers, v7.num_attention_heads, v7.image_size, v7.patch_size,
            v7.projection_dim) == (1024, 24, 16, 336, 14, 768)
    assert seven.image_token_index == 32000 and seven.projector_hidden_act == "gelu"
    # the toy world's 192 px image is resized to 336 px: 576 image tokens in LLaVA-1.5's prompt
    prompt = format_prompt("what color is the cube ?", processor)
    assert prompt.startswith("USER: <image>\n") and prompt.endswith(" ASSISTANT:")
    enc = processor(images=[Image.new("RGB", (192, 192), (200, 30, 30))], text=[prompt], return_tensors="pt")
    assert tuple(enc["pixel_values"].shape) == (1, 3, 336, 336)
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 576
    # every CLS / attn / norm score is available (feature layer -2 is a CLIP layer's output)
    from diffopsearch.search.space import available_scores

    assert available_scores(model.config) == available_scores(seven) == ("attn", "cls", "norm")


def test_every_baseline_evaluates_at_half_the_flops_and_fits_7b(real, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code = cli.main(["eval", "-m", *common(real), f"hydra.sweep.dir={sweep}", "limit=4",
                     "plan=" + ",".join(BASELINES), f"budget={BUDGET}"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert sorted(r["plan"]["method"] if r.get("plan") else "none" for r in results) == sorted(BASELINES)
    model_cfg = rs.build_model().config
    for r in results:
        method = r["plan"]["method"] if r.get("plan") else "none"
        assert r["n"] == 4 and r["visual_tokens"]["image"] == 576 and r["visual_tokens"]["grid"] == [24, 24]
        if method == "none":
            assert r["flops_ratio"] == pytest.approx(1.0)
            continue
        assert r["flops_ratio"] <= BUDGET + 1e-9, method
        claimed = {"flops_ratio": r["flops_ratio"], "visual_tokens_per_layer": r["visual_tokens"]["per_layer"]}
        seven_b_checks(r["plan"], r["mean_text_tokens"], claimed, model_cfg)
    assert cli.main(["report", f"dir={sweep}"]) == 0
    md = (sweep / "report.md").read_text()
    for method in BASELINES[1:]:
        assert method in md, method


def test_baselines_and_corners_solved_on_the_7b_config_fit_it(real):
    """The size solvers and the search space at the 7B config itself: every plan fits the budget there."""
    from diffopsearch import cost
    from diffopsearch.baselines import make_plan
    from diffopsearch.plan import backbone_info
    from diffopsearch.regimes import regime_knobs
    from diffopsearch.search.space import OPS, Planner, corner_choices, make_space

    seven = rs.seven_b_config()
    n_text = 40.0  # a LLaVA-1.5 GQA prompt with Vicuna's tokenizer
    for name in BASELINES[1:]:
        plan = make_plan(name, BUDGET, seven.text_config, 576, (24, 24), n_text)
        plan.validate_for(seven)
        c = cost.plan_cost(seven, plan, 576, n_text)
        assert c["flops_ratio"] <= BUDGET + 1e-9 and c["flops_ratio"] == pytest.approx(plan.cost["flops_ratio"])
    space = make_space(seven)
    assert space.layers == tuple(range(32)) and space.n_visual == 576 and space.grid == (24, 24)
    planner = Planner(space, backbone_info(seven), BUDGET, seven.text_config, n_text)
    plans = []
    for choice in corner_choices(space):  # each with its named regime's exact knobs, as search/select.py
        named = regime_knobs(OPS[choice.op].regime, OPS[choice.op].score)
        plan = planner.plan(choice, lambda slot, regime, e=named: {k: e[k] for k in
                                                                    ("merge", "sharpness", "locality", "reweight")})
        if plan is not None:
            plans.append(plan)
    assert len(plans) > 100  # (prune / merge x attn, cls, norm, pool) x 32 layers, the late ones unreachable
    for plan in plans:
        plan.validate_for(seven)
        assert plan.cost["flops_ratio"] <= BUDGET + 1e-9
        assert 1 <= plan.sites[0].keep < 576


def test_search_show_report_at_the_real_shape(real, tmp_path, capsys):
    run = tmp_path / "search"
    code = cli.main(["search", *common(real), f"hydra.run.dir={run}", f"budget={BUDGET}", "limit=4",
                     "search.steps=2", "search.plans_per_step=2", "search.batch_size=4", "search.knob_plans=1",
                     "search.select_questions=8", "search.select_samples=2", "search.select_corners=true",
                     "search.screen_questions=2", "search.select_finalists=1",
                     "search.checkpoint_every=1"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    plan = json.loads((run / "plan.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert plan["backbone"]["visual_tokens"] == 576 and plan["backbone"]["num_layers"] == 32
    assert plan["search"]["steps"] == 2 and plan["search"]["space"]["layers"] == list(range(32))
    assert plan["search"]["selection"] is not None and plan["search"]["selection"]["questions"] == 8
    log = [json.loads(line) for line in (run / "search_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1] and all(math.isfinite(r["loss"]) for r in log)
    assert plan["cost"]["flops_ratio"] <= BUDGET + 1e-9 and results["flops_ratio"] <= BUDGET + 1e-9
    assert results["n"] == 4
    model_cfg = rs.build_model().config
    seven_b_checks(plan, plan["search"]["n_text"], plan["cost"], model_cfg)
    seven_b_checks(plan, results["mean_text_tokens"],
                   {"flops_ratio": results["flops_ratio"],
                    "visual_tokens_per_layer": results["visual_tokens"]["per_layer"]},
                   model_cfg)
    # every candidate the selection scored (the policy's plans and the corners at all 32 layers) is a plan
    # of the budget
    rows = plan["search"]["selection"]["candidates"]
    assert sum(r["origin"].startswith("corner") for r in rows) > 100
    corner_layers = {int(r["sites"][0].split(":")[0][1:]) for r in rows if r["origin"].startswith("corner")}
    assert corner_layers >= {0, 1, 8, 12}  # a cut after layer 15 cannot reach half the FLOPs
    for row in rows:
        assert row["flops_ratio"] <= BUDGET + 1e-9

    capsys.readouterr()
    assert cli.main(["show", f"ckpt={run}"]) == 0
    out = capsys.readouterr().out.replace("\n", "")  # rich wraps long paths at the terminal width
    assert "576 visual tokens on a 24 x 24 grid" in out and f"{run}/plan.json" in out
    assert cli.main(["report", f"dir={run}"]) == 0
    assert "search" in (run / "report.md").read_text()


def test_knob_gradients_do_not_depend_on_checkpointing_or_micro_batches(real):
    """At 576 tokens x 32 layers: the same knob gradients with activation checkpointing on / off and with
    the batch in one forward or in micro-batches (what search.checkpoint_layers / micro_batch change)."""
    import torch

    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.data.datasets import load_qa, make_train_batch
    from diffopsearch.patch.llava import encode_images
    from diffopsearch.search.loop import micro_batches, plan_losses, reference_logprobs
    from diffopsearch.operators.reduce import SearchSite

    model, processor = load_backbone(str(real[0]), dtype="float32", device="cpu")
    ds = load_qa("toy", str(real[1]), "train")
    recs, imgs = ds.batch(range(4))
    batch = make_train_batch(processor, recs, imgs)

    def grads(checkpoint: bool, micro: int):
        knobs = {k: torch.tensor(v, requires_grad=True) for k, v in
                 (("merge", 0.7), ("sharpness", 20.0), ("locality", 2.0), ("reweight", 0.5))}
        sites = [SearchSite(layer=2, keep=200, score="attn", anchors="topk", **knobs)]
        for chunk in micro_batches(batch, micro):
            vision = encode_images(model, chunk["pixel_values"])
            ref = reference_logprobs(model, chunk, vision)
            loss = plan_losses(model, chunk, sites, ref, "kl", checkpoint, vision).sum() / 4
            loss.backward()
        return torch.stack([knobs[k].grad for k in ("merge", "sharpness", "locality", "reweight")])

    base = grads(False, 0)
    assert torch.isfinite(base).all() and base.abs().sum() > 0
    torch.testing.assert_close(grads(True, 0), base, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads(False, 2), base, rtol=1e-4, atol=1e-7)


def test_lmms_eval_generate_until_at_the_real_shape(real, tmp_path):
    lmms_eval = pytest.importorskip("lmms_eval")  # noqa: F841 - the optional extra [lmms]
    pytest.importorskip("lmms_eval.api.model")
    from lmms_eval.api.instance import Instance

    from diffopsearch import evaluate as ev
    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.baselines import make_plan
    from diffopsearch.data.datasets import load_qa
    from diffopsearch.data.prompts import POST_PROMPT
    from diffopsearch.integrations.lmms_eval import DiffopsearchLlava

    model, processor = load_backbone(str(real[0]), dtype="float32", device="cpu")
    ds = load_qa("toy", str(real[1]), "test")
    recs, imgs = ds.batch(range(len(ds)))
    n_visual, grid = ev.visual_token_count(model.config)
    plan = make_plan("fastv", BUDGET, model.config.text_config, n_visual, grid,
                     ev.mean_prompt_text_tokens(processor, ds))
    plan.validate_for(rs.seven_b_config())
    path = tmp_path / "plan.json"
    plan.save(path)
    docs = [{"question": r["question"], "answer": r["answer"], "image": im} for r, im in zip(recs, imgs)]
    gen = {"max_new_tokens": 2, "temperature": 0, "do_sample": False, "num_beams": 1}
    reqs = [Instance(request_type="generate_until",
                     arguments=(d["question"] + POST_PROMPT, dict(gen), lambda doc: [doc["image"]], i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]
    lm = DiffopsearchLlava.create_from_arg_string(
        f"pretrained={real[0]},plan={path},device=cpu,dtype=float32", {"batch_size": 3, "device": None,
                                                                         "max_batch_size": None})
    lm.task_dict = {"t": {"test": docs}}
    got = lm.generate_until(reqs)
    ev.evaluate(model, processor, plan, ds, batch_size=3, max_new_tokens=2, out_dir=tmp_path / "eval", show=False,
                latency_batches=0)
    want = {json.loads(line)["qid"]: json.loads(line)["prediction"]
            for line in open(tmp_path / "eval" / ev.CACHE_NAME)}
    assert got == [want[r["id"]] for r in recs]


def test_one_loop_step_is_the_same_with_checkpointing_and_micro_batches(real):
    """``search.checkpoint_layers`` and ``search.micro_batch`` change memory, not results: one step of the loop
    itself gives the same plan losses and the same policy / knob gradients at the real shape."""
    import dataclasses

    import torch

    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.data.datasets import load_qa
    from diffopsearch.evaluate import mean_prompt_text_tokens
    from diffopsearch.plan import backbone_info
    from diffopsearch.search.loop import SearchSettings, search
    from diffopsearch.search.space import Planner, make_space

    model, processor = load_backbone(str(real[0]), dtype="float32", device="cpu")
    train = load_qa("toy", str(real[1]), "train")
    space = make_space(model.config)
    n_text = mean_prompt_text_tokens(processor, train)
    planner = Planner(space, backbone_info(model.config), BUDGET, model.config.text_config, n_text)
    base = SearchSettings(budget=BUDGET, steps=1, batch_size=4, plans_per_step=2, knob_plans=1,
                          checkpoint_layers=False, micro_batch=0, grad_clip=0.0)

    def step(**kw):
        res = search(model, processor, train, space, planner, dataclasses.replace(base, **kw), n_text, progress=False)
        return res.history[0]["losses"], [p.grad.clone() for p in res.state.parameters()]

    losses, grads = step()
    assert any(float(g.abs().sum()) > 0 for g in grads)
    variants = [dict(checkpoint_layers=True), dict(checkpoint_layers=True, micro_batch=2), dict(micro_batch=1)]
    for kw in variants:
        other_losses, other_grads = step(**kw)
        # float32 sums in another order (micro-batches, threads): 1e-4 apart at this width; a lost micro-batch
        # or a wrong recomputation is off by far more than 5e-4
        assert other_losses == pytest.approx(losses, rel=5e-4, abs=1e-6), kw
        for g, h in zip(grads, other_grads):
            torch.testing.assert_close(h, g, rtol=5e-4, atol=1e-6, msg=lambda m, kw=kw: f"{kw}: {m}")
