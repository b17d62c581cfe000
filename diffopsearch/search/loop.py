"""The search loop: frozen backbone, architecture state only, under a budget (DESIGN section 3).

Per step: an architecture sampled from the state's distributions by Gumbel-softmax at temperature
tau (noise from (seed, step)), straight-through by default: the forward runs exactly the sampled
discrete architecture (dropped keys at log(eps), constant regime knobs exact), so what the loss
sees is what a plan would do, while the gradient is the relaxed sample's. Loss: answer
cross-entropy (+ ``kl_weight`` x KL to the unreduced model's answer distribution, computed once per
batch under no_grad) plus ``lambda_b * relu(E[cost] - budget)^2`` after the warm-up, ``lambda_b``
raised by dual ascent while E[cost] is over budget; tau anneals exponentially from tau_start to
tau_end. E[cost] is under the distributions themselves (``anneal_cost``: under softmax(logits /
tau), which approaches the argmax plan's cost). The start is the constraint itself: the keep-all
probability is set so that the initial E[cost] equals the budget.

Everything that varies from step to step is a function of (seed, step), and the checkpoint holds
the state, the optimizer and lambda_b, so ``resume=true`` ends at the plan an uninterrupted run
ends at. Data parallel: each process takes its share of the step's batch, the architecture
gradients are averaged over processes (all-reduce), and every process applies the same update;
only the main process writes (JSONL log, checkpoints) and draws the progress bar.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import Interrupted, NumericalError, UserError
from ..evaluate import to_device
from .relax import build_sites, expected_cost_ratio, init_keep_for_budget
from .state import ArchState, SearchSpace, seed_for

CKPT_DIR = "checkpoint"
CKPT_TENSORS = "search_state.safetensors"
CKPT_META = "search_state.json"
CKPT_PREV = "search_state.prev.safetensors"  # the tensors the JSON names while a new checkpoint is written
LOG_NAME = "search_log.jsonl"
DATA_STREAM = 17


@dataclass
class SearchSettings:
    """What the loop needs (from ``cfg.search``, ``cfg.budget``, ``cfg.seed``)."""

    budget: float = 0.6
    seed: int = 0
    operator: str = "continuous"
    steps: int = 80
    lr: float = 0.2
    batch_size: int = 8
    tau_start: float = 1.0
    tau_end: float = 0.3
    warmup_steps: int = 10
    lambda_init: float = 1.0
    dual_lr: float = 0.5
    kl_weight: float = 0.0
    checkpoint_every: int = 50
    init_keep: float | None = None  # None: the keep-all probability that puts E[cost] at the budget
    gumbel: bool = True  # Gumbel noise in the relaxed samples (False: the tempered distributions themselves)
    straight_through: bool = True  # the forward sees the sampled one-hot architecture, the gradient the relaxed one
    anneal_cost: bool = True  # E[cost] under softmax(logits / tau) instead of the distributions themselves
    # Max L2 norm of the architecture-state gradient per step (0: no clipping). On the tiny test LLaVA
    # the usual steps have norm 0.1-9, while the straight-through relaxation has sent spikes of 1e5-1e9
    # (and an inf) into the keep-ladder logits: 10 cuts such spikes and leaves the usual steps alone.
    grad_clip: float = 10.0

    def key(self, space: SearchSpace, n_text: float, n_train: int) -> str:
        """Fingerprint of everything that determines the trajectory (resume refuses a mismatch)."""
        blob = json.dumps({"settings": {k: v for k, v in asdict(self).items() if k != "checkpoint_every"},
                           "space": space.to_dict(), "n_text": round(float(n_text), 6), "n_train": n_train},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tau_at(s: SearchSettings, step: int) -> float:
    """Exponential annealing tau_start -> tau_end over the steps."""
    if s.steps <= 1:
        return float(s.tau_end)
    return float(s.tau_start * (s.tau_end / s.tau_start) ** (step / (s.steps - 1)))


# ---------------------------------------------------------------- processes

class Procs:
    """Rank / world / gradient all-reduce through Accelerate (or a single plain process)."""

    def __init__(self, accelerator=None):
        self.acc = accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.is_main = self.rank == 0

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """In-place average over processes (the architecture gradients, the logged scalars)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        o = 0
        for t in tensors:
            t.copy_(flat[o:o + t.numel()].view_as(t))
            o += t.numel()

    def wait(self):
        if self.world > 1:
            self.acc.wait_for_everyone()


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
    the summed answer-token CE, the number of answer tokens, and (B,) whether every answer token
    of a row is the argmax."""
    mask = target != -100
    ce = F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    right = ((logits.argmax(-1) == target) | ~mask).all(1)
    return (ce * mask).sum(), mask.sum(), right


def answer_losses(model, batch: dict, sites, kl_weight: float) -> dict:
    """CE on the answer tokens of the soft forward (and KL to the unreduced model's answer
    distribution when ``kl_weight > 0``). Returns ce, kl, acc (all answer tokens right) tensors."""
    from ..patch.llava import soft_forward

    labels = batch["labels"]
    width = int((labels != -100).sum(1).max()) + 1  # answer tokens + the position predicting the first
    kw = dict(attention_mask=batch["attention_mask"], pixel_values=batch.get("pixel_values"),
              position_ids=batch.get("position_ids"), logits_to_keep=width, query_index=batch.get("query_index"))
    logits = soft_forward(model, batch["input_ids"], sites=sites, **kw)[:, :-1].float()
    target = labels[:, -width + 1:]
    mask = target != -100
    ce_sum, n_tokens, right = answer_terms(logits, target)
    ce, right = ce_sum / n_tokens.clamp_min(1), right.float().mean()
    kl = torch.zeros((), device=ce.device)
    if kl_weight > 0:
        with torch.no_grad():
            ref = soft_forward(model, batch["input_ids"], sites=(), **kw)[:, :-1].float().log_softmax(-1)
        lp = logits.log_softmax(-1)
        kl = ((ref.exp() * (ref - lp)).sum(-1) * mask).sum() / mask.sum().clamp_min(1)
    return {"ce": ce, "kl": kl, "acc": right}


# ---------------------------------------------------------------- checkpoints

def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"optim.{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out_dir: Path, state: ArchState, opt, meta: dict) -> None:
    """The previous tensors moved aside (``CKPT_PREV``), the new tensors (safetensors) written, then
    the JSON that names their step: every write atomic, the JSON the commit. Killed at any point, the
    folder holds a JSON and a tensors file of the same step (the new pair, or the old one)."""
    import os

    from ..io import atomic_save_safetensors, atomic_write_json

    d = Path(out_dir) / CKPT_DIR
    otensors, ometa = _flatten_optimizer(opt)
    tensors = {f"state.{k}": v for k, v in state.state_dict().items()}
    tensors.update(otensors)
    if (d / CKPT_TENSORS).exists() and (d / CKPT_META).exists():
        os.replace(d / CKPT_TENSORS, d / CKPT_PREV)  # what the current JSON names, until the new JSON lands
    atomic_save_safetensors(d / CKPT_TENSORS, tensors, metadata={"step": str(meta["step"])})
    atomic_write_json(d / CKPT_META, {**meta, "optimizer": ometa})


def load_checkpoint(out_dir: Path, state: ArchState, opt, key: str) -> dict | None:
    """Restore state and optimizer from ``out_dir/checkpoint``; the meta dict, or None if absent."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = Path(out_dir) / CKPT_DIR
    files = [d / n for n in (CKPT_TENSORS, CKPT_PREV) if (d / n).exists()]
    if not (d / CKPT_META).exists() or not files:
        return None
    try:
        meta = json.loads((d / CKPT_META).read_text())
        steps = {}
        for path in files:  # the tensors of the JSON's step: the current file, or the previous one when
            with safe_open(str(path), "pt") as f:  # a kill fell between the new tensors and the new JSON
                steps[path] = (f.metadata() or {}).get("step")
        match = [path for path in files if steps[path] == str(meta.get("step"))]
        tensors = load_file(str(match[0])) if match else None
    except Exception as e:  # a damaged checkpoint is a user-facing problem, not a crash
        raise UserError(f"the search checkpoint in {str(d)!r} cannot be read ({type(e).__name__}: {e}); delete "
                        "that folder to start the search afresh, or run without resume=true.") from e
    if tensors is None:
        raise UserError(f"the search checkpoint in {str(d)!r} is inconsistent (JSON step {meta.get('step')}, "
                        f"tensors step {', '.join(str(v) for v in steps.values())}); delete that folder to start "
                        "afresh.")
    if meta.get("key") != key:
        raise UserError(f"resume=true found a search checkpoint in {str(d)!r} made with different settings "
                        "(search.*, budget, seed, model or data differ): resume with the same configuration, "
                        "or use a new run directory.")
    state.load_state_dict({k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")})
    opt.load_state_dict(_unflatten_optimizer(tensors, meta.pop("optimizer")))
    return meta


# ---------------------------------------------------------------- progress

class _Progress:
    """A rich progress bar (main process only): loss, E[cost] vs budget, lambda_b, tau, ETA."""

    def __init__(self, enabled: bool, total: int, start: int, budget: float):
        self.p = None
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.p = Progress(
            TextColumn("[bold]search[/]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("E\\[cost] {task.fields[cost]}/{task.fields[budget]}"),
            TextColumn("λ {task.fields[lam]}"), TextColumn("τ {task.fields[tau]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.p.start()
        self.task = self.p.add_task("search", total=total, completed=start, loss="-", cost="-",
                                    budget=f"{budget:.2f}", lam="-", tau="-")

    def update(self, rec: dict):
        if self.p is not None:
            self.p.update(self.task, completed=rec["step"] + 1, loss=f"{rec['loss']:.3f}",
                          cost=f"{rec['cost']:.3f}", lam=f"{rec['lambda']:.2f}", tau=f"{rec['tau']:.2f}")

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
    1e20 is not an overflow. When clipping, a non-finite element (an overflow in the backward pass of
    the relaxation) is first set to 0 (NaN) or to the largest float of its sign (inf), so it cannot
    turn the state into NaN: the step then moves that element alone, by at most ``max_norm``."""
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
    lam: float
    resumed_from: int | None
    history: list = field(default_factory=list)  # the per-step records of this process's run
    seconds: float = 0.0


def search(model, processor, dataset, space: SearchSpace, settings: SearchSettings, n_text: float,
           out_dir: str | Path | None = None, accelerator=None, resume: bool = False, progress: bool = True,
           stop_after: int | None = None, on_step: Callable[[dict], None] | None = None,
           hard_cost: Callable[[ArchState], float] | None = None) -> SearchResult:
    """Run the search and return the trained state. ``out_dir``: where the log and checkpoints go
    (None: nothing is written). ``stop_after``: stop after that many steps in total (simulates an
    interruption; tests). ``hard_cost``: optional callable giving the current argmax plan's cost
    (logged as ``cost_argmax``). The backbone is frozen here (requires_grad False)."""
    procs = Procs(accelerator)
    model.requires_grad_(False)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    text_config = model.config.text_config
    torch.manual_seed(settings.seed)
    state = ArchState(space).to(device)
    if settings.init_keep is None:
        init_keep_for_budget(state, text_config, n_text, settings.budget,
                             tau_at(settings, 0) if settings.anneal_cost else 1.0)
    else:
        state.set_init_keep(settings.init_keep)
    opt = torch.optim.Adam(state.parameters(), lr=settings.lr)
    key = settings.key(space, n_text, len(dataset))
    out = Path(out_dir) if out_dir is not None else None
    start, lam, last_loss, resumed = 0, float(settings.lambda_init), None, None
    if resume and out is not None:
        meta = load_checkpoint(out, state, opt, key)
        if meta is not None:
            start, lam, last_loss, resumed = int(meta["step"]), float(meta["lambda"]), meta.get("final_loss"), int(meta["step"])
    log_path = out / LOG_NAME if out is not None else None
    if out is not None and procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if procs.is_main and log_path is not None:
        if start > 0:
            _truncate_log(log_path, start)
        elif log_path.exists():
            log_path.unlink()
    batches = Batches(dataset, processor, settings.batch_size, settings.seed, procs.rank, procs.world)
    end = settings.steps if stop_after is None else min(settings.steps, stop_after)
    bar = _Progress(progress and procs.is_main and end > start, settings.steps, start, settings.budget)
    history, t0 = [], time.time()
    current, last_ckpt = start, resumed  # for the messages of an interruption or a numerical fault
    try:
        for step in range(start, end):
            current = step
            ts = time.time()
            tau = tau_at(settings, step)
            sample = state.sample(step, tau, settings.seed, noise=settings.gumbel, hard=settings.straight_through)
            sites = build_sites(state, sample, skip_identity=True)
            batch = batches.get(step)
            if batch is None:  # every image of this share failed to decode: contribute nothing
                ce = kl = acc = torch.zeros((), device=device)
                task = torch.zeros((), device=device)
            else:
                losses = answer_losses(model, to_device(batch, device, dtype), sites, settings.kl_weight)
                ce, kl, acc = losses["ce"], losses["kl"], losses["acc"]
                task = ce + settings.kl_weight * kl
            cost = expected_cost_ratio(state, text_config, n_text, temperature=tau if settings.anneal_cost else 1.0)
            active = step >= settings.warmup_steps
            over = torch.relu(cost - settings.budget)
            penalty = lam * over ** 2 if active else torch.zeros((), device=device)
            loss = task + penalty
            opt.zero_grad(set_to_none=False)
            if loss.requires_grad:  # every site an identity this step and no budget term: nothing to learn
                loss.backward()
            for p in state.parameters():  # same shapes on every process, even for unused knobs
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in state.parameters()]
            scalars = torch.stack([ce.detach(), kl.detach(), acc.detach()]).float()
            procs.mean_(grads + [scalars])
            grad_norm, grad_bad = clip_grads_(grads, settings.grad_clip)  # after the all-reduce: same everywhere
            for what, value in (("task loss", float(scalars[0] + settings.kl_weight * scalars[1])),
                                ("budget penalty", float(penalty.detach())), ("expected cost", float(cost.detach())),
                                ("architecture-state gradient", grad_norm)):
                if not math.isfinite(value):
                    raise _numerical_error(what, value, step, settings, out, last_ckpt)
            opt.step()
            bad = [p.detach()[~torch.isfinite(p)] for p in state.parameters() if not bool(torch.isfinite(p).all())]
            if bad:
                raise _numerical_error("architecture state", float(bad[0][0]), step, settings, out, last_ckpt)
            ce_v, kl_v, acc_v = scalars.tolist()
            cost_v = float(cost.detach())
            with torch.no_grad():  # the relaxation gap, logged: E[cost] at T=1 and the argmax plan's cost
                cost_p = float(expected_cost_ratio(state, text_config, n_text))
            cost_hard = hard_cost(state) if hard_cost is not None else None
            loss_v = ce_v + settings.kl_weight * kl_v + (lam * max(0.0, cost_v - settings.budget) ** 2 if active else 0.0)
            rec = {"step": step, "loss": loss_v, "ce": ce_v, "kl": kl_v, "penalty": float(penalty.detach()),
                   "cost": cost_v, "cost_t1": cost_p, "cost_argmax": cost_hard, "budget": settings.budget,
                   "lambda": lam, "tau": tau, "train_acc": acc_v, "grad_norm": grad_norm, "grad_nonfinite": grad_bad,
                   "step_s": round(time.time() - ts, 4)}
            if active:  # dual ascent on the budget multiplier while the constraint is violated
                lam = lam + settings.dual_lr * max(0.0, cost_v - settings.budget)
            last_loss = loss_v
            history.append(rec)
            if procs.is_main:
                if log_path is not None:
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.update(rec)
            if on_step is not None:
                on_step(rec)
            done = step + 1
            if out is not None and procs.is_main and (done % settings.checkpoint_every == 0 or done == settings.steps):
                save_checkpoint(out, state, opt, {"step": done, "lambda": lam, "final_loss": last_loss, "key": key,
                                                  "space": space.to_dict(), "settings": asdict(settings)})
                last_ckpt = done
    except KeyboardInterrupt:
        ck = f"last checkpoint: step {last_ckpt}" if last_ckpt else "no checkpoint yet"
        raise Interrupted(f"at step {current} of {settings.steps} ({ck})") from None
    finally:
        bar.close()
    procs.wait()
    return SearchResult(state=state, steps=end, final_loss=last_loss, lam=lam, resumed_from=resumed,
                        history=history, seconds=time.time() - t0)


# ---------------------------------------------------------------- validation (model selection)

@torch.no_grad()
def plan_scores(model, processor, plan, dataset, batch_size: int = 32, procs: Procs | None = None) -> dict:
    """Teacher-forced scores of a hard plan on ``dataset``: ``accuracy`` (a question counts when
    every answer token and the eos are the argmax: exactly when greedy decoding produces the
    answer, for answers that are whole tokens) and ``ce`` (mean answer-token cross-entropy). One
    reduced forward per batch, no generation: cheap enough to compare candidate plans."""
    from ..data.datasets import make_train_batch
    from ..patch.llava import apply_plan

    procs = procs or Procs()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    fwd = apply_plan(model, plan) if plan is not None and plan.sites else model
    rows = list(range(len(dataset)))[procs.rank::procs.world]
    tally = torch.zeros(4, dtype=torch.float64)  # right, questions, summed CE, answer tokens
    for s in range(0, len(rows), batch_size):
        recs, imgs = dataset.batch(rows[s:s + batch_size])
        if not recs:
            continue
        b = to_device(make_train_batch(processor, recs, imgs), device, dtype)
        labels = b.pop("labels")
        query = b.pop("query_index")  # attn scores from the last prompt token, as in generation
        if fwd is not model:
            b["query_index"] = query
        width = int((labels != -100).sum(1).max()) + 1
        logits = fwd(**b, logits_to_keep=width).logits[:, :-1].float()
        ce_sum, n_tokens, ok = answer_terms(logits, labels[:, -width + 1:])
        tally += torch.tensor([float(ok.sum()), float(ok.numel()), float(ce_sum), float(n_tokens)],
                              dtype=torch.float64)
    procs.mean_([tally])
    return {"accuracy": float(tally[0] / tally[1].clamp_min(1)), "ce": float(tally[2] / tally[3].clamp_min(1)),
            "n": int(round(float(tally[1]) * procs.world))}
