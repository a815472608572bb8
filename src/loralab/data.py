"""Raw splits -> tokenised features, cached per (tokenizer, task, lengths, data); collators."""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import nullcontext
from dataclasses import dataclass, replace

from . import rundir
from .cache import cache_dir
from .config import DataConfig
from .console import known_warnings_silenced, library_bars_off
from .errors import LoralabError
from .tasks import MODEL_COLUMNS, Task

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a forward reads

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


# The backend's raw JSON state (by hash) -> a SHA-256 fed with its normalised form. Parsing and
# re-serialising a 50k vocabulary takes ~0.4 s, and a run keys both of its splits on the same
# tokenizer; the hash object is kept, not the megabytes of normalised text.
_normalised: dict[str, hashlib._Hash] = {}


def _hash_of_state(raw: str) -> hashlib._Hash:
    """A fresh SHA-256 that has been fed the normalised backend state `raw`."""
    key = hashlib.sha256(raw.encode()).hexdigest()
    if key not in _normalised:
        state = json.loads(raw)
        # A call with truncation=/padding= leaves those settings on the backend; they are per
        # call, not part of the tokenizer, and keeping them would change the key after any use.
        state.pop("truncation", None)
        state.pop("padding", None)
        _normalised[key] = hashlib.sha256(json.dumps(state, sort_keys=True).encode())
    return _normalised[key].copy()


def _tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that changes token ids: vocab, special tokens, post-processing.

    Kept per tokenizer state in `$LORALAB_CACHE/fingerprints`: the backend's state takes ~5 ms to
    hash as it is, its normalised form (`_hash_of_state`) ~0.4 s to build, at every run's start."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    settings = [repr(sorted(tokenizer.special_tokens_map.items())), tokenizer.padding_side]
    # Which end a too-long text loses (`_hash_of_state` drops the backend's truncation); the
    # default adds nothing, so that caches made before it counted stay valid.
    side = getattr(tokenizer, "truncation_side", "right")
    if side != "right":
        settings.append(f"truncation_side={side}")
    if backend is None:
        return _fingerprint(hashlib.sha256(repr(tokenizer.get_vocab()).encode()), settings)
    raw = backend.to_str()
    key = hashlib.sha256(raw.encode() + b"\0" + json.dumps(settings).encode()).hexdigest()[:32]
    path = cache_dir() / "fingerprints" / f"tokenizer-{key}"
    try:
        known = path.read_text()
        if re.fullmatch(r"[0-9a-f]{16}", known):
            return known
    except OSError:
        pass
    fingerprint = _fingerprint(_hash_of_state(raw), settings)
    try:  # best effort: without it the next run computes the same value again
        rundir.atomic_write(path, fingerprint)
    except OSError:
        pass
    return fingerprint


def _fingerprint(h: hashlib._Hash, settings: list[str]) -> str:
    """`h` (fed the vocabulary or backend state) fed the settings too: 16 hex digits."""
    for value in settings:
        h.update(value.encode())
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
    head=None,
    progress: bool = True,
):
    """Tokenise `raw` once; later runs with the same inputs load the saved features from disk.

    `head` featurises (None: the task's own features, as the classifier head makes them);
    `progress=False` hides the tokenising bar."""
    from datasets import load_from_disk

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
                head.cache_key() if head is not None else None,
            ]
        ).encode()
    ).hexdigest()[:20]
    path = cache_dir() / "features" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', task.name)}-{split}-{key}"
    if path.is_dir():
        return load_from_disk(str(path))
    with nullcontext() if progress else library_bars_off():
        if head is not None:
            feats = head.featurize(raw, tokenizer, max_length, split, causal)
        else:
            feats = task.featurize(raw, tokenizer, max_length, cfg.doc_stride, split, causal)
    try:
        # Another process may win the race; its copy is equal, so ours is then dropped.
        with rundir.atomic_dir(path, replace=False) as tmp, library_bars_off():
            feats.save_to_disk(str(tmp))  # a cache write is not a phase the user waits for
    except OSError:
        pass
    return load_from_disk(str(path)) if path.is_dir() else feats


def dev_settings(data: DataConfig, data_dir: str | None, eval_file: str | None) -> DataConfig:
    """A run's data settings with a dev split given on the command line (merge, analyze):
    `eval_file` over the run's; `data_dir` alone names that folder's dev split, so the run's own
    evaluation file, or the one paired with its training file, is not taken over it."""
    if not (data_dir or eval_file):
        return data
    alone = data_dir and not eval_file
    return replace(
        data,
        data_dir=data_dir or data.data_dir,
        eval_file=None if alone else eval_file or data.eval_file,
        train_file=None if alone else data.train_file,
    )


def eval_split(
    task: Task, cfg: DataConfig, tokenizer, causal: bool, head=None, limit: int | None = None,
    sort: bool = True, raw=None, progress: bool = True,
):  # fmt: skip
    """The dev examples (`limit` of them spread over the split, if given: `spread`) and their
    features through the feature cache, sorted by length unless `sort` is False (then in example
    order).

    `raw`: the whole dev split when the caller has loaded it already. Length-sorted batches
    carry little padding; metrics don't depend on order (QA joins features to examples by id).
    """
    if raw is None:
        raw = task.load_dev(cfg.data_dir, cfg.train_file, cfg.eval_file)
    raw = spread(raw, limit)
    max_length = task_max_length(task, cfg)
    feats = cached_features(task, raw, tokenizer, cfg, "eval", causal, max_length, head, progress)
    if sort:
        with known_warnings_silenced():
            feats = feats.sort("length")
    return raw, feats


def spread(rows, n: int | None):
    """`n` of `rows` spread evenly over them (every len/n-th, in order); all of them when `n` is
    None or not below len. A capped dev set so samples the whole split: SQuAD v2's dev questions
    come article by article, and its first 1,000 are 4 of 35 articles."""
    if not n or n >= len(rows):
        return rows
    return rows.select([i * len(rows) // n for i in range(n)])


def task_max_length(task: Task, cfg: DataConfig) -> int:
    """Tokens per example (SQuAD v2: per window): `data.max_length`, else the task's default."""
    return cfg.max_length or task.default_max_length


def check_max_length(task: Task, cfg: DataConfig, model_config, model_name: str) -> None:
    """Refuse a `data.max_length` beyond the positions the model was trained with (absolute
    position embeddings fail mid-run with an index error; rotary ones were never trained there)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    max_length = task_max_length(task, cfg)
    if isinstance(limit, int) and max_length > limit:
        source = "data.max_length" if cfg.max_length else f"{task.name}'s default max_length"
        raise LoralabError(
            f"{source} is {max_length} tokens, but {model_name} has {limit} positions "
            f"(max_position_embeddings). Set data.max_length to at most {limit}."
        )


def batches_per_epoch(train_features: int, batch_size: int, world: int) -> int:
    """Batches each of `world` processes draws in one epoch (the last one may be short)."""
    return -(-train_features // (batch_size * world))


def check_accumulation(train_features: int, batch_size: int, grad_accum: int, world: int) -> None:
    """Refuse a `train.grad_accum` above the batches one epoch holds: the Trainer would take one
    short step per epoch from fewer batches than asked, with its loss misreported."""
    batches = batches_per_epoch(train_features, batch_size, world)
    if grad_accum > batches:
        procs = f" per process ({world} processes)" if world > 1 else ""
        raise LoralabError(
            f"train.grad_accum is {grad_accum}, but an epoch holds only {batches} batches of "
            f"{batch_size}{procs} ({train_features} training features). Set train.grad_accum to "
            f"at most {batches}, or lower train.batch_size."
        )


def load_splits(
    task: Task, cfg: DataConfig, tokenizer, seed: int, causal: bool, head=None,
    progress: bool = True,
) -> Splits:  # fmt: skip
    """Load, cap and tokenise both splits. The training cap takes the first N after a seeded shuffle."""
    max_length = task_max_length(task, cfg)
    train_raw = task.load("train", cfg.data_dir, cfg.train_file)
    eval_all = task.load_dev(cfg.data_dir, cfg.train_file, cfg.eval_file)
    fingerprint = {
        "train_sha256": content_fingerprint(train_raw),
        "eval_sha256": content_fingerprint(eval_all),
        "train_rows": len(train_raw),
        "eval_rows": len(eval_all),
    }
    if cfg.max_train_examples and cfg.max_train_examples < len(train_raw):
        train_raw = train_raw.shuffle(seed=seed).select(range(cfg.max_train_examples))
    train = cached_features(
        task, train_raw, tokenizer, cfg, "train", causal, max_length, head, progress
    )
    eval_raw, evals = eval_split(
        task, cfg, tokenizer, causal, head, cfg.max_eval_examples, raw=eval_all, progress=progress
    )
    return Splits(train_raw, train, eval_raw, evals, max_length, fingerprint)


def pad_batches(features, tokenizer, batch_size: int) -> list[dict]:
    """Padded model inputs (no labels) in feature order: [{input_ids: [b, t], ...}, ...]."""
    cols = [c for c in MODEL_INPUTS if c in features.column_names]
    rows = features.select_columns(cols)
    return [
        dict(tokenizer.pad([rows[j] for j in range(i, min(i + batch_size, len(rows)))],
                           return_tensors="pt"))
        for i in range(0, len(rows), batch_size)
    ]  # fmt: skip


def lengths(features) -> list[int] | None:
    """The features' `length` column as a list, None without one. Through Arrow: indexing it
    (`features["length"]`) formats it row by row, ~75 ms for 4,000 features at each run's start."""
    if "length" not in getattr(features, "column_names", ()):
        return None
    return features.with_format("arrow")["length"].to_pylist()


def model_inputs(features):
    """Only the columns a model's forward takes (plus `length` for length-grouped sampling)."""
    keep = [c for c in (*MODEL_COLUMNS, "length") if c in features.column_names]
    return features.select_columns(keep)
