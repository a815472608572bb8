"""Users' own classification tasks: CSV, TSV or JSONL files, or a hub dataset.

A task is referenced by one string, so that a config's `data.task` (and a study spec) can
hold it:
- `csv:PATH`, `tsv:PATH`, `jsonl:PATH`: PATH is a folder holding `train.<ext>` and one of
  `dev|validation|eval|test.<ext>`, or a training file (the evaluation file is its sibling
  with `train` replaced by `dev`, `validation`, `eval` or `test`, or `--eval-file`).
  Options follow a `?`: `csv:data/reviews?text=review&label=stars&labels=neg|neu|pos&metric=matthews`.
- `hub:ORG/NAME?...`: a hub dataset (options as above, plus `config`, `train_split`, `eval_split`).
- `PATH.yaml`: a task file with the same keys (see `TaskSpec`); relative paths are relative to it.

Defaults: text column `text` or `sentence` (pairs: `sentence1`+`sentence2`, `text_a`+`text_b`,
`premise`+`hypothesis`, `question`+`sentence`), label column `label`, label names = the distinct
labels of the training data (sorted), metric `accuracy`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .. import metrics
from ..errors import LoralabError
from ..hub import require_dataset
from .base import Split, find_file
from .custom_spec import (
    EVAL_STEMS,
    TaskSpec,
    format_of_folder,
    guess_text,
    parse_ref,
    read_rows,
    short_name,
    sort_labels,
)
from .glue import GlueTask


@dataclass
class CustomTask(GlueTask):
    """A user's classification task (see the module docstring)."""

    kind: ClassVar[str] = "classification"
    spec: TaskSpec = field(default_factory=TaskSpec)
    base_dir: Path = field(default_factory=Path.cwd)
    reference: str = ""

    # -- where the data are ----------------------------------------------------------------
    def _path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def default_file(self, split: Split) -> Path | None:
        """The task's own file for `split` (None: the user must give --eval-file)."""
        s, ext = self.spec, self.spec.format
        if split == "train" and s.train:
            return self._path(s.train)
        if split == "eval" and s.eval:
            return self._path(s.eval)
        where = self._path(s.train or s.path)
        if where.is_dir():
            stems = ("train",) if split == "train" else EVAL_STEMS
            found = [
                where / f"{stem}.{ext}" for stem in stems if (where / f"{stem}.{ext}").is_file()
            ]
            if not found:
                names = " or ".join(f"{stem}.{ext}" for stem in stems)
                raise LoralabError(f"Task '{self.reference}': the folder '{where}' has no {names}.")
            return found[0]
        if split == "train":
            return where
        for stem in EVAL_STEMS:
            sibling = where.with_name(where.name.replace("train", stem))
            if sibling != where and sibling.is_file():
                return sibling
        return None

    def load(self, split: Split, data_dir: str | None = None, file: str | None = None):
        from datasets import Dataset

        if self.spec.format == "hub" and not file and not data_dir:
            return Dataset.from_dict(self._from_hub(split))
        names = [f"train.{self.spec.format}"] if split == "train" else [
            f"{stem}.{self.spec.format}" for stem in EVAL_STEMS
        ]  # fmt: skip
        try:
            path = find_file(self.name, data_dir, file, names, split) or self.default_file(split)
        except LoralabError as e:
            if not data_dir or file:
                raise
            raise LoralabError(f"{e} data.data_dir replaces the data that task '{self.reference}' names; drop it to read the task's own files.") from None  # fmt: skip
        if path is None:
            raise LoralabError(
                f"Task '{self.reference}' has no evaluation file: put a dev.{self.spec.format} "
                "next to the training file, set `eval` in the task, or set data.eval_file."
            )
        if not path.is_file():
            raise LoralabError(
                f"The {split} file '{path}' of task '{self.reference}' does not exist."
            )
        return Dataset.from_dict(self._columns(read_rows(path, self.spec.format), path))

    def _columns(self, rows: list[tuple[int, dict]], path) -> dict[str, list]:
        """Canonical columns (text_a, text_b, label) from rows; every complaint names the line."""
        if not rows:
            raise LoralabError(f"{path} holds no examples.")
        wanted = [*self.text_columns, self.spec.label]
        cols: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
        for lineno, row in rows:
            missing = [c for c in wanted if row.get(c) is None]
            if missing:
                raise LoralabError(
                    f"{path}, line {lineno}: no value for column(s) {missing}; task "
                    f"'{self.name}' reads the columns {wanted}."
                )
            cols["text_a"].append(str(row[self.text_columns[0]]))
            cols["text_b"].append(str(row[self.text_columns[1]]) if self.pair else "")
            if not str(row[self.spec.label]).strip():
                raise LoralabError(
                    f"{path}, line {lineno}: the label (column '{self.spec.label}') is empty; "
                    "every example needs one of the task's labels."
                )
            cols["label"].append(self._label(str(row[self.spec.label]), path, lineno))
        return cols

    def _from_hub(self, split: Split) -> dict[str, list]:
        ds = _hub_split(self.spec, split)
        names = _hub_label_names(ds, self.spec.label)
        rows = []
        for i, row in enumerate(ds):
            value = row.get(self.spec.label)
            if names is not None and isinstance(value, int) and 0 <= value < len(names):
                value = names[value]  # a ClassLabel index -> its name
            rows.append((i + 1, {**row, self.spec.label: value}))
        return self._columns(rows, f"{self.spec.hub} ({split})")

    # -- metrics ---------------------------------------------------------------------------
    def label_metrics(self, preds, labels) -> dict[str, float]:
        out = {"accuracy": metrics.accuracy(preds, labels)}
        if self.primary_metric == "f1":
            out["f1"] = (
                metrics.f1_binary(preds, labels, positive=1)
                if self.num_labels == 2
                else metrics.f1_macro(preds, labels, self.num_labels)
            )
        elif self.primary_metric == "matthews":
            out["matthews"] = metrics.matthews(preds, labels, self.num_labels)
        return out


def _hub_split(spec: TaskSpec, split: Split):
    from datasets import load_dataset

    name = spec.train_split if split == "train" else spec.eval_split
    require_dataset(spec.hub, "Save the data as CSV/JSONL files and use csv:PATH or jsonl:PATH.")
    try:
        return load_dataset(spec.hub, spec.config, split=name)
    except Exception as e:  # offline, missing split, renamed: the user has to act on each
        raise LoralabError(
            f"Could not load split '{name}' of the hub dataset {spec.hub}"
            f"{f' ({spec.config})' if spec.config else ''}: {type(e).__name__}: {e}. Check the "
            "id and the split names (train_split, eval_split), or use local files."
        ) from None


def _hub_label_names(ds, column: str) -> list[str] | None:
    feature = ds.features.get(column)
    return list(feature.names) if hasattr(feature, "names") else None


def _infer(spec: TaskSpec, task: CustomTask) -> tuple[list[str], list[str]]:
    """Text columns and label names, from the spec or else from the training data."""
    if spec.format == "hub":
        ds = _hub_split(spec, "train")
        columns, where = list(ds.column_names), spec.hub
        names = _hub_label_names(ds, spec.label)
        values = None if names else _label_values(ds[spec.label] if spec.label in columns else [])
    else:
        path = task.default_file("train")
        if not path.is_file():
            raise LoralabError(
                f"The training file '{path}' of task '{task.reference}' does not exist."
            )
        rows = read_rows(path, spec.format)
        if not rows:
            raise LoralabError(f"{path} holds no examples.")
        columns, where, names = list(rows[0][1]), path, None
        values = _label_values(r.get(spec.label) for _, r in rows)
    text = spec.text or guess_text(columns, where)
    missing = [c for c in (*text, spec.label) if c not in columns]
    if missing:
        raise LoralabError(f"{where}: no column(s) {missing}; its columns are {columns}.")
    labels = spec.labels or names or sort_labels(values)
    if spec.labels and len(labels) < 2:
        raise LoralabError(
            f"Task '{task.reference}': `labels` lists {len(labels)} label(s) {labels}; a "
            "classification task needs at least two: list every value of the label column "
            "(in the order of their ids), or drop `labels` to take them from the data."
        )
    if len(labels) < 2:
        raise LoralabError(
            f"{where}: the label column '{spec.label}' holds {len(labels)} distinct value(s) "
            f"{labels}; a classification task needs at least two (or list them with `labels`)."
        )
    return text, labels


def _label_values(values) -> set[str]:
    """The distinct labels of a column as the loader reads them (stripped text); a missing or
    blank one is left out (it is reported when that row loads), a 0 or false is not."""
    return {text for v in values if v is not None and (text := str(v).strip())}


def _default_prompt(text: list[str], labels: list[str]) -> str:
    choice = ", ".join(labels)
    if len(text) == 1:
        return f"Text: {{text_a}}\nAnswer with one of {choice}.\nAnswer:"
    return f"Text 1: {{text_a}}\nText 2: {{text_b}}\nAnswer with one of {choice}.\nAnswer:"


@functools.lru_cache(maxsize=32)
def load_custom(ref: str) -> CustomTask:
    """The task a custom reference describes (label names read from the data when not given)."""
    spec, base = parse_ref(ref)
    task = CustomTask(name=short_name(ref), spec=spec, base_dir=base, reference=ref)
    if not spec.format:
        spec.format = format_of_folder(task._path(spec.train or spec.path), ref)
    text, labels = _infer(spec, task)
    if spec.verbalizers and len(spec.verbalizers) != len(labels):
        raise LoralabError(
            f"Task '{ref}': {len(spec.verbalizers)} verbalizers for {len(labels)} labels {labels}."
        )
    task.text_columns = tuple(text)
    task.label_column = spec.label
    task.label_names = tuple(labels)
    task.label_aliases = {name: i for i, name in enumerate(labels)}
    task.metric_names = ("accuracy", spec.metric) if spec.metric != "accuracy" else ("accuracy",)
    task.primary_metric = spec.metric
    task.default_max_length = spec.max_length
    task.prompt = spec.prompt or _default_prompt(text, labels)
    task.prompt_fields = ("text_a", "text_b") if len(text) == 2 else ("text_a",)
    task.verbalizers = tuple(spec.verbalizers or [f" {name}" for name in labels])
    task.hub_path = spec.hub or ""
    return task
