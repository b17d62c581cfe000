"""Bad input: a bad value is one clear message, exit code 2, and nothing written.

Every bad input goes through the real command (``cli.main``, in process, the real bodies) and must
end with exit code 2, one message naming the value and what is allowed, no traceback, and no
results.json / plan.json written. Also here: the undamaged plan file as the control, a few undecodable
images skipped rather than fatal, the traceback on request, and an unwritable output path as an error
that is both a user error and an OSError. Models are the tiny random-weight LLaVAs of the real classes
(the ``assets`` fixture, tests/conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import fixtures as fx  # tests/fixtures.py
from diffopsearch import evaluate as ev
from diffopsearch.errors import UserError
from fixtures import cli_message, run_cli  # the command in process, its one line on stderr


pytestmark = pytest.mark.usefixtures("clean_cli_env")  # tests/conftest.py


def _written(run: Path) -> list[str]:
    """What the command wrote besides Hydra's own record (.hydra/, the log)."""
    if not run.exists():
        return []
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.is_file() and ".hydra" not in p.parts and not p.name.endswith(".log"))


def _bad_cases():
    """(id, command, overrides(assets), needle): each must exit 2 naming the value and what is allowed."""
    P = lambda name: (lambda a: [f"ckpt={a.plans[name]}"])  # noqa: E731
    model = lambda d: (lambda a: [f"model.path={getattr(a, d)}"])  # noqa: E731
    gqa = lambda d, *more: (lambda a: ["dataset=gqa", f"dataset.path={getattr(a, d)}", *more])  # noqa: E731
    fixed = lambda *o: (lambda a: list(o))  # noqa: E731
    return [
        ("budget-zero", "search", fixed("budget=0"), "budget=0.0 is not valid"),
        ("budget-negative", "eval", fixed("budget=-0.5"), "budget=-0.5 is not valid"),
        ("budget-above-one", "search", fixed("budget=1.5"), "must lie in (0, 1]"),
        ("budget-not-a-number", "search", fixed("budget=abc"), "could not be converted to Float"),
        ("unknown-model", "eval", fixed("model=gpt"), "Available options in 'model'"),
        ("unknown-dataset", "search", fixed("dataset=coco"), "Available options in 'dataset'"),
        ("unknown-plan", "eval", fixed("plan=magic"), "Available options in 'plan'"),
        ("unknown-launcher", "search", fixed("hydra/launcher=nope"), "Available options in 'hydra/launcher'"),
        ("limit-zero", "eval", fixed("limit=0"), "limit=0 is not valid"),
        ("ckpt-missing", "eval", P("missing"), "does not exist"),
        ("ckpt-dir-without-plan", "eval", P("dir"), "directory without a plan.json"),
        ("ckpt-empty", "eval", P("empty"), "is empty"),
        ("ckpt-truncated", "eval", P("truncated"), "looks truncated"),
        ("ckpt-not-json", "eval", P("not_json"), "is not valid JSON"),
        ("ckpt-binary", "eval", P("binary"), "not UTF-8"),
        ("ckpt-format-version", "eval", P("version"), "'diffopsearch.plan/9'"),
        ("ckpt-other-grid", "eval", lambda a: P("grid")(a) + gqa("gqa")(a) + model("model")(a),
         "backbone.visual_tokens = 576 does not match the model (144)"),
        ("ckpt-other-layer-count", "eval", lambda a: P("layers")(a) + gqa("gqa")(a) + model("model")(a),
         "backbone.num_layers = 32 does not match the model (4)"),
        ("plan-keep-above-tokens", "eval", P("keep"), "keep = 200 is not valid"),
        ("plan-layer-out-of-range", "eval", P("layer"), "layer = 9 is out of range"),
        ("dataset-missing-column", "eval", gqa("gqa_no_column"), "has no column 'imageId'"),
        ("dataset-undecodable-images", "eval", lambda a: gqa("gqa_broken")(a) + model("model")(a),
         "cannot decode"),
        ("dataset-empty-split", "eval", gqa("gqa_empty"), "has no questions"),
        ("dataset-missing-dir", "search", fixed("dataset=gqa", "dataset.path=/nonexistent/GQA"), "does not exist"),
        ("model-missing-weights", "eval", lambda a: gqa("gqa")(a) + model("noweights")(a),
         "missing *.safetensors (the weights)"),
        ("model-missing-processor", "search", lambda a: model("noprocessor")(a) + [f"dataset.path={a.world}"],
         "processor_config.json or preprocessor_config.json"),
        ("model-truncated-weights", "eval", lambda a: gqa("gqa")(a) + model("truncweights")(a), "is damaged"),
        ("model-missing-dir", "eval", lambda a: gqa("gqa")(a) + ["model.path=/nonexistent/llava"], "does not exist"),
        ("output-dir-unwritable", "eval", lambda a: [f"hydra.run.dir={a.afile / 'run'}"], "cannot write"),
        ("search-empty-split", "search", lambda a: gqa("gqa_empty", "dataset.search_split=testdev",
                                                          "dataset.search_questions_config=null",
                                                          "dataset.search_images_config=null")(a),
         "has no questions"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("command,overrides,needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_clear_message_exit_2_and_nothing_written(capsys, tmp_path, assets, command, overrides,
                                                                   needle):
    argv = overrides(assets)
    run = tmp_path / "run"
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={run}")
    code, out, err = run_cli(capsys, command, *argv)
    assert code == 2, (out, err)
    assert needle in err, err
    assert "Traceback" not in err and "Traceback" not in out
    assert _written(run) == []  # no results.json, plan.json, answers, checkpoint
    assert not list(tmp_path.glob("outputs/.answers/*.jsonl"))


def test_the_message_names_the_value_and_what_is_allowed(capsys, assets):
    code, _, err = run_cli(capsys, "eval", f"ckpt={assets.plans['keep']}")
    assert code == 2
    line = cli_message(err)
    assert line.startswith("diffopsearch eval: error:") and "keep = 200" in line and "keep must be in 1..144" in line


def test_a_good_plan_file_is_accepted(capsys, tmp_path, assets):
    """The control for the ckpt cases above: the undamaged plan evaluates."""
    code, _, err = run_cli(capsys, "eval", f"ckpt={assets.plans['good']}", "dataset=gqa", f"dataset.path={assets.gqa}",
                           f"model.path={assets.model}", "model.device=cpu", "limit=2", "max_new_tokens=1",
                           f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / ev.RESULTS_NAME).read_text())["plan"]["sites"][0]["keep"] == 72


def test_a_few_undecodable_images_are_skipped_and_named_not_fatal(tmp_path, assets, caplog):
    from diffopsearch.data.datasets import load_qa

    model, proc = fx.tiny_model()
    data = fx.write_gqa(tmp_path / "GQA", n_images=3, per_image=1, broken=("n1001",))
    with caplog.at_level("WARNING", logger="diffopsearch"):
        r = ev.evaluate(model, proc, None, load_qa("gqa", str(data)), batch_size=2, max_new_tokens=1,
                        out_dir=tmp_path / "run", show=False, latency_batches=0)
    assert r["n"] == 2 and r["image_errors"]["count"] == 1
    assert "1 of 3 questions skipped" in caplog.text and "20000001" in caplog.text


@pytest.mark.parametrize("how", ["debug", "env"])
def test_the_traceback_is_there_for_developers(capsys, monkeypatch, assets, how):
    argv = ["eval", f"ckpt={assets.plans['truncated']}"]
    if how == "debug":
        argv.append("debug=true")
    else:
        monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" in err and "looks truncated" in err


def test_an_unwritable_output_path_is_a_user_error_that_is_still_an_oserror(tmp_path):
    from diffopsearch.errors import UnwritableError
    from diffopsearch.io import atomic_write_json, check_writable_dir

    (tmp_path / "f").write_text("")
    for call in (lambda: atomic_write_json(tmp_path / "f" / "results.json", {}),
                 lambda: check_writable_dir(tmp_path / "f" / "run")):
        with pytest.raises(UnwritableError, match="cannot write") as e:
            call()
        assert isinstance(e.value, OSError) and isinstance(e.value, UserError)
