"""Memory-aware claiming: a worker starts a point only if it fits in RAM beside the running ones.

A study on a small machine runs one worker per core, and two runs of a long-sequence task can
need more memory together than the machine has: SmolLM2-135M keeps ~3.6 GB for the backward
pass under LoRA at 16 × 256 tokens (RTE's longest batches) and ~6.6 GB at 16 × 384 (SQuAD v2),
and the process's peak is ~1.4× what it keeps (glibc malloc; ~23% less under tcmalloc, see
`loralab.allocator`). The kernel's OOM killer then ends one of them.

So each running point reserves its predicted peak: the largest `peak_memory_mb` among finished
points with its task and method (in any study of the storage; only those run under this worker's
heap allocator, `loralab.allocator`, where there are some), plus a margin. Where its task has
finished points of the other method only, that method's peak stands in (`predict`): LoRA needs
no more than full fine-tuning of the same batches, and full fine-tuning needs LoRA's peak times
the largest full/LoRA ratio among tasks with both (1.4-1.7 for SmolLM2-135M; SQuAD v2 full
fine-tuning predicted at 15.0 GB from LoRA's 8.7 peaked at 12.9). A point with nothing to
predict it from reserves the whole budget, unless this machine has run its configuration
before: a finished point's peak is also kept in `$LORALAB_CACHE/study-peaks.json`, by its config
without the learning rate, seed and output paths (`grid.memory_key`), with this machine's CPU, heap
allocator and torch version, so a new study's first points start side by side where an earlier
study measured them (a measured peak of the storage's own comes first, then this record, then
a prediction from the other method). A worker claims a waiting point only when that
point's reservation fits in the budget beside the reservations of the points running on this
host; when nothing runs here, any point starts. Budget: `LORALAB_MEMORY_BUDGET_MB`, else 90% of
the machine's RAM or of a container's memory limit; `LORALAB_MEMORY_BUDGET_MB=0` turns the
check off. Workers pinned to a GPU (`CUDA_VISIBLE_DEVICES`, as `--workers auto` pins them) do
not check unless the budget is set: their runs record GPU memory as their peak.
"""

from __future__ import annotations

import os
import socket
import weakref
from pathlib import Path

from .. import allocator, probecache
from ..errors import LoralabError
from .leases import fail_dead
from .storage import is_final

BUDGET_ENV = "LORALAB_MEMORY_BUDGET_MB"
MARGIN = 1.15  # peaks of one task and method vary between runs (e.g. 9.9 vs 10.2 GB on RTE)
MACHINE_FILE = "study-peaks.json"  # in $LORALAB_CACHE: this machine's finished points' peaks


def budget_mb() -> float | None:
    """MB that running points may take together on this host; None: no limit."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise LoralabError(
                f"{BUDGET_ENV}={raw!r} is not a number: give the MB that a study's running "
                "points may use together on this machine, or 0 to turn the check off."
            ) from None
        return value if value > 0 else None
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"):
        return None  # a worker pinned to a GPU: its runs' recorded peaks are GPU memory
    try:
        with open("/proc/meminfo") as f:
            total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        return None  # not Linux: no check
    return 0.9 * min(total_kb * 1024, _cgroup_limit()) / 2**20


def _cgroup_limit() -> float:
    """A container's memory limit in bytes (cgroup v2 or v1), or infinity."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                return float(f.read().strip())  # "max" (no limit) is not a number
        except (OSError, ValueError):
            continue
    return float("inf")


def history(trials, allocator: str | None = None) -> dict[tuple[str, str], float]:
    """(task, method) -> the largest peak_memory_mb of finished trials' results; where some of
    them ran under `allocator` (this worker's, `loralab.allocator`), only those count: the
    allocator alone moves a peak by ~25%."""
    every: dict[tuple[str, str], float] = {}
    same: dict[tuple[str, str], float] = {}
    for t in trials:
        rec = t.user_attrs.get("result") or {}
        peak, task, method = rec.get("peak_memory_mb"), rec.get("task"), rec.get("method")
        if isinstance(peak, (int, float)) and task and method:
            every[task, method] = max(peak, every.get((task, method), 0.0))
            if allocator is not None and rec.get("allocator") == allocator:
                same[task, method] = max(peak, same.get((task, method), 0.0))
    return {**every, **same}


class Peaks(dict):
    """(task, method) -> MB, as `history` and `predict` make it; `predicted` holds the keys
    inferred from the other method rather than measured."""

    predicted: frozenset = frozenset()
    machine: dict = {}  # this machine's record by configuration (`recorded`)


def predict(peaks: dict[tuple[str, str], float]) -> Peaks:
    """`peaks` plus a prediction for each task with finished points of one method only.

    LoRA's peak is at most full fine-tuning's on the same batches (the frozen base keeps no
    gradients, optimiser states or inputs of frozen layers): full's stands in for it. Full
    fine-tuning's is LoRA's times the largest full/LoRA ratio among the tasks that have both
    (the ratio is largest where the fixed optimiser state dominates, so the largest one is the
    safe side); without such a task it stays unknown.
    """
    ratios = [
        peaks[task, "full"] / peak
        for (task, method), peak in peaks.items()
        if method == "lora" and peak > 0 and (task, "full") in peaks
    ]
    out = Peaks(peaks)
    for (task, method), peak in peaks.items():
        if method == "full" and (task, "lora") not in peaks:
            out[task, "lora"] = peak
        elif method == "lora" and (task, "full") not in peaks and ratios:
            out[task, "full"] = peak * max(ratios)
    out.predicted = frozenset(out.keys() - peaks.keys())
    return out


def _peak(attrs: dict, peaks: dict, machine: dict | None) -> tuple[float | None, str | None]:
    """(peak MB, where from) of a point with these trial user attrs (task, method, memory_key):
    its task and method's measured peak in the storage ("measured"), else this machine's record
    of its configuration ("machine": `recorded()`), else the other method's prediction
    ("predicted"); (None, None): unknown (also for a trial enqueued before points carried their
    method)."""
    key = (attrs.get("task"), attrs.get("method"))
    predicted = key in getattr(peaks, "predicted", ())
    if key in peaks and not predicted:
        return peaks[key], "measured"
    local = (machine or {}).get(_local(attrs["memory_key"])) if attrs.get("memory_key") else None
    if local is not None:
        return local, "machine"
    return (peaks[key], "predicted") if predicted else (None, None)


def reservation(attrs: dict, peaks: dict, machine: dict | None = None) -> float | None:
    """The MB a point with these trial user attrs reserves (`_peak` with the margin); None:
    unknown, i.e. all of the budget."""
    peak, _ = _peak(attrs, peaks, machine)
    return None if peak is None else MARGIN * peak


def _local(key: str) -> str:
    """`key` on this machine: the CPU, the heap allocator and torch move a peak too."""
    import torch

    return f"{key} {probecache.machine()} {allocator.current()} torch {torch.__version__}"


def recorded() -> dict[str, float]:
    """This machine's record: `_local(memory_key)` -> the largest peak MB measured."""
    return {k: v["peak_mb"] for k, v in probecache.read(MACHINE_FILE).items()
            if isinstance(v, dict) and isinstance(v.get("peak_mb"), (int, float))}  # fmt: skip


def remember(attrs: dict, result: dict | None) -> None:
    """Keep a finished point's measured peak in this machine's record (where its trial carries
    a `memory_key`, and the point ran on this host); a failed write only loses the hint."""
    peak = (result or {}).get("peak_memory_mb")
    if not attrs.get("memory_key") or not isinstance(peak, (int, float)) or peak <= 0:
        return
    key = _local(attrs["memory_key"])
    before = recorded().get(key, 0.0)
    if peak > before:
        probecache.store(MACHINE_FILE, key, {"peak_mb": float(peak), "task": attrs.get("task"),
                                             "method": attrs.get("method")})  # fmt: skip


def on_this_host(attrs: dict) -> bool:
    """A running trial whose worker has not said where it runs counts as here."""
    host = (attrs.get("worker") or {}).get("host")
    return host is None or host == socket.gethostname()


def fits(need: float | None, reserved: list[float | None], budget: float | None) -> bool:
    """Whether a point reserving `need` MB may start beside running points reserving
    `reserved` (None: unknown, i.e. all of it)."""
    if budget is None or not reserved:
        return True
    if need is None or any(r is None for r in reserved):
        return False
    return need + sum(reserved) <= budget


def describe(
    need: float | None,
    reserved: list[float | None],
    budget: float,
    source: str | None = None,
    lead: str = "waits for memory",
) -> str:
    """Why a point waits, for the worker's log (`source`: where `need` comes from, `_peak`;
    `lead` opens the sentence)."""
    gb = lambda mb: f"{mb / 1024:.1f} GB"  # noqa: E731
    need_s = gb(need) if need is not None else "an unknown amount (no finished run like it yet)"
    if source == "predicted" and need is not None:
        need_s += " (predicted from its task's runs of the other method)"
    elif source == "machine" and need is not None:
        need_s += " (as its configuration peaked in an earlier study on this machine)"
    known = [r for r in reserved if r is not None]
    parts = [f"{len(known)} holding {gb(sum(known))}"] if known else []
    if len(known) < len(reserved):
        parts.append(f"{len(reserved) - len(known)} of unknown size")
    held = f"{len(reserved)} point(s) running here ({', '.join(parts)})"
    return (f"{lead}: it needs {need_s}, {held}, budget {gb(budget)} "
            f"({BUDGET_ENV} sets it; 0 turns the check off)")  # fmt: skip


def state(storage, locks: Path | None = None) -> tuple[dict, list]:
    """Finished peaks per (task, method) in every study of the storage, and the reservations
    of the points running on this host. `locks` (the results folder's point locks): first fail
    the points of dead workers (`leases.fail_dead`), which then hold nothing; None for readers
    that must change nothing (`--status`)."""
    from optuna.trial import TrialState

    trials = []
    for study in _studies(storage):
        if locks is not None:  # a dead worker's point (in any study, e.g. an earlier spec's)
            fail_dead(storage, study, locks)
        trials += study.get_trials(deepcopy=False)
    peaks = predict(history((t for t in trials if is_final(t)), allocator.current()))
    peaks.machine = recorded()
    running = [
        t.user_attrs
        for t in trials
        if t.state == TrialState.RUNNING and "point" in t.user_attrs and on_this_host(t.user_attrs)
    ]  # fmt: skip
    return peaks, [reservation(a, peaks, peaks.machine) for a in running]


_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> {name: Study}


def _studies(storage) -> list:
    """Every study of the storage, as Study objects kept between calls: a Study keeps the
    trials it has seen finished (Optuna's cached storage) and re-reads only the others, so a
    worker that polls while it waits for memory does not reload a long history (0.3 s a poll
    with 22 studies) every few seconds."""
    import optuna

    loaded = _LOADED.setdefault(storage, {})
    names = [s.study_name for s in storage.get_all_studies()]
    for name in loaded.keys() - set(names):  # deleted meanwhile
        del loaded[name]
    for name in names:
        if name not in loaded:
            loaded[name] = optuna.load_study(study_name=name, storage=storage)
    return [loaded[name] for name in names]


def why_waits(
    attrs: dict, peaks: dict, reserved: list, budget: float | None, lead: str = "waits for memory"
) -> str | None:
    """Why a point with these trial user attrs (task, method, memory_key) may not start beside
    the running points' `reserved` MB (`describe`'s sentence, opened by `lead`), or None."""
    peak, source = _peak(attrs, peaks, getattr(peaks, "machine", {}))
    need = None if peak is None else MARGIN * peak
    if fits(need, reserved, budget):
        return None
    return describe(need, reserved, budget, source, lead)


def waits(worker, attrs: dict, peaks: dict, reserved: list, budget: float | None) -> bool:
    """Whether the waiting point with these trial user attrs must wait for memory; the worker
    (a `worker.Worker`: its plan's `points`, `say`, `said_waits`) says why, once per point."""
    point = worker.points.get(attrs["point"], {})  # the worker's own plan
    method = attrs.get("method") or point.get("method")
    why = why_waits({**attrs, "method": method}, peaks, reserved, budget)
    if why is None:
        return False
    if attrs["point"] not in worker.said_waits:
        worker.said_waits.add(attrs["point"])
        worker.say(f"{attrs['point']} {why}")
    return True
