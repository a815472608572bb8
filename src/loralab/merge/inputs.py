"""What a merge works on: a LoRA run's config, task, tokenizer, fp32 adapter model (the
reference) and its length-sorted dev batches, and how their outputs are scored."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from .. import lm
from ..config import ExperimentConfig
from ..data import cached_features
from ..models import load_tokenizer
from ..runs import load_adapter_model, open_lora_run
from ..tasks import Task, get_task
from ..train import is_causal


def device() -> torch.device:
    """Where the merge's models run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eval_features(
    cfg: ExperimentConfig,
    task: Task,
    tokenizer,
    causal: bool,
    max_examples: int | None,
    prompting=None,
):
    """Raw dev examples (first N) and their features, sorted by length (as in training)."""
    raw = task.load("eval", cfg.data.data_dir, cfg.data.eval_file)
    caps = [n for n in (max_examples, cfg.data.max_eval_examples) if n]
    if caps and min(caps) < len(raw):
        raw = raw.select(range(min(caps)))
    max_length = cfg.data.max_length or task.default_max_length
    feats = cached_features(task, raw, tokenizer, cfg.data, "eval", causal, max_length, prompting)
    return raw, feats.sort("length")


def make_batches(features, tokenizer, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded model inputs (no labels), in feature order: input_ids etc. [batch, seq]."""
    from transformers import DataCollatorWithPadding

    cols = [
        c for c in ("input_ids", "attention_mask", "token_type_ids") if c in features.column_names
    ]
    rows = features.select_columns(cols)
    collate = DataCollatorWithPadding(tokenizer)
    return [
        dict(collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))]))
        for i in range(0, len(rows), batch_size)
    ]


def predictions(outs: list[torch.Tensor], task: Task):
    """Batch outputs -> what `task.score` takes (as from Trainer.predict; QA padded with -100)."""
    if task.kind == "classification":
        return torch.cat(outs).numpy()
    width = max(o.shape[-1] for o in outs)
    padded = torch.cat([nn.functional.pad(o, (0, width - o.shape[-1]), value=-100.0) for o in outs])
    return padded[:, 0].numpy(), padded[:, 1].numpy()


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
    prompting: object = None  # `--head lm` runs: the prompt and verbalizers they were trained with

    def score(self, model: nn.Module, outs: list[torch.Tensor]) -> dict:
        """Task metrics of `model`, whose dev-batch outputs are `outs`. The LM formulation scores
        verbalizers (or generates answers) with the model itself, as training's evaluation did."""
        if self.prompting is None:
            return self.task.score(self.raw, self.feats, predictions(outs, self.task))
        return lm.evaluate(
            self.task, model, self.tokenizer, self.raw, self.feats, self.prompting,
            self.cfg.train.eval_batch_size, progress=False,
        )  # fmt: skip

    def adapter_model(self) -> nn.Module:
        """A fresh fp32 copy of the adapter model on the device."""
        return load_adapter_model(self.cfg, self.task, self.run_dir, self.tokenizer).to(device())


def load_run(
    run_dir, max_eval_examples, data_dir=None, eval_file=None, quiet=False, trust_remote_code=False
) -> Loaded:
    """Open a LoRA run for merging: its reference model on the device and its dev batches.

    `data_dir`/`eval_file` replace the run's own (e.g. it was trained elsewhere, or with a
    relative path) in a copy of its config.
    """
    run_dir, cfg = open_lora_run(run_dir, "merge", trust_remote_code)
    if data_dir or eval_file:
        data = replace(
            cfg.data,
            data_dir=data_dir or cfg.data.data_dir,
            eval_file=eval_file or cfg.data.eval_file,
        )
        cfg = replace(cfg, data=data)
    task = get_task(cfg.data.task)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, progress=not quiet)
    tokenizer.padding_side = "right"  # as in training (QA positions are absolute)
    reference = load_adapter_model(cfg, task, run_dir, tokenizer, progress=not quiet).to(device())
    prompting = None
    if cfg.model.head == "lm":
        prompting = lm.prompting_for(task, cfg.data, tokenizer)
    raw, feats = eval_features(
        cfg, task, tokenizer, is_causal(reference.config), max_eval_examples, prompting
    )
    batches = make_batches(feats, tokenizer, cfg.train.eval_batch_size)
    return Loaded(run_dir, cfg, task, tokenizer, reference, raw, feats, batches, prompting)
