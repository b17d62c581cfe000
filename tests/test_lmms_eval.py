"""lmms-eval's `--model diffopsearch` (diffopsearch/integrations/lmms_eval.py), offline on the toy backbone.

Requests are real lmms-eval ``Instance`` objects built as lmms-eval's ConfigurableTask builds them
for its GQA task (its own ``gqa_doc_to_text`` / ``gqa_doc_to_visual`` and generation_kwargs), over a
small toy world in GQA's schema. The answers must be the ones ``diffopsearch eval`` gives for the same
questions and plan. Skipped where lmms-eval is not installed (it is the optional extra
``diffopsearch[lmms]``, not part of ``[test]``), except with DIFFOPSEARCH_REQUIRE_LMMS=1 (set by
``.ci/run``'s lmms-eval step): then a missing or broken lmms-eval fails the module instead.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import Path

import pytest

# CI's lmms-eval step sets it, so that this module can never be skipped there without anyone noticing
REQUIRE_LMMS = os.environ.get("DIFFOPSEARCH_REQUIRE_LMMS", "") not in ("", "0")


def _import_or_skip(name: str):
    if REQUIRE_LMMS:
        return importlib.import_module(name)  # an ImportError here is a collection error: the step fails
    return pytest.importorskip(name)


lmms_eval = _import_or_skip("lmms_eval")
_import_or_skip("lmms_eval.api.model")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.tasks.gqa.utils import gqa_doc_to_text, gqa_doc_to_visual  # noqa: E402

from diffopsearch import evaluate as ev  # noqa: E402
from diffopsearch.baselines import make_plan  # noqa: E402
from diffopsearch.data.datasets import local_cache_dir, load_qa  # noqa: E402
from diffopsearch.data.prompts import POST_PROMPT  # noqa: E402
from diffopsearch.errors import UserError  # noqa: E402
from diffopsearch.integrations import LMMS_CLASS_PATH, LMMS_MODEL_ID, lmms_eval_manifest  # noqa: E402
from diffopsearch.integrations.lmms_eval import DiffopsearchLlava  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASK, SPLIT = "toy_gqa", "test"
# lmms_eval/tasks/gqa/gqa.yaml
GQA_GEN_KWARGS = {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
GQA_PROMPT_KWARGS = {"pre_prompt": "", "post_prompt": POST_PROMPT}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 10-question toy world (GQA's schema), its records / images, and lmms-eval docs of them."""
    from diffopsearch.data import world as w

    root = tmp_path_factory.mktemp("lmms") / "world"
    w.write_world(root, seed=3, sizes={"test": 2})
    ds = load_qa("toy", str(root))
    recs, imgs = ds.batch(range(len(ds)))
    assert len(recs) == len(ds) >= 6
    docs = [{"question": r["question"], "answer": r["answer"], "image": im} for r, im in zip(recs, imgs)]
    return ds, recs, docs


@pytest.fixture(scope="module")
def toy():
    from diffopsearch.backbone.load import load_backbone
    from diffopsearch.config import ModelConfig

    return load_backbone(ModelConfig(device="cpu"))


@pytest.fixture(scope="module")
def fastv_plan(toy, world, tmp_path_factory):
    model, proc = toy
    ds = world[0]
    n_visual, grid = ev.visual_token_count(model.config)
    plan = make_plan("fastv", 0.5, model.config.text_config, n_visual, grid, ev.mean_prompt_text_tokens(proc, ds))
    assert plan.sites and plan.cost["flops_ratio"] <= 0.5
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(path)
    return plan, path


def requests(docs, gen_kwargs=GQA_GEN_KWARGS, kind="generate_until"):
    """As ConfigurableTask.construct_requests builds them for an lmms-eval GQA-style task."""
    out = []
    for i, doc in enumerate(docs):
        ctx = gqa_doc_to_text(doc, GQA_PROMPT_KWARGS)
        second = copy.deepcopy(gen_kwargs) if kind == "generate_until" else doc["answer"]
        out.append(Instance(request_type=kind, arguments=(ctx, second, gqa_doc_to_visual, i, TASK, SPLIT), idx=0,
                            metadata={"task": TASK, "doc_id": i, "repeats": 1}))
    return out


def lmms_model(docs, args: str, batch_size=4):
    lm = DiffopsearchLlava.create_from_arg_string(args, {"batch_size": batch_size, "device": None,
                                                         "max_batch_size": None})
    lm.task_dict = {TASK: {SPLIT: docs}}  # what lmms-eval's evaluator sets before it sends requests
    return lm


def eval_answers(model, proc, plan, ds, out_dir) -> dict:
    ev.evaluate(model, proc, plan, ds, batch_size=4, max_new_tokens=16, out_dir=out_dir, show=False,
                latency_batches=0)
    return {json.loads(line)["qid"]: json.loads(line)["prediction"] for line in open(out_dir / ev.CACHE_NAME)}


# ------------------------------------------------------------------------------------------ tests


def test_generate_until_answers_equal_diffopsearch_eval(toy, world, fastv_plan, tmp_path):
    model, proc = toy
    ds, recs, docs = world
    plan, path = fastv_plan
    lm = lmms_model(docs, f"pretrained=toy,plan={path},device=cpu", batch_size=4)  # 10 requests: 4 + 4 + 2
    assert lm.plan.to_dict()["sites"] == plan.to_dict()["sites"]
    got = lm.generate_until(requests(docs))
    want = eval_answers(model, proc, plan, ds, tmp_path / "eval")
    assert got == [want[r["id"]] for r in recs]
    assert len(set(got)) > 1  # the answers depend on the question


def test_a_baseline_by_name_is_solved_as_eval_solves_it(toy, world, fastv_plan):
    ds, recs, docs = world
    plan, _ = fastv_plan
    lm = lmms_model(docs, "pretrained=toy,plan=fastv,budget=0.5,device=cpu", batch_size=3)
    assert lm.plan is None  # solved at the first requests' mean prompt length
    lm.generate_until(requests(docs[:2]))
    one_by_one = [lm.generate_until(requests(docs)[i:i + 1])[0] for i in range(3)]
    assert lm.plan.to_dict()["sites"] == plan.to_dict()["sites"]
    assert lm.generate_until(requests(docs))[:3] == one_by_one


def test_unreduced_and_stop_strings(toy, world, tmp_path):
    model, proc = toy
    ds, recs, docs = world
    lm = lmms_model(docs, "pretrained=toy", batch_size=5)
    assert lm.plan.sites == [] and lm.device.type == "cpu"
    got = lm.generate_until(requests(docs))
    assert got == [eval_answers(model, proc, None, ds, tmp_path / "none")[r["id"]] for r in recs]
    word = got[0]
    cut = lm.generate_until(requests(docs[:1], {**GQA_GEN_KWARGS, "until": [word[1:]]}))
    assert cut == [word[:1]]


def test_loglikelihood_matches_the_model_one_request_at_a_time(toy, world):
    import torch

    from diffopsearch.data.prompts import format_context

    model, proc = toy
    _, _, docs = world
    lm = lmms_model(docs[:5], "pretrained=toy", batch_size=5)
    greedy = lm.generate_until(requests(docs[:5]))
    docs5 = [dict(d, answer=a) for d, a in zip(docs[:5], greedy)]
    lm.task_dict = {TASK: {SPLIT: docs5}}
    got = lm.loglikelihood(requests(docs5, kind="loglikelihood"))
    for (ll, is_greedy), doc in zip(got, docs5):
        ctx = gqa_doc_to_text(doc, GQA_PROMPT_KWARGS)
        prompt = proc(text=[format_context(ctx, proc)], images=[doc["image"]], return_tensors="pt")
        full = proc(text=[format_context(ctx, proc, answer=doc["answer"])], images=[doc["image"]], return_tensors="pt")
        n = full["input_ids"].shape[1] - prompt["input_ids"].shape[1]
        with torch.inference_mode():
            logp = torch.log_softmax(model(**full).logits[0, -n - 1:-1].float(), -1)
        want = logp.gather(-1, full["input_ids"][0, -n:, None]).sum().item()
        assert ll == pytest.approx(want, abs=1e-3) and ll < 0
        assert is_greedy  # the continuation is the greedy answer (and its end of turn)


def test_bad_model_args_are_clear_errors(world, tmp_path):
    docs = world[2]
    with pytest.raises(UserError, match="budget"):
        lmms_model(docs, "pretrained=toy,plan=pool")
    with pytest.raises(UserError, match="does not exist"):  # eval's own message for a bad ckpt
        lmms_model(docs, f"pretrained=toy,plan={tmp_path / 'nope.json'}")
    with pytest.raises(UserError, match="unknown model_args.*colour"):
        lmms_model(docs, "pretrained=toy,colour=red")
    with pytest.raises(UserError, match="batch_size"):
        lmms_model(docs, "pretrained=toy", batch_size="auto")
    lm = lmms_model(docs, "pretrained=toy")
    with pytest.raises(UserError, match="greedily"):
        lm.generate_until(requests(docs[:1], {**GQA_GEN_KWARGS, "temperature": 0.7, "do_sample": True}))


def test_lmms_eval_finds_the_model_by_its_entry_point():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    manifest = lmms_eval_manifest()
    assert (manifest.model_id, manifest.simple_class_path) == (LMMS_MODEL_ID, LMMS_CLASS_PATH)
    reg = ModelRegistryV2()
    reg.register_manifest(manifest)
    assert reg.get_model_class(LMMS_MODEL_ID) is DiffopsearchLlava  # lmms-eval's own class checks pass
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points."lmms_eval.models"]' in text
    assert 'diffopsearch = "diffopsearch.integrations:lmms_eval_manifest"' in text
    from importlib.metadata import entry_points

    if not any(ep.name == LMMS_MODEL_ID for ep in entry_points(group="lmms_eval.models")):
        msg = "this installation of diffopsearch predates its entry point: reinstall it (pip install -e .)"
        if REQUIRE_LMMS:
            pytest.fail(msg)
        pytest.skip(msg)
    import lmms_eval.models

    assert lmms_eval.models.get_model(LMMS_MODEL_ID) is DiffopsearchLlava


TASK_YAML = """\
dataset_path: {world}
dataset_name: instructions
dataset_kwargs:
  cache_dir: {cache}
task: diffopsearch_toy_gqa
test_split: test
output_type: generate_until
doc_to_visual: !function utils.gqa_doc_to_visual
doc_to_text: !function utils.gqa_doc_to_text
doc_to_target: "answer"
process_docs: !function utils.process_docs
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""

TASK_UTILS = """\
# lmms-eval's own GQA prompt and visuals; the images joined from the toy world's images config, as
# lmms-eval's gqa_process_docs joins them from the hub's.
import datasets
from lmms_eval.tasks.gqa.utils import gqa_doc_to_text, gqa_doc_to_visual  # noqa: F401


def process_docs(dataset):
    images = datasets.load_dataset({world!r}, "images", split="test", cache_dir={cache!r})
    by_id = {{row["id"]: row["image"].convert("RGB") for row in images}}
    return dataset.map(lambda doc: {{"image": by_id[doc["imageId"]]}})
"""


def test_lmms_eval_scores_a_local_gqa_task_with_its_own_metric(world, fastv_plan, toy, tmp_path):
    """simple_evaluate: lmms-eval's own pipeline (task YAML, requests, exact_match) over the model."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from diffopsearch.metrics import gqa_match

    ds, recs, _ = world
    plan, path = fastv_plan
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # `datasets` names a local folder's cache after its base name only: a private one per world
    cache = local_cache_dir(Path(ds.path))
    (tasks / "toy_gqa.yaml").write_text(TASK_YAML.format(world=ds.path, cache=cache))
    (tasks / "utils.py").write_text(TASK_UTILS.format(world=ds.path, cache=cache))
    out = simple_evaluate(model=LMMS_MODEL_ID, model_args=f"pretrained=toy,plan={path}",
                          tasks=["diffopsearch_toy_gqa"], batch_size=4, device="cpu", log_samples=True,
                          task_manager=TaskManager("WARNING", include_path=str(tasks), include_defaults=False))
    model, proc = toy
    want = eval_answers(model, proc, plan, ds, tmp_path / "eval")
    samples = out["samples"]["diffopsearch_toy_gqa"]
    # answer by answer, matched on the question (the logged doc keeps its `id`; doc_id is its index in the
    # task's split, the order load_qa reads): answers swapped between questions must fail here
    assert len(samples) == len(recs)
    got = {}
    for s in samples:
        rec = recs[s["doc_id"]]
        assert s["doc"].get("id", rec["id"]) == rec["id"] and s["target"] == rec["answer"], (s["doc"], rec)
        got[rec["id"]] = s["filtered_resps"][0]
    assert got == want
    assert len(set(want.values())) > 1  # different answers to different questions, so an exchange would show
    accuracy = sum(gqa_match(want[r["id"]], r["answer"]) for r in recs) / len(recs)
    assert out["results"]["diffopsearch_toy_gqa"]["exact_match,none"] == pytest.approx(accuracy)
