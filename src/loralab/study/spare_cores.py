"""Idle cores lent to a running point: a study worker's run takes the cores nobody else uses.

A study on a CPU runs one 1-thread worker per core (`layout`), but not always with every worker
busy: a point too large to run beside another (`memory`), the last point of a phase, a worker
that has finished its tasks. Then a core idles while the running point trains on one thread. On
an AMD EPYC (bf16, `benchmarks/spare_cores.py`) a second thread took a SmolLM2-135M LoRA step on
16 × 384 tokens from 28.8 to 19.8 s and a full fine-tuning step on 16 × 256 from 30.7 to 15.6 s.

So a study's training process measures, every `INTERVAL_S` seconds at a step boundary, how
much CPU the other processes of the machine used (`/proc/stat` minus its own CPU time) and
takes `threads_for(...)` threads: the cores the others leave idle, never fewer than it started
with (and no more where its steps are shorter than `MIN_STEP_S`: there threads only add
overhead). When another worker starts training again, the next sample sees it and the run gives
the core back. The summary's `layout` records the most threads used and the share of training
and evaluation time run with more than the worker's own (`lent_share`): a lent run takes less
wall time and more CPU time (two threads do not halve a step), and the report warns where one
method's runs were lent cores and the other's not (`caveats.lent_warnings`). Results are the
same up to float rounding (thread count changes how matrix products split their sums).
`LORALAB_LEND_CORES=0` turns it off.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from transformers import TrainerCallback

from .progress import LENT_LOG

ENV = "LORALAB_LEND_CORES"
INTERVAL_S = 10.0  # long enough that a short burst (a git command) does not count
SLACK = 0.3  # others' use below 0.3 core leaves that core idle (pollers, the worker itself)
# Below this many seconds per step a second thread only adds overhead: a tiny test model's 0.06 s
# step ran 0.91x as fast on two threads; SmolLM2-135M's smallest (16 x 16 tokens, 1.2 s) 1.35x.
MIN_STEP_S = 0.5


def threads_for(base: int, cores: int, others: float) -> int:
    """Threads to run with: the cores that processes other than this one leave idle (`others`:
    cores' worth of CPU they used lately), at least `base` (the worker's own share)."""
    return max(base, min(cores, int(cores - others + SLACK)))


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy since boot (/proc/stat), None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def usable_cores(root: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota
    (cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; threads beyond a quota only queue)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = None
    for files in (("cpu.max",), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            text = " ".join(Path(root, f).read_text() for f in files).split()
            quota = float(text[0]) / float(text[1])  # "max": no quota; -1: none (v1)
            break
        except (OSError, ValueError, IndexError):
            continue
    if quota is not None and quota > 0:
        cores = min(cores or 1, max(1, int(quota)))
    return cores or 1


class SpareCores(TrainerCallback):
    """Set torch's thread count at step boundaries to the idle cores (see the module doc).

    `busy`, `own` and `clock` are the machine's busy CPU seconds, this process's CPU seconds and
    a wall clock (injected in tests); `say` gets a line at each change (the point's log)."""

    def __init__(self, base: int, cores: int, busy=machine_busy_s, own=time.process_time,
                 clock=time.monotonic, interval: float = INTERVAL_S, say=None):  # fmt: skip
        self.base, self.cores, self.threads, self.say = base, cores, base, say
        self.busy, self.own, self.clock, self.interval = busy, own, clock, interval
        self.last = (self.clock(), self.busy(), self.own())
        self.ran = {False: 0.0, True: 0.0}  # wall seconds at base / with lent threads
        self.calls = 0  # steps (training and prediction) since the last decision
        self.most = base

    def check(self) -> None:
        import torch

        self.calls += 1
        now = self.clock()
        then, busy0, own0 = self.last
        if now - then < self.interval:
            return
        busy, own = self.busy(), self.own()
        self.ran[self.threads > self.base] += now - then
        self.last, step_s, self.calls = (now, busy, own), (now - then) / self.calls, 0
        if busy is None or busy0 is None:
            return
        others = max(0.0, (busy - busy0) - (own - own0)) / (now - then)
        threads = threads_for(self.base, self.cores, others) if step_s >= MIN_STEP_S else self.base
        if threads != self.threads:
            torch.set_num_threads(threads)  # on this (the training) thread: OpenMP's is per thread
            if self.say is not None:
                why = "idle cores lent" if threads > self.base else "cores given back"
                self.say(f"{threads} threads ({why}; others used {others:.1f} cores)")
            self.threads, self.most = threads, max(self.most, threads)

    def on_step_begin(self, args, state, control, **kwargs):
        self.check()

    def on_prediction_step(self, args, state, control, **kwargs):
        self.check()

    def layout_record(self) -> dict:
        """This run's lending for its summary's layout (`summary.process_layout` asks)."""
        total = sum(self.ran.values())
        lent = self.ran[True] / total if total else 0.0
        return {"threads": self.base, "threads_max": self.most, "lent_share": lent}


def lender() -> SpareCores | None:
    """A lender for this training process: a CPU run with fewer threads than usable cores,
    unless `LORALAB_LEND_CORES=0`."""
    import torch

    cores, base = usable_cores(), torch.get_num_threads()
    if os.environ.get(ENV, "1") == "0" or torch.cuda.is_available() or base >= cores:
        return None
    return SpareCores(base, cores, say=lambda line: print(LENT_LOG + line, flush=True))
