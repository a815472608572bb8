"""What a merge works on: a LoRA run's config, task, tokenizer, fp32 adapter model (the
reference) and its length-sorted dev batches, and how their outputs are scored.

A run on a quantized base (`model.quantization`) is merged into the dequantized base: the
stored int8/NF4 weights expanded to fp32, so "merged" and "reference" share one fp32 base."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..config import ExperimentConfig
from ..console import known_warnings_silenced
from ..data import dev_settings, eval_split, pad_batches
from ..heads import Head, head_for
from ..models import is_causal, load_tokenizer
from ..quantization import dequantize_
from ..rundir import ADAPTER_DIR
from ..runs import load_adapter_model, load_base, open_lora_run
from ..tasks import Task, get_task


def device() -> torch.device:
    """Where the merge's models run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Loaded:
    """A run's config, task, tokenizer, fp32 adapter model and dev batches."""

    run_dir: Path
    cfg: ExperimentConfig
    task: Task
    tokenizer: object
    reference: nn.Module
    raw: object
    feats: object
    batches: list[dict]
    head: Head  # the run's formulation, prepared for its tokenizer

    def score(self, model: nn.Module, outs: list[torch.Tensor]) -> dict:
        """Task metrics of `model`, whose dev-batch outputs (`Head.logits`) are `outs`."""
        return self.head.score_logits(
            model, self.tokenizer, self.raw, self.feats, outs, self.cfg.train.eval_batch_size
        )

    def adapter_model(self) -> nn.Module:
        """A fresh fp32 copy of the adapter model on the device (on the dequantized base)."""
        return merge_adapter_model(self.cfg, self.task, self.run_dir, self.tokenizer).to(device())

    def base(self) -> nn.Module:
        """A fresh copy of the run's base (dequantized) without the adapter, eval mode."""
        return merge_base(self.cfg, self.task, self.tokenizer)


def merge_base(cfg: ExperimentConfig, task: Task, tokenizer=None, progress=False) -> nn.Module:
    """The run's base as the merge uses it: a quantized base dequantized to fp32, eval mode."""
    base = load_base(cfg, task, tokenizer, progress)
    dequantize_(base)
    return base


def merge_adapter_model(
    cfg: ExperimentConfig, task: Task, run_dir: Path, tokenizer=None, progress: bool = False
) -> nn.Module:
    """Base + the run's adapter, fp32, eval mode; a quantized base is dequantized first (PEFT's
    quantized LoRA layers cannot merge into fp32, and the merge is defined on the fp32 base)."""
    if cfg.model.quantization == "none":
        return load_adapter_model(cfg, task, run_dir, tokenizer, progress)
    from peft import PeftModel

    base = merge_base(cfg, task, tokenizer, progress)
    with known_warnings_silenced():
        return PeftModel.from_pretrained(base, str(Path(run_dir) / ADAPTER_DIR)).eval()


def load_run(
    run_dir, max_eval_examples, data_dir=None, eval_file=None, quiet=False, trust_remote_code=False
) -> Loaded:
    """Open a LoRA run for merging: its reference model on the device and its dev batches.

    `data_dir`/`eval_file` replace the run's own (e.g. it was trained elsewhere, or with a
    relative path) in a copy of its config.
    """
    run_dir, cfg = open_lora_run(run_dir, "merge", trust_remote_code)
    cfg = replace(cfg, data=dev_settings(cfg.data, data_dir, eval_file))
    task = get_task(cfg.data.task)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, progress=not quiet)
    tokenizer.padding_side = "right"  # as in training (QA positions are absolute)
    reference = merge_adapter_model(cfg, task, run_dir, tokenizer, not quiet).to(device())
    head = head_for(cfg, task)
    head.prepare(tokenizer)
    caps = [n for n in (max_eval_examples, cfg.data.max_eval_examples) if n]
    causal = is_causal(reference.config)
    raw, feats = eval_split(task, cfg.data, tokenizer, causal, head, min(caps) if caps else None)
    batches = pad_batches(feats, tokenizer, cfg.train.eval_batch_size)
    return Loaded(run_dir, cfg, task, tokenizer, reference, raw, feats, batches, head)
