"""Module names (kind, layer, role) and the per-kind means shared with the training callbacks."""

from __future__ import annotations

import math

import pytest

from loralab import analysis as an


@pytest.mark.parametrize(
    "name, kind",
    [
        ("model.layers.3.self_attn.v_proj", "v"),  # Llama
        ("model.layers.3.mlp.gate_proj", "mlp"),
        ("model.layers.0.self_attn.qkv_proj", "qkv"),  # Phi-3
        ("gpt_neox.layers.0.attention.query_key_value", "qkv"),  # GPT-NeoX
        ("gpt_neox.layers.0.attention.dense", "o"),
        ("transformer.h.0.attn.c_attn", "qkv"),  # GPT-2
        ("transformer.h.0.attn.c_proj", "o"),
        ("transformer.h.0.mlp.c_fc", "mlp"),
        ("bert.encoder.layer.1.attention.self.query", "q"),  # BERT
        ("bert.encoder.layer.1.attention.output.dense", "o"),
        ("bert.encoder.layer.1.intermediate.dense", "mlp"),
        ("bert.encoder.layer.1.output.dense", "mlp"),
        ("distilbert.transformer.layer.0.attention.q_lin", "q"),  # DistilBERT
        ("score", "other"),
    ],
)
def test_module_kind_names_layers_as_the_lora_presets_do(name, kind):
    assert an.module_kind(name) == kind


def test_module_layer():
    assert an.module_layer("model.layers.3.self_attn.v_proj") == 3
    assert an.module_layer("bert.encoder.layer.11.attention.self.query") == 11
    assert an.module_layer("transformer.h.0.attn.c_attn") == 0
    assert an.module_layer("score") is None


def test_module_role():
    assert an.module_role("model.layers.3.self_attn.v_proj") == "self_attn.v_proj"
    assert an.module_role("score") == "score"


ROWS = [
    ("model.layers.0.self_attn.q_proj", {"x": 1.0, "y": 4.0}),
    ("model.layers.0.self_attn.v_proj", {"x": 2.0, "y": 5.0}),
    ("model.layers.1.self_attn.q_proj", {"x": 3.0, "y": math.inf}),
    ("model.layers.1.self_attn.v_proj", {"x": 6.0, "y": math.nan}),
]


def test_kind_means_average_each_kind_over_layers():
    means = an.kind_means(ROWS, ["x", "y"])
    assert list(means) == ["q", "v"]  # first-seen order
    assert means["q"] == {"x": 2.0, "y": 4.0}  # inf left out
    assert means["v"] == {"x": 4.0, "y": 5.0}  # NaN left out
    # Kept in when asked for: a diverged statistic shows in its mean.
    raw = an.kind_means(ROWS, ["y"], finite_only=False)
    assert math.isinf(raw["q"]["y"]) and math.isnan(raw["v"]["y"])
    assert an.kind_means(ROWS, ["x"], kind=lambda _: "all") == {"all": {"x": 3.0}}
    assert math.isnan(an.mean([None, math.nan]))


def test_group_by_kind_keeps_module_order_within_a_kind():
    groups = an.group_by_kind(ROWS)
    assert [n for n, _ in groups["q"]] == [ROWS[0][0], ROWS[2][0]]
    assert [n for n, _ in groups["v"]] == [ROWS[1][0], ROWS[3][0]]


def test_training_records_use_the_same_per_kind_means(tiny_lora_model):
    """The callbacks' `lora_adapters/<kind>/*_mean` are kind_means of module_stats."""
    from loralab.callbacks import adapter_records

    factors = an.lora_factors(tiny_lora_model)
    rows = [(f.name, an.module_stats(f)) for f in factors]
    records = adapter_records(tiny_lora_model)
    means = an.kind_means(rows, ["B_norm", "effective_rank"], finite_only=False)
    assert set(means) == {"q", "v"}
    for kind, m in means.items():
        assert records[f"lora_adapters/{kind}/B_norm_mean"] == pytest.approx(m["B_norm"])
        assert records[f"lora_rank/{kind}/effective_rank_mean"] == pytest.approx(
            m["effective_rank"]
        )
    everything = an.kind_means(rows, ["delta_fro_norm"], kind=lambda _: "all")["all"]
    assert records["lora_adapters/all/delta_fro_norm_mean"] == pytest.approx(
        everything["delta_fro_norm"]
    )
    assert records["lora_adapters/all/delta_fro_norm_mean"] > 0


@pytest.fixture
def tiny_lora_model():
    """tiny-llama with LoRA on q and v, B ≠ 0."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loralab.models import resolve

    base = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model
