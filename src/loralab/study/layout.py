"""How a study uses one machine: how many worker processes, how many threads each.

A study is many independent runs, so runs finished per hour is what counts. Measured on 2 cores:
two 1-thread processes give 1.9× the total throughput of one 2-thread process on issue 16's
model-shaped block (bf16, AMX), and 1.27× on a real SST-2 LoRA study (`--workers auto` against
`--workers 1`, AMX Xeon, 2026-12-03), where a point's steps scale better across threads; two
2-thread processes oversubscribe the cores and run ~4.7× slower each. So on a CPU `auto` is one
1-thread worker per core (never slower in total); a GPU machine runs one worker per visible
GPU. `benchmarks/study_throughput.py` measures the layouts on the machine at hand.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from ..errors import LoralabError
from ..summary import ENV_WORKERS  # set in each worker: how many run side by side

ENV_DEFAULT = "LORALAB_STUDY_WORKERS"  # the default of `--workers` (e.g. 1 in the tests)


def choose(workers: str | int | None = None, cores: int | None = None) -> tuple[int, int]:
    """(worker processes, threads per worker) for `--workers` = auto | N."""
    import torch

    cores = cores or os.cpu_count() or 1
    workers = workers if workers is not None else os.environ.get(ENV_DEFAULT, "auto")
    if str(workers) == "auto":
        if torch.cuda.is_available():
            return torch.cuda.device_count(), max(1, cores // torch.cuda.device_count())
        return cores, 1
    try:
        n = int(workers)
    except ValueError:
        n = 0
    if n < 1:
        raise LoralabError(
            f"--workers must be 'auto' or a whole number ≥ 1, got {workers!r}: 'auto' runs one "
            "1-thread worker per core on a CPU."
        )
    return n, max(1, cores // n)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def gpu_for_workers(workers: int, visible: str | None = None, count: int = 0) -> list[str | None]:
    """The GPU each worker is pinned to (`CUDA_VISIBLE_DEVICES`), round-robin over the visible
    ones (`visible`: that variable's value, else devices 0..count-1); None without GPUs."""
    ids = [d for d in (visible or "").split(",") if d.strip()] or [str(i) for i in range(count)]
    return [ids[i % len(ids)] if ids else None for i in range(workers)]


def argv_with(argv: list[str], flag: str, value: str) -> list[str]:
    """`argv` with `flag` set to `value` (replaced if present)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return [*out, flag, value]


def spawn_siblings(argv: list[str], workers: int, threads: int) -> list[subprocess.Popen]:
    """Start `workers - 1` more `loralab` processes with `argv` (at `--workers 1`), each with
    `threads` threads and, on a GPU machine, its own GPU (so one machine runs several points
    side by side).

    This process becomes the first worker: it gets the same thread count. Siblings die with it.
    """
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = gpu_for_workers(workers, os.environ.get("CUDA_VISIBLE_DEVICES"), count)
    env = {**os.environ, ENV_WORKERS: str(workers), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), ENV_DEFAULT: "1"}  # fmt: skip
    os.environ[ENV_WORKERS] = str(workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the point processes this worker starts
    if gpus[0] is not None:  # the point processes this worker starts use the first GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
    torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "loralab.cli", *argv_with(argv, "--workers", "1")]
    kw = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
    return [
        subprocess.Popen(cmd, env={**env, **({"CUDA_VISIBLE_DEVICES": g} if g else {})}, **kw)
        for g in gpus[1:]
    ]


@contextlib.contextmanager
def stopping_siblings(siblings: list[subprocess.Popen], grace_s: float = 120.0):
    """Stop `siblings` as this worker stops when its body raises (SIGTERM, Ctrl-C, an error):
    each gets SIGTERM, so it hands its running point back at once, and up to `grace_s` in all to
    exit; one still running then dies with this process (`_die_with_parent`). A `kill PID` of
    the first worker otherwise reached only it, and the siblings' points waited out the grace."""
    try:
        yield
    except BaseException:
        for p in siblings:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace_s
        for p in siblings:
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        raise
