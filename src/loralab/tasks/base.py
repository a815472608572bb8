"""What a task is: raw examples in canonical columns, features for a model, metrics.

Canonical raw columns
- classification: `text_a` (str), `text_b` (str, "" for single-sentence tasks), `label` (int)
- qa (SQuAD v2): `id`, `question`, `context`, `answers` = {"text": [...], "answer_start": [...]}
  (empty lists for unanswerable questions)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..errors import LoralabError

Split = Literal["train", "eval"]

# Columns a model's forward accepts; everything else in a feature set is bookkeeping.
MODEL_COLUMNS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "labels",
    "start_positions",
    "end_positions",
)


@dataclass
class Task(ABC):
    """A registered task. Quirks live here, never as `if task == ...` in the training loop."""

    name: str
    kind: ClassVar[Literal["classification", "qa"]]
    hub_path: str = ""
    hub_config: str | None = None
    default_max_length: int = 128
    primary_metric: str = "accuracy"
    prompt: str = ""
    """`--head lm`: the prompt template (str.format fields from the canonical columns)."""
    prompt_fields: tuple[str, ...] = ()
    verbalizers: tuple[str, ...] = ()
    """`--head lm`: one answer word per label (GLUE)."""
    label_names: tuple[str, ...] = ()
    """Classification: one name per label index (exports' id2label, error messages)."""
    metric_names: tuple[str, ...] = ()
    """The metrics `score` reports, main one first."""
    points_per_unit: ClassVar[float] = 100.0
    """Report points per unit of `score`'s metrics (fractions x 100; 1 for metrics in points)."""

    @property
    def num_labels(self) -> int:
        return 2

    @abstractmethod
    def load(
        self,
        split: Split,
        data_dir: str | None = None,
        file: str | None = None,
    ):
        """Raw examples of one split as a `datasets.Dataset` in the canonical columns.

        `file` (explicit path) wins over `data_dir` (folder with the original file names);
        with neither, the Hugging Face hub is used.
        """

    def eval_file_for(self, train_file: str | None, eval_file: str | None) -> str | None:
        """The evaluation file to load: `eval_file`, or one the task pairs with `train_file`
        when none is given; None = the data folder's or the hub's dev split."""
        return eval_file

    def load_dev(self, data_dir: str | None, train_file: str | None, eval_file: str | None):
        """The dev split these data settings name (`load("eval")` of `eval_file_for`'s file)."""
        return self.load("eval", data_dir, self.eval_file_for(train_file, eval_file))

    @abstractmethod
    def featurize(
        self, raw, tokenizer, max_length: int, doc_stride: int, split: Split, causal: bool
    ):
        """Tokenised features as a `datasets.Dataset` (model columns plus bookkeeping columns)."""

    @abstractmethod
    def score(self, raw, features, predictions: Any) -> dict[str, float]:
        """Task metrics from the model outputs on `features` (as returned by Trainer.predict)."""

    def label_metrics(self, preds, labels) -> dict[str, float]:
        """Classification: the task's metrics from predicted and true label indices (any head)."""
        raise NotImplementedError(f"{self.name} is not a classification task")

    def answer_metrics(self, answers: dict[str, str], raw) -> dict[str, float]:
        """Question answering: the task's metrics from {example id: answer text} (any head)."""
        raise NotImplementedError(f"{self.name} is not a question-answering task")

    def probe_rows(self):
        """A handful of hand-built examples in this task's canonical columns, as a
        `datasets.Dataset`: what `loralab validate` trains its probe on (no data files)."""
        raise LoralabError(
            f"Task '{self.name}' gives no probe examples, so `loralab validate` cannot check it: "
            "define `probe_rows()` on the task (a few examples in its canonical columns; see "
            "loralab/tasks/probes.py), or validate on a built-in task (data.task=sst2)."
        )

    def majority_baseline(self, raw) -> dict[str, float]:
        """The metrics of the trivial answer on `raw` (most frequent label, or "no answer"),
        in the units of `score`: the floor a fine-tuned model has to beat. {} if undefined."""
        return {}


def find_file(
    task: str, data_dir: str | None, file: str | None, names: list[str], split: str
) -> Path | None:
    """Locate a local data file; None means 'use the hub'. Missing files are user errors."""
    if file:
        p = Path(file)
        if not p.is_file():
            state = (
                "is a folder, not a file (use data.data_dir for a folder)"
                if p.is_dir()
                else "does not exist"
            )
            raise LoralabError(f"The {split} file '{p}' for task '{task}' {state}.")
        return p
    if not data_dir:
        return None
    d = Path(data_dir)
    if not d.is_dir():
        raise LoralabError(
            f"data.data_dir '{d}' is not a folder. Point it at a folder holding the {task} files "
            f"({' or '.join(names)})."
        )
    for folder in (d, d / task):
        for n in names:
            if (folder / n).is_file():
                return folder / n
    raise LoralabError(
        f"No {split} file for task '{task}' in '{d}': expected {' or '.join(names)} "
        f"(in that folder or in a '{task}' subfolder)."
    )
