"""A task and a head defined in this file alone (no edit of loralab), trained end to end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from loralab.config import build_config
from loralab.heads import Head, register_head
from loralab.tasks import Task, register_task
from loralab.train import train

WORDS = {1: ["good", "great", "fine"], 0: ["bad", "poor", "dull"]}


@dataclass
class ToyTask(Task):
    """Is the sentence's adjective positive? Examples are generated, not read from files."""

    kind: ClassVar[str] = "classification"
    name: str = "toy-sentiment"
    label_names: tuple[str, ...] = ("negative", "positive")
    metric_names: tuple[str, ...] = ("accuracy",)

    def load(self, split, data_dir=None, file=None):
        from datasets import Dataset

        n = 32 if split == "train" else 12
        labels = [i % 2 for i in range(n)]
        texts = [f"the film was {WORDS[y][i % 3]}" for i, y in enumerate(labels)]
        return Dataset.from_dict({"text_a": texts, "text_b": [""] * n, "label": labels})

    def probe_rows(self):
        return self.load("train").select(range(8))

    def featurize(self, raw, tokenizer, max_length, doc_stride, split, causal):
        def encode(batch):
            enc = tokenizer(batch["text_a"], truncation=True, max_length=max_length)
            enc["labels"] = batch["label"]
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            return enc

        return raw.map(encode, batched=True, remove_columns=raw.column_names)

    def score(self, raw, features, predictions):
        preds = np.asarray(predictions).argmax(-1)
        return self.label_metrics(preds, np.asarray(features["labels"]))

    def label_metrics(self, preds, labels):
        return {"accuracy": float((preds == labels).mean())}


class BrierHead(Head):
    """A classifier trained with the Brier score (squared error of the class probabilities)."""

    name = "brier"
    loss_calls = 0

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def peft_task_type(self):
        return "SEQ_CLS"

    def model_kwargs(self):
        return {"num_labels": self.task.num_labels}

    def featurize(self, raw, tokenizer, max_length, split, causal):
        return self.task.featurize(raw, tokenizer, max_length, 0, split, causal)

    def loss(self, model, inputs):
        type(self).loss_calls += 1
        labels = inputs["labels"]
        probs = (
            model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float().softmax(-1)
        )
        onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
        return ((probs - onehot) ** 2).sum(-1).mean()

    def evaluate(self, model, tokenizer, raw, features, batch_size, progress, predict=None):
        return self.task.score(raw, features, predict(features).predictions)

    def logits(self, output, batch):
        return output.logits

    def score_logits(self, model, tokenizer, raw, features, outs, batch_size):
        return self.task.score(raw, features, torch.cat(outs).numpy())


def test_a_registered_task_and_head_train_end_to_end(tmp_path):
    register_task(ToyTask())
    register_head(BrierHead)
    cfg = build_config(
        overrides=[
            "model.name=tiny-llama", "data.task=toy-sentiment", "model.head=brier",
            "train.max_steps=4", "train.batch_size=8", "train.lr=1e-2", "train.save_steps=100",
            f"run.output_dir={tmp_path}", "run.name=toy",
        ]
    )  # fmt: skip
    result = train(cfg, quiet=True)
    assert BrierHead.loss_calls >= 4  # the head's loss trained the model, not the model's own
    assert result.summary["status"] == "completed" and result.summary["head"] == "brier"
    assert result.summary["examples"] == {"train": 32, "eval": 12}
    acc = result.metrics["accuracy"]  # a share of the 12 dev examples
    assert 0.0 <= acc <= 1.0 and abs(acc * 12 - round(acc * 12)) < 1e-9
    assert result.summary["majority_baseline"] == {}  # the toy task defines none
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert result.summary["verification"]["base_unchanged"] is True


def test_validate_checks_a_registered_task_and_head_with_the_heads_loss(tmp_path):
    import json

    from loralab import cli

    register_task(ToyTask())
    register_head(BrierHead)
    calls = BrierHead.loss_calls
    out = tmp_path / "v.json"
    argv = ["validate", "--model", "tiny-llama", "--out", str(out), "--steps", "6"]
    assert cli.main([*argv, "data.task=toy-sentiment", "model.head=brier"]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and (report["task"], report["head"]) == ("toy-sentiment", "brier")
    # The probe's forward/backward check and its 6 steps trained with the head's loss.
    assert BrierHead.loss_calls - calls == 7
