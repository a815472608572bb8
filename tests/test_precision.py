"""Precision modes: bf16 frozen base with fp32 adapters (LoRA), fp32 master weights (full), auto."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from loralab import precision
from loralab.config import build_config
from loralab.runs import load_adapter_model
from loralab.tasks import get_task
from loralab.train import train


class _Keep(TrainerCallback):
    """Keeps the trained model and the dtypes seen during the first training step."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model = model
        self.autocast_bf16 = args.bf16

    def on_step_end(self, args, state, control, model=None, **kw):
        self.step_dtypes = {n: p.dtype for n, p in model.named_parameters()}


def _train(tmp_path, sst2_dir, *overrides):
    cfg = build_config(
        overrides=[
            "model.name=tiny-llama", f"data.data_dir={sst2_dir}", f"run.output_dir={tmp_path}",
            "train.max_steps=3", "train.lr=5e-2", "train.batch_size=8", "train.save_steps=100",
            *overrides,
        ]
    )  # fmt: skip
    keep = _Keep()
    return train(cfg, quiet=True, callbacks=[keep]), keep


def test_lora_bf16_stores_the_frozen_base_in_bf16_and_adapters_in_fp32(tmp_path, sst2_dir):
    result, keep = _train(tmp_path, sst2_dir, "train.precision=bf16")
    assert keep.autocast_bf16
    for name, dtype in keep.step_dtypes.items():
        trainable = "lora_" in name or ".modules_to_save." in name
        assert dtype == (torch.float32 if trainable else torch.bfloat16), (name, dtype)
    s = result.summary
    assert s["precision"] == "bf16"
    assert s["param_dtypes"] == {"frozen": "bfloat16", "trainable": "float32"}
    assert s["verification"]["base_unchanged"] and s["status"] == "completed"
    assert torch.isfinite(torch.tensor(s["train_loss"]))


def test_bf16_adapter_loads_onto_an_fp32_base_with_the_same_predictions(tmp_path, sst2_dir):
    result, keep = _train(tmp_path, sst2_dir, "train.precision=bf16")
    cfg_task = get_task("sst2")
    from loralab.config import from_dict, load_yaml

    cfg = from_dict(load_yaml(result.run_dir / "config.yaml"))
    fp32 = load_adapter_model(cfg, cfg_task, result.run_dir)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (16, 24), generator=g)
    mask = torch.ones_like(ids)
    bf16_model = keep.model.eval()
    with torch.no_grad(), precision.autocast(True, "cpu"):
        want = bf16_model(input_ids=ids, attention_mask=mask).logits.float()
    with torch.no_grad():
        got = fp32(input_ids=ids, attention_mask=mask).logits
    # bf16 keeps 8 bits of mantissa: logits agree to bf16 rounding of the activations.
    assert (got - want).abs().max() <= 0.03 * want.abs().max() + 0.02
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_full_fine_tuning_bf16_keeps_fp32_master_weights(tmp_path, sst2_dir):
    result, keep = _train(tmp_path, sst2_dir, "train.method=full", "train.precision=bf16")
    assert keep.autocast_bf16
    assert set(keep.step_dtypes.values()) == {torch.float32}
    assert result.summary["param_dtypes"] == {"frozen": "none", "trainable": "float32"}


def test_lm_head_trains_under_bf16(tmp_path, sst2_dir):
    """The LM loss calls the decoder directly; it must run under autocast as well."""
    result, keep = _train(tmp_path, sst2_dir, "model.head=lm", "train.precision=bf16")
    assert result.summary["param_dtypes"] == {"frozen": "bfloat16", "trainable": "float32"}
    assert 0.0 <= result.metrics["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "flags, expected", [({"avx2", "fma"}, "fp32"), ({"avx2", "avx512_bf16"}, "bf16")]
)
def test_auto_picks_bf16_only_with_native_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    precision.native_bf16.cache_clear()
    try:
        assert precision.resolve("auto") == expected
        assert precision.resolve("fp32") == "fp32" and precision.resolve("bf16") == "bf16"
    finally:
        precision.native_bf16.cache_clear()


def test_cast_frozen_leaves_trainable_parameters_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    assert precision.cast_frozen(model) == 20
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    assert precision.dtypes(model) == {"frozen": "bfloat16", "trainable": "float32"}
