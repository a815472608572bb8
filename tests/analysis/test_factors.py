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
        (dict(use_dora=True), "DoRA"),
        (dict(init_lora_weights="pissa"), "pissa"),
        (dict(init_lora_weights="olora"), "olora"),
    ],
)
def test_unsupported_variants_are_refused(lora, word):
    from peft import LoraConfig

    assert word in an.unsupported_variant(LoraConfig(**lora))
    model = _peft_model(**lora)
    with pytest.raises(an.UnsupportedVariant, match=word):
        an.lora_factors(model)
    assert an.lora_factors(model, check_variant=False)  # structural use still works


@pytest.mark.parametrize("lora", [{}, dict(use_rslora=True), dict(init_lora_weights="gaussian")])
def test_plain_lora_rslora_and_gaussian_init_are_supported(lora):
    from peft import LoraConfig

    assert an.unsupported_variant(LoraConfig(**lora)) is None
    assert an.UnsupportedVariant.__mro__[1] is ValueError


def test_short_name_drops_the_peft_prefix():
    assert an.short_name("base_model.model.model.layers.0.q_proj") == "model.layers.0.q_proj"
    assert an.short_name("base_model.x") == "x"
    assert an.short_name("x") == "x"
