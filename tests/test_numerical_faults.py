"""Numerical faults: a NaN or inf stops the search, naming the step and what to change.

A NaN task loss or an inf architecture state stops the search (in Python: NumericalError; from the
command line: one message, exit code 2, no plan.json) and keeps the last good checkpoint; architecture
gradients are clipped by default, which also absorbs an inf gradient (with clipping off, it stops the
search). Models are the tiny random-weight LLaVAs of the real classes."""
from __future__ import annotations

import json
import math

import pytest
import torch

from diffopsearch.errors import NumericalError
from diffopsearch.search import checkpoint as ck
from diffopsearch.search import loop
from fixtures import SEARCH_ARGS, cli_message, run_cli, run_search


pytestmark = pytest.mark.usefixtures("clean_cli_env")  # tests/conftest.py


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, tiny4, world_train):
    model, proc = tiny4
    _nan_loss_at_step(monkeypatch, 3)
    with pytest.raises(NumericalError) as e:
        run_search(model, proc, world_train, tmp_path)
    msg = str(e.value)
    assert "stopped at step 3" in msg and "task loss is nan" in msg
    assert "last good checkpoint (step 2)" in msg and "search.lr=0.1" in msg and "search.grad_clip=" in msg
    from safetensors.torch import load_file

    assert json.loads((tmp_path / ck.CKPT_DIR / ck.CKPT_META).read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / ck.CKPT_DIR / ck.CKPT_TENSORS).values())
    assert [json.loads(x)["step"] for x in (tmp_path / loop.LOG_NAME).read_text().splitlines()] == [0, 1, 2]


def test_an_inf_in_the_architecture_state_stops_the_search(tmp_path, monkeypatch, tiny4, world_train):
    model, proc = tiny4
    real, calls = torch.optim.Adam.step, []

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    with pytest.raises(NumericalError, match=r"stopped at step 1: the architecture state is inf.*no checkpoint"):
        run_search(model, proc, world_train, tmp_path)


def _nan_loss_at_step(monkeypatch, step):
    """Every plan loss of search step ``step`` is NaN (the loop computes one reference per step)."""
    real_ref, real_loss, steps = loop.reference_logprobs, loop.plan_losses, []

    def counting(*a, **k):
        steps.append(1)
        return real_ref(*a, **k)

    def poisoned(*a, **k):
        out = real_loss(*a, **k)
        return out * float("nan") if len(steps) == step + 1 else out

    monkeypatch.setattr(loop, "reference_logprobs", counting)
    monkeypatch.setattr(loop, "plan_losses", poisoned)


def test_a_nan_search_from_the_command_line_is_one_message_exit_2(capsys, monkeypatch, tmp_path, assets):
    _nan_loss_at_step(monkeypatch, 0)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "search", *SEARCH_ARGS, f"model.path={assets.model}",
                           f"dataset.path={assets.world}", f"hydra.run.dir={run}")
    assert code == 2 and "Traceback" not in err
    line = cli_message(err)
    assert "stopped at step 0: the task loss is nan" in line and "search.lr=" in line and "search.grad_clip=" in line
    assert not (run / "plan.json").exists()


def test_architecture_gradients_are_clipped_by_default(tmp_path, monkeypatch, tiny4, world_train):
    from diffopsearch.config import compose

    assert loop.SearchSettings().grad_clip == compose("search").search.grad_clip > 0
    g = [torch.tensor([3e20, 4e20]), torch.tensor([0.0])]  # float32 squares overflow; the float64 sum does not
    assert loop.clip_grads_(g, 1.0) == (pytest.approx(5e20), 0)
    assert torch.allclose(torch.cat(g), torch.tensor([0.6, 0.8, 0.0]))
    g = [torch.tensor([float("inf"), 0.5]), torch.tensor([float("nan")])]  # an overflow in the backward pass
    norm, bad = loop.clip_grads_(g, 1.0)
    assert bad == 2 and math.isfinite(norm) and torch.allclose(torch.cat(g), torch.tensor([1.0, 0.0, 0.0]), atol=1e-30)
    g = [torch.tensor([float("inf"), 0.5])]
    assert loop.clip_grads_(g, 0.0) == (float("inf"), 1) and g[0][1] == 0.5  # not clipping: left alone, reported
    # in the loop: the update sees the clipped gradient, the log the norm before clipping
    model, proc = tiny4
    real, norms = torch.optim.Adam.step, []

    def spy(self, *a, **k):
        norms.append(float(torch.cat([p.grad.reshape(-1) for p in self.param_groups[0]["params"]]).norm()))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    res = run_search(model, proc, world_train, None, grad_clip=1e-4, steps=3)
    logged = [r["grad_norm"] for r in res.history]
    assert max(logged) > 1e-4 and all(n <= 1e-4 * (1 + 1e-4) for n in norms)


def test_an_inf_gradient_is_clipped_and_stops_the_search_only_with_clipping_off(monkeypatch, tiny4, world_train):
    model, proc = tiny4
    real, calls = loop.Procs.mean_, []

    def overflow_at_step_1(self, tensors):
        real(self, tensors)
        calls.append(1)
        if len(calls) == 4:  # per step: the plans' losses, then the gradients; this is step 1's gradients
            tensors[0].view(-1)[0] = float("inf")  # the first architecture gradient (the policy's logits)

    monkeypatch.setattr(loop.Procs, "mean_", overflow_at_step_1)
    res = run_search(model, proc, world_train, None, steps=2)
    assert [r["grad_nonfinite"] for r in res.history] == [0, 1]
    assert all(torch.isfinite(p).all() for p in res.state.parameters())
    calls.clear()
    with pytest.raises(NumericalError, match=r"stopped at step 1: the architecture-state gradient is inf.*"
                                             r"search.grad_clip=0 \(off\)"):
        run_search(model, proc, world_train, None, steps=2, grad_clip=0.0)
