"""Parameter accounting against counts worked out by hand from the architecture."""

from __future__ import annotations

import os

import pytest
from transformers import AutoModelForSequenceClassification

from loralab.accounting import parameter_counts
from loralab.config import build_config
from loralab.lora import apply_lora
from loralab.models import load_model


def _lora(name: str, *overrides):
    cfg = build_config(overrides=[f"model.name={name}", *overrides])
    model, heads = load_model(
        name, AutoModelForSequenceClassification, progress=False, num_labels=2
    )
    base_total = sum(p.numel() for p in model.parameters())
    return (
        parameter_counts(apply_lora(cfg.lora, model, heads, "SEQ_CLS"), heads),
        base_total,
        model.config,
    )


def test_tiny_llama_counts_by_hand():
    counts, base_total, c = _lora("tiny-llama")
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    lora = c.num_hidden_layers * (8 * (h + h) + 8 * (h + kv))  # q: h->h, v: h->kv
    head = h * 2  # score, no bias
    assert counts["lora"] == lora
    assert counts["head"] == head
    assert counts["total"] == base_total + lora
    assert counts["trainable"] == lora + head
    assert counts["trainable_share_pct"] == pytest.approx(100 * (lora + head) / (base_total + lora))
    assert counts["trainable_share_without_head_pct"] == pytest.approx(
        100 * lora / (base_total + lora)
    )
    # the LoRA paper's share: adapter weights only (the golden test skips "_s"-named figures)
    assert counts["lora_share_pct"] == pytest.approx(100 * lora / (base_total + lora))


def test_full_fine_tuning_is_all_trainable():
    model, heads = load_model(
        "tiny-bert", AutoModelForSequenceClassification, progress=False, num_labels=2
    )
    counts = parameter_counts(model, heads)
    assert counts["trainable_share_pct"] == 100.0 and counts["lora"] == 0
    assert counts["head"] == 64 * 2 + 2  # classifier weight + bias


@pytest.mark.slow
def test_minilm_counts_by_hand(monkeypatch):
    monkeypatch.delenv("LORALAB_CACHE", raising=False)  # the real, shared cache
    counts, base_total, c = _lora("minilm-l6")
    h, f, L, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    assert (h, f, L) == (384, 1536, 6)
    embeddings = v * h + c.max_position_embeddings * h + c.type_vocab_size * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    pooler = h * h + h
    head = h * 2 + 2
    assert base_total == embeddings + L * layer + pooler + head == 22_713_216 + head
    lora = L * (8 * (h + h) + 8 * (h + h))  # query and value, 384 -> 384
    assert counts["lora"] == lora == 73_728
    # the shipped pooler never trained (sentence-transformer): trained with the classifier, as
    # the LoRA paper's RoBERTa trains its classification head's dense layer, and counted with it
    assert counts["head"] == head + pooler == 770 + 147_840
    assert counts["trainable"] == lora + head + pooler
    assert counts["trainable_share_without_head_pct"] == pytest.approx(
        100 * lora / (base_total + lora)
    )
    assert os.environ.get("LORALAB_CACHE") is None


def _role_sums(counts) -> dict:
    return {
        k: sum(r[k] for r in counts["by_module"].values()) for k in ("total", "trainable", "lora")
    }


def test_tiny_llama_by_module_by_hand():
    counts, _, c = _lora("tiny-llama")
    r, L, h, f, v = 8, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    q_out = c.num_attention_heads * c.head_dim
    kv_out = c.num_key_value_heads * c.head_dim
    assert not c.attention_bias and not c.mlp_bias and not c.tie_word_embeddings
    by = counts["by_module"]
    assert list(by) == ["q", "k", "v", "o", "mlp", "head", "other"]  # no fused q/k/v here
    q_lora, v_lora = L * r * (h + q_out), L * r * (h + kv_out)
    assert by["q"] == {"total": L * h * q_out + q_lora, "trainable": q_lora, "lora": q_lora}
    assert by["v"] == {"total": L * h * kv_out + v_lora, "trainable": v_lora, "lora": v_lora}
    assert by["k"] == {"total": L * h * kv_out, "trainable": 0, "lora": 0}
    assert by["o"] == {"total": L * q_out * h, "trainable": 0, "lora": 0}
    assert by["mlp"] == {"total": L * 3 * h * f, "trainable": 0, "lora": 0}  # gate, up, down
    assert by["head"] == {"total": h * 2, "trainable": h * 2, "lora": 0}  # score
    # Embeddings and every RMSNorm (two per block and the final one), never mlp.
    assert by["other"] == {"total": v * h + (2 * L + 1) * h, "trainable": 0, "lora": 0}
    assert _role_sums(counts) == {k: counts[k] for k in ("total", "trainable", "lora")}
    assert counts["head"] == h * 2 and counts["other_saved"] == 0


def test_tiny_bert_full_fine_tuning_by_module_by_hand():
    model, heads = load_model(
        "tiny-bert", AutoModelForSequenceClassification, progress=False, num_labels=2
    )
    c = model.config
    h, f, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    counts = parameter_counts(model, heads)
    by = counts["by_module"]
    for role in ("q", "k", "v", "o"):  # query/key/value, attention.output.dense: with bias
        assert by[role]["total"] == L * (h * h + h), role
    assert by["mlp"]["total"] == L * ((h * f + f) + (f * h + h))  # intermediate, output.dense
    assert by["head"]["total"] == h * 2 + 2 == counts["head"]
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h
    layer_norms = L * 2 * (2 * h)
    pooler = h * h + h  # in the checkpoint: not a new head
    assert by["other"]["total"] == embeddings + layer_norms + pooler
    assert all(r["trainable"] == r["total"] and r["lora"] == 0 for r in by.values())
    assert _role_sums(counts) == {"total": counts["total"], "trainable": counts["total"], "lora": 0}
    assert counts["other_saved"] == 0


def test_extra_modules_to_save_are_other_saved_not_head():
    counts, base_total, c = _lora("tiny-llama", 'lora.extra={"modules_to_save": ["embed_tokens"]}')
    h, embed = c.hidden_size, c.vocab_size * c.hidden_size
    lora = counts["lora"]
    assert counts["head"] == h * 2  # score only
    assert counts["other_saved"] == embed
    assert counts["trainable"] == lora + h * 2 + embed
    assert counts["total"] == base_total + lora  # the frozen original embedding is not counted
    assert counts["by_module"]["other"]["trainable"] == embed
    assert counts["by_module"]["head"]["trainable"] == h * 2
    # Without the task head, the extra trained embedding still counts as trainable.
    assert counts["trainable_share_without_head_pct"] == pytest.approx(
        100 * (lora + embed) / counts["total"]
    )


def test_gpt2_fused_qkv_conv1d_by_module():
    import transformers as tf

    from loralab.config import LoraSettings

    c = tf.GPT2Config(vocab_size=261, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    h, L, r = c.n_embd, c.n_layer, 8
    model = apply_lora(LoraSettings(r=r), tf.GPT2ForSequenceClassification(c), ["score"], "SEQ_CLS")
    counts = parameter_counts(model, ["score"])
    by = counts["by_module"]
    assert list(by) == ["q", "k", "v", "qkv", "o", "mlp", "head", "other"]
    qkv_lora = L * r * (h + 3 * h)  # c_attn: h -> 3h (Conv1D)
    assert by["qkv"] == {"total": L * (h * 3 * h + 3 * h) + qkv_lora, "trainable": qkv_lora,
                         "lora": qkv_lora}  # fmt: skip
    assert by["q"]["total"] == by["k"]["total"] == by["v"]["total"] == 0
    assert by["o"]["total"] == L * (h * h + h)  # attn.c_proj
    assert by["mlp"]["total"] == L * ((h * 4 * h + 4 * h) + (4 * h * h + h))  # c_fc, mlp.c_proj
    norms = (2 * L + 1) * 2 * h  # ln_1, ln_2, ln_f with bias
    assert by["other"]["total"] == (c.vocab_size + c.n_positions) * h + norms
    assert _role_sums(counts) == {k: counts[k] for k in ("total", "trainable", "lora")}


def test_efficiency_records_are_flat_scalars():
    from loralab.callbacks import efficiency_records

    counts, _, _ = _lora("tiny-llama")
    records = efficiency_records(counts)
    assert records["efficiency/total"] == counts["total"]
    assert records["efficiency/by_module/q/lora"] == counts["by_module"]["q"]["lora"]
    assert all(isinstance(v, (int, float)) for v in records.values())


def test_checksum_is_four_runs_hashed_apart_whatever_the_threads():
    """The documented construction, worked out here: the tensors in name order cut into four
    runs of about equal bytes, each run's SHA-256 over name, dtype and bytes, then one SHA-256
    over the four digests. The threads hashing the runs do not change it; any byte does."""
    import hashlib

    import torch

    from loralab import quantization

    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(64, 32, generator=g).to(torch.bfloat16) for i in range(8)}
    runs = [[f"w{2 * r}", f"w{2 * r + 1}"] for r in range(4)]  # 8 equal tensors: 2 a run
    digests = []
    for run in runs:
        h = hashlib.sha256()
        for name in run:
            h.update(name.encode() + b"torch.bfloat16" + tensors[name].view(torch.uint8).numpy().tobytes())  # fmt: skip
        digests.append(h.digest())
    expected = hashlib.sha256(b"".join(digests)).hexdigest()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            assert quantization.checksum(dict(reversed(tensors.items()))) == expected
    finally:
        torch.set_num_threads(threads)
    for name in ("w0", "w7"):  # the first run's first tensor, the last run's last
        changed = dict(tensors)
        changed[name] = tensors[name].clone()
        changed[name].view(torch.uint8).view(-1)[5] ^= 1
        assert quantization.checksum(changed) != expected
