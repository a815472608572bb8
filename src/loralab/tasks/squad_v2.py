"""SQuAD v2.0: extractive question answering where some questions have no answer.

Raw examples use the canonical QA columns (`id`, `question`, `context`,
`answers={"text": [...], "answer_start": [...]}`, empty lists when unanswerable).

Features are windows over the context (question first, context second, overlapping by
`doc_stride` tokens). Every feature has a `null_index`: the position whose start+end logits
score "no answer". Encoders use position 0 ([CLS]); causal decoders use an end-of-sequence
token appended to every window, because a causal model's first position has seen nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import metrics
from ..errors import LoralabError
from ..hub import require_dataset
from . import probes
from .base import Split, Task, find_file
from .qa_answers import postprocess_qa, qa_candidates  # noqa: F401 (postprocess_qa: public here)
from .squad_json import RAW_COLUMNS, read_squad_json

_FILE_NAMES = {
    "train": ["train-v2.0.json", "train.json", "train-offline.json"],
    "eval": ["dev-v2.0.json", "dev.json", "eval-offline.json"],
}
_NO_CONTEXT = (-1, -1)  # offset of a token that is not part of the context


def qa_features():
    """`datasets.Features` of the canonical raw QA columns."""
    from datasets import Features, List, Value

    return Features(
        {
            "id": Value("string"),
            "question": Value("string"),
            "context": Value("string"),
            "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
        }
    )


@dataclass
class SquadV2Task(Task):
    """SQuAD v2.0 (rajpurkar/squad_v2): span extraction with unanswerable questions."""

    kind: ClassVar[str] = "qa"
    points_per_unit: ClassVar[float] = 1.0  # the official script's metrics are in points
    name: str = "squad_v2"
    hub_path: str = "rajpurkar/squad_v2"
    default_max_length: int = 384
    primary_metric: str = "f1"
    n_best: int = 20
    max_answer_len: int = 30

    def probe_rows(self):
        from datasets import Dataset

        return Dataset.from_dict(probes.qa_rows(), features=qa_features())

    # -- loading -----------------------------------------------------------------------------
    def load(self, split: Split, data_dir: str | None = None, file: str | None = None):
        from datasets import Dataset

        path = find_file(self.name, data_dir, file, self._file_names(split, data_dir), split)
        if path is None:
            return self._load_hub(split)
        return Dataset.from_dict(read_squad_json(path), features=qa_features())

    def _file_names(self, split: Split, data_dir: str | None) -> list[str]:
        """File names to look for; the offline pair stays together.

        `train-offline.json` and `eval-offline.json` are an article-disjoint split of
        `dev-v2.0.json`. A folder holding them next to dev-v2.0.json but without the official
        training file must not evaluate on dev-v2.0.json: it contains the training questions.
        """
        names = list(_FILE_NAMES[split])
        if split == "eval" and data_dir:
            for folder in (Path(data_dir), Path(data_dir) / self.name):
                official = any((folder / n).is_file() for n in _FILE_NAMES["train"][:2])
                if (folder / "train-offline.json").is_file() and not official:
                    return ["eval-offline.json", *[n for n in names if n != "eval-offline.json"]]
                if official:
                    break
        return names

    def eval_file_for(self, train_file: str | None, eval_file: str | None) -> str | None:
        """`eval_file`; none given with `train-offline.json` as the training file, the
        `eval-offline.json` beside it (as `_file_names` keeps the pair together in a folder)."""
        if eval_file or not train_file or Path(train_file).name != "train-offline.json":
            return eval_file
        beside = Path(train_file).with_name("eval-offline.json")
        if beside.is_file():
            return str(beside)
        raise LoralabError(
            f"data.train_file '{train_file}' is the offline split's training half: its questions "
            "come from SQuAD v2's dev set, which evaluation would use without an evaluation file "
            "(the data folder's dev-v2.0.json or the hub's), so it would score questions the "
            "model trained on. Put eval-offline.json beside it, or set data.eval_file to it."
        )

    def _load_hub(self, split: Split):
        from datasets import load_dataset

        hub_split = "train" if split == "train" else "validation"

        require_dataset(
            self.hub_path,
            f"The {split} split has no local file: put the SQuAD v2.0 files (train-v2.0.json, "
            f"dev-v2.0.json) in a folder and set data.data_dir to it, or data.{split}_file to "
            "its file.",
        )
        try:
            ds = load_dataset(self.hub_path, self.hub_config, split=hub_split)
        except Exception as exc:  # network, auth, missing cache: all need the same advice
            raise LoralabError(
                f"Could not load {self.hub_path} (split '{hub_split}') from the Hugging Face hub: "
                f"{exc}. Without hub access, put the SQuAD v2.0 files (train-v2.0.json, "
                f"dev-v2.0.json) in a folder and set data.data_dir to it, or name them with "
                f"data.train_file / data.eval_file."
            ) from exc
        missing = [c for c in RAW_COLUMNS if c not in ds.column_names]
        if missing:
            raise LoralabError(
                f"The hub dataset {self.hub_path} lacks the column(s) {missing}; a SQuAD v2 "
                f"dataset has {list(RAW_COLUMNS)}."
            )
        return ds.select_columns(list(RAW_COLUMNS)).cast(qa_features())

    # -- features ----------------------------------------------------------------------------
    def featurize(
        self, raw, tokenizer, max_length: int, doc_stride: int, split: Split, causal: bool
    ):
        from datasets import Features, List, Value

        if not getattr(tokenizer, "is_fast", False):
            raise LoralabError(
                f"SQuAD v2 needs a fast (Rust `tokenizers`) tokenizer for character offsets; "
                f"{type(tokenizer).__name__} is a slow one. Load the tokenizer with use_fast=True "
                f"or pick a model that ships a tokenizer.json."
            )
        budget = max_length - 1 if causal else max_length  # causal: one slot for the null token
        if not 0 <= doc_stride < budget:
            raise LoralabError(
                f"doc_stride {doc_stride} does not fit max_length {max_length}: the overlap between "
                f"windows must be at least 0 and well below the window size (e.g. 128 for 384)."
            )
        null_token = None
        if causal:
            for attr in ("eos_token_id", "sep_token_id", "pad_token_id"):
                null_token = getattr(tokenizer, attr, None)
                if null_token is not None:
                    break
            else:
                raise LoralabError(
                    "SQuAD v2 with a causal model appends an end-of-sequence token to every window "
                    "to score 'no answer', but this tokenizer has no eos, sep or pad token. Set "
                    "tokenizer.eos_token before featurising."
                )
        n_special = tokenizer.num_special_tokens_to_add(pair=True)
        eval_split = split != "train"
        has_types = "token_type_ids" in tokenizer("a", "b")
        ints = List(Value("int64"))
        columns = {"input_ids": ints, "attention_mask": ints}
        if has_types:
            columns["token_type_ids"] = ints
        for name in ("start_positions", "end_positions", "null_index", "length"):
            columns[name] = Value("int64")
        if eval_split:
            columns["example_id"] = Value("string")
            columns["offset_mapping"] = List(List(Value("int32")))

        def encode(batch: dict[str, list]) -> dict[str, list]:
            questions = [q.lstrip() for q in batch["question"]]
            q_lens = tokenizer(questions, add_special_tokens=False)["input_ids"]
            for qid, q_ids in zip(batch["id"], q_lens, strict=True):
                room = budget - n_special - len(q_ids)
                if room <= doc_stride:
                    raise LoralabError(
                        f"Question '{qid}' takes {len(q_ids)} tokens, which leaves {max(room, 0)} "
                        f"context tokens per window (max_length {max_length}, {n_special} special "
                        f"tokens{', 1 null token' if causal else ''}); that must exceed doc_stride "
                        f"{doc_stride}. Raise max_length or lower doc_stride."
                    )
            enc = tokenizer(
                questions,
                batch["context"],
                truncation="only_second",
                max_length=budget,
                stride=doc_stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
                padding=False,
            )
            out: dict[str, list] = {name: [] for name in columns}
            for i, ex in enumerate(enc["overflow_to_sample_mapping"]):
                seq_ids = enc.sequence_ids(i)
                n = len(seq_ids)
                ids = list(enc["input_ids"][i])
                mask = list(enc["attention_mask"][i])
                # The context is one contiguous run of sequence-1 tokens (may be empty).
                first = seq_ids.index(1) if 1 in seq_ids else n
                last = n - 1 - seq_ids[::-1].index(1) if first < n else n - 1
                offsets = enc["offset_mapping"][i]
                null_index = n if causal else 0
                if causal:
                    ids.append(null_token)
                    mask.append(1)
                start, end = _answer_positions(
                    batch["answers"][ex], offsets, first, last, null_index
                )
                out["input_ids"].append(ids)
                out["attention_mask"].append(mask)
                if has_types:
                    types = list(enc["token_type_ids"][i])
                    if causal:
                        types.append(types[-1] if types else 0)
                    out["token_type_ids"].append(types)
                out["start_positions"].append(start)
                out["end_positions"].append(end)
                out["null_index"].append(null_index)
                out["length"].append(len(ids))
                if eval_split:
                    out["example_id"].append(batch["id"][ex])
                    tail = n - 1 - last + (1 if causal else 0)
                    out["offset_mapping"].append(
                        [_NO_CONTEXT] * first
                        + list(offsets[first : last + 1])
                        + [_NO_CONTEXT] * tail
                    )
            return out

        return raw.map(
            encode,
            batched=True,
            remove_columns=raw.column_names,
            features=Features(columns),
            desc=f"Tokenising {self.name} ({split})",
        )

    # -- metrics -----------------------------------------------------------------------------
    def score(self, raw, features, predictions: Any) -> dict[str, float]:
        predictions = getattr(predictions, "predictions", predictions)
        if isinstance(predictions, np.ndarray) and predictions.ndim == 3 and len(predictions) == 2:
            predictions = (predictions[0], predictions[1])
        if not isinstance(predictions, (tuple, list)) or len(predictions) < 2:
            raise ValueError(
                "SQuAD v2 scoring expects the QA model's (start_logits, end_logits) as returned by "
                f"Trainer.predict; got {type(predictions).__name__}."
            )
        answers, spans, margins = qa_candidates(
            raw,
            features,
            predictions[0],
            predictions[1],
            n_best=self.n_best,
            max_answer_len=self.max_answer_len,
        )
        out = self.answer_metrics(answers, raw)
        # The official script's threshold search: what the spans score with the null threshold
        # tuned on this same set (optimistic). It tells "no span skill" apart from "the null
        # wins everywhere", which both read as the no-answer prior in `f1`.
        best = metrics.squad_v2_best_threshold(spans, margins, _references(raw))
        return {**out, "best_exact": best["best_exact"], "best_f1": best["best_f1"]}

    def answer_metrics(self, answers: dict[str, str], raw) -> dict[str, float]:
        return metrics.squad_v2_scores(answers, _references(raw))

    def majority_baseline(self, raw) -> dict[str, float]:
        """Always answering "no answer" (the commonest single answer in SQuAD v2's dev set)."""
        references = _references(raw)
        if not references:
            return {}
        scores = metrics.squad_v2_scores(dict.fromkeys(references, ""), references)
        return {k: scores[k] for k in ("exact", "f1")}


def _references(raw) -> dict[str, list[str]]:
    """Question id -> gold answer texts ([] for an unanswerable question)."""
    return {
        qid: list(ans["text"])
        for qid, ans in zip(list(raw["id"]), list(raw["answers"]), strict=True)
    }


def _answer_positions(
    answers: dict, offsets: list, first: int, last: int, null_index: int
) -> tuple[int, int]:
    """Token span of the first gold answer if the window's context tokens `first..last` hold
    all of it, else (null_index, null_index)."""
    if not answers["text"] or first > last:
        return null_index, null_index
    text = answers["text"][0]
    start_char = answers["answer_start"][0] + (len(text) - len(text.lstrip()))
    end_char = start_char + len(text.strip())
    if end_char <= start_char or offsets[first][0] > start_char or offsets[last][1] < end_char:
        return null_index, null_index
    start = first
    while offsets[start][1] <= start_char:  # first token ending after the answer starts
        start += 1
    end = last
    while offsets[end][0] >= end_char:  # last token starting before the answer ends
        end -= 1
    if start > end:  # only with non-monotonic offsets; no usable label
        return null_index, null_index
    return start, end
