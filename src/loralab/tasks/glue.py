"""GLUE sentence(-pair) classification: SST-2, MRPC, RTE."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from .. import metrics
from ..errors import LoralabError
from ..hub import require_dataset
from . import probes
from .base import Split, Task, find_file

_FILE_NAMES = {"train": ["train.tsv"], "eval": ["dev.tsv"]}


@dataclass
class GlueTask(Task):
    """A GLUE task: which TSV columns hold the texts and the label, and how labels are spelled."""

    kind: ClassVar[str] = "classification"
    text_columns: tuple[str, ...] = ("sentence",)
    label_column: str = "label"
    label_names: tuple[str, ...] = ("0", "1")
    hub_columns: tuple[str, ...] = ("sentence",)
    metric_names: tuple[str, ...] = ("accuracy",)
    label_aliases: dict[str, int] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def probe_rows(self):
        from datasets import Dataset

        return Dataset.from_dict(probes.classification_rows(self.num_labels, self.pair))

    @property
    def pair(self) -> bool:
        """Whether an example is two texts (`text_b` filled)."""
        return len(self.text_columns) > 1

    # -- loading ---------------------------------------------------------------------------
    def load(self, split: Split, data_dir: str | None = None, file: str | None = None):
        from datasets import Dataset

        path = find_file(self.name, data_dir, file, _FILE_NAMES[split], split)
        if path is None:
            return self._load_hub(split)
        return Dataset.from_dict(self.read_tsv(path))

    def _load_hub(self, split: Split):
        from datasets import load_dataset

        require_dataset(
            f"{self.hub_path} ({self.hub_config})",
            f"The {split} split has no local file: set data.data_dir to a folder with the GLUE "
            f"files (train.tsv, dev.tsv) of {self.name}, or data.{split}_file to its file.",
        )
        try:
            ds = load_dataset(
                self.hub_path, self.hub_config, split="train" if split == "train" else "validation"
            )
        except Exception as e:  # offline, hub down, renamed: the fix is the same for the user
            raise LoralabError(
                f"Could not load {self.name}'s {split} split (no local file named for it) from "
                f"the Hugging Face hub ({self.hub_path}/{self.hub_config}): {type(e).__name__}: "
                f"{e}. Without hub access, set data.data_dir to a folder with the GLUE files "
                f"(train.tsv, dev.tsv) of {self.name}, or data.{split}_file to its file."
            ) from None
        a, b = (self.hub_columns + ("",))[:2]
        return ds.map(
            lambda ex: {
                "text_a": ex[a],
                "text_b": ex[b] if b else "",
                "label": int(ex["label"]),
            },
            remove_columns=ds.column_names,
        )

    def read_tsv(self, path: Path) -> dict[str, list]:
        """Parse a GLUE TSV (BOM-tolerant, quoting off: strings may hold quote characters)."""
        try:
            return self._read_tsv(path)
        except UnicodeDecodeError as e:
            raw = Path(path).read_bytes()
            line = raw[: e.start].count(b"\n") + 1
            raise LoralabError(
                f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}). GLUE files are "
                "UTF-8: re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
            ) from None
        except OSError as e:
            raise LoralabError(f"Cannot read {path}: {e.strerror or e}.") from None
        except csv.Error as e:  # e.g. a field over csv's size limit: a JSON file given by mistake
            raise LoralabError(
                f"{path}: not a GLUE TSV ({e}). A GLUE {self.name} file is tab-separated text with "
                f"the header {'<TAB>'.join((*self.text_columns, self.label_column))} and one "
                "example per line."
            ) from None

    def _read_tsv(self, path: Path) -> dict[str, list]:
        cols: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            try:
                header = next(reader)
            except StopIteration:
                raise LoralabError(
                    f"{path} is empty: expected a GLUE TSV with a header row."
                ) from None
            wanted = (*self.text_columns, self.label_column)
            missing = [c for c in wanted if c not in header]
            if missing:
                raise LoralabError(
                    f"{path}, line 1: header {header} lacks column(s) {missing}; a GLUE {self.name} "
                    f"file has the columns {list(wanted)}."
                )
            ia, il = header.index(wanted[0]), header.index(wanted[-1])
            ib = header.index(wanted[1]) if self.pair else None
            text_a, text_b, labels = cols["text_a"], cols["text_b"], cols["label"]
            known: dict[str, int] = {}  # raw label -> index: a task has a few (SST-2: 67k rows)
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise LoralabError(
                        f"{path}, line {lineno}: expected {len(header)} tab-separated fields "
                        f"({', '.join(header)}), found {len(row)}. Is the file truncated or not tab-separated?"
                    )
                text_a.append(row[ia])
                text_b.append(row[ib] if ib is not None else "")
                label = known.get(row[il])
                if label is None:
                    label = known[row[il]] = self._label(row[il], path, lineno)
                labels.append(label)
        if not cols["label"]:
            raise LoralabError(f"{path} has a header but no examples.")
        return cols

    def _label(self, raw: str, path: Path, lineno: int) -> int:
        raw = raw.strip()
        if raw in self.label_aliases:
            return self.label_aliases[raw]
        # A class index stands for its name (GLUE's 0/1), unless the names are numbers
        # themselves: then an unknown number is a label the task lacks, not an index.
        numeric_names = any(_is_int(name) for name in self.label_aliases)
        value = int(raw) if _is_int(raw) and not numeric_names else -1
        if not 0 <= value < self.num_labels:
            allowed = list(self.label_aliases) or [str(i) for i in range(self.num_labels)]
            raise LoralabError(
                f"{path}, line {lineno}: label {raw!r} is out of range for {self.name}; "
                f"allowed labels are {', '.join(allowed)}."
            )
        return value

    # -- features and metrics --------------------------------------------------------------
    def featurize(
        self, raw, tokenizer, max_length: int, doc_stride: int, split: Split, causal: bool
    ):
        pair = self.pair

        def encode(batch):
            # GLUE sentences often end in a space; a decoder classifier reads the last token,
            # which would then be a lone whitespace token.
            a = [t.strip() for t in batch["text_a"]]
            args = (a, [t.strip() for t in batch["text_b"]]) if pair else (a,)
            enc = tokenizer(*args, truncation=True, max_length=max_length)
            enc["labels"] = batch["label"]
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            return enc

        return raw.map(
            encode, batched=True, remove_columns=raw.column_names, desc=f"Tokenising {self.name}"
        )

    def score(self, raw, features, predictions) -> dict[str, float]:
        logits = predictions[0] if isinstance(predictions, tuple) else predictions
        preds = np.asarray(logits).argmax(-1)
        return self.label_metrics(preds, np.asarray(features["labels"]))

    def label_metrics(self, preds, labels) -> dict[str, float]:
        """The task's metrics from predicted and true label indices (both heads use this)."""
        out = {"accuracy": metrics.accuracy(preds, labels)}
        if "f1" in self.metric_names:
            out["f1"] = metrics.f1_binary(preds, labels, positive=1)
        return out

    def majority_baseline(self, raw) -> dict[str, float]:
        """The task's own metrics (`label_metrics`) of always predicting the commonest label."""
        labels = np.asarray(raw["label"], dtype=int)
        if labels.size == 0:
            return {}
        preds = np.full_like(labels, np.bincount(labels).argmax())  # a tie goes to the lower label
        return self.label_metrics(preds, labels)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def glue_tasks() -> dict[str, GlueTask]:
    return {
        "sst2": GlueTask(
            name="sst2",
            hub_path="nyu-mll/glue",
            hub_config="sst2",
            default_max_length=128,
            text_columns=("sentence",),
            hub_columns=("sentence",),
            label_names=("negative", "positive"),
            prompt="Review: {text_a}\nSentiment:",
            prompt_fields=("text_a",),
            verbalizers=(" negative", " positive"),
        ),
        "mrpc": GlueTask(
            name="mrpc",
            hub_path="nyu-mll/glue",
            hub_config="mrpc",
            default_max_length=128,
            text_columns=("#1 String", "#2 String"),
            label_column="Quality",
            hub_columns=("sentence1", "sentence2"),
            label_names=("not_equivalent", "equivalent"),
            metric_names=("accuracy", "f1"),
            prompt="Sentence 1: {text_a}\nSentence 2: {text_b}\nDo both sentences say the same thing? Answer yes or no:",
            prompt_fields=("text_a", "text_b"),
            verbalizers=(" no", " yes"),
        ),
        "rte": GlueTask(
            name="rte",
            hub_path="nyu-mll/glue",
            hub_config="rte",
            default_max_length=256,
            text_columns=("sentence1", "sentence2"),
            hub_columns=("sentence1", "sentence2"),
            label_names=("entailment", "not_entailment"),
            label_aliases={"entailment": 0, "not_entailment": 1},
            prompt="Premise: {text_a}\nHypothesis: {text_b}\nDoes the premise entail the hypothesis? Answer yes or no:",
            prompt_fields=("text_a", "text_b"),
            verbalizers=(" yes", " no"),
        ),
    }
