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
