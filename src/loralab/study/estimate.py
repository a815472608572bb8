"""What one point of a study costs in training CPU time, for `--status` and the running study's
progress line. A (task, method)'s cost is, in order of preference:
  1. the mean training CPU time (`train_cpu_time_s`) of its newest finished points: those that
     started within `RECENT_S` of the newest one (summary.json's `first_step_at`; points that
     do not record it count only when none does). A study outlives code versions and machines
     (SmolLM2's MRPC points cost ~53 training CPU minutes on 2026-12-02, ~19 on 12-04), and
     the next point costs what the latest ones did (a resumed point is dated by its last
     attempt). Given the machine that asks (`here`), those of them run on it; where none was,
     each point's cost times how much slower `here` ran the (task, method)s both machines ran
     in the same window (`machine_ratio`: SmolLM2's SST-2 LoRA points took ~2.6x the training
     CPU on an AMD EPYC that they took on an AMX Xeon);
  2. the CPU time its unfinished points spent up to their checkpoints, scaled to the whole run
     (checkpoints at `MIN_SHARE` of training or more);
  3. the other method's cost on the same task times the mean ratio between the two methods on
     the tasks where both are known from 1 or 2 (full fine-tuning costs a steady multiple of
     LoRA on one model, whatever the task);
  4. a rough one: the same method's cost per character of training text on the other tasks,
     times this task's training text (`training_chars`). It misses what the text's length
     does to attention and the evaluations' cost (SQuAD v2's are large).
A (task, method) with none of these has no cost (its points are counted apart).
"""

from __future__ import annotations

import functools

from ..errors import LoralabError
from ..tasks import get_task

MIN_SHARE = 0.05  # an earlier checkpoint says too little about the whole run's cost
RECENT_S = 86400.0  # finished points this close to the newest one share its code and machine
TEXT_COLUMNS = ("text_a", "text_b", "question", "context")  # the canonical text columns


def point_costs(points, chars: dict[str, float] | None = None, here: str | None = None) -> dict[tuple[str, str], float]:  # fmt: skip
    """{(task, method): training CPU s of one point} from `points`, objects with `task`,
    `method`, `finished`, `cpu_s`, `started_at` (finished; Unix time or None) and `machine`
    (the one it ran on, or None), `resumes_at` and `resumes_cpu_s` (the newest checkpoint's
    share of training and CPU s); `chars`: {task: training text of one run} for the rough
    fourth tier (see `rough`); `here`: the machine the estimate is for (None: any)."""
    done: dict[tuple[str, str], list[tuple[float | None, float, str | None]]] = {}
    partial: dict[tuple[str, str], list[float]] = {}
    for p in points:
        if p.finished and p.cpu_s is not None:
            done.setdefault((p.task, p.method), []).append((p.started_at, p.cpu_s, getattr(p, "machine", None)))  # fmt: skip
        elif p.resumes_cpu_s is not None and (p.resumes_at or 0.0) >= MIN_SHARE:
            partial.setdefault((p.task, p.method), []).append(p.resumes_cpu_s / p.resumes_at)
    known = {k: sum(v) / len(v) for k, v in partial.items()}
    machines = {m for timed in done.values() for _, _, m in timed}
    ratio = {m: machine_ratio(done, here, m) for m in machines}  # once per machine
    for k, timed in done.items():  # finished points win
        recent = newest(timed)  # the newest code; then this machine's points among them
        mine = [c for _, c, m in recent if here is not None and m == here]
        costs = mine or [c * ratio[m] for _, c, m in recent]
        known[k] = sum(costs) / len(costs)
    costs = dict(known)
    tasks, methods = {p.task for p in points}, {p.method for p in points}
    for task, m, o in ((t, m, o) for t in tasks for m in methods for o in methods if o != m):
        both = [t for t in tasks if (t, m) in known and (t, o) in known]
        if (task, m) not in costs and (task, o) in known and both:
            ratio = sum(known[t, m] / known[t, o] for t in both) / len(both)
            costs[task, m] = ratio * known[task, o]
    for (task, m), cost in rough(costs, chars or {}, tasks, methods).items():
        costs.setdefault((task, m), cost)
    return costs


def newest(timed: list[tuple]) -> list[tuple]:
    """The (start time, cost, ...) tuples that started within `RECENT_S` of the newest start;
    all of them when none has a start time."""
    times = [t[0] for t in timed if t[0] is not None]
    if not times:
        return list(timed)
    return [t for t in timed if t[0] is not None and t[0] >= max(times) - RECENT_S]


def wall_per_cpu(points, here: str | None = None) -> float | None:
    """Wall s of training per training CPU s over the newest finished points (`here`'s, where
    it ran any; `points` as for `point_costs`, plus `wall_s`), summed before dividing so that
    a point weighs by its length (a short one paused for an hour does not dominate): above 1
    where workers shared cores, below 1 for points that trained on several threads. None: no
    finished point timed. A study with none yet goes by its unfinished points' checkpoints
    (`resumes_wall_s`, `resumes_cpu_s`: a long first point's pace so far)."""
    timed = [(p.started_at, (p.wall_s, p.cpu_s), p.machine) for p in points
             if p.finished and p.cpu_s and getattr(p, "wall_s", None)]  # fmt: skip
    pairs = newest_here(timed, here) or [
        (w, c) for p in points if not p.finished
        and (w := getattr(p, "resumes_wall_s", None)) and (c := getattr(p, "resumes_cpu_s", None))
    ]  # fmt: skip
    return sum(w for w, _ in pairs) / sum(c for _, c in pairs) if pairs else None


def overheads(points, here: str | None = None) -> dict[tuple[str, str], tuple[float, float]]:
    """{(task, method): (start-up, final evaluation)}: wall s of one point outside training,
    the means over its newest finished points (`here`'s, where it ran any). `points` as for
    `point_costs`, plus `setup_s` (model, data and zero-shot evaluation before the first step;
    known for points trained in one attempt, else None) and `eval_s` (None: unrecorded).
    SQuAD v2's final evaluation is ~10% of a point's wall time; GLUE's start-up a few s."""
    timed: dict[tuple[str, str], list[tuple]] = {}
    for p in points:
        if p.finished and getattr(p, "eval_s", None) is not None:
            timed.setdefault((p.task, p.method), []).append((p.started_at, (p.setup_s, p.eval_s), p.machine))  # fmt: skip
    out = {}
    for key, ts in timed.items():
        pairs = newest_here(ts, here)
        setups = [s for s, _ in pairs if s is not None]
        out[key] = (sum(setups) / len(setups) if setups else 0.0, sum(e for _, e in pairs) / len(pairs))  # fmt: skip
    return out


def newest_here(timed: list[tuple], here: str | None) -> list:
    """The values of (start time, value, machine) tuples among the `newest`: `here`'s where it
    ran any, else every machine's."""
    recent = newest(timed)
    mine = [v for _, v, m in recent if here is not None and m == here]
    return mine or [v for _, v, _ in recent]


def makespan(busy: list[float], queued: list[float]) -> float:
    """Seconds until workers busy for `busy` s each have also run the `queued` jobs (s each),
    every job in order going to the first worker free; 0 with no worker."""
    free = sorted(busy)
    if not free:
        return 0.0
    for cost in queued:  # a list of a few workers: keeping it sorted is as cheap as a heap
        free[0] += cost
        free.sort()
    return free[-1]


def machine_ratio(done: dict, here: str | None, there: str | None) -> float:
    """How many times the training CPU of a point on `there` one on `here` takes: the mean, over
    the (task, method)s both ran among their newest points (one code version), of the ratio of
    their mean costs (1 where unknown)."""
    if here is None or there is None or here == there:
        return 1.0
    ratios = []
    for timed in done.values():
        recent, mean = newest(timed), {}
        for m in (here, there):
            costs = [c for _, c, on in recent if on == m]
            mean[m] = sum(costs) / len(costs) if costs else None
        if mean[here] and mean[there]:
            ratios.append(mean[here] / mean[there])
    return sum(ratios) / len(ratios) if ratios else 1.0


def rough(costs: dict, chars: dict[str, float], tasks, methods) -> dict[tuple[str, str], float]:
    """Tier 4 for the (task, method) pairs `costs` lacks: the method's mean CPU s per character
    of training text over the tasks that have both, times the task's characters."""
    out = {}
    for m in methods:
        rates = [costs[t, m] / chars[t] for t in tasks if (t, m) in costs and chars.get(t)]
        for task in tasks:
            if (task, m) not in costs and chars.get(task) and rates:
                out[task, m] = sum(rates) / len(rates) * chars[task]
    return out


def training_chars(cfg) -> float | None:
    """Characters of text one run of `cfg` trains on: the mean row's text (question and context
    for SQuAD) x the rows it sees (rows capped by `max_train_examples`, x epochs; or steps x
    batch). None without a local training file (a status never reaches for the hub) or when the
    file cannot be read."""
    data, tr = cfg.data, cfg.train
    if not (data.data_dir or data.train_file):
        return None
    found = _text_per_row(data.task, data.data_dir, data.train_file)
    if found is None:
        return None
    per_row, n = found
    rows = min(n, data.max_train_examples or n)
    seen = tr.max_steps * tr.batch_size * tr.grad_accum if tr.max_steps > 0 else rows * tr.epochs
    return per_row * seen


@functools.lru_cache(maxsize=32)  # a running study asks again after every point
def _text_per_row(task: str, data_dir: str | None, file: str | None) -> tuple[float, int] | None:
    """(mean characters of text per training row, rows) of a task's local training data."""
    try:
        raw = get_task(task).load("train", data_dir=data_dir, file=file)
    except (LoralabError, OSError, ValueError):
        return None
    if not len(raw):
        return None
    text = sum(len(str(v)) for c in TEXT_COLUMNS if c in raw.column_names for v in raw[c])
    return text / len(raw), len(raw)
