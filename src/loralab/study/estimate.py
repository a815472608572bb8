"""What one point of a study costs in training CPU time, for `--status` and the running study's
progress line. A (task, method)'s cost is, in order of preference:
  1. the mean training CPU time (`train_cpu_time_s`) of its finished points;
  2. the CPU time its unfinished points spent up to their checkpoints, scaled to the whole run
     (checkpoints at `MIN_SHARE` of training or more);
  3. the other method's cost on the same task times the mean ratio between the two methods on
     the tasks where both are known from 1 or 2 (full fine-tuning costs a steady multiple of
     LoRA on one model, whatever the task).
A (task, method) with none of these has no cost (its points are counted apart).
"""

from __future__ import annotations

MIN_SHARE = 0.05  # an earlier checkpoint says too little about the whole run's cost


def point_costs(points) -> dict[tuple[str, str], float]:
    """{(task, method): training CPU s of one point} from `points`, objects with `task`,
    `method`, `finished`, `cpu_s` (finished), `resumes_at` and `resumes_cpu_s` (the newest
    checkpoint's share of training and CPU s)."""
    done: dict[tuple[str, str], list[float]] = {}
    partial: dict[tuple[str, str], list[float]] = {}
    for p in points:
        if p.finished and p.cpu_s is not None:
            done.setdefault((p.task, p.method), []).append(p.cpu_s)
        elif p.resumes_cpu_s is not None and (p.resumes_at or 0.0) >= MIN_SHARE:
            partial.setdefault((p.task, p.method), []).append(p.resumes_cpu_s / p.resumes_at)
    known = {k: sum(v) / len(v) for k, v in partial.items()}
    known.update({k: sum(v) / len(v) for k, v in done.items()})  # finished points win
    costs = dict(known)
    tasks, methods = {p.task for p in points}, {p.method for p in points}
    for task, m, o in ((t, m, o) for t in tasks for m in methods for o in methods if o != m):
        both = [t for t in tasks if (t, m) in known and (t, o) in known]
        if (task, m) not in costs and (task, o) in known and both:
            ratio = sum(known[t, m] / known[t, o] for t in both) / len(both)
            costs[task, m] = ratio * known[task, o]
    return costs
