"""What a first-time user sees: the closing block of every command (the files it wrote, the next
command, which must then run), and the libraries' progress bars and chatter kept off the terminal.

The real CLI in process (``cli.main``); eval, report and show run their real bodies on a tiny saved
LLaVA and a local GQA copy; the search body is a fake that writes a baseline plan."""
from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import types
from pathlib import Path

import pytest

import fixtures as fx  # tests/fixtures.py
from diffopsearch import cli
from fixtures import run_cli  # the in-process runner; the fake bodies are `bodies` (tests/conftest.py)


pytestmark = pytest.mark.usefixtures("clean_cli_env")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved random 4-layer toy LLaVA and a GQA fixture with 3 images x 2 questions."""
    from diffopsearch.backbone import toy

    root = tmp_path_factory.mktemp("first_run")
    model = toy.build_model(0, vision={**fx.TINY_VISION, "initializer_range": 0.5},
                            text={**fx.TINY_TEXT, "num_hidden_layers": 4, "initializer_range": 0.5})
    model.save_pretrained(root / "model")
    toy.build_processor().save_pretrained(root / "model")
    return root / "model", fx.write_gqa(root / "GQA", n_images=3, per_image=2)


def data_args(world) -> list[str]:
    model, data = world
    return [f"model.path={model}", "model.device=cpu", "dataset=gqa", f"dataset.path={data}",
            "batch_size=4", "max_new_tokens=2"]


def block(out: str) -> dict[str, list[str]]:
    """The closing block's rows by label ("run dir", "wrote", "next"; unlabelled rows join the one above)."""
    lines = out[out.rindex(": done"):].splitlines()[1:]
    rows: dict[str, list[str]] = {}
    label = None
    for line in lines:
        m = re.match(r" (\S.*?)?\s{2,}(\S.*)$", line)
        if not m:
            break
        label = m.group(1) or label
        rows.setdefault(label, []).append(m.group(2).split("  # ")[0].strip())
    return rows


def next_argv(command_line: str) -> list[str]:
    argv = shlex.split(command_line)
    assert argv[0] == "diffopsearch"
    return argv[1:]


# --------------------------------------------------------------------------- the closing block


def test_eval_ends_with_the_files_it_wrote_and_a_report_command_that_runs(world, capsys, tmp_path):
    code, out, err = run_cli(capsys, "eval", *data_args(world), "plan=fastv", "budget=0.8", "limit=4")
    assert code == 0, err
    rows = block(out)
    (run_dir,) = rows["run dir"]
    run_dir = tmp_path / run_dir
    assert run_dir.parent.parent == tmp_path / "outputs" and run_dir.name.endswith("_eval")
    wrote = rows["wrote"][0].split()
    assert wrote[0] == "results.json" and {"answers.jsonl", "eval.log"} <= set(wrote)
    assert all((run_dir / name).is_file() for name in wrote)
    assert rows["next"] == ["diffopsearch report dir=outputs"]
    # nothing from the libraries on the terminal: no progress bar, no warning
    assert "Loading weights" not in err and "%|" not in err and "Generating" not in err
    assert "deprecated" not in out + err

    code, out, err = run_cli(capsys, *next_argv(rows["next"][0]))
    assert code == 0, err
    report = block(out)["wrote"]
    assert report == ["outputs/report.md", "outputs/pareto.png"]
    assert all((tmp_path / p).is_file() for p in report)


@pytest.fixture
def searched(world, monkeypatch):
    """A fake search body (eval and show stay real) that writes a FastV plan for the tiny backbone."""
    from transformers import AutoConfig

    from diffopsearch.baselines import make_plan
    from diffopsearch.config import run_dir
    from diffopsearch.evaluate import visual_token_count

    config = AutoConfig.from_pretrained(world[0])

    def run(cfg):
        n_visual, grid = visual_token_count(config)
        make_plan("fastv", 0.6, config.text_config, n_visual, grid, 20.0).save(run_dir() / "plan.json")
        return {"ok": True}

    monkeypatch.setitem(sys.modules, "diffopsearch.commands.search", types.SimpleNamespace(run=run))


def test_search_ends_with_show_and_eval_commands_that_run(world, searched, capsys, tmp_path):
    code, out, err = run_cli(capsys, "search", *data_args(world), f"hydra.run.dir={tmp_path / 'my run'}")
    assert code == 0, err
    rows = block(out)
    assert rows["run dir"] == ["my run/"] and rows["wrote"][0].split()[0] == "plan.json"
    show, evaluate = rows["next"]
    assert show == "diffopsearch show 'ckpt='\"'\"'my run/plan.json'\"'\"''"  # quoted for the shell, then Hydra
    assert next_argv(evaluate)[:2] == ["eval", "ckpt='my run/plan.json'"]
    assert all(arg in next_argv(evaluate) for arg in data_args(world)[:4])  # the same backbone and data

    code, out, err = run_cli(capsys, *next_argv(show))
    assert code == 0, err
    assert "plan my run/plan.json" in out and block(out)["next"] == [evaluate]  # not evaluated yet
    code, out, err = run_cli(capsys, *next_argv(evaluate), "limit=2")
    assert code == 0, err
    assert json.loads((tmp_path / block(out)["run dir"][0] / "results.json").read_text())["n"] == 2


def test_a_sweep_ends_with_the_report_command_for_its_directory(bodies, capsys, tmp_path):
    code, out, err = run_cli(capsys, "search", "-m", "budget=0.8,0.6")
    assert code == 0, err
    assert out.count("diffopsearch search: done") == 2  # one block per job
    (sweep,) = (tmp_path / "multirun").glob("*/*_search")
    tail = out[out.rindex("diffopsearch search -m"):]
    assert "2 job(s) with results" in tail
    assert f"diffopsearch report dir={sweep.relative_to(tmp_path)}" in tail


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"DIFFOPSEARCH_LAUNCHED": "1"}])
def test_only_the_main_process_prints_the_block(bodies, capsys, monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, out, err = run_cli(capsys, "eval")
    assert code == 0, err
    assert ": done" not in out and "next" not in out


# --------------------------------------------------------------------------- the libraries kept quiet


def test_after_the_cli_setup_library_progress_bars_are_off(bodies, capsys):
    import datasets
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tlog

    hub_bars_before = hub.are_progress_bars_disabled()
    assert run_cli(capsys, "eval")[0] == 0
    assert datasets.is_progress_bar_enabled() is False
    assert tlog.is_progress_bar_enabled() is False
    assert hub.are_progress_bars_disabled() == hub_bars_before  # downloads keep their bar


@pytest.fixture
def transformers_warnings():
    """transformers' default verbosity (conftest.py sets TRANSFORMERS_VERBOSITY=error for the tests)."""
    import transformers.utils.logging as tlog

    before = tlog.get_verbosity()
    tlog.set_verbosity_warning()
    yield
    tlog.set_verbosity(before)


def test_library_records_go_to_the_log_file_and_only_their_errors_to_the_terminal(
        bodies, transformers_warnings, capsys, tmp_path):
    def chatty(cfg):
        logging.getLogger("transformers.modeling_utils").warning("some transformers advice")
        logging.getLogger("datasets.builder").warning("some datasets notice")
        logging.getLogger("transformers.generation").error("a real transformers error")
        logging.getLogger("diffopsearch.evaluate").warning("our own warning")
        return {}

    sys.modules["diffopsearch.commands.eval"].run = chatty
    code, out, err = run_cli(capsys, "eval", f"hydra.run.dir={tmp_path / 'r'}")
    assert code == 0, err
    terminal = out + err
    assert "advice" not in terminal and "notice" not in terminal
    assert terminal.count("a real transformers error") == 1 and "our own warning" in terminal
    logged = (tmp_path / "r" / "eval.log").read_text()
    for message in ("some transformers advice", "some datasets notice", "a real transformers error", "our own warning"):
        assert message in logged


def test_hydra_verbose_keeps_the_libraries_records_on_the_terminal(bodies, transformers_warnings, capsys,
                                                                   tmp_path):
    sys.modules["diffopsearch.commands.eval"].run = lambda cfg: logging.getLogger("transformers.x").warning("advice") or {}
    code, out, err = run_cli(capsys, "eval", "hydra.verbose=true", f"hydra.run.dir={tmp_path / 'r'}")
    assert code == 0, err
    assert "advice" in out + err


def test_known_harmless_warnings_are_filtered_and_others_are_not(bodies, capsys):
    import warnings

    assert run_cli(capsys, "eval")[0] == 0
    with warnings.catch_warnings(record=True) as caught:  # the filters the CLI set stay in front
        warnings.simplefilter("always", append=True)
        warnings.warn("`past_key_values` is deprecated and will be removed in version 5.40.0 for "
                      "`LlamaDecoderLayer.forward`. Use `cache` instead.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
