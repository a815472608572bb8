"""`loralab study --status` and `sweep status` as text: per phase its points, then one line of
totals (points done, training CPU time spent and left, the wall time left); the running study's
progress line is that last line."""

from __future__ import annotations

from .progress import FINAL
from .status import PointStatus, StudyStatus


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min"


def _ago(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def render(status: StudyStatus) -> list[str]:
    """Text lines: per phase a header and its points, then the totals."""
    lines, costs = [], status.costs()
    if status.storage is None:
        lines.append(f"no study storage in {status.results_dir} yet: nothing has run")
    for ph in status.phases:
        done = sum(p.state in FINAL for p in ph.points)
        head = f"{ph.name}: {done}/{len(ph.points)} done"
        if ph.waits_for_grid:
            head += f" (waits for {ph.waits_on}"
            if ph.so_far:
                head += "; best so far " + _rates(ph.so_far)
            head += ")"
        elif ph.best:
            head += " · best lr " + _rates(ph.best)
        lines.append(head)
        if ph.refused:
            lines.append(f"  refused: stored with a different grid ({ph.refused}); `loralab study` "
                         "exits 2 on it: give the spec a new `name`, or undo the change")  # fmt: skip
        width = max(len(p.key) for p in ph.points) if ph.points else 0
        for p in ph.points:
            left = status.left_of(p, costs) if p.state in ("running", "interrupted") else None
            detail = _point_detail(p) + (f"; ~{_hours(left)} of training CPU left" if left else "")
            lines.append(f"  {p.state:<12} {p.key:<{width}}  {detail}".rstrip())
    lines.append(totals(status))
    return lines


def _rates(best: dict) -> str:
    """'lora 0.001, full 0.0001'; an axis value that diverged at every rate says so."""
    return ", ".join(f"{k} {lr:g}" if lr is not None else f"{k} diverged at every rate" for k, lr in best.items())  # fmt: skip


def totals(status: StudyStatus, idle: int = 0) -> str:
    """One line: points done (and to be reused), training CPU time spent and left; the wall
    time left for the workers running now and `idle` more (see `StudyStatus.wall_left`)."""
    spent, left, unknown = status.estimate()
    pts = status.points
    done = sum(p.state in FINAL for p in pts)
    reused = sum(p.reusable for p in pts)
    text = f"total: {done}/{len(pts)} points done"
    if reused:
        text += f" (+{reused} to be reused from finished run folders)"
    if any(p.reusable for ph in status.phases if ph.so_far for p in ph.points):
        text += " (where a grid is unfinished, at its best lr so far)"
    text += f"; training CPU time {_hours(spent)} spent"
    if done + reused < len(pts):
        known = len(pts) - done - reused - unknown
        if known:
            text += f", ~{_hours(left)} left for {known} point{'s' * (known != 1)}"
            if wall := status.wall_left(idle):
                workers = "worker" if wall[1] == 1 else f"{wall[1]} workers"
                text += f" (~{_hours(wall[0])} of wall time for the {workers} running now)"
            rough = sum(not p.finished and (p.task, p.method) in status.rough() for p in pts)
            if rough:
                text += (f" ({rough} of them roughly, from the other tasks' cost per character "
                         "of training text)")  # fmt: skip
        if unknown:
            text += (f"{' (+' if known else '; '}{unknown} point{'s' * (unknown != 1)} with no "
                     f"cost yet for their task and method{')' if known else ''}")  # fmt: skip
    return text


def _point_detail(p: PointStatus) -> str:
    bits = []
    if p.value is not None:
        bits.append(f"{p.metric} {p.value:.4f}" + (f", dev loss {p.loss:.3f}" if p.loss is not None else ""))  # fmt: skip
    if p.cpu_s is not None:
        bits.append(f"training CPU {_hours(p.cpu_s)}")
    if p.worker:
        bits.append(f"on {p.worker}")
    if not p.finished:
        if p.progress is not None:
            bits.append(f"{p.progress:.0%} logged" + (f" {_ago(p.logged_ago_s)} ago" if p.logged_ago_s is not None else ""))  # fmt: skip
        if p.resumes_at is not None:
            bits.append(f"checkpoint at {p.resumes_at:.0%}")
        if ev := p.last_eval:
            dev = [f"{p.metric} {ev['value']:.4f}" if ev["value"] is not None else "",
                   f"dev loss {ev['loss']:.3f}" if ev["loss"] is not None else ""]  # fmt: skip
            bits.append(f"{', '.join(d for d in dev if d)} at step {ev['step']}")
        if p.lent_threads:
            bits.append(f"{p.lent_threads} threads (idle cores lent)")
    if p.detail:
        bits.append(p.detail)
    return "; ".join(bits)
