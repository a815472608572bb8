"""A run's identity records the learning rate it trained with, the method's default when unset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loralab.config import build_config
from loralab.identity import identity

SPLITS = SimpleNamespace(max_length=32, fingerprint={"train_sha256": "t", "eval_sha256": "e"})


@pytest.mark.parametrize(("method", "default"), [("lora", 3e-4), ("full", 3e-5)])
def test_identity_fills_the_default_learning_rate(method, default):
    cfg = build_config(overrides=["model.name=tiny-llama", f"train.method={method}"])
    assert cfg.train.lr is None  # no train.lr in the config
    ident = identity(cfg, SPLITS, "fp32")
    assert ident["train"]["lr"] == default
    # An explicit one is recorded as given.
    cfg = build_config(
        overrides=["model.name=tiny-llama", f"train.method={method}", "train.lr=1e-3"]
    )
    assert identity(cfg, SPLITS, "fp32")["train"]["lr"] == 1e-3


def test_a_file_task_is_identified_by_its_rows_not_where_they_lie(tmp_path):
    """The same CSV in two folders (the fingerprint is the rows') pools; another option does not."""
    from dataclasses import replace

    cfg = build_config(overrides=["model.name=tiny-llama"])
    ids = [identity(replace(cfg, data=replace(cfg.data, task=t)), SPLITS, "fp32")
           for t in ("csv:/a/moods?label=y", "csv:/b/moods?label=y", "csv:/b/moods?label=z")]  # fmt: skip
    assert ids[0] == ids[1] != ids[2]
    assert ids[0]["data"]["task"] == "csv:moods?label=y"
    builtin = identity(cfg, SPLITS, "fp32")["data"]["task"]
    assert builtin == cfg.data.task  # built-in tasks are their names


def test_runs_from_before_pool_with_new_ones_only_with_a_fingerprint():
    """A stored identity that kept the folder pools with today's (the report normalises it);
    one without a data fingerprint keeps its path, so other files never pool."""
    from dataclasses import replace

    from loralab.study.records import pooled_identity

    cfg = build_config(overrides=["model.name=tiny-llama"])
    cfg = replace(cfg, data=replace(cfg.data, task="csv:/home/u/data/moods?label=mood"))
    new = identity(cfg, SPLITS, "fp32")
    old = {**new, "data": {**new["data"], "task": "csv:/home/u/data/moods?label=mood"}}
    assert pooled_identity(old) == new
    blind = identity(cfg, SimpleNamespace(max_length=32, fingerprint=None), "fp32")
    assert blind["data"]["task"] == "csv:/home/u/data/moods?label=mood"
    assert pooled_identity(blind) == blind
