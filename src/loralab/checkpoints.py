"""A run's training checkpoints: which one a resume can trust, and loralab's own state in them."""

from __future__ import annotations

import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import tracking
from .errors import LoralabError
from .identity import short_fingerprint
from .rundir import LOSS_FILE
from .runs import check_safetensors

_WEIGHTS = ("adapter_model.safetensors", "model.safetensors")
# torch.save files: a zip archive each; a CRC check finds truncation and flipped bytes.
_TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")


def _step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest (highest step) first."""
    root = Path(run_dir) / tracking.CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step(p) >= 0]
    return sorted(found, key=_step, reverse=True)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (missing, truncated or damaged files), or None."""
    try:
        state = tracking.read_json(ckpt / "trainer_state.json")
        if not isinstance(state.get("global_step"), int):
            return "trainer_state.json has no global_step"
        weights = [ckpt / w for w in _WEIGHTS if (ckpt / w).is_file()][:1]
        index = ckpt / "model.safetensors.index.json"  # a model past max_shard_size: its shards
        if not weights and index.is_file():
            weights = [ckpt / f for f in sorted(set((tracking.read_json(index).get("weight_map") or {}).values()))]  # fmt: skip
        if not weights:
            return f"it holds neither {' nor '.join(_WEIGHTS)} (nor a sharded model's index)"
        for w in weights:
            check_safetensors(w)
    except LoralabError as e:
        return str(e)
    # Several processes save one RNG state each (rng_state_0.pth, ...), one process rng_state.pth.
    per_process = sorted(p.name for p in ckpt.glob("rng_state_*.pth"))
    try:
        processes = _state(ckpt).get("processes")
    except LoralabError:
        processes = None  # a damaged loralab_state.json: the resume's own read reports it
    if isinstance(processes, int) and processes > 1:  # each must be there
        per_process = [f"rng_state_{i}.pth" for i in range(processes)]
    for name in (*_TORCH_FILES, *per_process):
        path = ckpt / name
        if not path.is_file():
            if name == "rng_state.pth":
                continue  # optional for the Trainer
            return f"{name} is missing"
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            return f"{name} is truncated or damaged ({e})"
        if bad is not None:
            return f"{name} is damaged (entry {bad} fails its checksum)"
    return None


def newest_good_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that passes `checkpoint_problem`, and a warning per one skipped."""
    skipped = []
    for ckpt in checkpoints(run_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, skipped
        skipped.append(f"skipping damaged checkpoint '{ckpt}': {problem}")
    return None, skipped


@dataclass
class Progress:
    """What a checkpoint recorded of the run up to it; the defaults stand for what a checkpoint
    from an older loralab lacks."""

    loss_sum: float | None = None  # the whole-run sum of step losses
    time: tuple[float, float] | None = None  # (wall s, CPU s) of training
    setup_s: float = 0.0  # wall s outside training (start-up, zero-shot) of the attempts
    tokens: tuple[int, int] = (0, 0)  # (real, padded) trained on, over every process
    first_step_at: float | None = None  # Unix time the attempt that saved it began stepping
    # (loss summed since the last logged step, that step): the log window open at the save,
    # which the next logged loss averages over, as it would have without the stop.
    pending: tuple[float, int] | None = None
    eval_owed: int | None = None  # the step whose periodic evaluation a stop cut short


def read_progress(ckpt: Path) -> Progress:
    """`Progress` from `ckpt`'s loralab state, read once."""
    state = _state(ckpt)
    num = lambda k: float(state[k]) if isinstance(state.get(k), (int, float)) else None  # noqa: E731
    wall, cpu, setup = num("train_time_s"), num("train_cpu_time_s"), num("setup_time_s")
    real, padded = state.get("tokens_real"), state.get("tokens_padded")
    pending, last = num("pending_loss"), state.get("last_logged_step")
    return Progress(
        loss_sum=num("loss_sum"),
        time=(wall, cpu) if wall is not None and cpu is not None else None,
        setup_s=setup or 0.0,
        tokens=(real, padded) if isinstance(real, int) and isinstance(padded, int) else (0, 0),
        first_step_at=num("first_step_at"),
        pending=(pending, last) if pending is not None and isinstance(last, int) else None,
        eval_owed=state.get("eval_owed") if isinstance(state.get("eval_owed"), int) else None,
    )


def run_facts(fingerprint: dict | None, processes: int) -> dict:
    """What each checkpoint records of how its run was trained, for `check_same_run`."""
    return {"data_fingerprint": fingerprint, "processes": processes}


def check_same_run(ckpt: Path, fingerprint: dict | None, processes: int) -> None:
    """A resume must train on what the checkpoint's steps trained on: the same data (the
    fingerprint of the train and eval rows) and the same number of processes (the global
    batch). Else the run would pool two setups under one config; a user error. Checkpoints
    from before these were recorded are not checked."""
    then, changed = _state(ckpt), []
    if then.get("data_fingerprint") not in (None, fingerprint):
        changed.append(
            f"its data: the rows it trained on hash to {short_fingerprint(then['data_fingerprint'])}, "
            f"the data given now to {short_fingerprint(fingerprint)}"
        )
    if then.get("processes") not in (None, processes):
        changed.append(
            f"its processes: it trained on {then['processes']}, this resume has {processes} "
            "(each process takes its own batch, so the global batch would change)"
        )
    if changed:
        raise LoralabError(
            f"Cannot resume from '{ckpt}': the run has changed since, in {'; and in '.join(changed)}. "
            "Nothing was trained. Resume with the data and the process count it started with, or "
            "start a new run."
        )


def continue_from(ckpt: Path, fingerprint: dict | None, processes: int) -> None:
    """Before a resume trains from `ckpt`: `check_same_run`, then (one process) drop the
    metrics.jsonl records after its step, which the resume logs again. A refused resume
    leaves the folder as it was."""
    from . import distributed

    check_same_run(ckpt, fingerprint, processes)
    if distributed.is_main():
        trim_metrics(ckpt.parent.parent, _step(ckpt))
    distributed.barrier()


def _state(ckpt: Path) -> dict:
    path = Path(ckpt) / LOSS_FILE
    return tracking.read_json(path) if path.is_file() else {}


def trim_metrics(run_dir: Path, step: int | None) -> None:
    """Drop metrics.jsonl records after `step` (all of them for None), so the resumed run logs
    those steps once, as an uninterrupted run would. A torn last line (killed mid-write) goes too."""
    path = Path(run_dir) / tracking.METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        at = record.get("step") if isinstance(record, dict) else None
        if step is not None and (not isinstance(at, int) or at <= step):
            kept.append(line)
    tracking.atomic_write(path, "".join(f"{line}\n" for line in kept))


def logged(run_dir: Path, prefix: str) -> dict | None:
    """The values metrics.jsonl holds under `prefix` (e.g. 'zero_shot/'), the prefix dropped,
    from the last record that has them; None when none does."""
    path = Path(run_dir) / tracking.METRICS_FILE
    found = None
    lines = (
        path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    )
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        mine = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)} if isinstance(record, dict) else {}  # fmt: skip
        found = mine or found
    return found


def warn(lines: list[str]) -> None:
    for line in lines:
        print(f"loralab: warning: {line}", file=sys.stderr)
