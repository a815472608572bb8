"""Attention kernel choice: measured per shape, injectable timings, recorded in the summary."""

from __future__ import annotations

import pytest
import torch

from loralab import attention
from loralab.config import build_config
from loralab.train import train

pytestmark = pytest.mark.precision  # run once in bf16 and once in fp32 (conftest.py)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(attention, "_memo", {})
    return monkeypatch


@pytest.mark.parametrize("sdpa_s, eager_s, expected", [(4.0, 1.0, "eager"), (1.0, 4.0, "sdpa")])
def test_the_faster_kernel_wins(fresh, sdpa_s, eager_s, expected):
    seen = []

    def timer(fn, shape, dtype, budget_s):
        seen.append(fn.__name__)
        return sdpa_s if fn is attention._sdpa else eager_s

    d = attention.decide((16, 4, 32, 16), torch.float32, timer=timer)
    assert d["implementation"] == expected and d["reason"] == "measured"
    assert d["probe"]["sdpa_s"] == sdpa_s and d["probe"]["eager_s"] == eager_s
    assert seen == ["_sdpa", "_eager"] * 3  # interleaved bursts


def test_eager_and_sdpa_probes_compute_the_same_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(attention._eager(q, k, v), attention._sdpa(q, k, v))


def test_real_probe_is_cached(fresh):
    shape = (2, 2, 8, 8)
    first = attention.decide(shape, torch.float32, budget_s=0.02)
    assert first["implementation"] in ("eager", "sdpa") and "cached" not in first
    attention._memo.clear()
    again = attention.decide(shape, torch.float32, budget_s=0.02)
    assert again["cached"] and again["probe"] == first["probe"]


def test_shape_from_a_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    assert attention.attention_shape(cfg, 16, 40) == (16, 9, 40, 64)


@pytest.mark.parametrize("setting", ["eager", "sdpa"])
def test_explicit_attention_reaches_the_model_and_the_summary(tmp_path, sst2_dir, setting):
    seen = {}
    from transformers import TrainerCallback

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["impl"] = model.config._attn_implementation

    cfg = build_config(
        overrides=[
            "model.name=tiny-llama", f"data.data_dir={sst2_dir}", f"run.output_dir={tmp_path}",
            "train.max_steps=2", "train.batch_size=8", f"model.attention={setting}",
        ]
    )  # fmt: skip
    result = train(cfg, quiet=True, callbacks=[Spy()])
    assert seen["impl"] == setting
    assert result.summary["attention"] == {"implementation": setting, "reason": "set in the config"}
    assert "attention" not in result.summary["identity"]["model"]


@pytest.mark.parametrize("measured", ["eager", "sdpa"])
def test_a_measured_attention_reaches_the_model(tmp_path, sst2_dir, monkeypatch, measured):
    # `auto`: the probe's verdict must be what the model runs, not only what the summary says.
    seen = {}
    from transformers import TrainerCallback

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["impl"] = model.config._attn_implementation

    verdict = {"implementation": measured, "reason": "measured"}
    monkeypatch.setattr(attention, "decide", lambda shape, dtype: dict(verdict))
    cfg = build_config(
        overrides=[
            "model.name=tiny-llama", f"data.data_dir={sst2_dir}", f"run.output_dir={tmp_path}",
            "train.max_steps=2", "train.batch_size=8", "model.attention=auto",
        ]
    )  # fmt: skip
    result = train(cfg, quiet=True, callbacks=[Spy()])
    assert seen["impl"] == measured and result.summary["attention"] == verdict
