"""Several processes training one run (`torchrun` / `accelerate launch`): who writes, and the
few values the processes agree on. One process (rank 0) owns the run folder; the others train
and evaluate beside it. Every function is a no-op in a single process."""

from __future__ import annotations

import atexit
import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in the process that writes the run folder (always, without a launcher)."""
    return rank() == 0


def _active() -> bool:
    return world_size() > 1 and torch.distributed.is_available()


def init() -> None:
    """Join the launcher's process group (gloo on CPUs, NCCL on GPUs) before any collective."""
    if _active() and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # Left to interpreter teardown, gloo's worker threads can free tensors after Python is
        # gone and abort the rank ("terminate called without an active exception", SIGABRT).
        atexit.register(leave)


def leave() -> None:
    """Leave the process group (a no-op when none was joined or it was already left)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def broadcast(value):
    """Rank 0's `value` in every process (any picklable object)."""
    if not _active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def total(values: list[float]) -> list[float]:
    """Element-wise sums over all processes (float64)."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def barrier() -> None:
    """Wait until every process gets here (e.g. rank 0 finished writing)."""
    if _active():
        torch.distributed.barrier()


def main_first(fn):
    """`fn()` in rank 0 first, then in the others (e.g. building a cached model once)."""
    if is_main():
        out = fn()
        barrier()
        return out
    barrier()
    return fn()
