"""Processes, devices and synchronisation: the few Accelerate and device calls that evaluation, the search
and the integrations share (one place; no module reaches into another's private helpers)."""
from __future__ import annotations

from typing import Sequence


class Procs:
    """Rank / world / collectives through Accelerate, or a single plain process without an accelerator."""

    def __init__(self, accelerator=None):
        self.acc = accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.is_main = self.rank == 0

    def mean_(self, tensors: Sequence) -> None:
        """In-place average over processes (the search's gradients and losses, plan scores)."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        o = 0
        for t in tensors:
            t.copy_(flat[o:o + t.numel()].view_as(t))
            o += t.numel()

    def gather(self, items: list) -> list:
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box)
        return box[0]

    def wait(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    def main_first(self, load):
        """``load()`` on the main process, then on the others: processes that build the same `datasets`
        cache at once race on it, so the main one builds it and the others read it. If the main process
        fails, the others stop too instead of waiting for it."""
        if self.world == 1:
            return load()
        out = None
        if self.is_main:
            try:
                out = load()
            except BaseException:
                self.broadcast(True)
                raise
        if self.broadcast(False):  # the main process's flag; also the barrier the others wait at
            from .errors import UserError

            raise UserError("the main process could not load the data (its error says why); this process stops too.")
        return out if self.is_main else load()


def device_of(model):
    """The device a model (or a wrapper exposing ``.device``) runs on."""
    import torch

    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


def sync(device) -> None:
    """Wait for queued GPU work (timings); a no-op on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(inputs: dict, device, dtype) -> dict:
    """Tensors of a batch onto ``device``; pixel values also into the model's dtype."""
    out = {}
    for k, v in inputs.items():
        if hasattr(v, "to"):
            v = v.to(device)
            if k == "pixel_values" and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


_CLOSED_A_GROUP = False


def close_process_group() -> bool:
    """Tear down the torch.distributed process group a multi-process run set up (a no-op otherwise);
    True if there was one. torch asks for this call before exit."""
    global _CLOSED_A_GROUP
    import sys

    if "torch.distributed" not in sys.modules:  # nothing was set up: do not import torch for it
        return False
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _CLOSED_A_GROUP = True
        return True
    return False


def exit_process(code: int):
    """Exit with ``code``; after a multi-process run, without the interpreter's finalization. gloo's run-loop
    threads can still be releasing the last collective's tensors then (destroy_process_group does not
    always stop them: something inside torch keeps the group alive), and a thread that needs the GIL during
    finalization aborts the whole process ("terminate called without an active exception", SIGABRT;
    pytorch/pytorch#179291), which the launcher reports as a failed run. Everything is written by now:
    streams and logging are flushed first."""
    import os
    import sys

    if close_process_group() or _CLOSED_A_GROUP:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def make_accelerator(device: str = "auto"):
    """The Accelerator of a run (``device``: auto | cpu | cuda). On a machine without CUDA it must be told
    ``cpu=True``: otherwise, started by torchrun / ``accelerate launch --multi_gpu``, every process
    believes it is alone (DistributedType.NO) and each one does everything."""
    import os

    import torch
    from accelerate import Accelerator

    from .errors import UserError

    acc = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and acc.num_processes != world:
        raise UserError(f"{world} processes were launched but Accelerate set up {acc.num_processes}: start "
                        "multi-process runs with `accelerate launch --multi_gpu --num_processes N` "
                        "(on CPU too) or torchrun.")
    return acc
