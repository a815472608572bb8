"""Precision modes: bf16 frozen base with fp32 adapters (LoRA), fp32 master weights (full), auto."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from loralab import precision, probecache
from loralab.config import build_config
from loralab.runs import load_adapter_model
from loralab.tasks import get_task
from loralab.train import train

pytestmark = pytest.mark.precision  # run once in bf16 and once in fp32 (conftest.py)


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


def test_lm_head_trains_under_bf16(tmp_path, sst2_dir, monkeypatch):
    """The LM loss calls the decoder directly; it must run under autocast as well."""
    from loralab.heads import prompting

    seen = []  # (autocast on, gradients on) at each call of the LM head's loss
    real_loss = prompting.target_loss

    def recording_loss(model, inputs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
        return real_loss(model, inputs)

    monkeypatch.setattr(prompting, "target_loss", recording_loss)
    result, keep = _train(tmp_path, sst2_dir, "model.head=lm", "train.precision=bf16")
    assert sum(grad for _, grad in seen) >= 3  # at least one call per training step
    assert all(on for on, _ in seen), seen
    assert result.summary["param_dtypes"] == {"frozen": "bfloat16", "trainable": "float32"}
    assert 0.0 <= result.metrics["accuracy"] <= 1.0


@pytest.fixture
def cpu_only(monkeypatch, tmp_path):
    """A CPU machine with no GPU, an empty probe cache and no forced precision."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "_memo", {})
    precision.native_bf16.cache_clear()
    yield monkeypatch
    precision.native_bf16.cache_clear()


def _timer(fp32_s, bf16_s, calls):
    def timer(dtype, shape, budget_s):
        calls.append((dtype, shape))
        return bf16_s if dtype == torch.bfloat16 else fp32_s

    return timer


def test_auto_without_bf16_instructions_is_fp32_without_probing(cpu_only):
    cpu_only.setattr(probecache, "cpu_flags", lambda: {"avx2", "fma"})
    calls = []
    d = precision.decide("auto", (256, 576, 1536), timer=_timer(1.0, 0.1, calls))
    assert d["precision"] == "fp32" and d["reason"] == "cpu without bf16 instructions"
    assert calls == []
    assert precision.resolve("fp32") == "fp32" and precision.resolve("bf16") == "bf16"


@pytest.mark.parametrize("fp32_s, bf16_s, expected", [(1.0, 0.2, "bf16"), (0.2, 1.0, "fp32")])
def test_auto_with_bf16_instructions_takes_the_faster_measured_dtype(
    cpu_only, fp32_s, bf16_s, expected
):
    cpu_only.setattr(probecache, "cpu_flags", lambda: {"avx2", "amx_bf16", "avx512_bf16"})
    calls = []
    d = precision.decide("auto", (256, 64, 128), timer=_timer(fp32_s, bf16_s, calls))
    assert d["precision"] == expected and d["reason"] == "measured"
    assert d["probe"]["fp32_s"] == fp32_s and d["probe"]["bf16_s"] == bf16_s
    assert d["probe"]["shape"] == [256, 64, 128]
    assert {c[0] for c in calls} == {torch.float32, torch.bfloat16}


def test_real_probe_is_cached_per_machine_and_shape(cpu_only):
    shape = (32, 64, 128)
    first = precision.probe(shape, budget_s=0.02)
    assert not first["cached"] and first["fp32_s"] > 0 and first["bf16_s"] > 0
    assert first["choice"] == ("bf16" if first["bf16_s"] < first["fp32_s"] else "fp32")
    again = precision.probe(shape, budget_s=0.02)
    assert again["cached"] and again["fp32_s"] == first["fp32_s"]
    assert not precision.probe((32, 64, 256), budget_s=0.02)["cached"]  # another shape


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_environment_forces_what_auto_picks(cpu_only, forced):
    cpu_only.setenv(precision.ENV, forced)
    d = precision.decide("auto")
    assert d == {"precision": forced, "reason": f"forced by {precision.ENV}"}
    other = "fp32" if forced == "bf16" else "bf16"
    assert precision.resolve(other) == other  # an explicit config value wins


def test_bad_forced_precision_is_a_user_error(cpu_only):
    from loralab.errors import LoralabError

    cpu_only.setenv(precision.ENV, "fp8")
    with pytest.raises(LoralabError, match="LORALAB_PRECISION"):
        precision.decide("auto")


def test_summary_records_the_precision_decision(tmp_path, sst2_dir, cpu_only):
    cpu_only.setenv(precision.ENV, "fp32")
    result, _ = _train(tmp_path, sst2_dir)
    s = result.summary
    assert s["precision"] == "fp32"
    assert s["precision_decision"] == {"precision": "fp32", "reason": "forced by LORALAB_PRECISION"}
    assert s["identity"]["train"]["precision"] == "fp32"
    from loralab.config import load_yaml

    assert load_yaml(result.run_dir / "config.yaml")["train"]["precision"] == "fp32"


@pytest.mark.parametrize("model_name, extra", [("tiny-llama", []), ("tiny-bert", []),
                                               ("tiny-llama", ["lora.bias=all"])])  # fmt: skip
def test_a_bf16_lora_model_runs_outside_autocast(tmp_path, sst2_dir, model_name, extra):
    """Built for bf16 training, the model must also work when called directly (eval, notebook)."""
    from loralab.models import load_tokenizer
    from loralab.train import build_model

    cfg = build_config(overrides=[f"model.name={model_name}", "train.precision=bf16", *extra])
    tok = load_tokenizer(model_name)
    built = build_model(cfg, get_task("sst2"), tok, progress=False)
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    out = built.model(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1])
    )
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    with precision.autocast(True, "cpu"):
        inside = built.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    assert (inside - out.logits).abs().max() <= 0.05 * inside.abs().max() + 0.05


def test_cast_frozen_leaves_trainable_parameters_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    assert precision.cast_frozen(model) == 20
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    assert precision.dtypes(model) == {"frozen": "bfloat16", "trainable": "float32"}


def test_probe_cache_keeps_cpu_generations_with_one_name_apart(cpu_only):
    """ "AMD EPYC" names AVX2-only and AVX-512 BF16 generations alike; a cache in a home folder
    that several machines share must not hand one's measurement to the other."""
    cpu_only.setattr(probecache, "_cpu_name", lambda: "AMD EPYC")
    cpu_only.setattr(probecache, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    shape = (32, 16, 32)
    assert precision.probe(shape, budget_s=0.01)["cached"] is False
    assert precision.probe(shape, budget_s=0.01)["cached"] is True
    cpu_only.setattr(
        probecache, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    )
    assert precision.probe(shape, budget_s=0.01)["cached"] is False
    keys = list(probecache.read(precision.CACHE_FILE))
    assert len(keys) == 2 and all(k.startswith("AMD EPYC[") for k in keys)
