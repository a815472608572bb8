"""Raw splits -> tokenised features, cached per (tokenizer, task, lengths, data); collators."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig
from .console import known_warnings_silenced, library_bars_off
from .tasks import MODEL_COLUMNS, Task

# Bump when featurisation changes, so caches built by older code are not reused.
FEATURES_VERSION = 2


@dataclass
class Splits:
    """Raw examples and their features for training and evaluation."""

    train_raw: object
    train: object
    eval_raw: object
    eval: object
    max_length: int
    fingerprint: dict | None = None
    """SHA-256 of the whole (uncapped) train and eval data, so runs on other data never pool."""


def _tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that changes token ids: vocab, special tokens, post-processing."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # A call with truncation=/padding= leaves those settings on the backend; they are per
        # call, not part of the tokenizer, and keeping them would change the key after any use.
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(repr(tokenizer.get_vocab()).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    h.update(tokenizer.padding_side.encode())
    return h.hexdigest()[:16]


def _data_fingerprint(raw) -> str:
    return (
        getattr(raw, "_fingerprint", None)
        or hashlib.sha256(
            json.dumps(raw[:50], sort_keys=True, default=str).encode() + str(len(raw)).encode()
        ).hexdigest()
    )


def content_fingerprint(raw) -> str:
    """SHA-256 of a split's rows in order (independent of where the files lie)."""
    h = hashlib.sha256()
    for start in range(0, len(raw), 4096):
        h.update(json.dumps(raw[start : start + 4096], sort_keys=True, default=str).encode())
    return h.hexdigest()


def cached_features(
    task: Task,
    raw,
    tokenizer,
    cfg: DataConfig,
    split: str,
    causal: bool,
    max_length: int,
    prompting=None,
):
    """Tokenise `raw` once; later runs with the same inputs load the saved features from disk."""
    from datasets import load_from_disk

    from .models import cache_dir

    key = hashlib.sha256(
        json.dumps(
            [
                FEATURES_VERSION,
                task.name,
                split,
                causal,
                max_length,
                cfg.doc_stride,
                _tokenizer_fingerprint(tokenizer),
                _data_fingerprint(raw),
                prompting.key() if prompting is not None else None,
            ]
        ).encode()
    ).hexdigest()[:20]
    path = cache_dir() / "features" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', task.name)}-{split}-{key}"
    if path.is_dir():
        return load_from_disk(str(path))
    if prompting is not None:  # the causal-LM formulation
        from .lm import featurize

        feats = featurize(task, raw, tokenizer, max_length, split, prompting)
    else:
        feats = task.featurize(raw, tokenizer, max_length, cfg.doc_stride, split, causal)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        with library_bars_off():  # a cache write is not a phase the user waits for
            feats.save_to_disk(str(tmp))
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is equal
    return load_from_disk(str(path)) if path.is_dir() else feats


def load_splits(
    task: Task, cfg: DataConfig, tokenizer, seed: int, causal: bool, prompting=None
) -> Splits:
    """Load, cap and tokenise both splits. The training cap takes the first N after a seeded shuffle."""
    max_length = cfg.max_length or task.default_max_length
    train_raw = task.load("train", cfg.data_dir, cfg.train_file)
    eval_all = task.load("eval", cfg.data_dir, cfg.eval_file)
    fingerprint = {
        "train_sha256": content_fingerprint(train_raw),
        "eval_sha256": content_fingerprint(eval_all),
        "train_rows": len(train_raw),
        "eval_rows": len(eval_all),
    }
    if cfg.max_train_examples and cfg.max_train_examples < len(train_raw):
        train_raw = train_raw.shuffle(seed=seed).select(range(cfg.max_train_examples))
    eval_raw = eval_all
    if cfg.max_eval_examples and cfg.max_eval_examples < len(eval_raw):
        eval_raw = eval_raw.select(range(cfg.max_eval_examples))
    train = cached_features(task, train_raw, tokenizer, cfg, "train", causal, max_length, prompting)
    evals = cached_features(task, eval_raw, tokenizer, cfg, "eval", causal, max_length, prompting)
    # Length-sorted evaluation: batches of similar length carry little padding. Metrics don't
    # depend on order (QA post-processing joins features to examples by id).
    with known_warnings_silenced():
        evals = evals.sort("length")
    return Splits(train_raw, train, eval_raw, evals, max_length, fingerprint)


def model_inputs(features):
    """Only the columns a model's forward takes (plus `length` for length-grouped sampling)."""
    keep = [c for c in (*MODEL_COLUMNS, "length") if c in features.column_names]
    return features.select_columns(keep)
