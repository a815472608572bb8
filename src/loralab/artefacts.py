"""Portable run artefacts: an adapter that names its base by a canonical id, and its model card.

PEFT writes `base_model_name_or_path` as the folder the base was loaded from, which for a
built-in model is this machine's cache. Rewriting it to the canonical name (a hub id, or a
built-in name with its recorded source) lets the adapter travel; the card says what it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__, tracking
from .config import ExperimentConfig
from .models import canonical

# PEFT's task type in adapter_config.json -> the transformers class that loads the base.
_AUTO_CLASS = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
}


def fix_adapter_config(adapter_dir: Path, model_name: str) -> dict:
    """Canonical base id and duplicate-free modules_to_save in adapter_config.json; returns it."""
    path = Path(adapter_dir) / "adapter_config.json"
    data = json.loads(path.read_text())
    base = canonical(model_name)
    data["base_model_name_or_path"] = base["id"]
    if data.get("modules_to_save"):
        # PEFT's SEQ_CLS type adds its own ["classifier", "score"] to ours: keep each once.
        data["modules_to_save"] = list(dict.fromkeys(data["modules_to_save"]))
    tracking.atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _rank(lo, adapter_config: dict) -> str:
    """r and alpha as saved; a PiSSA/OLoRA run is saved as the equivalent plain adapter of rank
    2r on the pretrained weights, which the card says next to the rank it trained at."""
    r, alpha = adapter_config.get("r", lo.r), adapter_config.get("lora_alpha", lo.alpha)
    text = f"r={r}, alpha={alpha:g}"
    if r != lo.r:
        text += (
            f" (trained at r={lo.r}, alpha={lo.alpha:g} with init {lo.init_lora_weights}; saved "
            "as the equivalent plain adapter on the pretrained weights)"
        )
    return text


def model_card(cfg: ExperimentConfig, task, summary: dict, adapter_config: dict) -> str:
    """README.md for a run's adapter folder: base model, task and data, metrics, LoRA settings."""
    base = canonical(cfg.model.name)
    lo = cfg.lora
    metrics = summary.get("metrics") or {}
    examples = summary.get("examples") or {}
    labels = list(getattr(task, "label_names", ()) or ())
    auto = _AUTO_CLASS.get(adapter_config.get("task_type"), "AutoModelForQuestionAnswering")
    num_labels = f", num_labels={task.num_labels}" if auto.endswith("Classification") else ""
    # loralab builds a built-in and dequantises a GGUF file into a transformers folder
    converted = base["kind"] in ("builtin", "gguf")
    load_base = f"resolve({base['id']!r})" if converted else repr(base["id"])  # any path quotes
    front = ["---", "library_name: peft", "tags: [loralab, lora]"]
    if base["origin"]:
        front.append(f"base_model: {base['origin']}")
    front.append("---")
    lines = [
        *front,
        "",
        f"# LoRA adapter: {task.name} on {base['id']}",
        "",
        f"Trained with loralab {__version__} (`{summary.get('command') or 'loralab train'}`).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base['id']}`: {base['description']} |",
        f"| base source | {base['source']} |",
        f"| head | {cfg.model.head} ({auto}) |",
        f"| task | `{cfg.data.task}` ({task.kind}; labels: {', '.join(labels) or 'n/a'}) |",
        f"| data | train {examples.get('train', '?')} examples, eval {examples.get('eval', '?')} "
        f"examples; sha256 train {str((summary.get('data_fingerprint') or {}).get('train_sha256', '?'))[:12]}… |",
        f"| metrics (dev) | {', '.join(f'{k} {_fmt(v)}' for k, v in metrics.items()) or 'n/a'} |",
        f"| main metric | {task.primary_metric} |",
        f"| LoRA | {_rank(lo, adapter_config)}, dropout {lo.dropout:g}, target `{lo.target}` -> "
        f"{', '.join(sorted(adapter_config.get('target_modules') or []))}"
        f"{', rsLoRA' if lo.use_rslora else ''}{', DoRA' if lo.use_dora else ''} |",
        f"| trained in full | {', '.join(adapter_config.get('modules_to_save') or []) or 'none'} |",
        f"| training | lr {cfg.lr:g}, {summary.get('steps', '?')} steps, batch "
        f"{cfg.train.batch_size}, precision {summary.get('precision', cfg.train.precision)}, "
        f"seed {cfg.train.seed} |",
        f"| loralab | {__version__} (git {summary.get('git_commit') or 'n/a'}) |",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto}",
    ]
    if converted:
        lines.append("from loralab.models import resolve  # builds or converts the base once")
    lines += [
        "",
        f"base = {auto}.from_pretrained({load_base}{num_labels})",
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)


def finish_adapter(run_dir: Path, cfg: ExperimentConfig, task, summary: dict) -> None:
    """Make a finished LoRA run's adapter folder portable and give it its model card."""
    adapter = Path(run_dir) / tracking.ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        return
    data = fix_adapter_config(adapter, cfg.model.name)
    tracking.atomic_write(adapter / "README.md", model_card(cfg, task, summary, data))
