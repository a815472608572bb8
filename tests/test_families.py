"""Any decoder or encoder family without code changes: tiny in-memory models of eight families.

Presets resolve from each model's own layers; a LoRA step trains only adapters and heads; merging
is exact in fp32; `loralab validate` passes on a saved folder of each; the LM head follows the
model's own output path (Gemma 2 softcapping).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from loralab.cli import main
from loralab.config import LoraSettings as LoraConfig
from loralab.errors import LoralabError
from loralab.lora import adapted_modules, apply_lora, check_targets, linear_layers, resolve_targets
from loralab.merge import DEFAULT_TOLERANCES, INFORMATIVE_FACTOR, equivalence_bound
from loralab.models import load_tokenizer

# Byte tokenizers of the built-in tiny models: <pad>=0 <s>=1 </s>=2 (260 tokens); BERT 261.
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
SIZE = dict(
    vocab_size=261,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)
LAYERS = 2

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **SIZE, **IDS),
    "gemma3_text": lambda: tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, **SIZE, **IDS),
    "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **SIZE, **IDS),
    "mistral": lambda: tf.MistralConfig(num_key_value_heads=2, **SIZE, **IDS),
    "phi3": lambda: tf.Phi3Config(num_key_value_heads=4, **SIZE, **IDS),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**SIZE, **IDS),
    "bert": lambda: tf.BertConfig(**SIZE, pad_token_id=0),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=261, n_embd=32, n_layer=2, n_head=4, n_positions=128, **IDS
    ),
}

_LLAMA = (
    ["self_attn.q_proj", "self_attn.v_proj"],
    ["self_attn.k_proj", "self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
)
# (standard, what extended adds, what all-linear adds): names inside each block.
EXPECTED = {
    **dict.fromkeys(("llama", "gemma3_text", "qwen2", "mistral"), _LLAMA),
    "phi3": (["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj", "mlp.down_proj"]),
    "gpt_neox": (
        ["attention.query_key_value"],
        ["attention.dense"],
        ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    ),
    "bert": (
        ["attention.self.query", "attention.self.value"],
        ["attention.self.key", "attention.output.dense"],
        ["intermediate.dense", "output.dense"],
    ),
    "gpt2": (["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]),
}


def classifier(family: str, seed: int = 0):
    """A random two-label classifier of `family` and its new head modules."""
    torch.manual_seed(seed)
    model = tf.AutoModelForSequenceClassification.from_config(CONFIGS[family]())
    prefix = model.base_model_prefix
    heads = [n for n, m in model.named_children() if n != prefix and list(m.parameters())]
    return model.eval(), heads


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def local_names(model, names: list[str]) -> set[str]:
    """Names inside the block ("self_attn.q_proj") of the layers `names`."""
    return {x.local for x in linear_layers(model) if x.name in names}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_presets_resolve_from_the_models_own_layers(family):
    model, heads = classifier(family)
    standard, extra, mlp = EXPECTED[family]
    for preset, local in (
        ("standard", standard),
        ("extended", standard + extra),
        ("all-linear", standard + extra + mlp),
    ):
        keys = resolve_targets(LoraConfig(target=preset), model, exclude=heads)
        chosen = adapted_modules(model, keys, exclude=heads)
        assert local_names(model, chosen) == set(local), (preset, keys)
        assert len(chosen) == LAYERS * len(local)  # every block, nothing outside the blocks
    # The same answer from a weightless skeleton of the config (what train/validate check first).
    keys = check_targets(
        LoraConfig(target="extended"), model.config, tf.AutoModelForSequenceClassification
    )
    assert keys == resolve_targets(LoraConfig(target="extended"), model)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_lora_step_changes_only_adapters_and_head(family):
    model, heads = classifier(family)
    model = apply_lora(LoraConfig(target="all-linear", r=4), model, heads, task_type="SEQ_CLS")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**batch()).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora_b = {n for n in before if ".lora_B." in n}
    head = {n for n in before if ".modules_to_save." in n}
    assert lora_b and head
    assert lora_b <= changed and head <= changed  # B = 0 at start: only B (and heads) move
    assert changed <= lora_b | head | {n for n in before if ".lora_A." in n}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_merge_is_exact_in_fp32(family):
    from peft import PeftModel

    model, heads = classifier(family)
    model = apply_lora(LoraConfig(target="all-linear", r=4), model, heads, task_type="SEQ_CLS")
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0, 0.5)  # a trained-looking update, so the check has something to see
    model.eval()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        adapter = model(**inputs).logits
        with model.disable_adapter():
            plain = model(**inputs).logits
        merged = model.merge_and_unload()(**inputs).logits
    assert not isinstance(merged, PeftModel)
    bound = equivalence_bound("fp32", DEFAULT_TOLERANCES["fp32"], adapter.abs().max().item())
    assert (merged - adapter).abs().max().item() <= bound
    assert (plain - adapter).abs().max().item() >= INFORMATIVE_FACTOR * bound


def save_folder(family: str, path, causal: bool = True):
    """A tiny model of `family` + a byte tokenizer, as a local model folder."""
    torch.manual_seed(0)
    config = CONFIGS[family]()
    if family == "bert":
        model, tok = tf.BertModel(config), load_tokenizer("tiny-bert", progress=False)
    else:
        auto = tf.AutoModelForCausalLM if causal else tf.AutoModel
        model, tok = auto.from_config(config), load_tokenizer("tiny-llama", progress=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", list(CONFIGS))
def test_validate_passes_on_every_family(tmp_path, family, capsys):
    folder = save_folder(family, tmp_path / family)
    out = tmp_path / "validate.json"
    code = main(["validate", "--model", str(folder), "--out", str(out)])
    report = json.loads(out.read_text())
    failed = [c for c in report["checks"] if not c["passed"]]
    assert code == 0 and report["passed"], failed
    probe = report["probe"]
    assert probe["steps"] == 20 and len(probe["losses"]) == 20 and probe["lr"] == 1e-3
    first, last = probe["losses"][:5], probe["losses"][-5:]
    assert sum(last) / 5 < sum(first) / 5


def test_validate_lm_head_on_a_new_family(tmp_path):
    folder = save_folder("gemma3_text", tmp_path / "g3")
    out = tmp_path / "validate.json"
    code = main(["validate", "--model", str(folder), "--out", str(out), "model.head=lm"])
    report = json.loads(out.read_text())
    assert code == 0, [c for c in report["checks"] if not c["passed"]]
    assert len(report["probe"]["losses"]) == 20


def test_unknown_target_fails_before_data_and_lists_every_layer(tmp_path, capsys):
    folder = save_folder("gemma3_text", tmp_path / "g3")
    code = main(
        ["train", "--model", str(folder), "--task", "sst2", "--data-dir", str(tmp_path / "none"),
         "--quiet", "lora.target=[query]"]
    )  # fmt: skip
    err = capsys.readouterr().err
    # The data folder does not exist: the target check ran first.
    assert code == 2 and "match no linear layer" in err
    listed = [f"model.layers.N.{n}" for n in sum(EXPECTED["gemma3_text"], [])]
    assert all(name in err for name in listed), err


def test_preset_on_unrecognised_layers_lists_every_name():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tf.PretrainedConfig()
            self.blocks = torch.nn.ModuleList(
                torch.nn.ModuleDict({f"mix{i}": torch.nn.Linear(8, 8) for i in range(8)})
                for _ in range(2)
            )

    model = Odd()
    with pytest.raises(LoralabError) as err:
        resolve_targets(LoraConfig(target="standard"), model)
    assert all(f"blocks.N.mix{i}" in str(err.value) for i in range(8))
    # all-linear needs no roles: every layer of the blocks.
    keys = resolve_targets(LoraConfig(target="all-linear"), model)
    assert len(adapted_modules(model, keys)) == 16
    assert all(x.role == "mlp" for x in linear_layers(model))


def test_lm_head_loss_matches_the_models_own_with_softcapping():
    from loralab.heads.prompting import target_loss

    torch.manual_seed(0)
    config = tf.Gemma2Config(
        **{**SIZE, "vocab_size": 64}, num_key_value_heads=2, head_dim=8, **IDS,
        tie_word_embeddings=True, initializer_range=1.0,  # logits up to ~35: capping matters
    )  # fmt: skip
    assert config.final_logit_softcapping == 30.0  # Gemma 2's default
    model = tf.Gemma2ForCausalLM(config).eval()
    ids = torch.randint(3, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 6:9], labels[1, 8:], labels[2, 4:7] = ids[0, 6:9], ids[1, 8:], ids[2, 4:7]
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        own = model(**inputs).loss.item()
        ours = target_loss(model, inputs).item()
        # Without softcapping (the raw head on the hidden states) the loss is far off.
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        raw = torch.nn.functional.cross_entropy(
            model.lm_head(hidden[:, :-1]).flatten(0, 1), labels[:, 1:].flatten()
        ).item()
    assert abs(ours - own) < 1e-5
    assert abs(raw - own) > 0.1


# -- GGUF ---------------------------------------------------------------------------------------
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _rope_permute(x, heads: int):
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes it on load."""
    return (
        x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    )


def write_llama_gguf(path):
    """A tiny random Llama as a Q8_0 GGUF (byte-level gpt2 vocabulary); returns the model."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<pad>", "<s>", "</s>", "<unk>", *sorted(bytes_to_unicode().values()), "Ġt"]
    config = tf.LlamaConfig(
        **{**SIZE, "vocab_size": len(tokens), "hidden_size": 64, "intermediate_size": 128},
        num_key_value_heads=2, tie_word_embeddings=False, **IDS,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * 4 + [1] * (len(tokens) - 4))  # 3: control (special) tokens
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    for key, tensor in model.state_dict().items():
        x = tensor.float().numpy()
        module = key.removesuffix(".weight")
        if module in top:
            name = top[module]
        else:
            _, _, block, local = module.split(".", 3)
            name = f"blk.{block}.{_GGUF_NAMES[local]}"
            if local.endswith(("q_proj", "k_proj")):
                x = _rope_permute(x, 4 if local.endswith("q_proj") else 2)
        if x.ndim == 2:
            w.add_tensor(f"{name}.weight", gguf.quants.quantize(x, q8), raw_dtype=q8)
        else:
            w.add_tensor(f"{name}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_convert_gguf_then_train_on_it(tmp_path, sst2_dir, capsys):
    from loralab.convert import MARKER

    source = write_llama_gguf(tmp_path / "tiny-q8.gguf")
    out = tmp_path / "converted"
    assert main(["convert", str(tmp_path / "tiny-q8.gguf"), str(out), "--quiet"]) == 0
    got = capsys.readouterr()
    assert "from Q8_0" in got.out
    assert "GGUF tensors" not in got.err and "Failed to load" not in got.err  # --quiet is quiet
    marker = json.loads((out / MARKER).read_text())
    assert marker["dequantized"] and marker["quantization"] == "Q8_0"
    assert marker["tensor_types"] == {"Q8_0": 16, "F32": 5}
    assert "dequantised to float32 from **Q8_0**" in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    # The converted model is the source model up to Q8_0 rounding (a wrong q/k layout is not).
    converted = tf.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        ref, got = source(ids).logits, converted(ids).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    # Weight by weight, within Q8_0's rounding: blocks of 32 share a scale absmax/127 (stored
    # in fp16), so no weight moves by more than one step of the largest. The logits above
    # barely see attention at this init (weights ~0.02); a q/k layout left permuted moves
    # weights by about their own size and fails here.
    src, conv = source.state_dict(), converted.state_dict()
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            step = src[key].abs().max() / 127
            assert (conv[key] - src[key]).abs().max() <= step, key
    assert converted.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    # A second convert into the same (now full) folder is refused.
    assert main(["convert", str(tmp_path / "tiny-q8.gguf"), str(out), "--quiet"]) == 2

    # --model FILE.gguf: converted once into the cache, then trained on like any folder.
    runs = tmp_path / "runs"
    args = ["train", "--model", str(tmp_path / "tiny-q8.gguf"), "--task", "sst2",
            "--data-dir", str(sst2_dir), "--output-dir", str(runs), "--quiet",
            "train.max_steps=3", "train.batch_size=8"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(next(runs.glob("*/summary.json")).read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["verification"]["base_unchanged"]
    # The run names its base as the GGUF file it came from, not as a hub id, and the adapter's
    # card loads it through loralab's converter (transformers cannot read the path alone).
    gguf_path = str((tmp_path / "tiny-q8.gguf").resolve())
    assert summary["model_source"]["kind"] == "gguf" and summary["model_source"]["id"] == gguf_path
    adapter = next(runs.glob("*/adapter"))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == gguf_path  # fmt: skip
    card = (adapter / "README.md").read_text()
    assert f"from_pretrained(resolve({gguf_path!r})" in card and "base_model:" not in card
    # The card's snippet runs as written (pointed at this adapter folder).
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(snippet.replace('"path/to/this/folder"', repr(str(adapter))), scope)  # noqa: S102
    assert scope["model"].peft_config["default"].base_model_name_or_path == gguf_path


@pytest.mark.parametrize(
    ("curve", "passes"),
    [
        ([1.5, 1.4, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 1.6], True),  # one spike at the end
        ([1.0, 0.9, 1.0, 1.1, 1.0, 1.2, 1.1, 1.3, 1.2, 0.9], False),  # drifting up, low last step
    ],
)
def test_probe_judges_the_smoothed_curve(monkeypatch, curve, passes):
    from loralab import validate
    from loralab.config import build_config

    seen = {}

    def fixed(model, batch, steps, lr, head):
        seen.update(steps=steps, lr=lr)
        return list(curve)

    monkeypatch.setattr(validate, "train_steps", fixed)
    cfg = build_config(None, ["train.lr=2e-4"], model={"name": "tiny-llama"})
    checks = validate.run_checks(cfg, steps=len(curve)).checks
    probe = next(c for c in checks if c.name == "training_lowers_loss")
    assert probe.passed is passes
    assert seen == {"steps": 10, "lr": 2e-4}  # train.lr, when set, is the probe's lr
    assert probe.data == {"steps": 10, "lr": 2e-4, "window": 5, "losses": curve}


def test_convert_refuses_what_is_not_a_gguf(tmp_path, capsys):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    assert main(["convert", str(bogus), str(tmp_path / "out"), "--quiet"]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_all_linear_says_what_it_leaves_out_of_a_mixture_of_experts():
    config = tf.MixtralConfig(**SIZE, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, **IDS)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.warns(UserWarning, match="stacked expert weights") as caught:
        keys = resolve_targets(LoraConfig(target="all-linear"), model)
    message = str(caught[0].message)
    assert "mlp.experts.gate_up_proj" in message and "mlp.experts.down_proj" in message
    # every linear layer it can reach: the attention projections (the router is no Linear)
    assert {x.local for x in linear_layers(model) if x.name in adapted_modules(model, keys)} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
    }  # fmt: skip
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the others say nothing: they select what they name
        resolve_targets(LoraConfig(target="extended"), model)
    conv = torch.nn.Module()  # a convolution inside a block has a 3-d kernel, but is no stack
    conv.config, conv.blocks = (
        tf.PretrainedConfig(),
        torch.nn.ModuleList(
            [torch.nn.ModuleDict({"conv": torch.nn.Conv1d(4, 4, 3), "proj": torch.nn.Linear(4, 4)})]
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_targets(LoraConfig(target="all-linear"), conv)
