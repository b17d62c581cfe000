"""`diffopsearch {search,eval,report,prepare,show} [hydra overrides...]`.

Each subcommand is an ordinary Hydra app (version_base 1.3) over the configs shipped in
``diffopsearch/conf``: ``--help``, ``--cfg job``, ``-m``, ``hydra.run.dir=DIR`` work as in any
Hydra app. ``main`` strips the subcommand from the arguments and runs that app.

Exit codes: 0 success; 2 bad input (a ``UserError`` from our code, or a configuration Hydra
refused: unknown option, wrong type, unknown key), printed as one paragraph without traceback;
1 a bug (Hydra prints the stack). Tracebacks for bad input too with ``debug=true``,
``DIFFOPSEARCH_TRACEBACK=1`` or ``HYDRA_FULL_ERROR=1``.

In a sweep (``-m``) a failing job does not stop the others: it writes ``error.json`` into its job
directory, the sweep goes on, and a summary at the end names the failed jobs (exit code 1, or 2
when every failure was bad input).

What the terminal shows (console.py): a command that loads models or data keeps the libraries'
progress bars and log records below ERROR off the terminal (they stay in the run's log file;
``hydra.verbose=true`` keeps them on), and every command ends with a block naming the files it
wrote and the next command (rank 0 only); a sweep ends with the report command for its directory.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import config as _config  # registers the structured-config schemas
from .console import quote_override_value as _quote_override_value
from .errors import Interrupted, UserError

log = logging.getLogger("diffopsearch")

COMMANDS = {
    "search": "search a token-reduction plan under a FLOPs (or measured-time) budget (the main job)",
    "eval": "evaluate the unreduced model, a baseline (plan=NAME) or a searched plan (ckpt=PATH)",
    "report": "collect the results.json files below dir=DIR into report.md and pareto.png",
    "prepare": "build or find the embedded toy backbone and toy world, and print where they are",
    "show": "print a plan (ckpt=PATH) in words, its visual tokens per layer, cost and accuracy",
    "profile": "measure this device's latency model (the cost of cost=latency) and print it",
}

# What each command runs: (module, function), imported only when the command runs, so that
# `--help` stays fast and the modules (written separately) can be replaced in tests.
BODIES = {command: (f"diffopsearch.commands.{command}", "run") for command in COMMANDS}

USAGE = """\
usage: diffopsearch <command> [--help] [--cfg job] [-m] [key=value ...]

Differentiable search over visual-token reduction operators for LLaVA-family models.

commands:
{commands}

Every command is a Hydra app: `diffopsearch <command> --help` lists its options and config
groups; overrides look like budget=0.6 model=llava dataset=gqa; -m runs a sweep
(budget=0.8,0.6,0.4). Runs write under outputs/ (sweeps under multirun/) in the current directory.

examples:
  diffopsearch search                        # the embedded toy backbone and world, budget 0.6
  diffopsearch eval ckpt=outputs/DATE/TIME_search
  diffopsearch search -m budget=0.8,0.6,0.4,0.25
  diffopsearch report dir=multirun/DATE/TIME_search
  diffopsearch show ckpt=outputs/DATE/TIME_search
"""


@dataclass
class _Failure:
    job_dir: str
    overrides: list
    message: str
    user_error: bool


@dataclass
class _RunState:
    entered: bool = False  # the task function started: later exits are not config errors
    failures: list = field(default_factory=list)
    sweep_dir: Optional[str] = None  # set when a sweep starts (-m), for the report hint at its end


_STATE = _RunState()


def _traceback_wanted(cfg: Optional[DictConfig] = None) -> bool:
    env = any(os.environ.get(k, "") not in ("", "0") for k in ("DIFFOPSEARCH_TRACEBACK", "HYDRA_FULL_ERROR"))
    return env or bool(cfg is not None and cfg.get("debug", False))


def _hydra_runtime() -> tuple[bool, str, list]:
    """(is this a sweep job, the job's output dir, the job's overrides)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False, os.getcwd(), []
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN, hc.runtime.output_dir, list(hc.overrides.task)


# --------------------------------------------------------------------------- command bodies


def _body(command: str) -> Callable[[DictConfig], Any]:
    module, name = BODIES[command]
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------- accelerate relaunch


def accelerate_argv(command: str, overrides: list, run_dir: str, num_processes: int,
                    extra_args: list = ()) -> list:
    """The `accelerate launch` command line that re-runs this job with one process per GPU,
    writing into the same run directory."""
    argv = [sys.executable, "-m", "accelerate.commands.launch",
            "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        argv.append("--multi_gpu")
    argv += list(extra_args)
    argv += ["-m", "diffopsearch", command, *overrides,
             f"hydra.run.dir={_quote_override_value(str(run_dir))}", "hydra.output_subdir=null"]
    return argv


def _relaunch_under_accelerate(command: str, cfg: DictConfig) -> dict:
    import subprocess

    _, run_dir, overrides = _hydra_runtime()
    n = cfg.launch.num_processes
    if n is None:
        import torch

        n = max(1, torch.cuda.device_count())
    argv = accelerate_argv(command, overrides, run_dir, n, list(cfg.launch.args))
    log.info("relaunching under accelerate: %s", " ".join(argv))
    env = dict(os.environ, DIFFOPSEARCH_LAUNCHED="1")  # the children must not relaunch again
    rc = subprocess.call(argv, env=env)
    if rc == UserError.exit_code:
        raise UserError(f"`accelerate launch` of `diffopsearch {command}` refused its input "
                        f"(exit code 2); its message is above and in {run_dir}.")
    if rc != 0:
        raise RuntimeError(f"`accelerate launch` of `diffopsearch {command}` failed with exit code {rc}; "
                           f"see its output above and in {run_dir}.")
    return {"relaunched": True, "num_processes": n, "run_dir": run_dir}


_WORKER_ENV = ("DIFFOPSEARCH_LAUNCHED", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def _should_relaunch(cfg: DictConfig, environ=os.environ) -> bool:
    """launch.accelerate: true / false, or null = inside a SLURM job of hydra/launcher=slurm."""
    if "launch" not in cfg or any(environ.get(k) for k in _WORKER_ENV):
        return False
    if cfg.launch.accelerate is None:
        return environ.get("SUBMITIT_EXECUTOR") == "slurm"
    return bool(cfg.launch.accelerate)


# --------------------------------------------------------------------------- the task functions


def _print_user_error(command: str, err: UserError, cfg: Optional[DictConfig]) -> None:
    if _traceback_wanted(cfg):
        traceback.print_exc()
    sys.stderr.write(f"diffopsearch {command}: error: {err}\n")
    sys.stderr.flush()


def _record_failure(command: str, err: Exception, user: bool) -> None:
    """A failed sweep job: say so, leave error.json in its directory, let the sweep go on."""
    from .io import atomic_write_json

    _, job_dir, overrides = _hydra_runtime()
    if user:
        log.error("job %s failed: %s", " ".join(overrides), err)
    else:
        log.exception("job %s failed", " ".join(overrides))
    info = {"command": command, "overrides": overrides, "error": str(err), "type": type(err).__name__,
            "user_error": user, "traceback": None if user else traceback.format_exc()}
    try:
        atomic_write_json(os.path.join(job_dir, "error.json"), info)
    except OSError:
        pass
    _STATE.failures.append(_Failure(job_dir, overrides, str(err), user))


# The commands that load models or data: their libraries' progress bars and logging are quieted.
_LOADS_MODELS = ("search", "eval", "prepare")


def _hydra_verbose() -> bool:
    """``hydra.verbose=true`` (or a logger name): the user asked for everything, libraries included."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)


def _prints_closing_block(environ=os.environ) -> bool:
    """Rank 0 only; and not the workers of our own accelerate relaunch, whose parent prints it."""
    from .console import is_main_process

    return is_main_process(environ) and not environ.get("DIFFOPSEARCH_LAUNCHED")


def _run_task(command: str, cfg: DictConfig) -> Any:
    from . import console

    _STATE.entered = True
    multirun, run_dir, overrides = _hydra_runtime()
    start = time.monotonic()
    try:
        _config.validate(cfg)
        low = _config.for_budget(cfg, overrides, command)  # below budget 0.3 the default preset is thorough
        if low is not cfg:
            cfg = low
            _config.validate(cfg)
        if command in _LOADS_MODELS and not _hydra_verbose():
            console.quiet_libraries()
        if _should_relaunch(cfg):
            result = _relaunch_under_accelerate(command, cfg)
        else:
            result = _body(command)(cfg)
    except UserError as err:
        if multirun:
            _record_failure(command, err, user=True)
            return None
        _print_user_error(command, err, cfg)
        raise SystemExit(UserError.exit_code)
    except KeyboardInterrupt as err:  # Ctrl-C: one line that says how to go on, exit 130 (a sweep stops too)
        if _traceback_wanted(cfg):
            traceback.print_exc()
        sys.stderr.write(f"{interrupted_message(command, err)}\n")
        sys.stderr.flush()
        raise SystemExit(Interrupted.exit_code) from None
    except Exception as err:
        if multirun:
            _record_failure(command, err, user=False)
            return None
        raise  # a bug: Hydra prints the stack and exits 1
    if _prints_closing_block():
        console.closing_block(command, cfg, result, run_dir, time.monotonic() - start, multirun, overrides)
    return result


def interrupted_message(command: str, err: BaseException) -> str:
    """``diffopsearch search: interrupted at step 37 of 120 (last checkpoint: step 25); rerun with ...``"""
    where = err.where if isinstance(err, Interrupted) else ""
    head = f"diffopsearch {command}: interrupted" + (f" {where}" if where else "")
    run_dir = _hydra_runtime()[1]
    if command == "search":
        return (f"{head}; rerun with resume=true (same hydra.run.dir={_quote_override_value(run_dir)}) to continue "
                "from the last checkpoint")
    if command == "eval":
        return (f"{head}; rerun the same command from the same working directory to continue: the answers made "
                "so far are cached in outputs/.answers and are not computed again")
    return f"{head}; nothing was lost, rerun the command to finish"


class OutputDirCheck(Callback):
    """Hydra callback (conf/search.yaml, conf/eval.yaml): the run (or sweep) directory must be
    writable, checked before Hydra creates it, so a bad ``hydra.run.dir`` is bad input (exit 2, one
    line) rather than a stack from Hydra's own mkdir. It also remembers the sweep directory."""

    def _check(self, config: DictConfig, key: str) -> None:
        from .io import check_writable_dir

        path, command = OmegaConf.select(config, key), OmegaConf.select(config, "hydra.job.name")
        if not path:
            return
        try:
            check_writable_dir(path)
        except UserError as err:
            sys.stderr.write(f"diffopsearch {command}: error: {key}: {err}\n")
            sys.stderr.flush()
            raise SystemExit(UserError.exit_code) from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
        # Here, in the process that runs the sweep whatever the launcher (SLURM jobs run elsewhere):
        # the sweep's end names this directory in its report hint.
        _STATE.sweep_dir = OmegaConf.select(config, "hydra.sweep.dir")


# Plain module-level functions (not the decorated ones) are what Hydra hands to its launchers,
# so that submitit can pickle them by reference.
def search_task(cfg: DictConfig) -> Any:
    return _run_task("search", cfg)


def eval_task(cfg: DictConfig) -> Any:
    return _run_task("eval", cfg)


def report_task(cfg: DictConfig) -> Any:
    return _run_task("report", cfg)


def prepare_task(cfg: DictConfig) -> Any:
    return _run_task("prepare", cfg)


def show_task(cfg: DictConfig) -> Any:
    return _run_task("show", cfg)


def profile_task(cfg: DictConfig) -> Any:
    return _run_task("profile", cfg)


def _hydra_app(command: str, task: Callable) -> Callable[[], None]:
    return hydra.main(version_base="1.3", config_path="pkg://diffopsearch.conf", config_name=command)(task)


APPS = {
    "search": _hydra_app("search", search_task),
    "eval": _hydra_app("eval", eval_task),
    "report": _hydra_app("report", report_task),
    "prepare": _hydra_app("prepare", prepare_task),
    "show": _hydra_app("show", show_task),
    "profile": _hydra_app("profile", profile_task),
}


# --------------------------------------------------------------------------- entry point


def _usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {c.ljust(width)}  {h}" for c, h in COMMANDS.items()))


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")  # sys.exit("message") convention
    return 1


def _summarize_failures(command: str) -> int:
    failures = _STATE.failures
    lines = [f"diffopsearch {command}: {len(failures)} sweep job(s) failed (the others finished):"]
    for f in failures:
        lines.append(f"  {' '.join(f.overrides) or '(no overrides)'}: {f.message}  [{f.job_dir}/error.json]")
    sys.stderr.write("\n".join(lines) + "\n")
    return UserError.exit_code if all(f.user_error for f in failures) else 1


def main(argv: Optional[list] = None) -> int:
    """Run `diffopsearch <argv>`; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(), end="")
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"diffopsearch {version('diffopsearch')}")
        except PackageNotFoundError:
            print("diffopsearch (not installed)")
        return 0
    command = argv[0]
    if command not in APPS:
        sys.stderr.write(f"diffopsearch: error: unknown command {command!r}; the commands are "
                         f"{', '.join(COMMANDS)}. Run `diffopsearch --help`.\n")
        return 2

    _STATE.entered, _STATE.failures, _STATE.sweep_dir = False, [], None
    saved_argv = sys.argv
    # Hydra parses sys.argv itself; its usage lines then read `diffopsearch <command> ...`.
    sys.argv = [f"diffopsearch {command}", *argv[1:]]
    try:
        APPS[command]()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
        if code == 1 and not _STATE.entered:
            # Hydra refused the configuration (unknown option, wrong type, unknown key) and has
            # explained why: that is bad input, not a crash.
            sys.stderr.write(f"diffopsearch {command}: error: the configuration above was refused; "
                             f"`diffopsearch {command} --help` lists the options.\n")
            code = UserError.exit_code
    except BrokenPipeError:  # `diffopsearch search --help | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    except Exception as exc:
        if _STATE.entered:
            raise
        # A usage error Hydra raises outside its own reporting (`-m --cfg job`), or a config
        # error let through by HYDRA_FULL_ERROR=1: bad input either way.
        if _traceback_wanted():
            traceback.print_exc()
        sys.stderr.write(f"diffopsearch {command}: error: {exc}\n")
        code = UserError.exit_code
    finally:
        sys.argv = saved_argv
        from .runtime import close_process_group

        close_process_group()
    if code == 0 and _STATE.sweep_dir and _prints_closing_block():
        from .console import sweep_block

        sweep_block(command, _STATE.sweep_dir)
    if code == 0 and _STATE.failures:
        code = _summarize_failures(command)
    return code


def console_main():
    """The `diffopsearch` console script and `python -m diffopsearch`: :func:`main`, then exit with its code
    (see :func:`diffopsearch.runtime.exit_process` for how a multi-process run's ranks exit)."""
    from .runtime import exit_process

    exit_process(main())


if __name__ == "__main__":  # pragma: no cover
    console_main()
