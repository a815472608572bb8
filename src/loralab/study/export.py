"""A shareable copy of a results folder (`loralab export`): what the report and a continued
study need, without weights or checkpoints, safe to run while workers are writing.

    DEST/runs/RUN/{config.yaml, summary.json, metrics.jsonl, sweep.json}   finished runs only
    DEST/study.db                                                          a consistent snapshot
    DEST/report/                                                           regenerated from DEST

A finished run is one whose summary says `completed` or `diverged` (the report counts both);
runs still training, failed or killed are left out. Exporting again into the same folder
updates what changed; runs that are no longer in the source stay in DEST.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoralabError
from ..rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    REPORT_DIR,
    RUNS_DIR,
    STUDY_DB,
    SUMMARY_FILE,
    SWEEP_FILE,
    publish_modes,
    read_json,
)
from .report import folder_runs, stored_pending, write_report
from .storage import open_storage

SMALL_FILES = (CONFIG_FILE, SUMMARY_FILE, METRICS_FILE, SWEEP_FILE)
FINISHED = ("completed", "diverged")


@dataclass
class Exported:
    dest: Path
    runs: list[str] = field(default_factory=list)  # run folders copied
    left_out: list[str] = field(default_factory=list)  # run folders not finished
    storage: bool = False  # study.db copied
    report: object | None = None


def export(results_dir: str | Path, dest: str | Path) -> Exported:
    """Copy the finished runs' small files and a snapshot of study.db from `results_dir` to
    `dest`, then write the report of `dest`."""
    src, out = Path(results_dir), Path(dest)
    if not (src / RUNS_DIR).is_dir():
        state = "is a file" if src.is_file() else "does not exist" if not src.exists() else f"has no {RUNS_DIR}/ folder"  # fmt: skip
        raise LoralabError(
            f"'{src}' {state}: give the results folder of a sweep or study (the one holding "
            "runs/ and study.db)."
        )
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise LoralabError(
            f"The export folder '{out}' lies inside the results folder '{src}': give a folder "
            "outside it (e.g. results/<name> in a repository)."
        )
    _refuse_other_runs(src, out)
    # Read the source storage before anything is written: a damaged one fails here (exit 2),
    # not after DEST/runs has been filled.
    src_names = _study_names(src / STUDY_DB) if (src / STUDY_DB).is_file() else None
    if src_names is not None and (out / STUDY_DB).is_file():
        lost = sorted(_study_names(out / STUDY_DB) - src_names)
        if lost:  # `dest` is another results folder, not an earlier export of this one
            raise LoralabError(
                f"'{out / STUDY_DB}' holds studies that '{src / STUDY_DB}' does not ({', '.join(lost)}): "
                "exporting would replace them. Nothing was changed. Export into a new folder, or "
                "into the one an earlier export of these results made."
            )
    out.mkdir(parents=True, exist_ok=True)
    done = Exported(out)
    for run in sorted(p for p in (src / RUNS_DIR).iterdir() if p.is_dir()):
        try:
            status = read_json(run / SUMMARY_FILE).get("status")
        except LoralabError:
            status = None  # no summary yet, or one being written
        if status not in FINISHED:
            done.left_out.append(run.name)
            continue
        target = out / RUNS_DIR / run.name
        target.mkdir(parents=True, exist_ok=True)
        for name in SMALL_FILES:
            if (run / name).is_file():
                _copy(run / name, target / name)
        done.runs.append(run.name)
    if (src / STUDY_DB).is_file():
        _snapshot(src / STUDY_DB, out / STUDY_DB)
        done.storage = True
    if done.runs or (out / RUNS_DIR).is_dir():
        records = folder_runs(out)  # the groups from the storage just copied, as `report`
        if records:
            source = f"run directories under {out}"
            done.report = write_report(records, out / REPORT_DIR, source, stored_pending(out))
    return done


def _refuse_other_runs(src: Path, out: Path) -> None:
    """A DEST run folder named like one of the source's finished runs must hold that run (an
    earlier export of it, or the same point trained where a study continued): one with another
    identity or seed is another results folder's run, whose files the export would overwrite."""
    for theirs in sorted((out / RUNS_DIR).glob(f"*/{SUMMARY_FILE}")):
        ours = src / RUNS_DIR / theirs.parent.name / SUMMARY_FILE
        if not ours.is_file():
            continue
        try:
            a, b = read_json(ours), read_json(theirs)
        except LoralabError:
            continue  # a damaged summary in DEST: replaced by the source's whole one
        if a.get("status") in FINISHED and {"identity", "seed"} <= a.keys() & b.keys():
            if (a["identity"], a["seed"]) != (b["identity"], b["seed"]):
                raise LoralabError(
                    f"'{theirs.parent}' holds another run than '{ours.parent}' (other settings "
                    "under the same name): DEST is another results folder, and exporting would "
                    "overwrite its run files and study.db. Nothing was changed. Export into a "
                    "new folder, or into the one an earlier export of these results made."
                )


def _study_names(db: Path) -> set[str]:
    return {s.study_name for s in open_storage(f"sqlite:///{db.resolve()}").get_all_studies()}


def _copy(src: Path, dst: Path) -> None:
    """Copy through a temp file and a rename: a reader of `dst` never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        publish_modes(Path(tmp))
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _snapshot(db: Path, dst: Path) -> None:
    """SQLite's online backup: a consistent copy even while workers write to `db`."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    os.close(fd)
    try:
        source = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        target = sqlite3.connect(tmp)
        try:
            source.backup(target)
        except sqlite3.DatabaseError as e:  # damaged after the check above, or not SQLite
            raise LoralabError(
                f"'{db}' cannot be copied ({e}): it is damaged. Restore it, or export the runs "
                "alone from a copy of the results folder without it."
            ) from None
        finally:
            target.close()
            source.close()
        publish_modes(Path(tmp))
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
