"""Test helpers for the merge package: LoRA run directories with a non-identity adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from loralab import tracking
from loralab.config import build_config
from loralab.merge import MergeOptions, run_merge
from loralab.models import load_tokenizer
from loralab.tasks import get_task
from loralab.train import build_model

# B ~ N(0, std²): tiny BERT's logits react weakly to its layers (pooler tanh, small init), so it
# needs a larger update than tiny Llama for the check to be informative.
B_STD = {"tiny-llama": 0.1, "tiny-bert": 1.0}
FAST = dict(bench=False, export=False, quiet=True)


def make_run(
    root: Path, data_dir: Path, model="tiny-llama", target="standard", b_std=None, overrides=()
):
    """A LoRA run directory as `loralab train` leaves it, with B drawn at random (B ≠ 0)."""
    cfg = build_config(
        overrides=[
            f"model.name={model}", f"lora.target={target}", f"data.data_dir={data_dir}",
            f"run.output_dir={root}", *overrides,
        ]
    )  # fmt: skip
    task = get_task(cfg.data.task)
    tok = load_tokenizer(model, progress=False)
    torch.manual_seed(0)
    built = build_model(cfg, task, tok, progress=False)
    std = B_STD[model] if b_std is None else b_std
    with torch.no_grad():
        for name, p in built.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std) if std else p.zero_()
    run = tracking.create_run_dir(cfg)
    built.model.save_pretrained(run / tracking.ADAPTER_DIR)
    tok.save_pretrained(run / tracking.ADAPTER_DIR)
    return run


def merge_run(run: Path, **options):
    """`run_merge` with MergeOptions(**options)."""
    return run_merge(run, MergeOptions(**options))
