"""Report records: a finished run's summary.json (or an Optuna trial's stored result) as the
dict the report works on, its identity, and deduplication.

Runs pool only when their *identity* is equal: the whole run config except the seed, output
paths and logging intervals (the whole `lora` section included), with the data replaced by a
fingerprint of its rows (see `train.identity`). Two runs with the same identity and seed count
once (the newest).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import typing
from pathlib import Path
from types import SimpleNamespace

import yaml

from .. import tracking
from ..config import ExperimentConfig, from_dict
from ..errors import LoralabError
from ..identity import identity, without_path
from ..rundir import CHECKPOINT_DIR, CONFIG_FILE, SUMMARY_FILE, SWEEP_FILE
from ..tasks import get_task
from .grid import Plan
from .storage import STUDY_ATTR, is_final, load_study, open_storage
from .variants import is_number

RUN_FIELDS = ("status", "task", "method", "model", "head", "seed", "lr", "wall_time_s",
              "train_time_s", "train_cpu_time_s", "peak_memory_mb", "steps", "run_dir",
              "eval_loss")  # fmt: skip
REQUIRED = ("task", "method", "model", "seed", "lr")  # what a finished run's row is keyed by
SHARE_FIELDS = ("trainable_share_pct", "trainable_share_without_head_pct", "lora_share_pct",
                "total", "trainable")  # fmt: skip


def record_from_summary(summary: dict) -> dict:
    """The part of a run's summary.json the report needs (also stored in Optuna trials)."""
    rec = {k: summary.get(k) for k in RUN_FIELDS}
    params = summary.get("params") or {}
    rec.update({k: params.get(k) for k in SHARE_FIELDS})
    layout = summary.get("layout") or {}
    rec["allocator"] = layout.get("allocator")  # None: from before it was recorded
    rec["lent_share"] = layout.get("lent_share")  # idle cores lent (study.spare_cores)
    rec["hardware"] = tracking.machine_name(summary.get("hardware") or {})
    rec["lora"] = summary.get("lora") if summary.get("method") == "lora" else None
    rec["metrics"] = _numbers(summary.get("metrics"))
    rec["majority"] = _numbers(summary.get("majority_baseline"))
    rec["zero_shot"] = _numbers(summary.get("zero_shot"))
    rec["identity"] = pooled_identity(summary.get("identity"))
    rec["data_known"] = bool((summary.get("identity") or {}).get("data", {}).get("fingerprint"))
    return rec


def final_loss(summary: dict) -> float | None:
    """A run summary's final dev loss, where it recorded a finite one (from 2026-12-05 on)."""
    loss = summary.get("eval_loss")
    return float(loss) if is_number(loss) and math.isfinite(loss) else None


def summary_loss(run_dir: str | Path | None) -> float | None:
    """`final_loss` of the summary in `run_dir`; None without one. Trials recorded before their
    result carried `eval_loss` (0317c0b) take it from here, so the study, its status and the
    report break ties on the same losses."""
    try:
        return final_loss(json.loads((Path(run_dir) / SUMMARY_FILE).read_text()))
    except (TypeError, OSError, ValueError, AttributeError):
        return None


def majority_value(rec: dict) -> float | None:
    """The majority baseline's main metric in a record (`record_from_summary`), where it has one."""
    value = (rec.get("majority") or {}).get(main_metric(rec.get("task", "")))
    return float(value) if is_number(value) else None


def tie_inputs(result: dict, run_dir: str | Path | None) -> tuple[float | None, float | None]:
    """(final dev loss, majority baseline's main metric) of a point, what its rate's choice
    weighs besides the score: from its trial's `result` where it carries them, else from the
    summary in `run_dir`, read once (trials recorded before results carried them)."""
    summary = {}
    if "eval_loss" not in result or "majority" not in result:
        try:
            summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
        except (TypeError, OSError, ValueError):
            pass
    summary = summary if isinstance(summary, dict) else {}
    loss = final_loss(result if "eval_loss" in result else summary)
    as_record = {"task": summary.get("task", ""), "majority": summary.get("majority_baseline")}
    return loss, majority_value(result if "majority" in result else as_record)


def _numbers(d) -> dict:
    return {k: v for k, v in (d or {}).items() if is_number(v)}


@functools.cache  # asked for by every statistic; the registry builds every task object
def main_metric(task: str) -> str:
    try:
        return get_task(task).primary_metric
    except LoralabError:
        return "accuracy"


@functools.cache
def points_per_unit(task: str) -> float:
    """GLUE metrics are fractions (x100 = points); SQuAD's are already in points."""
    try:
        return get_task(task).points_per_unit
    except LoralabError:
        return 100.0


def main_metric_value(rec: dict) -> float | None:
    return (rec.get("metrics") or {}).get(main_metric(rec["task"]))


# ---------------------------------------------------------------------------------------------
# Identity


def identity_hash(identity: dict) -> str:
    """A short stable name of an identity (equal dicts, equal names)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def derived_identity(config: dict, summary: dict) -> dict:
    """The identity of a run whose summary predates `identity`, from its config.yaml.

    Built as `train.identity` builds it; the summary's own fields (what actually ran) win over
    the config's. Without a data fingerprint the data paths stay in, so runs on other files
    still never pool.
    """
    cfg, unread = _read_old_config(config)
    cfg.data.task = summary.get("task") or cfg.data.task
    cfg.model.name = summary.get("model") or cfg.model.name
    cfg.model.head = summary.get("head") or cfg.model.head
    cfg.train.method = summary.get("method") or cfg.train.method
    cfg.train.lr = summary.get("lr") if is_number(summary.get("lr")) else cfg.train.lr
    lora_fields = {f.name for f in dataclasses.fields(cfg.lora)}
    lora = {k: v for k, v in (summary.get("lora") or {}).items() if k in lora_fields}
    cfg.lora = dataclasses.replace(cfg.lora, **lora)
    ran = summary.get("precision")  # as it ran; never `auto` resolved on this machine
    paths = {k: getattr(cfg.data, k) for k in ("data_dir", "train_file", "eval_file")}
    splits = SimpleNamespace(
        max_length=summary.get("max_length") or cfg.data.max_length,
        fingerprint=summary.get("data_fingerprint"),
    )
    d = identity(cfg, splits, ran or "unknown")
    if not d["data"]["fingerprint"]:
        d["data"]["paths"] = paths
    if unread:  # what could not be read still tells runs apart
        d["unread_config"] = unread
    return d


def _read_old_config(config: dict) -> tuple[ExperimentConfig, str | None]:
    """An older version's config.yaml as this version reads it: keys since removed are dropped;
    where a value still fails, the defaults, and a hash of the config but its seed and
    run/tracking sections (None when it read)."""
    try:
        return from_dict(_known_keys(config, ExperimentConfig)), None
    except LoralabError:
        kept = without(config if isinstance(config, dict) else {}, "train.seed", "run", "tracking")
        return ExperimentConfig(), identity_hash(kept)


def _known_keys(data, cls):
    """`data` without the keys that `cls` (a config dataclass, nested) does not have."""
    if not isinstance(data, dict):
        return data
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    return {k: _known_keys(v, hints[k]) if dataclasses.is_dataclass(hints[k]) else v
            for k, v in data.items() if k in fields}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Loading


def load_runs(results_dir: str | Path, stored: dict[str, list[str]] | None = None) -> list[dict]:
    """Every finished run directory under `results_dir`, once per study group that used it:
    the groups its sweep.json names, else those `stored` (`stored_groups`) gives its folder's
    name (runs exported or copied without their sweep.json), else "sweep"."""
    root = Path(results_dir)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise LoralabError(
            f"Results folder '{root}' {what}. Give the folder that holds the run "
            "directories (where a sweep or study wrote them, e.g. results/smollm2-cpu)."
        )
    out = []
    for path in sorted(root.rglob(SUMMARY_FILE)):
        run_dir = path.parent
        if CHECKPOINT_DIR in path.parts or not (run_dir / CONFIG_FILE).is_file():
            continue
        summary = tracking.read_json(path)
        if summary.get("status") not in ("completed", "diverged"):
            continue  # running, killed or failed: no result yet
        missing = [k for k in REQUIRED if summary.get(k) in (None, "")]
        if missing:  # valid JSON, but edited or written by something else
            raise LoralabError(
                f"'{path}' says the run {summary['status']} but has no {', '.join(missing)}, "
                "which the report groups runs by. Restore it from a copy, or move that run "
                "folder out of the results folder; nothing was written."
            )
        if not summary.get("identity"):
            config = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
            summary = {**summary, "identity": derived_identity(config, summary)}
        rec = record_from_summary(summary)
        rec["run_dir"] = str(run_dir)
        # When it ran, for `deduplicate`: the first step's time where recorded; else the file's
        # mtime, which a copy or a git clone resets (so it ranks below any recorded time).
        started = summary.get("first_step_at")
        rec["time"], rec["time_recorded"] = (started, True) if is_number(started) else (path.stat().st_mtime, False)  # fmt: skip
        note = run_dir / SWEEP_FILE
        groups = tracking.read_json(note).get("groups") if note.is_file() else None
        groups = groups or (stored or {}).get(run_dir.name) or ["sweep"]
        out += [{**rec, "group": g} for g in groups]
    return out


def load_study_runs(study_names: list[str], storage: str) -> list[dict]:
    """The results stored in the studies' trials (works without the run directories)."""
    st = open_storage(storage)
    out = []
    for name in study_names:
        study, plan = load_study(st, name)
        for t in study.get_trials(deepcopy=False):
            if is_final(t) and t.user_attrs.get("result"):
                done = t.datetime_complete.timestamp() if t.datetime_complete else 0.0
                rec = {"time": done, **t.user_attrs["result"], "group": plan.group}
                if "eval_loss" not in rec:  # recorded before results carried it
                    rec["eval_loss"] = summary_loss(rec.get("run_dir"))
                out.append(rec)
    return out


def _stored_plans(storage: str):
    """(study id, plan) of every loralab study in the storage; other studies are skipped."""
    st = open_storage(storage)
    for s in st.get_all_studies():
        try:
            plan = Plan.from_json(s.user_attrs[STUDY_ATTR])
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # not a loralab study (or one from a loralab that stored plans otherwise)
        yield st, s._study_id, plan


def _final_points(st, study_id) -> set:
    return {t.user_attrs.get("point") for t in st.get_all_trials(study_id, deepcopy=False)
            if is_final(t)}  # fmt: skip


def pending_lrs(storage: str) -> dict[tuple[str, str], set[float]]:
    """(task, method) -> the learning rates of the stored studies' points that are not final
    yet (the grids still being run); empty for a storage without loralab studies."""
    out: dict[tuple[str, str], set[float]] = {}
    for st, study_id, plan in _stored_plans(storage):
        final = _final_points(st, study_id)
        for p in plan.points():
            if p["key"] not in final:
                out.setdefault((p["task"], p["method"]), set()).add(p["lr"])
    return out


def stored_groups(storage: str) -> dict[str, list[str]]:
    """Point key (= run folder name) -> the groups of the stored studies that finished it."""
    out: dict[str, list[str]] = {}
    for st, study_id, plan in _stored_plans(storage):
        for key in sorted(_final_points(st, study_id) - {None}):
            if plan.group not in out.setdefault(key, []):
                out[key].append(plan.group)
    return out


def _when(r: dict) -> tuple:
    """Newer sorts higher: a recorded time beats a file's mtime (a clone's checkout time)."""
    return (r.get("time_recorded", True), r.get("time", 0))


def deduplicate(records: list[dict]) -> tuple[list[dict], list[str]]:
    """One record per (group, identity, seed): the newest. Warnings name both run folders."""
    newest: dict[tuple, dict] = {}
    warnings = []
    for r in records:
        key = (r["group"], record_identity(r), r.get("seed"))
        old = newest.get(key)
        if old is None:
            newest[key] = r
            continue
        keep, drop = (r, old) if _when(r) >= _when(old) else (old, r)
        newest[key] = keep
        warnings.append(
            f"{drop.get('run_dir') or 'a stored trial'} and {keep.get('run_dir') or 'a stored trial'} "
            f"are the same run (identity {record_identity(r)}, seed {r.get('seed')}); counted once, the "
            f"newer: {keep.get('run_dir') or 'a stored trial'}."
        )
    kept = {id(r) for r in newest.values()}
    return [r for r in records if id(r) in kept], warnings


def pooled_identity(ident: dict | None) -> dict | None:
    """A stored identity as runs pool on it now: a file task with a data fingerprint is named
    without the folder its files lay in (`identity.without_path`; runs from before kept it)."""
    data = (ident or {}).get("data") or {}
    if not data.get("fingerprint") or not isinstance(data.get("task"), str):
        return ident
    task = without_path(data["task"])
    return ident if task == data["task"] else {**ident, "data": {**data, "task": task}}


def record_identity(rec: dict) -> str:
    """A record's identity name; records without one (old stored trials) keep apart by content."""
    ident = rec.get("identity")
    if ident:
        return identity_hash(ident)
    return identity_hash({k: rec.get(k) for k in ("task", "model", "head", "method", "lr", "lora")})


def without(identity: dict, *paths: str) -> dict:
    """A copy of `identity` without the dotted `paths` (e.g. 'train.lr', 'lora')."""
    d = json.loads(json.dumps(identity, default=str))
    for p in paths:
        *parents, last = p.split(".")
        node = d
        for k in parents:
            node = node.get(k, {})
        node.pop(last, None)
    return d
