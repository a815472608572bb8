"""Reading LoRA factors from a PEFT model, and refusing the variants they misdescribe."""

from __future__ import annotations

import pytest
import torch

from loralab import analysis as an


def _peft_model(**lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loralab.models import resolve

    base = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **lora))


def test_factors_of_every_adapted_layer_in_module_order():
    model = _peft_model()
    factors = an.lora_factors(model, with_base=True)
    assert [f.name for f in factors] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    f = factors[0]
    assert f.A.shape[0] == 4 and f.B.shape[1] == 4 and f.scaling == 2.0
    assert f.W.shape == (f.B.shape[0], f.A.shape[1]) and f.W.dtype == torch.float32
    assert not torch.any(f.B)  # a fresh adapter: B = 0
    assert an.lora_factors(model)[0].W is None


@pytest.mark.parametrize(
    "lora, word",
    [
        (dict(init_lora_weights="pissa"), "pissa"),
        (dict(init_lora_weights="olora"), "olora"),
        (dict(init_lora_weights="corda"), "corda"),
    ],
)
def test_residual_inits_without_recorded_initial_factors_are_refused(lora, word):
    from peft import LoraConfig

    assert word in an.unsupported_variant(LoraConfig(**lora))
    assert word in an.unsupported_variant({"init_lora_weights": word})  # adapter_config.json
    if word == "corda":
        return  # needs data-driven preprocessing to build at all
    model = _peft_model(**lora)  # made by PEFT alone: A0/B0 were not recorded
    with pytest.raises(an.UnsupportedVariant, match=word):
        an.lora_factors(model)
    assert an.lora_factors(model, check_variant=False)  # structural use still works


@pytest.mark.parametrize(
    "lora",
    [{}, dict(use_rslora=True), dict(use_dora=True), dict(init_lora_weights="gaussian")],
)
def test_plain_lora_rslora_dora_and_gaussian_init_are_supported(lora):
    from peft import LoraConfig

    assert an.unsupported_variant(LoraConfig(**lora)) is None
    assert an.UnsupportedVariant.__mro__[1] is ValueError
    factors = an.lora_factors(_peft_model(**lora))
    assert [f.delta is not None for f in factors] == [bool(lora.get("use_dora"))] * 2


def test_short_name_drops_the_peft_prefix():
    assert an.short_name("base_model.model.model.layers.0.q_proj") == "model.layers.0.q_proj"
    assert an.short_name("base_model.x") == "x"
    assert an.short_name("x") == "x"


def test_a_fresh_dora_adapter_has_no_update():
    """At init DoRA's magnitude is ‖W‖ per row in fp32; the norm taken in fp64 made m/‖V‖ = 1 ±
    6e-8 and a full-rank round-off ΔW (effective rank ~40 of 64), where plain LoRA's B = 0
    gives 0."""
    for f in an.lora_factors(_peft_model(use_dora=True)):
        stats = an.module_stats(f)
        assert f.delta is not None and not torch.any(f.delta)
        assert stats["delta_fro_norm"] == 0.0 and stats["numerical_rank"] == 0
