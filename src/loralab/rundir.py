"""Every file and folder name of a run directory and of a study folder, and how they are
written: atomically (a temp name, then a rename) and readable by others under the user's umask.

A run directory (`loralab train`)::

    RUN/config.yaml  metrics.jsonl  summary.json  sweep.json
        adapter/ (LoRA) or model/ (full)      checkpoints/checkpoint-N/loralab_state.json
        merge/merge.json  benchmark.json  model/     analysis/analysis.json  hidden_states.safetensors

A study or sweep folder::

    OUT/study.db  runs/RUN  locks/POINT.lock  logs/POINT.log  report/{report.md,...,figures/}
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A run directory.
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SWEEP_FILE = "sweep.json"  # which studies and workers used this run
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
LOSS_FILE = "loralab_state.json"  # in each checkpoint: the whole-run loss sum
MERGE_DIR = "merge"
MERGE_FILE = "merge.json"
BENCH_FILE = "benchmark.json"
EXPORT_DIR = "model"  # inside MERGE_DIR
ANALYSIS_DIR = "analysis"
ANALYSIS_FILE = "analysis.json"
HIDDEN_FILE = "hidden_states.safetensors"

# A study / sweep folder.
STUDY_DB = "study.db"
RUNS_DIR = "runs"
LOCKS_DIR = "locks"
LOGS_DIR = "logs"
REPORT_DIR = "report"
REPORT_LOCK = "report.lock"  # in LOCKS_DIR
FIGURES_DIR = "figures"  # in REPORT_DIR
REPORT_FILES = ("report.md", "report.html", "report.csv", "runs.csv")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_modes(path: Path) -> None:
    """Give `path` (and everything under it) the modes a plain `mkdir`/`open` would have.

    mkstemp/mkdtemp create owner-only (0600/0700) entries; results are meant to be shared, so
    they get 0644/0755 minus the user's umask once complete.
    """
    mask = _umask()
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o755 if p.is_dir() else 0o644) & ~mask)


def atomic_write(path: Path, text: str) -> None:
    """Write via a temp file + rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        publish_modes(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a hidden temp folder next to `final`; on success it becomes `final` in one rename.

    An error inside the block removes the temp folder and leaves `final` as it was. With
    `replace`, an existing `final` is swapped out (and deleted) only after the new folder is
    complete; without it, a `final` that appeared meanwhile (another process won a race) is kept
    and ours discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        publish_modes(tmp)
        if final.exists() and replace:
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.replace(final, old / "old")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        elif not final.exists():
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
