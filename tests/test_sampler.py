"""The training sampler: length-grouped batches from the features' `length` column, in the
order the stock Trainer path would give them."""

from __future__ import annotations

import datasets
import torch
from torch import nn
from transformers import TrainingArguments

from loralab.data import lengths
from loralab.trainer import LoralabTrainer, SeededLengthGroupedSampler


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids=None, labels=None):
        return {"loss": self.w.sum()}


def _features(n: int = 40) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 30, (n,), generator=g).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * k for k in sizes], "labels": [0] * n, "length": sizes})  # fmt: skip
    return ds.shuffle(seed=5).select(range(0, n, 2))  # an indices mapping, as a capped split has


def test_lengths_come_from_the_column_through_any_selection():
    ds = _features()
    assert lengths(ds) == list(ds["length"]) == [len(x) for x in ds["input_ids"]]
    assert lengths(ds.remove_columns("length")) is None


def test_the_sampler_reads_the_column_and_orders_as_from_the_input_ids(tmp_path, monkeypatch):
    ds = _features()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             train_sampling_strategy="group_by_length", length_column_name="length",
                             seed=3, report_to="none", use_cpu=True)  # fmt: skip
    trainer = LoralabTrainer(model=_Tiny(), args=args, train_dataset=ds)
    stripped = trainer._remove_unused_columns(
        ds, description="training"
    )  # as the dataloader has it
    assert "length" not in stripped.column_names

    def row_by_row(self):
        raise AssertionError("the sampler read every feature's input_ids row by row")

    monkeypatch.setattr(datasets.Dataset, "__iter__", row_by_row)
    sampler = trainer._get_train_sampler(stripped)
    monkeypatch.undo()
    assert isinstance(sampler, SeededLengthGroupedSampler) and sampler.batch_size == 8
    reference = SeededLengthGroupedSampler(8, [len(x) for x in ds["input_ids"]], 3)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert list(sampler) == list(reference)
    assert sorted(sampler) == list(range(len(ds)))


def test_random_order_keeps_the_trainer_s_sampler(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             train_sampling_strategy="random", report_to="none", use_cpu=True)  # fmt: skip
    trainer = LoralabTrainer(model=_Tiny(), args=args, train_dataset=_features())
    assert not isinstance(trainer._get_train_sampler(), SeededLengthGroupedSampler)
