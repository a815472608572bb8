"""Continuing a killed run from its newest intact checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import distributed, rundir, tracking
from .checkpoints import newest_good_checkpoint, trim_metrics, warn
from .errors import LoralabError
from .runs import command_line_trust, load_run_config
from .train import RunResult, train


def resume(
    run_dir: str | Path,
    quiet: bool = False,
    restart: bool = False,
    trust_remote_code: bool = False,
    callbacks: list | None = None,
) -> RunResult:
    """Continue a killed run from its newest intact checkpoint, with the config it was started
    with (damaged checkpoints are skipped with a warning).

    Without a usable checkpoint this is a user error, unless `restart`: then the run trains
    again from step 0 in the same folder (its metrics.jsonl starts afresh). Remote code follows
    `trust_remote_code` (the command line), never the folder's config. `callbacks`: extra
    Trainer callbacks, as for `train`.
    """
    run_dir = tracking.open_run_dir(run_dir)
    lock = rundir.hold_run_lock(run_dir) if distributed.is_main() else None  # noqa: F841
    _check_not_finished(run_dir)
    cfg = load_run_config(run_dir)
    cfg = command_line_trust(cfg, trust_remote_code, run_dir / tracking.CONFIG_FILE)
    checkpoint, skipped = newest_good_checkpoint(run_dir)
    warn(skipped)
    if checkpoint is None and not restart:
        why = "all of its checkpoints are damaged" if skipped else "it has no checkpoint"
        raise LoralabError(
            f"Cannot resume '{run_dir}': {why} ({tracking.CHECKPOINT_DIR}/checkpoint-N is written "
            f"every train.save_steps={cfg.train.save_steps} steps). Nothing was changed. Add "
            "--restart to train it again from step 0 in the same folder, or start a new run."
        )
    if distributed.is_main():  # one process tidies the folder; the others wait for it
        if checkpoint is None:
            warn(
                [f"restarting '{run_dir}' from step 0 (--restart): its metrics.jsonl starts afresh"]
            )
            shutil.rmtree(run_dir / tracking.CHECKPOINT_DIR, ignore_errors=True)  # none usable
            trim_metrics(run_dir, None)  # from a checkpoint: `train` trims once it is checked
            ids = run_dir / rundir.WANDB_ID_FILE
            if ids.is_file():  # a fresh W&B run too: the old one holds the discarded steps
                ids.unlink()
                tracking.wandb_run_id(run_dir, resuming=False)
    distributed.init()
    distributed.barrier()
    return train(cfg, resume=run_dir, quiet=quiet, checkpoint=checkpoint, callbacks=callbacks)


def _check_not_finished(run_dir: Path) -> None:
    """A completed run is not resumed; a damaged summary.json only gets a warning (it is
    rewritten when the resumed run finishes)."""
    summary_path = run_dir / tracking.SUMMARY_FILE
    if not summary_path.is_file():
        return
    try:
        status = tracking.read_json(summary_path).get("status")
    except LoralabError as e:
        warn([f"ignoring a damaged summary.json ({e})"])
        return
    if status == "completed":
        raise LoralabError(
            f"Run '{run_dir}' already finished (summary.json says completed); nothing to resume."
        )
