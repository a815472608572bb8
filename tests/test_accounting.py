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
    assert counts["head"] == head == 770
    assert counts["trainable"] == lora + head
    assert counts["trainable_share_without_head_pct"] == pytest.approx(
        100 * lora / (base_total + lora)
    )
    assert os.environ.get("LORALAB_CACHE") is None
