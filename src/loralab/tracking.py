"""The run directory (source of truth) and its files: config, metrics JSONL, summary."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import ExperimentConfig, dump_yaml
from .errors import LoralabError
from .redact import mask_tree

# Names and atomic writes live in rundir; re-exported here for the modules that read them so.
from .rundir import (  # noqa: E402, F401
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_DIR,
    SUMMARY_FILE,
    atomic_write,
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def write_json(path: Path, data: dict) -> None:
    """Credentials (URL passwords, tokens) in any string are masked on the way to disk."""
    text = json.dumps(mask_tree(_jsonable(data)), indent=2, sort_keys=False)
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


def check_writable(path: str | Path, what: str) -> Path:
    """Fail now, before any slow work, when folder `path` cannot be created and written.

    Walks up to the nearest existing ancestor: a file on the way, no write permission or a
    read-only file system is a user error naming `what` (e.g. "--output-dir"). Creates nothing.
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
            f"{what} '{path}' is not writable: cannot write in '{parent}' ({e.strerror}). "
            "Choose a folder you can write to."
        ) from None
    return path


def default_run_name(cfg: ExperimentConfig) -> str:
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.model.name).name or cfg.model.name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    from .tasks import task_label

    return f"{task_label(cfg.data.task)}-{cfg.train.method}-{model}-s{cfg.train.seed}-{stamp}"


def create_run_dir(cfg: ExperimentConfig) -> Path:
    """A fresh folder for this run under run.output_dir; never reuses one that has results."""
    root = Path(cfg.run.output_dir)
    name = cfg.run.name or default_run_name(cfg)
    path = root / name
    n = 1
    while path.exists():
        n += 1
        path = root / f"{name}-{n}"
    path.mkdir(parents=True)
    atomic_write(path / CONFIG_FILE, dump_yaml(cfg))
    return path


def open_run_dir(path: str | Path) -> Path:
    """An existing run directory (for --resume, merge, analyze)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise LoralabError(
            f"'{path}' is not a loralab run directory: it has no {CONFIG_FILE}. Pass the folder "
            "that `loralab train` created (it holds config.yaml, metrics.jsonl, summary.json)."
        )
    return path


class MetricsLog:
    """Append-only JSONL of metrics over time; one flushed line per record."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def log(self, record: dict) -> None:
        line = json.dumps(_jsonable({"time": round(time.time(), 3), **record}))
        with open(self.path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()


def peak_memory_mb() -> float:
    """Peak accelerator memory allocated, or the process's peak RSS on CPU (MB)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def git_commit() -> str | None:
    """The loralab source tree's commit, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("loralab", "torch", "transformers", "peft", "datasets", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


_WANDB_ENV_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


def preflight(cfg: ExperimentConfig) -> None:
    """Fail before any slow work when the requested W&B mode cannot work."""
    mode = cfg.tracking.wandb
    if mode == "disabled":
        return
    env = os.environ.get("WANDB_MODE")
    if env is not None and env.strip().lower() not in _WANDB_ENV_MODES:
        raise LoralabError(
            f"The environment variable WANDB_MODE is set to {env!r}, which W&B does not accept "
            f"(tracking.wandb={mode} asks for W&B). Unset it (`unset WANDB_MODE`) or set it to "
            "online, offline or disabled."
        )
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise LoralabError(
            f"tracking.wandb={mode} needs the wandb package: pip install 'loralab[tracking]', "
            "or set tracking.wandb=disabled."
        ) from None
    if mode == "online" and not _wandb_key_available():
        raise LoralabError(
            "tracking.wandb=online needs a Weights & Biases API key: set WANDB_API_KEY or run "
            "`wandb login`. Use tracking.wandb=offline to log locally and `wandb sync` later."
        )


class Tracker:
    """Metrics go to the run directory's JSONL always, and to Weights & Biases when asked.

    W&B is a mirror: the run directory stays the source of truth. No secret is ever logged:
    the API key stays in the environment / netrc where W&B itself reads it.
    """

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, resuming: bool = False):
        self.run_dir = Path(run_dir)
        self.file = MetricsLog(self.run_dir / METRICS_FILE)
        self.wandb_run = None
        mode = cfg.tracking.wandb
        if mode == "disabled":
            return
        preflight(cfg)
        import wandb

        from .config import to_dict

        self.wandb_run = wandb.init(
            project=cfg.tracking.project,
            name=self.run_dir.name,
            id=re.sub(r"[^A-Za-z0-9_-]", "-", self.run_dir.name)[-64:],
            dir=str(self.run_dir),
            mode=mode,
            config=mask_tree(to_dict(cfg)),
            resume="allow" if resuming else None,
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, record: dict, step: int | None = None) -> None:
        """One record (flat keys like `train/loss`, `lora_rank/q/mean`) at an optimiser step."""
        self.file.log({"step": step, **record} if step is not None else record)
        if self.wandb_run is not None:
            data = {
                k: (float(v) if isinstance(v, bool) else v)
                for k, v in record.items()
                if isinstance(v, (int, float, bool))
            }
            self.wandb_run.log(data, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, str, bool)):
                    self.wandb_run.summary[k] = v

    def finish(self, failed: bool = False) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None
