"""What a head is: one formulation of a task for a model, owned in one place.

A head decides which transformers class is loaded, how PEFT wraps it, how raw examples become
features, how batches are padded, the training loss, the evaluation, and which logits merge
equivalence and analysis probes compare. Everything else (training loop, merge, analysis,
validate) calls these methods and never asks which head it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from ..config import DataConfig
from ..errors import LoralabError
from ..tasks import Task


class Head(ABC):
    """A head bound to one task and the run's data settings.

    Subclasses set `name` (the `model.head` value) and register with `heads.register_head`.
    """

    name: ClassVar[str]
    evaluates_in_trainer: ClassVar[bool] = True
    """True: the Trainer's own predict loop scores dev features (`evaluate` gets `predict`)."""
    reads_prompts: ClassVar[bool] = False
    """True: the head reads `data.prompt` and `data.verbalizers` (others refuse them)."""

    def __init__(self, task: Task, data: DataConfig):
        self.task = task
        self.data = data

    # -- model -------------------------------------------------------------------------------
    @abstractmethod
    def auto_class(self):
        """The transformers Auto class to load the base with (e.g. AutoModelForCausalLM)."""

    @abstractmethod
    def peft_task_type(self) -> str | None:
        """PEFT's task_type for the LoRA wrapper (None: the plain PeftModel)."""

    def model_kwargs(self) -> dict:
        """Extra `from_pretrained` arguments (e.g. num_labels)."""
        return {}

    def check_model(self, model_config, model_name: str) -> None:
        """Raise LoralabError when this head cannot work with the model (before weights load):
        here, when transformers has no class of the head's kind for the model's type (Cohere
        has no sequence classifier, T5 no causal LM). A model with its own code is its own."""
        auto = self.auto_class()
        try:
            known = type(model_config) in auto._model_mapping  # transformers' registry
        except Exception:  # noqa: BLE001 - a registry this transformers lays out otherwise
            return
        if not known and not getattr(model_config, "auto_map", None):
            raise LoralabError(
                f"{model_name} is a {model_config.model_type} model, for which transformers has "
                f"no {auto.__name__.removeprefix('AutoModelFor')} class: model.head={self.name} "
                f"on {self.task.name} needs one. Use another head (model.head=) or another model."
            )

    @classmethod
    def check_data(cls, data: DataConfig) -> None:
        """Raise LoralabError for data settings this head would silently ignore."""
        given = [f"data.{k}" for k in ("prompt", "verbalizers") if getattr(data, k) is not None]
        given += ["data.chat_template"] if data.chat_template is False else []
        if given and not cls.reads_prompts:
            raise LoralabError(
                f"{' and '.join(given)} {'are' if len(given) > 1 else 'is'} for a prompted "
                f"language model (model.head=lm); the {cls.name} head would ignore "
                f"{'them' if len(given) > 1 else 'it'}. Remove {'them' if len(given) > 1 else 'it'}"
                ", or train with model.head=lm."
            )

    def export_labels(self) -> tuple[str, ...]:
        """Label names an exported model's config maps its outputs to (none: no mapping)."""
        return ()

    def prepare(self, tokenizer) -> None:
        """Bind what depends on the tokenizer (prompts, verbalizers); called once, before data."""
        return None

    # -- data --------------------------------------------------------------------------------
    def cache_key(self) -> list | None:
        """What, besides the task and tokenizer, changes this head's features (cache key)."""
        return None

    @abstractmethod
    def featurize(self, raw, tokenizer, max_length: int, split: str, causal: bool):
        """Tokenised features of `raw` as a `datasets.Dataset` (see `Task.featurize`)."""

    def collator(self, tokenizer):
        """The Trainer's batch collator."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    # -- training and evaluation ---------------------------------------------------------------
    def loss(self, model, inputs: dict) -> torch.Tensor | None:
        """The training loss of a batch; None: the model's own loss from `labels`."""
        return None

    def reports_zero_shot(self) -> bool:
        """Whether the untrained model's score is a meaningful reference (summary `zero_shot`)."""
        return False

    @abstractmethod
    def evaluate(
        self, model, tokenizer, raw, features, batch_size: int, progress: bool,
        predict: Callable | None = None,
    ) -> dict[str, float]:  # fmt: skip
        """Task metrics of `model` on the dev `features` of `raw`.

        `predict(features)` runs the Trainer's prediction loop (heads that use it)."""

    @abstractmethod
    def logits(self, output, batch: dict) -> torch.Tensor:
        """What merge equivalence compares, from one forward `output` of `batch`: [b, ...]."""

    @abstractmethod
    def score_logits(self, model, tokenizer, raw, features, outs, batch_size: int) -> dict:
        """Task metrics from the per-batch `logits` of the dev features (merge's verdicts)."""
