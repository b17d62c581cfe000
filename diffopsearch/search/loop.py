"""The search loop: a frozen backbone, the architecture state only, every plan under budget
(docs/DESIGN.md section 3).

One step, on one batch of the search split:

1. the unreduced model's answer distribution (no grad): the reference;
2. plans drawn from the policy in pairs, a first site alone and with a second site
   (:func:`draw_pairs`), plus the *decided pair* (the decoded first site alone and with its greedy second
   site, :meth:`Policy.decode_pair`), up to ``plans_per_step`` distinct ones, each run for real without a
   graph: a hard forward with a truly shorter sequence (:func:`diffopsearch.patch.llava.search_forward`)
   and its loss per question (KL to the reference by default, or the answer CE);
3. the policy's gradient (:func:`policy_objective`): the first site's score function against the
   other pairs (leave-one-out, reward minus the log of the batch's mean loss); the second site's from
   the paired difference it makes on the same questions (reward minus the mean of the per-question log
   losses); "a second site follows" from the decided pair's paired difference, after the first
   ``decide_after`` of the steps;
4. the knobs' gradient: the ``knob_plans`` best plans of the step run again with tensor knobs and
   their loss is backpropagated through the reduced forward (one plan's graph alive at a time;
   ``micro_batch`` and activation checkpointing bound it further);
5. one Adam step on policy and knobs, the knobs projected back into their domains.

Nothing is relaxed: what a plan's loss measures is what that plan does. Every draw is a function of
(seed, step) and the checkpoint holds state, optimizer and step, so ``resume=true`` ends at the plan
an uninterrupted run ends at. Data parallel: each process takes its share of the batch, all draw the
same plans, losses and gradients are averaged (all-reduce), every process applies the same update;
only the main process writes (JSONL log, checkpoints) and draws the progress bar.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..config import SearchConfig
from ..errors import Interrupted, NumericalError, UserError
from ..patch.llava import encode_images
from ..runtime import Procs, to_device
from .checkpoint import CKPT_DIR, load_checkpoint, save_checkpoint
from .policy import ArchState
from .space import Planner, SearchSpace, describe

LOG_NAME = "search_log.jsonl"
DATA_STREAM = 17
POLICY_STREAM = 23
PLAN_FLOOR = 1e-4    # plan_reward: batch-mean losses below this count as equal
REWARD_FLOOR = 1e-3  # question_reward: a question's losses below this count as equal


def seed_for(seed: int, step: int, stream: int) -> int:
    """A 63-bit generator seed from (seed, step, stream): distinct streams never share draws."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    return x & ((1 << 63) - 1)


_SCHEMA = SearchConfig()  # every default is defined once, in the schema (config.py)


@dataclass
class SearchSettings:
    """What the loop needs: the schema's ``search`` fields that shape the trajectory, ``budget``, ``seed``."""

    budget: float = 0.6
    seed: int = 0
    steps: int = _SCHEMA.steps
    batch_size: int = _SCHEMA.batch_size
    plans_per_step: int = _SCHEMA.plans_per_step
    knob_plans: int = _SCHEMA.knob_plans
    lr: float = _SCHEMA.lr
    knob_lr: float = _SCHEMA.knob_lr
    entropy: float = _SCHEMA.entropy
    loss: str = _SCHEMA.loss
    learn_knobs: bool = _SCHEMA.learn_knobs
    two_sites: bool = _SCHEMA.two_sites
    decide_after: float = _SCHEMA.decide_after
    micro_batch: int = _SCHEMA.micro_batch
    checkpoint_layers: bool | None = _SCHEMA.checkpoint_layers
    checkpoint_every: int = _SCHEMA.checkpoint_every
    grad_clip: float = _SCHEMA.grad_clip

    def key(self, space: SearchSpace, n_text: float, n_train: int, cost: dict | None = None) -> str:
        """Fingerprint of everything that determines the trajectory (resume refuses a mismatch); ``cost``:
        the latency model's identity under cost=latency."""
        blob = json.dumps({"settings": {k: v for k, v in asdict(self).items()
                                        if k not in ("checkpoint_every", "micro_batch", "checkpoint_layers")},
                           "space": space.to_dict(), "n_text": round(float(n_text), 6), "n_train": n_train,
                           **({"cost": cost} if cost else {})}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


STEP_SCALE_BUDGET, STEP_SCALE_MAX = 0.6, 3.0


def scaled_steps(steps: int, budget: float, scale: bool = True) -> int:
    """The steps a search runs: ``steps`` at budgets >= 0.6, and ``0.6 / budget`` times as many below (at most
    3x). A step at a small budget runs shorter sequences, so it is cheaper, while its decisions (which second
    site, which merge) are finer. Chosen on the toy validation split, never the test split (docs/DESIGN.md
    section 3, "Presets")."""
    if not scale or budget >= STEP_SCALE_BUDGET:
        return int(steps)
    return int(round(steps * min(STEP_SCALE_MAX, STEP_SCALE_BUDGET / budget)))


def auto_checkpoint(space: SearchSpace, device: torch.device) -> bool:
    """Activation checkpointing pays where activations, not weights, bound memory: long visual segments
    through many layers (LLaVA-1.5's 576 x 32), never on the toy backbone (144 x 8: it would only cost
    the recomputation)."""
    return space.n_visual * space.num_layers >= 4096


# ---------------------------------------------------------------- data

class Batches:
    """Training batches as a function of (seed, step): the step's global batch is ``batch_size``
    rows drawn without replacement from the search split; process r takes rows r::world."""

    def __init__(self, dataset, processor, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(dataset) == 0:
            raise UserError("the search split is empty: check dataset.search_split and search.train_limit.")
        self.dataset, self.processor = dataset, processor
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world

    def indices(self, step: int) -> list[int]:
        g = torch.Generator().manual_seed(seed_for(self.seed, step, DATA_STREAM))
        n = len(self.dataset)
        rows = torch.randperm(n, generator=g)[: min(self.batch_size, n)].tolist()
        return rows[self.rank::self.world]

    def get(self, step: int) -> dict | None:
        from ..data.datasets import make_train_batch

        recs, imgs = self.dataset.batch(self.indices(step))
        if not recs:
            return None
        return make_train_batch(self.processor, recs, imgs)


def answer_terms(logits: torch.Tensor, target: torch.Tensor):
    """Of answer-position logits (B, W, V) and their targets (B, W; -100 = not an answer token):
    the summed answer-token CE, the number of answer tokens, (B,) whether every answer token
    of a row is the argmax, and (B,) each row's mean answer-token CE."""
    mask = target != -100
    ce = F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    right = ((logits.argmax(-1) == target) | ~mask).all(1)
    return (ce * mask).sum(), mask.sum(), right, (ce * mask).sum(1) / mask.sum(1).clamp_min(1)


def micro_batches(batch: dict, size: int) -> list[dict]:
    """``batch`` split into pieces of ``size`` rows (0 or >= its rows: the batch itself)."""
    n = batch["input_ids"].shape[0]
    if size <= 0 or size >= n:
        return [batch]
    return [{k: (v[i:i + size] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
             for k, v in batch.items()} for i in range(0, n, size)]


def _forward_kw(batch: dict) -> tuple[dict, torch.Tensor, int]:
    labels = batch["labels"]
    width = int((labels != -100).sum(1).max()) + 1  # answer tokens + the position predicting the first
    kw = dict(attention_mask=batch["attention_mask"], pixel_values=batch.get("pixel_values"),
              position_ids=batch.get("position_ids"), logits_to_keep=width, query_index=batch.get("query_index"))
    return kw, labels[:, -width + 1:], width


@torch.no_grad()
def reference_logprobs(model, batch: dict, vision: dict | None = None) -> torch.Tensor:
    """The unreduced model's answer-position log-probabilities (B, W, V): the KL's reference."""
    from ..patch.llava import search_forward

    kw, _, _ = _forward_kw(batch)
    return search_forward(model, (), batch["input_ids"], vision=vision, **kw)[:, :-1].float().log_softmax(-1)


def plan_losses(model, batch: dict, sites, ref: torch.Tensor | None, loss: str = "kl",
                checkpoint: bool = False, vision: dict | None = None) -> torch.Tensor:
    """Per-question loss (B,) of the hard plan ``sites`` on a teacher-forced batch: mean over answer
    tokens of KL(reference || reduced) (``loss="kl"``, needs ``ref``) or of the answer CE."""
    from ..patch.llava import search_forward

    kw, target, _ = _forward_kw(batch)
    logits = search_forward(model, sites, batch["input_ids"], checkpoint=checkpoint, vision=vision,
                            **kw)[:, :-1].float()
    lp = logits.log_softmax(-1)
    mask = target != -100
    if loss == "kl":
        per_token = (ref.exp() * (ref - lp)).sum(-1)
    else:
        per_token = -lp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
    return (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)


def draw_pairs(policy, gen: torch.Generator, plans: int, tries: int = 4):
    """Pairs (first site alone, with a drawn second site) until ``plans`` distinct plans are drawn (at most
    ``tries`` x ``plans`` pairs), and the distinct plans. Each distinct plan runs once, so when the first site
    has concentrated, the step's forwards go to the second sites that are still being decided."""
    pairs, seen = [], {}
    for _ in range(tries * plans):
        pair = policy.sample_pair(gen)
        if len(seen) + sum(c is not None and c not in seen for c in pair) > plans and pairs:
            break
        pairs.append(pair)
        for c in pair:
            if c is not None:
                seen.setdefault(c, None)
        if len(seen) >= plans:
            break
    return pairs, list(seen)


def policy_objective(policy, pairs, reward: dict, paired: dict, entropy: float, decided=None) -> torch.Tensor:
    """The surrogate whose gradient is the policy's update (to minimise), from paired plans: each pair is a
    first site f alone and f with a drawn second site s (None where none can follow). ``reward[plan]``: the
    log of the plan's mean loss on the batch, negated (:func:`plan_reward`); ``paired[plan]``: the mean over
    questions of the log of its loss, negated (:func:`question_reward`).

    - first site: score function, value V = q r(f + s) + (1 - q) r(f) (q = pi(second site | f), the value of
      f under the policy), baseline the other pairs' V (leave-one-out), on ``reward``: first sites differ by
      what they get badly wrong, which the batch mean keeps;
    - the second site's layer / operator / ratio: score function of pi(s | f) with the paired difference
      d = paired(f + s) - paired(f) (the first site's effect cancels), centred by the other pairs' d. It is
      the gradient of the second site's value *given* one follows, not scaled by q, so the second-site
      factors keep learning whatever "a second site follows" says. Per question: second sites differ by
      little, and there the per-question difference has less noise;
    - "a second site follows" (``decided`` = (f*, f* + s*): the decoded first site alone and with its greedy
      second site, :meth:`Policy.decode_pair`): the logit at f*'s layer moves by paired(f* + s*) - paired(f*),
      i.e. by whether the second site the plan would be decoded with helps. Not the average over drawn
      second sites: most of those are poor while the second-site factors learn, and their average drove
      the decision to "never" before the good second site had been found (measured: q fell from 0.5 to 0.04
      in 80 steps while the factors' own mode was a second site that helps). The natural gradient of the
      Bernoulli (no q (1 - q) factor), so a decision at q near 0 or 1 can still turn.

    Every term is divided by the spread of the step's rewards (the second sites' by that of ``paired``),
    as an advantage normalisation."""
    f = policy.factors()

    def rewards_of(table, i):  # (pairs,) for the first sites (i = 0) or the pairs' two-site plans (i = 1)
        return torch.tensor([float(table[p[i]]) if p[i] is not None else float(table[p[0]]) for p in pairs])

    has2 = torch.tensor([two is not None for _, two in pairs])
    r1, r2 = rewards_of(reward, 0), rewards_of(reward, 1)
    sd = _spread(torch.cat([r1, r2[has2]]))
    p1, p2 = rewards_of(paired, 0), rewards_of(paired, 1)
    q = torch.tensor([float(f["two"][one.layer].detach().exp()) if two is not None else 0.0 for one, two in pairs])
    v = q * r2 + (1 - q) * r1
    lp1 = torch.stack([policy.first_log_prob(one, f) for one, _ in pairs])
    lp2 = torch.stack([policy.second_log_prob(two, f) if two is not None else torch.zeros(()) for _, two in pairs])
    d = torch.where(has2, p2 - p1, torch.zeros_like(p1)) * sd / _spread(torch.cat([p1, p2[has2]]))
    a2 = torch.zeros_like(d)
    if int(has2.sum()) > 1:
        a2[has2] = leave_one_out(d[has2])
    elif int(has2.sum()) == 1:
        a2 = d
    obj = (leave_one_out(v) * lp1).mean() + (a2 * lp2).mean()
    if decided is not None and decided[1] is not None:
        first, both = decided
        obj = obj + policy.two[first.layer] * (float(paired[both]) - float(paired[first]))
    return -obj / sd - entropy * policy.entropy()


def _spread(x: torch.Tensor) -> torch.Tensor:
    return (x.std() if x.numel() > 1 else torch.zeros(())) + 1e-6


def leave_one_out(x: torch.Tensor) -> torch.Tensor:
    """Each value against the mean of the others (a baseline independent of the value itself; zeros for
    a single value)."""
    m = x.numel()
    return x - (x.sum() - x) / (m - 1) if m > 1 else torch.zeros_like(x)


# ---------------------------------------------------------------- progress

class _Progress:
    """A rich progress bar (main process only): the plans' mean loss, the policy's current plan, ETA."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.p = None
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.p = Progress(TextColumn("[bold]search[/]"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]}"), TextColumn("plan {task.fields[plan]}"),
                          TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self.p.start()
        self.task = self.p.add_task("search", total=total, completed=start, loss="-", plan="-")

    def update(self, rec: dict):
        if self.p is not None:
            self.p.update(self.task, completed=rec["step"] + 1, loss=f"{rec['loss']:.3f}", plan=rec["mode"])

    def close(self):
        if self.p is not None:
            self.p.stop()


def _truncate_log(path: Path, upto: int) -> None:
    """Keep the log lines of steps < upto (a resumed run rewrites what came after its checkpoint)."""
    from ..io import atomic_write_text

    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < upto:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a torn last line
    atomic_write_text(path, "".join(x + "\n" for x in keep))


# ---------------------------------------------------------------- the loop

def clip_grads_(grads: Sequence[torch.Tensor], max_norm: float) -> tuple[float, int]:
    """Clip in place to global L2 norm ``max_norm`` (0: leave the gradients alone); returns (the norm
    before clipping, the number of non-finite elements). The norm is summed in float64, so a spike of
    1e20 is not an overflow. When clipping, a non-finite element (an overflow in a backward pass) is
    first set to 0 (NaN) or to the largest float of its sign (inf), so it cannot turn the state into
    NaN: the step then moves that element alone, by at most ``max_norm``."""
    bad = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    if bad and max_norm > 0:
        for g in grads:
            torch.nan_to_num_(g, nan=0.0)
    total = math.sqrt(sum(float(g.detach().double().square().sum()) for g in grads))
    if max_norm > 0 and math.isfinite(total) and total > max_norm:
        for g in grads:
            g.mul_(max_norm / total)
    return total, bad


def _numerical_error(what: str, value: float, step: int, s: SearchSettings, out: Path | None,
                     last_ckpt: int | None) -> NumericalError:
    """The message of a NaN / inf: where, what is kept, and the usual fixes."""
    if out is None:
        kept = "nothing is written without an output directory"
    elif last_ckpt:
        kept = f"the last good checkpoint (step {last_ckpt}) is kept in {str(out / CKPT_DIR)!r}"
    else:
        kept = "no checkpoint had been written yet"
    clip = f"search.grad_clip={s.grad_clip:g}" if s.grad_clip > 0 else "search.grad_clip=0 (off)"
    return NumericalError(
        f"the search stopped at step {step}: the {what} is {value} (not finite); nothing of this step was saved "
        f"and {kept}. Lower the learning rate (search.lr={s.lr:g}, try search.lr={s.lr / 4:g}) or clip "
        f"the architecture gradients ({clip}, try search.grad_clip={(s.grad_clip or 4.0) / 4:g}), "
        "and rerun in a new run directory (resume=true refuses other settings).")


@dataclass
class SearchResult:
    state: ArchState
    steps: int
    final_loss: float | None
    resumed_from: int | None
    history: list = field(default_factory=list)  # the per-step records of this process's run
    seconds: float = 0.0
    forwards: int = 0                            # reduced forwards (plans x batches) this run


def first_site_feasibility(space: SearchSpace, planner: Planner) -> torch.Tensor:
    """(S, |OPS|) bool: first-site choices that are allowed and meet the budget alone."""
    from .space import OPS, Choice
    from .policy import Knobs

    k = Knobs()
    return torch.tensor([[space.op_allowed(li, oi, 0) and planner.keep1(Choice(li, oi), k.floats) is not None
                          for oi in range(len(OPS))] for li in range(len(space.layers))])


def _plan_losses(model, planner, state, choices, batch, settings, device, dtype):
    """Every plan's loss on the step's batch (no graph): what the policy's rewards are made of. Returns the
    losses (the batch's mean per plan; zeros without a batch), the per-question rewards (the batch's mean of
    :func:`question_reward` per plan), the encoded chunks (chunk, vision, reference) for the knobs' pass,
    and the reduced forwards run."""
    losses = torch.zeros(len(choices), dtype=torch.float64)
    paired = torch.zeros(len(choices), dtype=torch.float64)
    if batch is None:
        return losses, paired, [], 0
    plans = [planner.hard_sites(c, state.knobs.floats) for c in choices]
    n = batch["input_ids"].shape[0]
    chunks = micro_batches(to_device(batch, device, dtype), settings.micro_batch)
    encoded = []
    for chunk in chunks:
        vision = encode_images(model, chunk["pixel_values"])  # one vision pass for all plans
        ref = reference_logprobs(model, chunk, vision) if settings.loss == "kl" else None
        encoded.append((chunk, vision, ref))
        with torch.no_grad():
            for j, sites in enumerate(plans):
                per_q = plan_losses(model, chunk, sites, ref, settings.loss, False, vision).double()
                losses[j] += float(per_q.sum()) / n
                paired[j] += float(question_reward(per_q).sum()) / n
    return losses, paired, encoded, len(plans) * len(chunks)


def plan_reward(losses: torch.Tensor) -> torch.Tensor:
    """Plans' rewards from their mean losses on the batch: minus the log, so halving a loss is worth the same
    at 0.01 as at 1 (the good plans' losses are orders of magnitude below the bad ones', which would
    otherwise drown them). Losses below ``PLAN_FLOOR`` count as equal."""
    return -torch.log(losses + PLAN_FLOOR)


def question_reward(per_question: torch.Tensor) -> torch.Tensor:
    """A plan's reward on each question: minus the log of its loss there (losses below ``REWARD_FLOOR`` count
    as equal). Averaged over the batch it is the reward that pairs compare: one question a plan gets badly
    wrong counts as one question, not as the batch (measured on 640 search questions: 1.4x the
    signal-to-noise ratio of :func:`plan_reward`'s paired difference between two good plans)."""
    return -torch.log(per_question + REWARD_FLOOR)


def _knob_backward(model, planner, state, choices, losses, encoded, settings, ckpt_layers, n, device) -> int:
    """The knobs' gradient: the loss of the step's ``knob_plans`` best plans (the ones the policy moves
    towards) backpropagated through their reduced forward, one plan's graph alive at a time. Returns the
    forwards run."""
    best = sorted(range(len(choices)), key=lambda j: (float(losses[j]), j))[:settings.knob_plans]
    for j in best:
        for chunk, vision, ref in encoded:  # sites per chunk: each backward frees its graph
            sites = planner.hard_sites(choices[j], state.knobs.floats, lambda s, r: state.knobs.value(s, r, device))
            per_q = plan_losses(model, chunk, sites, ref, settings.loss, ckpt_layers, vision)
            (per_q.sum() / (n * len(best))).backward()
    return len(best) * len(encoded)


def _apply_update(state, opt, procs, grad_clip: float, mean_loss: float, fail) -> tuple[float, int]:
    """Average the gradients over processes, clip, check that everything is finite (``fail(what, value)``
    makes the error to raise), take the Adam step and project the knobs. Returns (gradient norm, non-finite
    gradient elements)."""
    for p in state.parameters():  # same shapes on every process, even for what this step left alone
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in state.parameters()]
    procs.mean_(grads)
    grad_norm, grad_bad = clip_grads_(grads, grad_clip)  # after the all-reduce: the same everywhere
    for what, value in (("task loss", mean_loss), ("architecture-state gradient", grad_norm)):
        if not math.isfinite(value):
            raise fail(what, value)
    opt.step()
    bad = [p.detach()[~torch.isfinite(p)] for p in state.parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise fail("architecture state", float(bad[0][0]))
    state.knobs.project_()
    return grad_norm, grad_bad


def _record(step, state, planner, choices, losses, grad_norm, grad_bad, seconds) -> dict:
    """The step's line of the JSONL log (and the progress bar's fields)."""
    space = planner.space
    with torch.no_grad():
        f = state.policy.factors()
        mode = state.policy.decode(f)
        p_two = float(f["two"][mode.layer].exp())  # P(a second site follows) at the decoded first site
    mode_plan = planner.plan(mode, state.knobs.floats)
    return {"step": step, "loss": float(losses.mean()), "best": float(losses.min()),
            "plans": [describe(c, space) for c in choices], "losses": [round(float(x), 5) for x in losses],
            "mode": describe(mode, space), "mode_keep": [s.keep for s in mode_plan.sites],
            "mode_cost": round(mode_plan.cost["flops_ratio"], 5), "p_second_site": round(p_two, 4),
            "entropy": round(float(state.policy.entropy().detach()), 4), "knobs": state.knobs.to_dict(),
            "grad_norm": grad_norm, "grad_nonfinite": grad_bad, "step_s": round(seconds, 4)}


# One screen on purpose (nanoGPT's rule for a training loop): set-up, resume, the steps and the checkpoints
# in reading order; a step's parts are the helpers above (_plan_losses, _knob_backward, _apply_update, _record).
def search(model, processor, dataset, space: SearchSpace, planner: Planner, settings: SearchSettings,
           n_text: float, out_dir: str | Path | None = None, accelerator=None, resume: bool = False,
           progress: bool = True, stop_after: int | None = None,
           on_step: Callable[[dict, ArchState], None] | None = None) -> SearchResult:
    """Run the search and return the trained state. ``out_dir``: where the log and checkpoints go (None:
    nothing is written). ``stop_after``: stop after that many steps in total (simulates an interruption;
    tests). ``on_step(record, state)``: called after every step (the benchmark tracks the policy's plan)."""
    procs = Procs(accelerator)
    model.requires_grad_(False)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    torch.manual_seed(settings.seed)
    state = ArchState(space, first_site_feasibility(space, planner))
    groups = [{"params": list(state.policy.parameters()), "lr": settings.lr},
              {"params": list(state.knobs.parameters()), "lr": settings.knob_lr if settings.learn_knobs else 0.0}]
    opt = torch.optim.Adam(groups)
    key = settings.key(space, n_text, len(dataset), planner.latency.key if planner.latency is not None else None)
    out = Path(out_dir) if out_dir is not None else None
    start, last_loss, resumed = 0, None, None
    if resume and out is not None:
        meta = load_checkpoint(out, state, opt, key)
        if meta is not None:
            start, last_loss, resumed = int(meta["step"]), meta.get("final_loss"), int(meta["step"])
    log_path = out / LOG_NAME if out is not None else None
    if out is not None and procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if procs.is_main and log_path is not None:
        if start > 0:
            _truncate_log(log_path, start)
        elif log_path.exists():
            log_path.unlink()
    ckpt_layers = settings.checkpoint_layers
    if ckpt_layers is None:
        ckpt_layers = auto_checkpoint(space, device)
    batches = Batches(dataset, processor, settings.batch_size, settings.seed, procs.rank, procs.world)
    end = settings.steps if stop_after is None else min(settings.steps, stop_after)
    bar = _Progress(progress and procs.is_main and end > start, settings.steps, start)
    history, t0, forwards = [], time.time(), 0
    current, last_ckpt = start, resumed  # for the messages of an interruption or a numerical fault
    M = settings.plans_per_step
    try:
        for step in range(start, end):
            current, ts = step, time.time()
            gen = torch.Generator().manual_seed(seed_for(settings.seed, step, POLICY_STREAM))
            decided = state.policy.decode_pair()  # always run: it decides "a second site follows"
            extra = [c for c in decided if c is not None]
            pairs, choices = draw_pairs(state.policy, gen, max(1, M - len(extra)))
            choices += [c for c in extra if c not in choices]
            opt.zero_grad(set_to_none=False)
            batch = batches.get(step)  # None: every image of this share failed to decode; contribute nothing
            losses, paired, encoded, used = _plan_losses(model, planner, state, choices, batch, settings, device,
                                                         dtype)
            procs.mean_([losses, paired])  # every process now ranks the plans alike
            if batch is not None and settings.learn_knobs:
                used += _knob_backward(model, planner, state, choices, losses, encoded, settings, ckpt_layers,
                                       batch["input_ids"].shape[0], device)
            forwards += used
            reward = plan_reward(losses)
            policy_objective(state.policy, pairs, dict(zip(choices, reward.tolist())),
                             dict(zip(choices, paired.tolist())), settings.entropy,
                             decided if step >= settings.decide_after * settings.steps else None).backward()

            def fail(what, value, step=step, last=last_ckpt):
                return _numerical_error(what, value, step, settings, out, last)

            grad_norm, grad_bad = _apply_update(state, opt, procs, settings.grad_clip, float(losses.mean()), fail)
            rec = _record(step, state, planner, choices, losses, grad_norm, grad_bad, time.time() - ts)
            last_loss = rec["loss"]
            history.append(rec)
            if procs.is_main:
                if log_path is not None:
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.update(rec)
            if on_step is not None:
                on_step(rec, state)
            done = step + 1
            if out is not None and procs.is_main and (done % settings.checkpoint_every == 0 or done == settings.steps):
                save_checkpoint(out, state, opt, {"step": done, "final_loss": last_loss, "key": key,
                                                  "space": space.to_dict(), "settings": asdict(settings)})
                last_ckpt = done
    except KeyboardInterrupt:
        ck = f"last checkpoint: step {last_ckpt}" if last_ckpt else "no checkpoint yet"
        raise Interrupted(f"at step {current} of {settings.steps} ({ck})") from None
    finally:
        bar.close()
    procs.wait()
    return SearchResult(state=state, steps=end, final_loss=last_loss, resumed_from=resumed, history=history,
                        seconds=time.time() - t0, forwards=forwards)


# ---------------------------------------------------------------- validation (model selection)

@dataclass
class EncodedQuestions:
    """A question set prepared once for scoring many plans on it (selection): this process's rows,
    teacher-forced batches with their images decoded and processed, and the vision tower's output.
    Decoding, processing and the vision pass are more than half of one candidate's scoring on the toy
    backbone; each candidate then runs only its decoder. The vision outputs stay on the CPU between
    uses, so a large backbone's GPU holds one batch of them at a time."""

    batches: list  # (teacher-forced batch on the model's device without its pixels, the vision output on the CPU)
    n: int  # questions in the set, every process's

    def __len__(self) -> int:
        return self.n


@torch.no_grad()
def encode_questions(model, processor, dataset, batch_size: int = 32, procs: Procs | None = None) -> EncodedQuestions:
    """``dataset`` prepared for :func:`plan_scores` (:class:`EncodedQuestions`)."""
    from ..data.datasets import make_train_batch

    procs = procs or Procs()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rows = list(range(len(dataset)))[procs.rank::procs.world]
    batches = []
    for s in range(0, len(rows), batch_size):
        recs, imgs = dataset.batch(rows[s:s + batch_size])
        if not recs:
            continue
        b = to_device(make_train_batch(processor, recs, imgs), device, dtype)
        pixels = b.pop("pixel_values", None)  # not kept: the vision output stands for them
        vision = encode_images(model, pixels) if pixels is not None else None
        batches.append((b, to_device(vision, "cpu", dtype) if vision is not None else None))
    return EncodedQuestions(batches=batches, n=len(dataset))


@torch.no_grad()
def plan_scores(model, processor, plan, dataset, batch_size: int = 32, procs: Procs | None = None,
                per_question: bool = False) -> dict:
    """Teacher-forced scores of a hard plan on ``dataset`` (a data set, or :func:`encode_questions` of one):
    ``accuracy`` (a question counts when every answer token and the eos are the argmax: exactly when
    greedy decoding produces the answer, for answers that are whole tokens), ``ce`` (mean answer-token
    cross-entropy) and with ``per_question``, this process's questions' mean answer-token CE (a tensor,
    rows rank::world). One reduced forward per batch, no generation: cheap enough to compare candidate
    plans."""
    from ..patch.llava import plan_seed, search_forward

    procs = procs or Procs()
    device = next(model.parameters()).device
    enc = dataset if isinstance(dataset, EncodedQuestions) else encode_questions(model, processor, dataset,
                                                                               batch_size, procs)
    sites, seed = (list(plan.sites), plan_seed(plan)) if plan is not None else ([], 0)
    tally = torch.zeros(4, dtype=torch.float64)  # right, questions, summed CE, answer tokens
    per_q = []
    for b, vision in enc.batches:
        kw, target, _ = _forward_kw(b)  # query_index: attn scores from the last prompt token, as in generation
        logits = search_forward(model, sites, b["input_ids"],
                                vision=to_device(vision, device, None) if vision is not None else None,
                                seed=seed, **kw)[:, :-1].float()
        ce_sum, n_tokens, ok, row_ce = answer_terms(logits, target)
        per_q.append(row_ce.double().cpu())
        tally += torch.tensor([float(ok.sum()), float(ok.numel()), float(ce_sum), float(n_tokens)],
                              dtype=torch.float64)
    procs.mean_([tally])
    out = {"accuracy": float(tally[0] / tally[1].clamp_min(1)), "ce": float(tally[2] / tally[3].clamp_min(1)),
           "n": int(round(float(tally[1]) * procs.world))}
    if per_question:
        out["per_question"] = torch.cat(per_q) if per_q else torch.zeros(0, dtype=torch.float64)
    return out
