"""Every file and folder name of a run directory and of a study folder, and how they are
written: atomically (a temp name, then a rename) and readable by others under the user's umask.
Also the JSON result files (credentials masked on the way out, damage reported on the way in),
the "can this folder be written?" check made before slow work, and opening an existing run.

A run directory (`loralab train`)::

    RUN/config.yaml  metrics.jsonl  summary.json  sweep.json
        adapter/ (LoRA) or model/ (full)      checkpoints/checkpoint-N/loralab_state.json
        merge/merge.json  benchmark.json  model/     analysis/analysis.json  hidden_states.safetensors

A study or sweep folder::

    OUT/study.db  runs/RUN  locks/POINT.lock  logs/POINT.log  report/{report.md,...,figures/}
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import LoralabError
from .redact import mask_tree

# A run directory.
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SWEEP_FILE = "sweep.json"  # which studies and workers used this run
RUN_LOCK = ".training.lock"  # flock-ed by the process that trains in the folder
WANDB_ID_FILE = "wandb_id.txt"  # the run's W&B id, drawn once, kept for its resumes
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
LOSS_FILE = "loralab_state.json"  # in each checkpoint: whole-run loss sum, training times
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
REPORT_FILES = ("report.md", "report.html", "report.csv", "runs.csv", "report.tex")


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


# ---------------------------------------------------------------------------------------------
# JSON result files, writable folders, an existing run


def jsonable(value: Any) -> Any:
    """`value` with NaN/inf as strings and tensors/arrays as Python numbers, for JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        return jsonable(value.item())
    return value


def write_json(path: Path, data: dict) -> None:
    """Credentials (URL passwords, tokens) in any string are masked on the way to disk."""
    text = json.dumps(mask_tree(jsonable(data)), indent=2, sort_keys=False)
    atomic_write(path, text + "\n")


def read_json(path: Path) -> dict:
    """A JSON object from a file; a missing, unreadable, truncated or non-object file is a user
    error naming the file (and the line)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoralabError(f"'{path}' does not exist.") from None
    except UnicodeDecodeError as e:
        raise LoralabError(
            f"'{path}' is not UTF-8 text (byte {e.start}): it is damaged or not a JSON file."
        ) from None
    except json.JSONDecodeError as e:
        raise LoralabError(
            f"'{path}', line {e.lineno}: not valid JSON ({e.msg}); the file is truncated or "
            "damaged. Restore it, or remove the folder that holds it and run the step again."
        ) from None
    except OSError as e:
        raise LoralabError(f"Cannot read '{path}': {e.strerror}.") from None
    if not isinstance(data, dict):
        raise LoralabError(f"'{path}' should hold a JSON object, not {type(data).__name__}.")
    return data


# Where the unwritable folder is part of a run (its merge/ or analysis/): no option moves it.
IN_RUN_FIX = (
    "It lives in the run folder: copy the run folder somewhere writable and run this on the copy."
)


def check_writable(
    path: str | Path, what: str, fix: str = "Choose a folder you can write to."
) -> Path:
    """Fail now, before any slow work, when folder `path` cannot be created and written.

    Walks up to the nearest existing ancestor: a file on the way, no write permission or a
    read-only file system is a user error naming `what` (e.g. "run.output_dir"). Creates nothing.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise LoralabError(f"{what} '{path}' is a file, not a folder: choose a folder path.")
    parent = path
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: mkdir would fail
            break
        parent = parent.parent
    if not parent.is_dir():
        raise LoralabError(
            f"{what} '{path}' cannot be created: '{parent}' is a file, not a folder."
        )
    try:  # os.access ignores read-only mounts and ACLs; a real probe does not
        probe = tempfile.mkdtemp(dir=parent, prefix=".loralab-probe-")
        os.rmdir(probe)
    except OSError as e:
        raise LoralabError(
            f"{what} '{path}' is not writable: cannot write in '{parent}' ({e.strerror}). {fix}"
        ) from None
    return path


def discard_unstarted(path: Path) -> bool:
    """Remove a run folder that holds nothing of a run yet (its config.yaml, the W&B id and
    folder, the training lock): a start that failed there leaves no half-made folder behind.
    Whether it was removed."""
    if not {p.name for p in path.iterdir()} <= {CONFIG_FILE, WANDB_ID_FILE, RUN_LOCK, "wandb"}:
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def check_not_a_run(path: str | Path, what: str) -> None:
    """Outputs are never written into a run folder: its files are that run's record. A run
    folder: config.yaml with one of the files only a run has (a project's own config.yaml is
    no run)."""
    path = Path(path)
    marks = (SUMMARY_FILE, METRICS_FILE, RUN_LOCK, CHECKPOINT_DIR)
    if (path / CONFIG_FILE).is_file() and any((path / m).exists() for m in marks):
        raise LoralabError(
            f"{what} '{path}' is a run folder (it holds {CONFIG_FILE} and the run's files); "
            "writing there would mix other output into that run's record. Give another folder, "
            f"e.g. '{path.resolve().parent}'."
        )


def open_run_dir(path: str | Path) -> Path:
    """An existing run directory (to resume, merge or analyze)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        run = next((p for p in path.parents if (p / CONFIG_FILE).is_file()), None)
        if run is not None and path.exists():  # e.g. RUN/checkpoints/checkpoint-40
            raise LoralabError(f"'{path}' is inside run directory '{run}': pass that folder (merge and analyze read its adapter/, a resume picks its newest good checkpoint).")  # fmt: skip
        why = "does not exist" if not path.exists() else f"has no {CONFIG_FILE}"
        raise LoralabError(
            f"'{path}' is not a loralab run directory: it {why}. Pass the folder that `loralab "
            "train` created (it holds config.yaml, metrics.jsonl, summary.json)."
        )
    return path


def is_training(run_dir: Path) -> bool:
    """Whether a live process holds the folder's training lock (`hold_run_lock`) right now."""
    try:
        with open(Path(run_dir) / RUN_LOCK) as fh:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no lock file: never trained by this loralab, or trained and copied
    return False


def hold_run_lock(run_dir: Path):
    """Lock the run folder for the process that trains in it, until that process ends (keep
    the returned file open). A second process, e.g. `--resume` of a run that is still training,
    gets a user error before it changes anything: two trainers in one folder would interleave
    their metrics and checkpoints. The kernel drops the lock when its holder dies."""
    fh = open(Path(run_dir) / RUN_LOCK, "a")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise LoralabError(
            f"'{run_dir}' is being trained by another process right now (it holds "
            f"{RUN_LOCK}). Nothing was changed. Let that run finish, or stop it, before resuming "
            "it; to train the same settings again alongside, start a new run."
        ) from None
    return fh
