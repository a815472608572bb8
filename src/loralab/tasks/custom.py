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

import csv
import functools
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qsl

from .. import metrics
from ..errors import LoralabError
from .base import Split, find_file
from .glue import GlueTask

FORMATS = ("csv", "tsv", "jsonl")
METRICS = ("accuracy", "f1", "matthews")
EVAL_STEMS = ("dev", "validation", "eval", "test")
_SINGLE = ("text", "sentence")
_PAIRS = (("sentence1", "sentence2"), ("text_a", "text_b"), ("premise", "hypothesis"),
          ("question", "sentence"))  # fmt: skip


@dataclass
class TaskSpec:
    """What a task file or a `FORMAT:PATH?options` reference says (all optional but a source)."""

    format: str = ""
    """csv, tsv, jsonl or hub (default: from the file extension)."""
    path: str | None = None
    """csv/tsv/jsonl: a folder with train/dev files, or the training file."""
    train: str | None = None
    """Training file (overrides `path`)."""
    eval: str | None = None
    """Evaluation file (default: found next to the training file)."""
    hub: str | None = None
    """Hub dataset id (format hub)."""
    config: str | None = None
    """Hub dataset configuration name."""
    train_split: str = "train"
    eval_split: str = "validation"
    name: str | None = None
    """Short name for run folders and reports (default: from the file or folder name)."""
    text: list[str] = field(default_factory=list)
    """One text column, or two for sentence pairs."""
    label: str = "label"
    """The label column: label names (strings) or label indices."""
    labels: list[str] = field(default_factory=list)
    """Label names in index order (default: the sorted distinct labels of the training data)."""
    metric: str = "accuracy"
    """Main metric: accuracy, f1 (binary: positive class 1; else macro) or matthews."""
    prompt: str | None = None
    """`--head lm` prompt ({text_a}, {text_b}); default lists the label names."""
    verbalizers: list[str] = field(default_factory=list)
    """`--head lm` answer word per label (default: a space + the label name)."""
    max_length: int = 128


def is_custom_ref(ref: str) -> bool:
    """Whether `ref` names a user task (not a built-in name)."""
    return ref.split(":", 1)[0] in (*FORMATS, "hub") and ":" in ref or _is_task_file(ref)


def _is_task_file(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml"))


def absolute_ref(ref: str) -> str:
    """The reference with a relative path made absolute (run folders are read from anywhere)."""
    if _is_task_file(ref):
        return str(Path(ref).expanduser().resolve())
    kind, _, rest = ref.partition(":")
    if kind in FORMATS:
        path, q, query = rest.partition("?")
        return f"{kind}:{Path(path).expanduser().resolve()}{q}{query}"
    return ref


def short_name(ref: str) -> str:
    """File-system-safe short name of a task reference (for run folders and caches)."""
    try:
        spec, _ = parse_ref(ref)
    except LoralabError:
        spec = TaskSpec()
    if spec.name:
        name = spec.name
    elif spec.hub:
        name = spec.hub.split("/")[-1]
    else:
        where = spec.train or spec.path or ref
        p = Path(where.split("?")[0].split(":")[-1])
        name = p.stem if p.suffix else p.name
        name = re.sub(r"(^|[_.-])train([_.-]|$)", r"\1\2", name).strip("_.-") or p.parent.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "custom"


def parse_ref(ref: str) -> tuple[TaskSpec, Path]:
    """The spec a reference describes, and the folder relative paths start from."""
    if _is_task_file(ref):
        return _read_task_file(Path(ref).expanduser())
    kind, _, rest = ref.partition(":")
    source, _, query = rest.partition("?")
    if not source:
        raise LoralabError(f"Task '{ref}' names no {kind} source: write {kind}:PATH.")
    values: dict = {"format": kind}
    values["hub" if kind == "hub" else "path"] = source
    for key, value in parse_qsl(query, keep_blank_values=True):
        values[key] = _split_list(value) if key in ("text", "labels", "verbalizers") else value
    return _spec(values, ref), Path.cwd()


def _split_list(value: str) -> list[str]:
    # '|' separates list items where commas already separate tasks (sweep --tasks a,b).
    return [v for v in re.split(r"[|,]", value) if v]


def _read_task_file(path: Path) -> tuple[TaskSpec, Path]:
    import yaml

    if not path.is_file():
        raise LoralabError(f"Task file '{path}' does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LoralabError(f"Task file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LoralabError(f"Task file '{path}' must hold a mapping of task keys.")
    return _spec(data, str(path)), path.parent


def _spec(values: dict, where: str) -> TaskSpec:
    known = [f.name for f in fields(TaskSpec)]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise LoralabError(
            f"Task '{where}': unknown key(s) {unknown}; a task knows {', '.join(known)}."
        )
    for key in ("text", "labels", "verbalizers"):
        value = values.get(key)
        if isinstance(value, str):
            values[key] = _split_list(value)
        elif value is not None:
            values[key] = [str(v) for v in value]
    if "max_length" in values:
        try:
            values["max_length"] = int(values["max_length"])
        except (TypeError, ValueError):
            raise LoralabError(f"Task '{where}': max_length must be an integer.") from None
    spec = TaskSpec(**values)
    if not spec.format:  # a folder's format is read from its files in load_custom
        spec.format = "hub" if spec.hub else Path(spec.train or spec.path or "").suffix[1:].lower()
    if spec.format and spec.format not in (*FORMATS, "hub"):
        raise LoralabError(
            f"Task '{where}': format '{spec.format}' is not one of {', '.join(FORMATS)}, hub."
        )
    if spec.metric not in METRICS:
        raise LoralabError(
            f"Task '{where}': metric '{spec.metric}' is not one of {', '.join(METRICS)}."
        )
    if len(spec.text) > 2:
        raise LoralabError(f"Task '{where}': text names one column or a pair, not {spec.text}.")
    if spec.format == "hub" and not spec.hub:
        raise LoralabError(f"Task '{where}': format hub needs `hub: ORG/NAME`.")
    if spec.format != "hub" and not (spec.train or spec.path):
        raise LoralabError(f"Task '{where}' names no data: give `path` or `train` (and `eval`).")
    return spec


def _format_of_folder(folder: Path, where: str) -> str:
    found = [f for f in FORMATS if (folder / f"train.{f}").is_file()]
    if len(found) != 1:
        raise LoralabError(
            f"Task '{where}': cannot tell the format of '{folder}' (train files found: "
            f"{[f'train.{f}' for f in found] or 'none'}); set `format` to csv, tsv or jsonl."
        )
    return found[0]


# -- reading files -----------------------------------------------------------------------------


def read_rows(path: Path, fmt: str) -> list[tuple[int, dict]]:
    """(line number, row as dict) of a CSV/TSV (header row) or JSONL (one object per line)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            if fmt == "jsonl":
                return list(_jsonl_rows(fh, path))
            # TSV: no quoting (as GLUE's files: a text may start with a quote character).
            tsv = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else {}
            reader = csv.DictReader(fh, **tsv)
            return [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as e:
        raise LoralabError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    except csv.Error as e:
        raise LoralabError(f"{path}: not a well-formed {fmt.upper()} file ({e}).") from None


def _jsonl_rows(fh, path: Path):
    for lineno, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoralabError(
                f"{path}, line {lineno}: not a JSON object ({e.msg}); a JSONL file holds one "
                'object per line, e.g. {"text": "...", "label": "positive"}.'
            ) from None
        if not isinstance(row, dict):
            raise LoralabError(f"{path}, line {lineno}: expected a JSON object, got {row!r}.")
        yield lineno, row


def _guess_text(columns: list[str], path) -> list[str]:
    for pair in _PAIRS:
        if all(c in columns for c in pair):
            return list(pair)
    for single in _SINGLE:
        if single in columns:
            return [single]
    raise LoralabError(
        f"{path}: cannot tell which column holds the text (columns: {columns}); name it with "
        "`text` in the task (e.g. csv:PATH?text=review, or a pair: text=premise|claim)."
    )


def _sort_labels(values: set[str]) -> list[str]:
    try:
        return [str(v) for v in sorted(values, key=int)]
    except ValueError:
        return sorted(values)


# -- the task ----------------------------------------------------------------------------------


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
        path = find_file(self.name, data_dir, file, names, split) or self.default_file(split)
        if path is None:
            raise LoralabError(
                f"Task '{self.reference}' has no evaluation file: put a dev.{self.spec.format} "
                "next to the training file, set `eval` in the task, or pass --eval-file."
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
            cols["text_b"].append(
                str(row[self.text_columns[1]]) if len(self.text_columns) > 1 else ""
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

    from ..hub import require_dataset

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
        values = (
            None if names else {str(v) for v in ds[spec.label]} if spec.label in columns else set()
        )
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
        values = {str(r[spec.label]) for _, r in rows if r.get(spec.label) is not None}
    text = spec.text or _guess_text(columns, where)
    missing = [c for c in (*text, spec.label) if c not in columns]
    if missing:
        raise LoralabError(f"{where}: no column(s) {missing}; its columns are {columns}.")
    labels = spec.labels or names or _sort_labels(values)
    if len(labels) < 2:
        raise LoralabError(
            f"{where}: the label column '{spec.label}' holds {len(labels)} distinct value(s) "
            f"{labels}; a classification task needs at least two (or list them with `labels`)."
        )
    return text, labels


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
        spec.format = _format_of_folder(task._path(spec.train or spec.path), ref)
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
