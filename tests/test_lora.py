"""LoRA presets resolved from a model's own layers, their errors, and GPT-2's fused Conv1D."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.lora import apply_lora, resolve_targets, to_peft_config


def tiny_gpt2():
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return tf.GPT2LMHeadModel(config).eval()


def tiny_llama():
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def spec(*overrides):
    return build_config(overrides=list(overrides)).lora


@pytest.mark.parametrize(
    "preset, llama, gpt2",
    [
        ("standard", ["q_proj", "v_proj"], ["c_attn"]),
        # GPT-2's c_proj exists in attention and in the MLP: the key keeps the attention one only.
        ("extended", ["k_proj", "o_proj", "q_proj", "v_proj"], ["attn.c_proj", "c_attn"]),
    ],
)
def test_presets_read_the_roles_of_each_family(preset, llama, gpt2):
    assert sorted(resolve_targets(spec(f"lora.target={preset}"), tiny_llama())) == sorted(llama)
    assert sorted(resolve_targets(spec(f"lora.target={preset}"), tiny_gpt2())) == sorted(gpt2)


def test_all_linear_covers_every_block_layer_but_not_the_output_head():
    keys = resolve_targets(spec("lora.target=all-linear"), tiny_llama())
    assert {k.split(".")[-1] for k in keys} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip
    assert not any("lm_head" in k for k in keys)


def test_gpt2_fused_qkv_gets_fan_in_fan_out_and_a_correct_update():
    model = tiny_gpt2()
    peft_cfg = to_peft_config(spec("lora.target=standard"), model, [], "CAUSAL_LM")
    assert peft_cfg.fan_in_fan_out is True  # Conv1D stores [in, out]
    wrapped = apply_lora(spec("lora.target=standard", "lora.r=4", "lora.alpha=8"), model, []).eval()
    layer = wrapped.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r, in], [out, r]
    x = torch.randn(3, 32)
    dense = x @ layer.base_layer.weight + layer.base_layer.bias + 2.0 * x @ A.T @ B.T
    with torch.no_grad():
        assert torch.allclose(layer(x), dense, atol=1e-5)


def test_a_users_modules_to_save_add_to_the_heads_and_do_not_replace_them():
    model = tiny_llama()
    extra = 'lora.extra={"modules_to_save": ["embed_tokens", "lm_head"]}'
    cfg = to_peft_config(spec(extra), model, ["lm_head"], "CAUSAL_LM")
    assert list(cfg.modules_to_save) == ["lm_head", "embed_tokens"]  # once each, heads first
    cfg = to_peft_config(spec('lora.extra={"modules_to_save": "embed_tokens"}'), model, [], None)
    assert list(cfg.modules_to_save) == ["embed_tokens"]
    assert to_peft_config(spec(), model, [], None).modules_to_save is None


def test_unknown_preset_names_the_presets():
    with pytest.raises(LoralabError, match="Unknown LoRA target preset 'qv'.*standard"):
        resolve_targets(spec("lora.target=qv"), tiny_llama())


def test_a_module_list_that_matches_nothing_lists_the_layers():
    with pytest.raises(LoralabError, match=r"\['c_attn'\] match no linear layer.*q_proj"):
        resolve_targets(spec("lora.target=[c_attn]"), tiny_llama())


@pytest.mark.parametrize("init", [True, False, "gaussian", "OLoRA", "pissa", "pissa_niter_16", "loftq"])  # fmt: skip
def test_check_init_takes_every_name_peft_takes(init):
    """PEFT's own spellings pass (its annotation writes `pissa_niter_[number of iters]`, and it
    compares some names case-blind); `loftq` needs its config from lora.extra, which only the
    real build has: left to it, not refused here."""
    from loralab.config import LoraSettings
    from loralab.lora import check_init

    check_init(LoraSettings(init_lora_weights=init))


def test_check_init_refuses_an_unknown_name_and_lists_the_known():
    from loralab.config import LoraSettings
    from loralab.lora import check_init

    with pytest.raises(LoralabError, match=r"'pisa' is not an initialisation .* pissa_niter_N"):
        check_init(LoraSettings(init_lora_weights="pisa"))


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            "{r: 2, lora_alpha: 64}",
            "lora.extra sets r, lora_alpha, which loralab sets from its own keys",
        ),  # fmt: skip
        ("{use_dora: true}", "use_dora -> lora.use_dora"),
        ("{task_type: SEQ_CLS}", "task_type (set from the model)"),
        ("{modules_to_save: 5}", "modules_to_save must be a module name or a list of them, got 5"),
    ],
)
def test_lora_extra_cannot_shadow_loralabs_own_keys(tmp_path, capsys, extra, needle):
    """lora.extra={r: 2} trained an r=2 adapter that config, summary and report called r=8; now
    a user error, before any data or model loads."""
    from loralab.cli import main

    code = main(["train", "--model", "tiny-llama", "--output-dir", str(tmp_path), "--quiet",
                 f"lora.extra={extra}"])  # fmt: skip
    assert code == 2 and needle in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing started
