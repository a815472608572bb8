"""What a worker does with a point's run directory: reuse it (finished), resume it (a usable
checkpoint) or train afresh; and the run directory's note of who used it (sweep.json)."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

from .. import tracking
from ..checkpoints import checkpoint_problem, checkpoints
from ..config import from_dict, load_yaml, to_dict
from ..data import content_fingerprint
from ..errors import LoralabError
from ..rundir import CHECKPOINT_DIR, CONFIG_FILE, RUNS_DIR, SUMMARY_FILE, SWEEP_FILE
from ..tasks import get_task
from .grid import flatten

KEEP_CHECKPOINTS_ENV = "LORALAB_KEEP_CHECKPOINTS"  # set to 1: completed points keep theirs


def _resolve_defaults(flat: dict, cfg) -> None:
    """Fill values left to defaults, as a run folder's config.yaml records them."""
    if flat.get("train.lr") is None:
        flat["train.lr"] = cfg.lr
    if flat.get("data.max_length") is None:
        flat["data.max_length"] = get_task(cfg.data.task).default_max_length


def _same_config(run_dir: Path, cfg) -> str | None:
    """None when the run directory holds this config; else the first differing key."""

    def norm(d: dict) -> dict:
        d = json.loads(json.dumps(d))
        d.pop("run", None)
        if d["train"]["method"] == "full":
            d.pop("lora", None)  # unused: a DoRA sweep reuses the plain sweep's full runs
        d["model"].pop("trust_remote_code", None)  # taken from the command line, not the folder
        for k in ("data_dir", "train_file", "eval_file"):
            if d["data"].get(k):
                d["data"][k] = str(Path(d["data"][k]).expanduser().resolve())
        return flatten(d)

    have = norm(to_dict(from_dict(load_yaml(run_dir / CONFIG_FILE))))
    want = norm(to_dict(cfg))
    paths = [f"data.{k}" for k in ("data_dir", "train_file", "eval_file")]
    if any(have.get(k) != want.get(k) for k in paths) and _same_data(run_dir, cfg):
        for k in paths:  # the folder moved (e.g. a fresh clone elsewhere): same rows, same run
            have[k] = want.get(k)
    _resolve_defaults(have, cfg)
    _resolve_defaults(want, cfg)
    for k in ("train.precision", "model.attention", "train.compile"):
        if want.get(k) == "auto":  # decided per machine when the run started
            want[k] = have.get(k)
    for k in sorted(have.keys() | want.keys()):
        if have.get(k) != want.get(k):
            return f"{k}: {have.get(k)!r} there, {want.get(k)!r} in this study"
    return None


def _same_data(run_dir: Path, cfg) -> bool:
    """Whether the run's recorded data fingerprint equals that of the data `cfg` points at.

    Data paths are stored absolute, so a results folder used from another location (a clone
    elsewhere) names other paths for the same files; the rows' content decides.
    """
    try:
        recorded = tracking.read_json(run_dir / SUMMARY_FILE).get("data_fingerprint") or {}
    except (LoralabError, OSError):
        return False
    if not recorded.get("train_sha256"):
        return False
    d = cfg.data
    try:
        have = _fingerprints(d.task, d.data_dir, d.train_file, d.eval_file)
    except (LoralabError, OSError):
        return False
    return (recorded.get("train_sha256"), recorded.get("eval_sha256")) == have


@functools.lru_cache(maxsize=16)  # a study checks every point's folder against the same data
def _fingerprints(name: str, data_dir, train_file, eval_file) -> tuple[str, str]:
    """(train, eval) content fingerprints of the data these settings load."""
    task = get_task(name)
    train = task.load("train", data_dir, train_file)
    evals = task.load_dev(data_dir, train_file, eval_file)
    return content_fingerprint(train), content_fingerprint(evals)


FINISHED = ("completed", "diverged")  # summary statuses of a run that trains no more


def finished(run_dir: Path) -> bool:
    """Whether the run directory holds a finished run (completed or diverged): a claim reuses
    it (or refuses it as another study's) and never trains."""
    summary = run_dir / SUMMARY_FILE
    return summary.is_file() and tracking.read_json(summary).get("status") in FINISHED


def decide(run_dir: Path, cfg) -> str:
    """reuse (finished), resume (has a checkpoint) or train (fresh). Called under the point's
    lock: it drops checkpoints that fail the resume check (`_usable_checkpoints`)."""
    if not check_folder(run_dir, cfg):
        return "train"
    if finished(run_dir):
        return "reuse"
    if resume_broke(read_note(run_dir).get("attempts", [])):
        return "train"
    return "resume" if _usable_checkpoints(run_dir) else "train"


def check_folder(run_dir: Path, cfg) -> bool:
    """Whether `run_dir` holds a run (False: none yet, the point trains); a user error when it
    is not this point's (another run's settings, or no run at all). Reads only: the study's
    pre-check calls it without the point's lock, beside workers training in these folders."""
    if not run_dir.exists():
        return False
    if not (run_dir / CONFIG_FILE).is_file():
        # A run killed while writing its config.yaml left only the half-written temporary file
        # (`rundir.atomic_write`'s `.config.yaml.*`): nothing of a run, so the point trains.
        if any(not f.name.startswith(f".{CONFIG_FILE}.") for f in run_dir.iterdir()):
            raise LoralabError(
                f"'{run_dir}' exists and is not a loralab run directory; the sweep will not "
                "touch it. Move it away or use another --output-dir."
            )
        return False
    diff = _same_config(run_dir, cfg)
    if diff:
        raise LoralabError(
            f"Run directory '{run_dir}' holds a run with other settings ({diff}). Its results "
            "are kept: use another --output-dir for this study."
        )
    if finished(run_dir) and (frozen := _kept_frozen(run_dir, cfg)):
        raise LoralabError(
            f"Run directory '{run_dir}' holds a LoRA run from before loralab trained "
            f"{cfg.model.name}'s {', '.join(frozen)} (shipped untrained; that run kept it "
            "frozen), so it is not this study's point. Its results are kept: move that "
            "model's LoRA run folders out of the results folder (or use another "
            "--output-dir) and run the study again."
        )
    return True


def _kept_frozen(run_dir: Path, cfg) -> list[str]:
    """Modules a LoRA run of `cfg` trains because their shipped weights never trained (the
    built-in MiniLM's pooler) that the finished run in `run_dir` kept frozen (it predates that)."""
    from ..models import retrained_modules, untrained_modules

    if cfg.train.method != "lora" or not untrained_modules(cfg.model.name):
        return []
    summary = tracking.read_json(run_dir / SUMMARY_FILE)
    had = set((summary.get("identity") or {}).get("model", {}).get("retrained") or ())
    if had >= set(untrained_modules(cfg.model.name)):
        return []
    from ..heads import head_for

    head = head_for(cfg, get_task(cfg.data.task))
    wanted = retrained_modules(cfg.model.name, head.auto_class(), **head.model_kwargs())
    return [m for m in wanted if m not in had]


def resume_broke(attempts: list[dict]) -> bool:
    """Whether the last attempt resumed from a checkpoint and crashed by itself (an error, not a
    signal): the checkpoint may be what breaks it, so the point trains afresh. A resume killed
    by a signal (SIGKILL from the out-of-memory killer or a user) says nothing against the
    checkpoint, and the next attempt resumes again. Attempts noted before exit codes were
    recorded count as broken, as they always did."""
    last = attempts[-1] if attempts else {}
    if last.get("action") != "resume" or last.get("outcome") != "crashed":
        return False
    code = last.get("exitcode")
    return not (isinstance(code, int) and code < 0)


def _usable_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints that pass resume's check (trainer_state.json, weights and archives intact);
    a kill while one was being written leaves a partial folder, removed here so the point is
    resumed from an earlier one or, with none left, trained afresh."""
    good = []
    for ckpt in checkpoints(run_dir):
        if checkpoint_problem(ckpt) is None:
            good.append(ckpt)
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
    return good


def read_note(run_dir: Path) -> dict:
    path = run_dir / SWEEP_FILE
    return tracking.read_json(path) if path.is_file() else {}


def drop_checkpoints(run_dir: Path) -> bool:
    """Remove a completed point's checkpoints: they exist to resume it, and the run's weights are
    saved apart (a full fine-tuning checkpoint of SmolLM2 holds 1.5 GB of weights and optimizer
    state; a study of a few dozen points would fill a disk). `LORALAB_KEEP_CHECKPOINTS=1` keeps
    them. True when something was removed."""
    folder = run_dir / CHECKPOINT_DIR
    if os.environ.get(KEEP_CHECKPOINTS_ENV, "") not in ("", "0") or not folder.is_dir():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def check_run_folders(plans: list, results: str | Path) -> None:
    """Each point's run folder that exists already holds that point's run (to reuse or resume),
    as the point's claim checks (`check_folder`, which only reads: workers may be training
    in these folders): one with other settings, or a folder that is no run, is refused here,
    before the study storage is created, so that the failed command leaves the results folder
    as it was. `plans`: those whose points are known (not waiting for a grid's best lr)."""
    for plan in plans:
        for p in plan.points():
            run_dir = Path(results) / RUNS_DIR / p["key"]
            if run_dir.exists():
                check_folder(run_dir, plan.config_for(p, results))
