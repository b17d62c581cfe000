"""Structured configs: the schema every command's configuration is checked against.

Each subcommand has one top-level dataclass (``SearchApp``, ``EvalApp``, ``ReportApp``,
``PrepareApp``, ``ShowApp``) registered in Hydra's ConfigStore as ``<app>_schema``; the shipped YAML
(``diffopsearch/conf/<app>.yaml``) lists it first in its defaults, so Hydra types every node:
an unknown key or a wrong type (``budget=abc``) is refused with Hydra's own message. The group
files (``model/``, ``dataset/``, ``search/``, ``plan/``) merge into nodes typed by ``ModelConfig``,
``DatasetConfig``, ``SearchConfig`` and ``PlanConfig``. Values that a type cannot express (a budget
in (0, 1], a dtype name) are checked by :func:`validate`, which raises ``UserError``.

Plain strings, not Enums, for choices: other modules compare ``cfg.model.dtype == "bfloat16"`` and
write configs to JSON, and Enum members would break both.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import UserError
from .regimes import METHODS

APPS = ("search", "eval", "report", "prepare", "show", "profile")

MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_DEVICES = ("auto", "cpu", "cuda")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DATASET_NAMES = ("toy", "gqa", "vqav2")
METRICS = ("gqa", "vqa")
VQA_MODES = ("official", "lmms")
PLAN_NAMES = tuple(METHODS)  # the baselines of conf/plan/ (regimes.METHODS)
SEARCH_LOSSES = ("kl", "ce")
COSTS = ("flops", "latency")


@dataclass
class ModelConfig:
    name: str = "toy"
    path: str = ""  # HF id or local dir; "" with name=toy = the weights shipped in the package
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    trust_remote_code: bool = False
    revision: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DatasetConfig:
    name: str = "toy"  # toy | gqa | vqav2
    path: str = ""  # hub id or local dir; "" with name=toy = the prepared toy world
    questions_config: Optional[str] = None
    images_config: Optional[str] = None  # GQA keeps images in a second config; VQAv2 inline
    split: str = "test"  # evaluation split (HF slice syntax allowed: "val[:1000]")
    search_split: str = "train"  # what the search trains its few architecture scalars on
    # search_split may live in other configs than the eval split (GQA: testdev is its own
    # config); null = the same configs as the eval split.
    search_questions_config: Optional[str] = None
    search_images_config: Optional[str] = None
    metric: str = "gqa"  # gqa (exact match) | vqa (VQAv2 soft accuracy)
    vqa_mode: str = "official"  # official | lmms (answer normalisation flavour)


@dataclass
class PlanConfig:
    name: str = "none"  # none | fastv | tome | pool | prumerge | visionzip | random
    layer: Optional[int] = None  # reduction layer; null = the method's own default
    seed: int = 0


@dataclass
class SearchConfig:
    """The search (search/loop.py; docs/DESIGN.md section 3). Defaults sized for the toy backbone on 2 CPU
    cores (the 3-minute default command); ``search=thorough`` is the longer preset for GPUs. Below budget
    0.3 the default preset runs as ``low_budget_preset`` (:func:`for_budget`)."""

    preset: str = "default"  # the preset these values come from (conf/search/NAME.yaml; recorded in plan.json)
    low_budget_preset: Optional[str] = "thorough"  # below budget 0.3, `search=default` runs as this preset, the
    # user's own search.* overrides on top (null: never); docs/DESIGN.md section 3, "Presets"
    steps: int = 80  # at budgets >= 0.6; below, scale_steps raises it (search/loop.py, scaled_steps)
    scale_steps: bool = True  # below budget 0.6, run 0.6 / budget times the steps (at most 3x): a step there is
    # cheaper (shorter sequences) and its decisions finer, so the command's time stays about the same
    batch_size: int = 8  # questions per step, shared by the step's plans
    plans_per_step: int = 8  # hard plans drawn from the policy per step (leave-one-out baseline)
    knob_plans: int = 2  # the step's best plans whose loss is backpropagated into the knobs
    lr: float = 0.15  # policy logits (Adam)
    knob_lr: float = 0.005  # continuous knobs, in units of their scale (policy.KNOB_SCALE)
    entropy: float = 0.02  # entropy bonus on the policy
    loss: str = "kl"  # kl: to the unreduced model's answer distribution | ce: answer cross-entropy
    learn_knobs: bool = True  # false: the named regimes' exact knobs throughout
    two_sites: bool = True  # plans of one or two sites (false: one)
    decide_after: float = 0.4  # "a second site follows" learns after this fraction of the steps, once the
    # second site it would add has been learned (search/loop.py, policy_objective)
    candidate_layers: Optional[List[int]] = None  # null = every decoder layer
    micro_batch: int = 0  # questions per forward inside a step (0 = the whole batch); memory, not results
    checkpoint_layers: Optional[bool] = None  # activation checkpointing; null = where it pays (loop.auto_checkpoint)
    checkpoint_every: int = 20
    eval_baselines: bool = False
    train_limit: Optional[int] = None
    grad_clip: float = 10.0  # max L2 norm of the architecture-state gradient per step (0 = no clipping)
    select_samples: int = 4  # the policy's next most probable plans, scored beside its own (search/select.py)
    select_questions: int = 384  # held-out search-split questions that choose (0 = the policy's plan only)
    select_corners: bool = True  # the space's single-site corners are candidates too (search/select.py)
    screen_questions: Optional[int] = 64  # candidates besides the policy's plan are screened on this many first
    select_finalists: int = 2  # the screen's best that are scored on all select_questions, with the policy's plan
    select_margin: float = 1.0  # a challenger replaces the gradient plan only if its held-out CE is lower by more
    # than this many paired standard errors (0: the lowest CE wins outright)


@dataclass
class LaunchConfig:
    """Re-run the job under ``accelerate launch``, one process per GPU.

    ``accelerate``: true = always, false = never, null (default) = when the job runs inside a
    SLURM job submitted by ``hydra/launcher=slurm``. Never from a process that is already one of
    accelerate's (or torchrun's) workers."""

    accelerate: Optional[bool] = None
    num_processes: Optional[int] = None  # null = every GPU visible to the job
    args: List[str] = field(default_factory=list)  # extra `accelerate launch` flags


@dataclass
class ReportConfig:
    dir: str = "${dir}"  # `report dir=X` and `report report.dir=X` both work
    out: Optional[str] = None  # where report.md / pareto.png go; null = inside dir


@dataclass
class _RunApp:
    """Fields shared by the commands that run a model (search, eval)."""

    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    budget: float = 1.0
    limit: Optional[int] = None  # first N questions of the eval split
    batch_size: int = 16
    max_new_tokens: int = 16
    seed: int = 0
    resume: bool = False
    # what budget is a fraction of: the LLM's prefill FLOPs, or the measured prefill time on this device
    # (a latency model profiled once per device / backbone / dtype / batch size; docs/DESIGN.md section 4)
    cost: str = "flops"
    latency_batch_size: Optional[int] = None  # cost=latency: the batch size timed (null = batch_size)
    num_workers: int = 0
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    debug: bool = False  # show tracebacks for user errors too


@dataclass
class SearchApp(_RunApp):
    search: SearchConfig = MISSING
    budget: float = 0.6


@dataclass
class EvalApp(_RunApp):
    plan: PlanConfig = MISSING
    ckpt: Optional[str] = None  # a plan.json, or a run dir holding one; overrides `plan`
    budget: float = 1.0


@dataclass
class ReportApp:
    dir: str = MISSING
    report: ReportConfig = field(default_factory=ReportConfig)
    debug: bool = False


@dataclass
class PrepareApp:
    debug: bool = False


@dataclass
class ProfileApp:
    """``diffopsearch profile``: build (or read) the latency model and print it."""

    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    batch_size: int = 16
    refresh: bool = False  # profile again even when a valid cached model exists
    debug: bool = False


@dataclass
class ShowApp:
    ckpt: Optional[str] = None  # a plan.json, or a run dir holding one (found as eval finds it)
    debug: bool = False


SCHEMAS = {"search": SearchApp, "eval": EvalApp, "report": ReportApp, "prepare": PrepareApp, "show": ShowApp,
           "profile": ProfileApp}


def register() -> None:
    """Register the app schemas (idempotent; importing this module does it)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for app, node in SCHEMAS.items():
        cs.store(name=f"{app}_schema", node=node)


register()


# --------------------------------------------------------------------------- validation


def _choice(what: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UserError(f"{what}={value!r} is not valid: allowed values are {', '.join(allowed)}.")


def _at_least(what: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise UserError(f"{what}={value!r} is not valid: it must be an integer >= {low}"
                        + (" or null." if allow_none else "."))


def check_budget(budget: Any, what: str = "budget") -> float:
    """A budget is a fraction of the unreduced prefill FLOPs: 0 < budget <= 1."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        b = float("nan")
    if not (math.isfinite(b) and 0.0 < b <= 1.0):
        raise UserError(f"{what}={budget!r} is not valid: the budget is the fraction of the unreduced "
                        "model's prefill FLOPs and must lie in (0, 1], e.g. budget=0.6.")
    return b


def validate(cfg: DictConfig) -> None:
    """Check what the types cannot: value ranges and choices. Raises UserError naming the value."""
    if "budget" in cfg:
        check_budget(cfg.budget)
    if "model" in cfg:
        m = cfg.model
        if not m.name:
            raise UserError("model.name is empty: pick a model with model=toy|llava|llava13b.")
        _choice("model.dtype", m.dtype, MODEL_DTYPES)
        _choice("model.device", m.device, MODEL_DEVICES)
        _choice("model.attn_implementation", m.attn_implementation, ATTN_IMPLEMENTATIONS)
    if "dataset" in cfg:
        d = cfg.dataset
        _choice("dataset.name", d.name, DATASET_NAMES)
        _choice("dataset.metric", d.metric, METRICS)
        _choice("dataset.vqa_mode", d.vqa_mode, VQA_MODES)
        if d.name != "toy" and not d.path:
            raise UserError(f"dataset.path is empty for dataset {d.name!r}: set it to a hub id "
                            "(e.g. lmms-lab-encoder/GQA) or a local directory.")
    if "plan" in cfg:
        _choice("plan.name", cfg.plan.name, PLAN_NAMES)
        _at_least("plan.layer", cfg.plan.layer, 0, allow_none=True)
    if "cost" in cfg:
        _choice("cost", cfg.cost, COSTS)
        _at_least("latency_batch_size", cfg.latency_batch_size, 1, allow_none=True)
    for key, low in (("limit", 1), ("batch_size", 1), ("max_new_tokens", 1), ("num_workers", 0)):
        if key in cfg:
            _at_least(key, cfg[key], low, allow_none=key == "limit")
    if "launch" in cfg:
        _at_least("launch.num_processes", cfg.launch.num_processes, 1, allow_none=True)
    if "search" in cfg:
        s = cfg.search
        _choice("search.loss", s.loss, SEARCH_LOSSES)
        _at_least("search.steps", s.steps, 1)
        _at_least("search.batch_size", s.batch_size, 1)
        _at_least("search.plans_per_step", s.plans_per_step, 2)
        _at_least("search.micro_batch", s.micro_batch, 0)
        _at_least("search.knob_plans", s.knob_plans, 1)
        _at_least("search.checkpoint_every", s.checkpoint_every, 1)
        _at_least("search.train_limit", s.train_limit, 1, allow_none=True)
        _at_least("search.select_samples", s.select_samples, 0)
        _at_least("search.select_questions", s.select_questions, 0)
        _at_least("search.screen_questions", s.screen_questions, 1, allow_none=True)
        _at_least("search.select_finalists", s.select_finalists, 1)
        _at_least("search.select_margin", s.select_margin, 0)
        if s.low_budget_preset is not None:
            _choice("search.low_budget_preset", s.low_budget_preset, SEARCH_PRESETS)
        for key in ("lr", "knob_lr"):
            if not (math.isfinite(s[key]) and s[key] > 0):
                raise UserError(f"search.{key}={s[key]!r} is not valid: a learning rate must be a finite number > 0.")
        if s.candidate_layers is not None:
            layers = list(s.candidate_layers)
            if not layers or any(layer < 0 for layer in layers):
                raise UserError(f"search.candidate_layers={layers!r} is not valid: a non-empty list of decoder "
                                "layer indices >= 0, or null for every layer.")
        for key in ("entropy", "grad_clip"):
            if not (math.isfinite(s[key]) and s[key] >= 0):
                raise UserError(f"search.{key}={s[key]!r} is not valid: it must be a finite number >= 0.")
        if not (math.isfinite(s.decide_after) and 0 <= s.decide_after <= 1):
            raise UserError(f"search.decide_after={s.decide_after!r} is not valid: a fraction of the steps, "
                            "from 0 (the second-site decision learns from the first step) to 1 (never).")
    if "report" in cfg:
        from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

        try:
            rdir = cfg.report.dir
        except (MissingMandatoryValue, InterpolationToMissingValueError):
            raise UserError("report needs a directory: diffopsearch report dir=<a run, outputs/ or multirun/ "
                            "directory>; every results.json below it is collected.") from None
        if not Path(rdir).is_dir():
            raise UserError(f"report dir={rdir!r} is not a directory: give a run, outputs/ or multirun/ "
                            "directory; every results.json below it is collected.")


# --------------------------------------------------------------------------- helpers


def compose(app: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The configuration `diffopsearch <app> <overrides>` would run with (no `hydra` node).

    For the Python API and tests; works inside and outside a running Hydra app."""
    _choice("command", app, APPS)
    return for_budget(_compose(app, overrides), overrides, app)


def _compose(app: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=app, overrides=list(overrides))
    with initialize_config_module(config_module="diffopsearch.conf", version_base="1.3"):
        return hydra_compose(config_name=app, overrides=list(overrides))


LOW_BUDGET = 0.3
SEARCH_PRESETS = ("default", "thorough")  # conf/search/*.yaml


def for_budget(cfg: DictConfig, overrides: Sequence[str], app: str = "search") -> DictConfig:
    """The configuration a job runs with: ``cfg`` (composed from ``overrides``), except that below budget 0.3
    ``search=default`` is recomposed as ``search=<search.low_budget_preset>`` with the same overrides, so the
    user's own ``search.*`` values still win. At 0.25 thorough's loop (150 steps of 12 plans on 16 questions)
    took as long as the default's own (once the policy concentrates its draws repeat plans, which run once)
    and its plans scored higher on a fresh 9878-question sample of the world (docs/DESIGN.md section 3)."""
    s = cfg.get("search") if OmegaConf.is_config(cfg) else None
    if s is None or s.preset != "default" or not s.low_budget_preset or float(cfg.budget) >= LOW_BUDGET:
        return cfg
    _choice("search.low_budget_preset", s.low_budget_preset, SEARCH_PRESETS)
    return _compose(app, [*overrides, f"search={s.low_budget_preset}"])


def complete(cfg, app: str):
    """``cfg`` as the ``app`` command's schema (SCHEMAS): a config composed by Hydra already is one; a
    hand-made one (a test, a script) gets every default it leaves out from the schema, where each
    default is defined once."""
    schema = SCHEMAS[app]
    if OmegaConf.is_config(cfg) and OmegaConf.get_type(cfg) is schema:
        return cfg
    return OmegaConf.merge(OmegaConf.structured(schema), cfg)


def run_dir(out_dir=None) -> Path:
    """Where the current job writes: ``out_dir`` when the caller names one, else Hydra's output dir
    inside an app, else the cwd. (A Hydra config composed outside an app has no output dir.)"""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if out_dir is not None:
        return Path(out_dir)
    if HydraConfig.initialized():
        runtime = HydraConfig.get().runtime
        if not OmegaConf.is_missing(runtime, "output_dir"):
            return Path(runtime.output_dir)
    return Path(os.getcwd())


def to_dict(cfg: DictConfig) -> dict:
    """A resolved, JSON-ready copy of a config (for plan.json's `search.config`, results.json)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
