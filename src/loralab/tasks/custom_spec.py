"""Users' own task references: `csv:PATH?options`, `tsv:`, `jsonl:`, `hub:ORG/NAME`, or a task
YAML file -> a `TaskSpec` (see `tasks/custom.py`), and reading their rows."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import parse_qsl

from ..errors import LoralabError

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
    return ref.split(":", 1)[0] in (*FORMATS, "hub") and ":" in ref or is_task_file(ref)


def is_task_file(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml"))


def absolute_ref(ref: str) -> str:
    """The reference with a relative path made absolute (run folders are read from anywhere)."""
    if is_task_file(ref):
        return str(Path(ref).expanduser().resolve())
    kind, _, rest = ref.partition(":")
    if kind in FORMATS:
        path, q, query = rest.partition("?")
        return f"{kind}:{Path(path).expanduser().resolve()}{q}{query}"
    return ref


def without_folder(ref: str) -> str:
    """A file task's reference without its folder ("csv:/data/m1?label=y" -> "csv:m1?label=y"),
    its options (labels, metric, columns) kept. Built-in and hub tasks, and task files (whose
    other keys the path stands for), are themselves."""
    kind, _, rest = ref.partition(":")
    if kind not in FORMATS:
        return ref
    _, q, query = rest.partition("?")
    return f"{kind}:{short_name(ref)}{q}{query}"


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
    if is_task_file(ref):
        return _read_task_file(Path(ref).expanduser())
    kind, _, rest = ref.partition(":")
    source, _, query = rest.partition("?")
    if not source:
        raise LoralabError(f"Task '{ref}' names no {kind} source: write {kind}:PATH.")
    values: dict = {"format": kind}
    values["hub" if kind == "hub" else "path"] = source
    for key, value in _query_pairs(query):
        values[key] = _split_list(value) if key in ("text", "labels", "verbalizers") else value
    return _spec(values, ref), Path.cwd()


def _query_pairs(query: str) -> list[tuple[str, str]]:
    """key=value pairs of a reference's options, %-escapes decoded. A '+' stays a '+' (a form
    encoding would read it as a space: labels=+1|-1 must stay two labels)."""
    return parse_qsl(query.replace("+", "%2B"), keep_blank_values=True)


def _split_list(value: str) -> list[str]:
    # '|' separates list items where commas already separate tasks (sweep --tasks a,b).
    return [v for v in re.split(r"[|,]", value) if v]


def _read_task_file(path: Path) -> tuple[TaskSpec, Path]:
    from ..config import load_yaml  # its errors: one paragraph (PyYAML's lines joined)

    data = load_yaml(path, "Task file", "configs/tasks/sst2-matthews.yaml")
    return _spec(data, str(path)), path.parent


def _spec(values: dict, where: str) -> TaskSpec:
    known = [f.name for f in fields(TaskSpec)]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise LoralabError(
            f"Task '{where}': unknown key(s) {unknown}; a task knows {', '.join(known)}."
        )
    for key in [k for k in known if k in values]:
        values[key] = _checked(key, values[key], where)
    spec = TaskSpec(**values)
    if len(set(spec.labels)) != len(spec.labels):
        raise LoralabError(f"Task '{where}': `labels` names a label twice: {spec.labels}.")
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


LISTS = ("text", "labels", "verbalizers")
OPTIONAL = ("path", "train", "eval", "hub", "config", "name", "prompt")


def _checked(key: str, value, where: str):
    """A task key's value as TaskSpec holds it, or a LoralabError naming the key. YAML reads
    yes/no/on/off as booleans: a label or verbalizer written so must be quoted."""

    def text(v, what: str) -> str:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            quoted = " (YAML reads yes/no/true/false unquoted as booleans: quote it)" if isinstance(v, bool) else ""  # fmt: skip
            raise LoralabError(f"Task '{where}': {what} must be text, got {v!r}{quoted}.")
        return str(v)

    if key == "max_length":
        whole = isinstance(value, float) and value.is_integer() or re.fullmatch(r"\s*\d+\s*", str(value))  # fmt: skip
        if isinstance(value, bool) or not whole or int(value) < 16:
            raise LoralabError(f"Task '{where}': max_length must be a whole number of tokens, at least 16; got {value!r}.")  # fmt: skip
        return int(value)
    if value is None and key in OPTIONAL:
        return None
    if key not in LISTS:
        return text(value, f"`{key}`")
    if isinstance(value, str):
        value = _split_list(value)
    if not isinstance(value, list):
        raise LoralabError(f"Task '{where}': `{key}` must be a list (or one text), got {value!r}.")
    items = [text(v, f"each item of `{key}`") for v in value]
    # Verbalizers keep their spaces (" positive" is one token of many tokenizers); names do not.
    return items if key == "verbalizers" else [v.strip() for v in items]


def format_of_folder(folder: Path, where: str) -> str:
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
            rows = []
            for row in reader:
                if None in row:  # DictReader keeps fields past the header's under None
                    fix = (
                        "a TSV text cannot hold a tab" if fmt == "tsv"
                        else 'a text that holds a comma needs quotes ("like, this")'
                    )  # fmt: skip
                    raise LoralabError(
                        f"{path}, line {reader.line_num}: {len(row) - 1 + len(row[None])} "
                        f"fields, but the header names {len(reader.fieldnames)} "
                        f"({', '.join(reader.fieldnames)}); {fix}."
                    )
                rows.append((reader.line_num, row))
            return rows
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


def guess_text(columns: list[str], path) -> list[str]:
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


def sort_labels(values: set[str]) -> list[str]:
    try:
        return [str(v) for v in sorted(values, key=int)]
    except ValueError:
        return sorted(values)


# -- the task ----------------------------------------------------------------------------------
