"""The classifier/span head: a sequence-classification head (GLUE) or span extraction (SQuAD)
on top of the base model, trained with the model's own loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Head


class ClassifierHead(Head):
    name = "classifier"

    def _classifies(self) -> bool:
        return self.task.kind == "classification"

    def auto_class(self):
        from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

        if self._classifies():
            return AutoModelForSequenceClassification
        return AutoModelForQuestionAnswering

    def peft_task_type(self) -> str | None:
        # PEFT's QUESTION_ANS wrapper drops token_type_ids (BERT segment ids) on the way to the
        # model; the plain wrapper passes every input through, and modules_to_save works the same.
        return "SEQ_CLS" if self._classifies() else None

    def model_kwargs(self) -> dict:
        return {"num_labels": self.task.num_labels} if self._classifies() else {}

    def export_labels(self) -> tuple[str, ...]:
        return tuple(self.task.label_names) if self._classifies() else ()

    def featurize(self, raw, tokenizer, max_length: int, split: str, causal: bool):
        return self.task.featurize(raw, tokenizer, max_length, self.data.doc_stride, split, causal)

    def evaluate(self, model, tokenizer, raw, features, batch_size, progress, predict=None):
        return self.task.score(raw, features, predict(features).predictions)

    def logits(self, output, batch: dict) -> torch.Tensor:
        """Classification: [b, labels]; span extraction: [b, 2, seq] (start and end logits)."""
        if hasattr(output, "start_logits"):
            return torch.stack([output.start_logits, output.end_logits], dim=1)
        return output.logits

    def score_logits(self, model, tokenizer, raw, features, outs, batch_size: int) -> dict:
        """`outs` as Trainer.predict would return them (QA: padded with -100 to one width)."""
        if self._classifies():
            return self.task.score(raw, features, torch.cat(outs).numpy())
        width = max(o.shape[-1] for o in outs)
        padded = torch.cat([F.pad(o, (0, width - o.shape[-1]), value=-100.0) for o in outs])
        return self.task.score(raw, features, (padded[:, 0].numpy(), padded[:, 1].numpy()))
