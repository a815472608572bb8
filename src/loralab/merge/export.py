"""The merged model as an ordinary transformers folder (no PEFT needed), with its model card."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .. import tracking
from ..config import ExperimentConfig
from ..console import library_bars_off
from ..heads import Head
from ..models import canonical
from ..rundir import ADAPTER_DIR, SUMMARY_FILE, atomic_dir
from ..tasks import Task


def export_model(
    model: nn.Module, tokenizer, out: Path, card: str, labels: tuple[str, ...] = ()
) -> Path:
    """Save model + tokenizer + README.md into a temp folder, then rename it into place.

    `labels`: the names the exported config maps class indices to (`Head.export_labels`)."""
    model.config.pad_token_id = tokenizer.pad_token_id  # batched inference needs it (Llama)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}
    out = Path(out)
    with atomic_dir(out) as tmp:  # an existing export is replaced only once this one is whole
        with library_bars_off():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
    return out


def model_card(
    cfg: ExperimentConfig, task: Task, head: Head, run_dir: Path, report: dict, export_dtype: str
) -> str:
    """A short README.md for the exported folder: provenance, LoRA settings, metric, equivalence."""
    summary_path = run_dir / SUMMARY_FILE
    summary = tracking.read_json(summary_path) if summary_path.is_file() else {}
    adapter_cfg = tracking.read_json(run_dir / ADAPTER_DIR / "adapter_config.json")
    lo = cfg.lora
    scaling = lo.alpha / (lo.r**0.5 if lo.use_rslora else lo.r)
    targets = adapter_cfg.get("target_modules")
    targets = sorted(targets) if isinstance(targets, list) else targets
    metrics = ", ".join(
        f"{k} {v:.4f}" for k, v in (summary.get("metrics") or {}).items() if isinstance(v, float)
    )
    n_eval = (summary.get("examples") or {}).get("eval", "?")
    auto = head.auto_class().__name__
    lines = [
        "---",
        "library_name: transformers",
        "tags: [loralab, lora, merged]",
        "---",
        f"# {task.name}: {cfg.model.name} + LoRA, merged",
        "",
        f"An ordinary transformers model ({export_dtype}): the LoRA adapter of loralab run "
        f"`{run_dir.name}` folded into the base weights with `merge_and_unload`. No PEFT needed.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{cfg.model.name}`: {canonical(cfg.model.name)['description']} |",
        f"| task | {task.name} ({task.kind}) |",
        f"| LoRA | r={lo.r}, alpha={lo.alpha:g} (scaling {scaling:g}{', rsLoRA' if lo.use_rslora else ''}"
        f"{', DoRA' if lo.use_dora else ''}), dropout {lo.dropout:g}, target `{lo.target}` -> "
        f"{targets} ({report['lora_effect']['layers']} layers) |",
        f"| trained head | {', '.join(report['lora_effect']['heads']) or 'none'} (fully trained) |",
        f"| training | lr {cfg.lr:g}, {summary.get('steps', '?')} steps, seed {cfg.train.seed}, "
        f"{(summary.get('examples') or {}).get('train', '?')} examples |",
        f"| dev metric (adapter model, {n_eval} examples) | {metrics or 'n/a'} |",
        "",
        f"## Merge equivalence ({report['examples']} dev examples; status: **{report['status']}**)",
        "",
        f"Reference: the unmerged fp32 adapter model. LoRA update effect on the logits: "
        f"max |Δ| {report['lora_effect']['max_abs_diff']:.3g}.",
        "",
        "| variant | max abs Δlogit | max rel Δ | changed predictions | metric | bound | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["variants"].items():
        metric = row["metrics"].get(task.primary_metric, float("nan"))
        lines.append(
            f"| {name} | {row['max_abs_diff']:.3g} | {row['max_rel_diff']:.3g} | "
            f"{row['changed_predictions']:.2%} | {metric:.4f} | {row['bound']:.3g} | {row['status']} |"
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)
