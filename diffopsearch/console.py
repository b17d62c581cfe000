"""What a command shows on the terminal besides its own tables and bars (cli.py calls these).

- :func:`quiet_libraries`: the libraries under us (datasets, transformers, huggingface_hub) keep
  their progress bars and their log records below ERROR off the terminal; the records still reach
  Hydra's log file in the run directory.
- :func:`closing_block`: every command ends with the paths it wrote and the next useful command;
  :func:`sweep_block` names the sweep directory and the report command after a ``-m`` sweep.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import warnings
from pathlib import Path

# The libraries whose log records are kept off the terminal (below ERROR).
LIBRARIES = ("transformers", "datasets", "huggingface_hub")

# (category, message regex) of warnings that tell a user of the command nothing they can act on.
HARMLESS_WARNINGS = (
    # transformers 5.24 renamed the decoder layers' `past_key_values` keyword to `cache`. The reduced
    # forward passes the installed version's name (patch/llava/attention.py `cache_kw`; tests/test_forward.py
    # runs it with deprecation warnings as errors), so this only hides third-party callers' use of it.
    (FutureWarning, r"`past_key_values` is deprecated"),
)


def is_main_process(environ=os.environ) -> bool:
    """Rank 0 under accelerate / torchrun (both set RANK), and every process outside them."""
    return int(environ.get("RANK") or 0) == 0


def _terminal_filter(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or record.name.split(".", 1)[0] not in LIBRARIES


def quiet_libraries() -> None:
    """Call once Hydra has configured logging (inside the task function: a sweep reconfigures it for
    every job). Not at import: a library user keeps the libraries' defaults."""
    import datasets
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tlog

    datasets.disable_progress_bars()  # "Creating parquet from Arrow format", "Generating train split"
    hub_bars_off = hub.are_progress_bars_disabled()
    tlog.disable_progress_bar()  # "Loading weights"; this turns huggingface_hub's bars off too, ...
    if not hub_bars_off:
        hub.enable_progress_bars()  # ... but the first download of a 7B model (GBs) needs its bar
    # Each library prints through a stderr handler of its own. Drop those and let the records
    # propagate to Hydra's root handlers: the log file takes them all, and the terminal handlers
    # below let only errors through.
    tlog.disable_default_handler()
    tlog.enable_propagation()
    for name in ("datasets", "huggingface_hub"):  # these two propagate already
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_terminal_filter)  # a no-op when it is there already
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=".*" + message, category=category)


# --------------------------------------------------------------------------- the closing block


def quote_override_value(value: str) -> str:
    """Quote a value for Hydra's override grammar (paths may hold characters it would parse)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _shown(path) -> str:
    """A path as it can be typed from here: relative when below the working directory."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


def _arg(key: str, path) -> str:
    """``key=path`` as one shell word that Hydra parses back to the path."""
    value = _shown(path)
    if re.fullmatch(r"[\w./@+-]+", value):
        return f"{key}={value}"
    return shlex.quote(f"{key}={quote_override_value(value)}")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s"


def _run_files(run_dir: Path) -> list[str]:
    first = {"plan.json": 0, "results.json": 1}  # what a user opens first, then the rest by name
    if not run_dir.is_dir():
        return []
    names = [p.name for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(names, key=lambda n: (first.get(n, len(first)), n))


def _report_dir(run_dir: Path) -> Path:
    """Where a report of this run is most useful: all of outputs/ for a run in the default layout
    (outputs/DATE/TIME_eval), else the run itself."""
    root = run_dir.parent.parent
    return root if root.name == "outputs" else run_dir


def _model_and_data(overrides) -> str:
    """The model / dataset overrides, for a hint that must run on the same backbone and data (a
    plan only fits the backbone it was made for; without them the default toy would be used)."""
    return "".join(" " + shlex.quote(o) for o in overrides if re.match(r"(model|dataset)[.=]", o))


def _show_hint(plan_file: Path, evaluated: bool):
    """After ``show``: evaluate the plan, or compare it at its budget with the other side (a
    searched plan with FastV, a baseline with a search), on the backbone and data of the run that
    made it (its ``.hydra/overrides.yaml``, when the plan sits in a run directory)."""
    import yaml

    try:
        plan = json.loads(plan_file.read_text())
    except (OSError, ValueError):
        plan = {}
    try:
        overrides = yaml.safe_load((plan_file.parent / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        overrides = []
    same = _model_and_data(overrides if isinstance(overrides, list) else [])
    budget = plan.get("budget") if isinstance(plan, dict) else None
    if not evaluated:
        return f"diffopsearch eval {_arg('ckpt', plan_file)}{same}", "its accuracy, FLOPs and latency"
    if not isinstance(budget, (int, float)) or budget >= 1:
        return None
    from .config import PLAN_NAMES

    if plan.get("method") in PLAN_NAMES:
        return f"diffopsearch search budget={budget:g}{same}", "a searched plan at the same budget"
    return f"diffopsearch eval plan=fastv budget={budget:g}{same}", "FastV at the same budget, to compare"


def closing_lines(command: str, cfg, result, run_dir, multirun: bool = False,
                  overrides=()) -> list[tuple[str, str, str]]:
    """The block's rows, (label, text, comment): the files the command wrote, the next commands.
    ``overrides``: the job's (its model / dataset ones go on to the hints that run a model)."""
    run_dir, result = Path(run_dir), result if isinstance(result, dict) else {}
    same = _model_and_data(overrides)
    rows = []
    if command in ("search", "eval"):
        rows.append(("run dir", _shown(run_dir) + os.sep, ""))
        if _run_files(run_dir):
            rows.append(("wrote", "  ".join(_run_files(run_dir)), ""))
    if command == "search" and (run_dir / "plan.json").is_file():
        plan = run_dir / "plan.json"
        rows.append(("next", f"diffopsearch show {_arg('ckpt', plan)}", "the plan in words, tokens per layer, cost"))
        rows.append(("", f"diffopsearch eval {_arg('ckpt', plan)}{same}", "evaluate it again (limit=, dataset.split=)"))
    elif command == "eval":
        ckpt = cfg.get("ckpt") if cfg is not None else None
        if ckpt:
            rows.append(("next", f"diffopsearch show {_arg('ckpt', ckpt)}", "the plan in words"))
        if not multirun:  # a sweep ends with a report over the whole sweep instead
            report = _report_dir(run_dir)
            rows.append(("" if ckpt else "next", f"diffopsearch report {_arg('dir', report)}",
                         "report.md and pareto.png over every run there"))
    elif command == "report":
        wrote = [_shown(result[k]) for k in ("report", "plot") if result.get(k)]
        rows += [("wrote" if i == 0 else "", path, "") for i, path in enumerate(wrote)]
    elif command == "prepare":
        rows.append(("next", "diffopsearch search", "the main job: a plan searched on this default"))
        rows.append(("", "diffopsearch eval plan=fastv budget=0.5 limit=500", "a baseline, first 500 questions"))
    elif command == "show" and result.get("plan"):
        hint = _show_hint(Path(result["plan"]), result.get("results") is not None)
        if hint:
            rows.append(("next", *hint))
    return rows


def _print_block(title: str, rows) -> None:
    from rich.console import Console
    from rich.text import Text

    if not rows:
        return
    console = Console(highlight=False)
    console.rule(Text(title, style="bold green"), align="left")
    width = max((len(label) for label, _, _ in rows), default=0)
    for label, text, comment in rows:
        line = Text.assemble((f" {label.ljust(width)}  ", "bold"), (text, "cyan" if text.startswith("diffopsearch ") else ""))
        if comment:
            line.append(f"  # {comment}", style="dim")
        console.print(line, soft_wrap=True)  # never wrapped: paths and commands stay copyable


def closing_block(command: str, cfg, result, run_dir, seconds: float, multirun: bool = False,
                  overrides=()) -> None:
    title = f"diffopsearch {command}: done" + (f" in {_duration(seconds)}" if seconds >= 1 else "")
    _print_block(title, closing_lines(command, cfg, result, run_dir, multirun, overrides))


def sweep_block(command: str, sweep_dir) -> None:
    """After ``-m``: the sweep directory and the report over it (when a job left results)."""
    sweep_dir = Path(sweep_dir)
    done = sorted(sweep_dir.glob("*/results.json")) if sweep_dir.is_dir() else []
    if not done:
        return
    _print_block(f"diffopsearch {command} -m: {len(done)} job(s) with results", [
        ("sweep dir", _shown(sweep_dir) + os.sep, ""),
        ("next", f"diffopsearch report {_arg('dir', sweep_dir)}", "report.md and pareto.png over the sweep"),
    ])
