"""The tokenisation cache: a second run on the same data and tokenizer tokenises nothing."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
from tokenizers.processors import TemplateProcessing

from loralab import data
from loralab.config import build_config
from loralab.data import _tokenizer_fingerprint, load_splits
from loralab.models import cache_dir, load_tokenizer
from loralab.tasks import get_task


def test_fingerprint_ignores_per_call_truncation_and_padding():
    tok = load_tokenizer("tiny-llama")
    assert getattr(tok, "backend_tokenizer", None) is not None  # the path that hashes to_str()
    before = _tokenizer_fingerprint(tok)
    tok(["some words here"], truncation=True, max_length=4, padding="max_length")
    assert _tokenizer_fingerprint(tok) == before
    assert _tokenizer_fingerprint(load_tokenizer("tiny-llama")) == before  # a fresh load


def test_fingerprint_follows_what_changes_token_ids():
    """Documented: vocab, special tokens and post-processing each change the fingerprint."""
    base = _tokenizer_fingerprint(load_tokenizer("tiny-llama"))
    assert _tokenizer_fingerprint(load_tokenizer("tiny-bert")) != base  # another tokenizer

    vocab = load_tokenizer("tiny-llama")
    vocab.add_tokens(["zzzword"])
    assert _tokenizer_fingerprint(vocab) != base

    special = load_tokenizer("tiny-llama")
    special.pad_token = special.eos_token  # the backend state is unchanged; the map is not
    assert _tokenizer_fingerprint(special) != base

    post = load_tokenizer("tiny-llama")
    post.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", post.eos_token_id)]
    )
    assert _tokenizer_fingerprint(post) != base
    assert _tokenizer_fingerprint(load_tokenizer("tiny-llama")) == base  # no state leaked


def _reference_fingerprint(tok) -> str:
    """The fingerprint as the cache keys were always made: the normalised backend state, then
    the special tokens and the padding side (truncation_side stays at "right" here)."""
    state = json.loads(tok.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    h = hashlib.sha256(json.dumps(state, sort_keys=True).encode())
    h.update(repr(sorted(tok.special_tokens_map.items())).encode())
    h.update(tok.padding_side.encode())
    return h.hexdigest()[:16]


def test_fingerprint_is_kept_on_disk_with_the_same_value(monkeypatch):
    tok = load_tokenizer("tiny-llama")
    first = _tokenizer_fingerprint(tok)
    assert first == _reference_fingerprint(tok)  # keeping it changes no existing cache key
    # one entry per backend state: a per-call truncation left on it keys another, same value
    kept = [f for f in (cache_dir() / "fingerprints").iterdir() if f.read_text() == first]
    assert kept

    def no_normalising(raw):
        raise AssertionError("the fingerprint was computed again instead of read")

    monkeypatch.setattr(data, "_hash_of_state", no_normalising)
    assert _tokenizer_fingerprint(load_tokenizer("tiny-llama")) == first  # a new process's load
    other = load_tokenizer("tiny-llama")
    other.add_tokens([f"zz{uuid.uuid4().hex}"])  # another tokenizer: another entry, computed
    with pytest.raises(AssertionError, match="computed again"):
        _tokenizer_fingerprint(other)
    monkeypatch.undo()

    for f in kept:  # damaged: computed again, and the file repaired
        f.write_text("not a fingerprint")
    assert _tokenizer_fingerprint(load_tokenizer("tiny-llama")) == first
    assert first in {f.read_text() for f in kept}


def test_second_run_reuses_both_splits(sst2_dir, monkeypatch):
    cfg = build_config(
        overrides=["model.name=tiny-llama", f"data.data_dir={sst2_dir}", "data.max_length=48"]
    )
    task = get_task("sst2")

    def run():
        tok = load_tokenizer("tiny-llama")  # a fresh tokenizer, as in a new process
        tok.padding_side = "right"
        return load_splits(task, cfg.data, tok, seed=7, causal=True)

    first = run()
    folders = set((cache_dir() / "features").iterdir())

    def no_tokenising(*args, **kwargs):
        raise AssertionError("the second run tokenised instead of reading the cache")

    monkeypatch.setattr(task, "featurize", no_tokenising)
    second = run()
    assert set((cache_dir() / "features").iterdir()) == folders  # nothing tokenised again
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.eval["input_ids"] == first.eval["input_ids"]


def test_a_new_max_length_tokenises_anew(tmp_path, monkeypatch):
    """The cache key holds data.max_length: features cut at 48 tokens are not reused at 16."""
    words = "the film was a long and winding story with many good and bad parts in it".split()
    words.append(uuid.uuid4().hex)  # new data, even for a cache kept from an earlier session
    folder = tmp_path / "long-sst2"
    folder.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        rows = [f"{' '.join(words[i % 3 :] + words)}\t{i % 2}" for i in range(8)]
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    task = get_task("sst2")
    tokenised = []
    real = task.featurize

    def counting(raw, *args, **kwargs):
        tokenised.append(len(raw))
        return real(raw, *args, **kwargs)

    monkeypatch.setattr(task, "featurize", counting)

    def run(max_length):
        cfg = build_config(
            overrides=[
                "model.name=tiny-llama",
                f"data.data_dir={folder}",
                f"data.max_length={max_length}",
            ]
        )
        tok = load_tokenizer("tiny-llama")
        tok.padding_side = "right"
        return load_splits(task, cfg.data, tok, seed=7, causal=True)

    long = run(48)
    assert tokenised == [8, 8]  # train and dev
    assert max(map(len, long.train["input_ids"])) > 16  # the texts are longer than the cut
    short = run(16)
    assert tokenised == [8, 8, 8, 8]  # tokenised again, not read from the 48-token cache
    for split in (short.train, short.eval):
        assert max(map(len, split["input_ids"])) <= 16
    assert short.max_length == 16


def test_a_capped_dev_set_is_spread_over_the_split(tmp_path):
    """SQuAD-like dev data comes article by article: a cap of 6 of 24 rows takes every 4th, so
    every article is evaluated, not only the first; the identity records the spread."""
    from dataclasses import replace

    from loralab.data import spread
    from loralab.identity import identity

    folder = tmp_path / "ordered-sst2"
    folder.mkdir()
    rows = [f"article {i // 6} sentence {i}\t{i % 2}" for i in range(24)]  # 4 "articles"
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    cfg = build_config(
        overrides=["model.name=tiny-llama", f"data.data_dir={folder}", "data.max_eval_examples=6"]
    )
    tok = load_tokenizer("tiny-llama")
    tok.padding_side = "right"
    splits = load_splits(get_task("sst2"), cfg.data, tok, seed=7, causal=True)
    texts = list(splits.eval_raw["text_a"])
    assert texts == [f"article {i // 6} sentence {i}" for i in (0, 4, 8, 12, 16, 20)]
    assert {t.split()[1] for t in texts} == {"0", "1", "2", "3"}
    assert len(splits.eval) == 6
    assert identity(cfg, splits, "fp32")["data"]["eval_subset"] == "spread"
    # Uncapped (or capped at the split's size or more): every row, and no subset recorded.
    capped_at_all = replace(cfg.data, max_eval_examples=24)
    whole = load_splits(get_task("sst2"), capped_at_all, tok, seed=7, causal=True)
    assert len(whole.eval_raw) == 24
    assert "eval_subset" not in identity(cfg, whole, "fp32")["data"]
    assert spread(list(range(10)), None) == list(range(10))
    assert [spread(splits.eval_raw, n).num_rows for n in (1, 5, 6, 7)] == [1, 5, 6, 6]
    assert spread(whole.eval_raw, 3)["text_a"] == [
        f"article {i // 6} sentence {i}" for i in (0, 8, 16)
    ]
