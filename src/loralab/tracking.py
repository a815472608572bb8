"""A run's tracking: its folder and config, metrics JSONL, environment facts, a W&B mirror."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .config import ExperimentConfig, dump_yaml, load_yaml, to_dict
from .errors import LoralabError
from .redact import mask_secrets, mask_tree

# The run directory's file layer (names, atomic and JSON writes, writability, opening a run)
# lives in rundir. Only CONFIG_FILE, METRICS_FILE, atomic_write and jsonable are used here; the
# rest is re-exported for the modules that still read it as `tracking.X` (analyze, artefacts,
# checkpoints, merge, plots, report, runs, train, worker; tests/test_merge.py).
from .rundir import (  # noqa: F401
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_DIR,
    SUMMARY_FILE,
    WANDB_ID_FILE,
    atomic_write,
    check_writable,
    discard_unstarted,
    jsonable,
    open_run_dir,
    read_json,
    write_json,
)
from .tasks import task_label


def default_run_name(cfg: ExperimentConfig) -> str:
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.model.name).name or cfg.model.name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{task_label(cfg.data.task)}-{cfg.train.method}-{model}-s{cfg.train.seed}-{stamp}"


def create_run_dir(cfg: ExperimentConfig) -> Path:
    """A fresh folder for this run under run.output_dir; never reuses one that has results."""
    root = Path(cfg.run.output_dir)
    name = cfg.run.name or default_run_name(cfg)
    root.mkdir(parents=True, exist_ok=True)
    path, n = root / name, 1
    while True:  # mkdir is the claim: two runs starting at once never share a folder
        try:
            path.mkdir()
            break
        except FileExistsError:
            n += 1
            path = root / f"{name}-{n}"
    atomic_write(path / CONFIG_FILE, dump_yaml(cfg))
    return path


class MetricsLog:
    """Append-only JSONL of metrics over time; one flushed line per record."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def log(self, record: dict) -> None:
        line = json.dumps(jsonable({"time": round(time.time(), 3), **record}))
        with open(self.path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()


def reset_peak_memory() -> None:
    """Start the accelerator's peak-memory counter afresh, so that a second run in the same
    process (a notebook, a sweep in one process) reports its own peak. The CPU's peak RSS
    cannot be reset: it stays the process's, which is why a study runs each point in a child."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float:
    """Peak accelerator memory allocated since `reset_peak_memory`, or the process's peak RSS
    on CPU (MB)."""
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


def hardware() -> dict:
    """The machine a run ran on, for its summary: speed and memory figures mean little without
    it. `cpu` names the model and the extensions that decide its kernels (AMX, AVX-512 BF16,
    AVX2: the same name covers CPUs whose bf16 speed differs ~100x); `accelerator` is the GPU
    the run used, None on a CPU."""
    import torch

    from .probecache import machine

    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # not POSIX
        memory_gb = None
    cuda = torch.cuda.is_available()
    return {
        "cpu": machine(),
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "accelerator": torch.cuda.get_device_name(torch.cuda.current_device()) if cuda else None,
    }


def machine_name(hw: dict) -> str | None:
    """The name a run's records give its machine (a `hardware` dict): its GPU, else its CPU;
    None for a summary from before it was recorded."""
    return hw.get("accelerator") or hw.get("cpu")


def this_machine() -> str | None:
    """This machine's name as its runs' records give it (`machine_name`)."""
    return machine_name(hardware())


def _wandb_key_available() -> bool:
    """An API key in the environment, or a netrc entry for the W&B server this wandb logs in
    to (`WANDB_BASE_URL`, its settings; wandb 0.31 defaults to a coreweave host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    if not netrc.is_file():
        return False
    words = netrc.read_text(errors="ignore").split()
    return any(host in words for host in _wandb_hosts())


def _wandb_hosts() -> set[str]:
    from urllib.parse import urlparse

    hosts = {"api.wandb.ai"}
    try:
        import wandb

        hosts.add(urlparse(wandb.Settings().base_url).hostname or "api.wandb.ai")
    except Exception:  # no wandb (preflight says so), or settings it cannot read
        pass
    return hosts


_WANDB_ENV_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


def wandb_mode(mode: str) -> str:
    """The W&B mode a `tracking.wandb` value runs in: `auto` follows WANDB_MODE when that says
    offline or disabled, else is online with an API key and offline without one; the others
    are themselves."""
    if mode == "auto":
        env = (os.environ.get("WANDB_MODE") or "").strip().lower()
        if env in ("offline", "dryrun", "disabled"):
            return "disabled" if env == "disabled" else "offline"
        return "online" if _wandb_key_available() else "offline"
    return mode


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The run's W&B id: drawn at random the first time and kept in the run folder, so that
    folders of the same name (every study names its points alike) never share a W&B run,
    and a resume continues its own. A folder from before the id was kept resumes under the
    id it had then (its name)."""
    import secrets

    path = Path(run_dir) / WANDB_ID_FILE
    kept = path.read_text().strip() if path.is_file() else ""
    if kept:
        return kept
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", Path(run_dir).name)
    run_id = slug[-64:] if resuming else f"{slug[-55:]}-{secrets.token_hex(4)}"
    path.write_text(run_id + "\n")
    return run_id


@contextmanager
def masked_argv():
    """sys.argv with its credentials masked, while W&B reads it into the run's metadata (a
    study worker's `--storage postgresql://user:password@...`)."""
    import sys

    argv = sys.argv
    sys.argv = [mask_secrets(a) for a in argv]
    try:
        yield
    finally:
        sys.argv = argv


def preflight(cfg: ExperimentConfig) -> None:
    """Fail before any slow work when the requested W&B mode cannot work."""
    mode = wandb_mode(cfg.tracking.wandb)
    if mode == "disabled":
        return
    env = os.environ.get("WANDB_MODE")
    if env is not None and env.strip().lower() not in _WANDB_ENV_MODES:
        raise LoralabError(
            f"The environment variable WANDB_MODE is set to {env!r}, which W&B does not accept "
            f"(tracking.wandb={cfg.tracking.wandb} asks for W&B). Unset it (`unset WANDB_MODE`) or set it to "
            "online, offline or disabled."
        )
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise LoralabError(
            f"tracking.wandb={cfg.tracking.wandb} needs the wandb package: pip install 'loralab[tracking]', "
            "or set tracking.wandb=disabled."
        ) from None
    if mode == "online" and not _wandb_key_available():
        raise LoralabError(
            "tracking.wandb=online needs a Weights & Biases API key: set WANDB_API_KEY or run "
            "`wandb login`. Use tracking.wandb=offline to log locally and `wandb sync` later."
        )


STEP_KEY = "train/global_step"  # W&B's x axis: the optimiser step (`Tracker.log`'s step)


class Tracker:
    """Metrics go to the run directory's JSONL always, and to Weights & Biases when asked.

    W&B is a mirror: the run directory stays the source of truth. No secret is ever logged:
    the API key stays in the environment / netrc where W&B itself reads it.
    """

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, resuming: bool = False):
        self.run_dir = Path(run_dir)
        self.file = MetricsLog(self.run_dir / METRICS_FILE)
        self.wandb_run = None
        # What W&B runs as: `auto` resolved (online with an API key, else offline).
        self.wandb_mode = mode = wandb_mode(cfg.tracking.wandb)
        if mode == "disabled":
            return
        preflight(cfg)
        import wandb

        # The resolved config (lr, max_length, attention, compile as used), as config.yaml has it.
        saved = self.run_dir / CONFIG_FILE
        config = load_yaml(saved) if saved.is_file() else to_dict(cfg)
        try:
            with masked_argv():
                self.wandb_run = wandb.init(
                    project=cfg.tracking.project,
                    name=self.run_dir.name,
                    id=wandb_run_id(self.run_dir, resuming),
                    dir=str(self.run_dir),
                    mode=mode,
                    config=mask_tree(config),
                    resume="allow" if resuming else None,
                    settings=wandb.Settings(silent=True, console="off"),
                )
        except Exception as e:  # no network, a rejected key, an unreachable server
            why = mask_secrets((str(e).strip().splitlines() or [type(e).__name__])[0])
            gone = not resuming and discard_unstarted(self.run_dir)
            fix = ("tracking.wandb=offline (and `wandb sync` later) or " if mode == "online" else "")  # fmt: skip
            raise LoralabError(
                f"Weights & Biases could not start a run (tracking.wandb={cfg.tracking.wandb}, "
                f"mode {mode}): {why}. Nothing was trained"
                f"{' and the new run folder is removed' if gone else ''}. Use {fix}"
                "tracking.wandb=disabled, or fix the connection, key or W&B installation."
            ) from None
        # The optimiser step is a metric of its own, the x axis of every chart: a resumed run
        # logs the steps after its checkpoint again, which W&B's own step (it only increases)
        # would drop.
        self._mirror("define_metric", _step_axis)

    def _mirror(self, what: str, fn) -> None:
        """W&B is a mirror: its failure (a lost connection, its service killed) stops the
        mirror with a warning, never the run."""
        if self.wandb_run is None:
            return
        try:
            fn(self.wandb_run)
        except Exception as e:
            run, self.wandb_run = self.wandb_run, None
            if what != "finish":  # marked failed now, where W&B can still hear it: its exit hook
                try:  # would otherwise close the run as a success, its charts cut short
                    run.finish(exit_code=1)
                except Exception:  # noqa: BLE001 - the service is gone: nothing more to tell it
                    pass
            print(f"loralab: warning: W&B stopped mirroring this run ({what}: {type(e).__name__}: "
                  f"{e}); its metrics.jsonl and summary.json go on.", file=sys.stderr)  # fmt: skip

    def log(self, record: dict, step: int | None = None) -> None:
        """One record (flat keys like `train/loss`, `lora_rank/q/mean`) at an optimiser step."""
        self.file.log({"step": step, **record} if step is not None else record)
        if self.wandb_run is not None:
            data = {
                k: (float(v) if isinstance(v, bool) else v)
                for k, v in record.items()
                if isinstance(v, (int, float, bool))
            }
            if step is not None:
                data[STEP_KEY] = step
            self._mirror("log", lambda run: run.log(data))

    def summary(self, values: dict) -> None:
        def put(run):
            for k, v in values.items():
                if isinstance(v, (int, float, str, bool)):
                    run.summary[k] = v

        self._mirror("summary", put)

    def finish(self, failed: bool = False) -> None:
        self._mirror("finish", lambda run: run.finish(exit_code=1 if failed else 0))
        self.wandb_run = None


def _step_axis(run) -> None:
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY)


class SilentTracker:
    """What a process other than rank 0 logs to: nothing (rank 0 owns metrics.jsonl and W&B)."""

    def log(self, record: dict, step: int | None = None) -> None:
        return None

    def summary(self, values: dict) -> None:
        return None

    def finish(self, failed: bool = False) -> None:
        return None
