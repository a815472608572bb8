"""Reading finished runs back: a LoRA run's config, and its base model with the saved adapter."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import replace
from pathlib import Path

import torch.nn as nn

from . import rundir, tracking
from .config import ExperimentConfig, from_dict, load_yaml
from .console import known_warnings_silenced
from .errors import LoralabError
from .heads import head_for
from .models import load_for_task
from .tasks import Task


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """A run folder's config.yaml, checked to be whole: loralab writes every section with
    run.name last, so an empty file or one cut at a line boundary (still valid YAML) is a user
    error instead of a config silently filled with defaults (another model, data or schedule)."""
    path = Path(run_dir) / tracking.CONFIG_FILE
    data = load_yaml(path, "Run config")
    sections = [f.name for f in dataclasses.fields(ExperimentConfig)]
    missing = [s for s in sections if not isinstance(data.get(s), dict) or not data[s]]
    if not missing and "name" not in data["run"]:
        missing = ["run.name"]
    if missing:
        raise LoralabError(
            f"'{path}' is incomplete (no {', '.join(missing)}): it is truncated or was edited, "
            "and the defaults would stand in for the run's own settings. Restore it from a copy "
            "(every run's config.yaml holds all six sections, run.name last). Nothing was changed."
        )
    return from_dict(data)


def command_line_trust(
    cfg: ExperimentConfig, trust_remote_code: bool, source: Path
) -> ExperimentConfig:
    """A copy of `cfg` whose model.trust_remote_code comes from the command line alone; warns
    when `source` says true.

    A run folder or a study may come from someone else: its config must not switch remote
    code on.
    """
    if cfg.model.trust_remote_code and not trust_remote_code:
        print(
            f"loralab: warning: '{source}' sets model.trust_remote_code: true; remote code stays "
            "off unless this command is given --trust-remote-code.",
            file=sys.stderr,
        )
    return replace(cfg, model=replace(cfg.model, trust_remote_code=trust_remote_code))


def check_safetensors(path: Path) -> None:
    """A readable safetensors file (header and size intact), else a user error naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                fh.get_slice(key).get_shape()
    except FileNotFoundError:
        raise LoralabError(f"'{path}' is missing.") from None
    except Exception as e:  # SafetensorError, OSError: truncated, damaged, not a tensor file
        raise LoralabError(
            f"'{path}' is not a readable safetensors file ({str(e).strip() or type(e).__name__}): "
            "it is truncated or damaged. Restore it or train the run again."
        ) from None


def open_lora_run(
    run_dir: str | Path, purpose: str = "use", trust_remote_code: bool = False
) -> tuple[Path, ExperimentConfig]:
    """A finished LoRA run directory and its config; a full-FT run or a missing or damaged
    adapter is a user error. Remote code follows `trust_remote_code`, never the folder."""
    run_dir = tracking.open_run_dir(run_dir)
    cfg = load_run_config(run_dir)
    cfg = command_line_trust(cfg, trust_remote_code, run_dir / tracking.CONFIG_FILE)
    if cfg.train.method != "lora":
        raise LoralabError(
            f"'{run_dir}' is a full fine-tuning run (train.method={cfg.train.method}): there is no "
            f"adapter to {purpose}; its {tracking.MODEL_DIR}/ folder is already an ordinary "
            "transformers model."
        )
    if not (run_dir / tracking.ADAPTER_DIR / "adapter_config.json").is_file():
        summary = run_dir / tracking.SUMMARY_FILE
        state = (
            tracking.read_json(summary).get("status") if summary.is_file() else "no summary.json"
        )
        if rundir.is_training(run_dir):
            fix = "it is still training (another process holds its lock): wait until it finishes."
        elif state == "diverged":  # a diverged run would diverge again on resume
            fix = ("it diverged (a non-finite loss), so it has no adapter to use: train it again "
                   "with a lower train.lr.")  # fmt: skip
        elif state == "completed":  # finished, then its adapter folder was removed or not copied
            fix = ("the run finished, so the folder was moved or copied without its "
                   f"{tracking.ADAPTER_DIR}/ folder: point at a copy that has it, or train again.")  # fmt: skip
        else:
            fix = ("the adapter is written when training finishes: finish the run with "
                   f"`loralab train --resume {run_dir}` first.")  # fmt: skip
        raise LoralabError(
            f"'{run_dir}' has no saved adapter ({tracking.ADAPTER_DIR}/adapter_config.json; run "
            f"status: {state}): {fix}"
        )
    tracking.read_json(run_dir / tracking.ADAPTER_DIR / "adapter_config.json")
    check_safetensors(run_dir / tracking.ADAPTER_DIR / "adapter_model.safetensors")
    return run_dir, cfg


def load_base(
    cfg: ExperimentConfig, task: Task, tokenizer=None, progress: bool = False
) -> nn.Module:
    """The run's base model with the run's head formulation (classifier or causal LM), eval mode."""
    # The head is "missing" from the base checkpoint but comes with the adapter: hide the load
    # report that says otherwise.
    head = head_for(cfg, task)
    model, _ = load_for_task(cfg.model, head, tokenizer, progress, quiet_load_report=True)
    return model.eval()


def load_adapter_model(
    cfg: ExperimentConfig, task: Task, run_dir: Path, tokenizer=None, progress: bool = False
) -> nn.Module:
    """Base + the run's saved adapter (and trained head), fp32, eval mode."""
    from peft import PeftModel

    base = load_base(cfg, task, tokenizer, progress)
    with known_warnings_silenced():
        return PeftModel.from_pretrained(base, str(Path(run_dir) / tracking.ADAPTER_DIR)).eval()
