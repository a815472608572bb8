"""The tokenisation cache: a second run on the same data and tokenizer tokenises nothing."""

from __future__ import annotations

from tokenizers.processors import TemplateProcessing

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
