"""The prompted causal-LM head (`model.head=lm`): the language model itself answers a prompt.

GLUE labels are verbalizer words scored by log-probability; SQuAD v2 answers are generated.
The loss covers the target tokens only. See `heads/prompting.py` for the machinery.
"""

from __future__ import annotations

import torch

from ..errors import LoralabError
from ..models import is_causal
from . import prompting
from .base import Head


class PromptedLMHead(Head):
    name = "lm"
    evaluates_in_trainer = False  # scored by its own loop (verbalizers / generation)
    reads_prompts = True

    def __init__(self, task, data):
        super().__init__(task, data)
        self.prompting: prompting.Prompting | None = None

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def peft_task_type(self) -> str | None:
        return "CAUSAL_LM"

    def check_model(self, model_config, model_name: str) -> None:
        if not is_causal(model_config):
            raise LoralabError(
                f"model.head=lm needs a causal (decoder) language model; {model_name} is a "
                f"{model_config.model_type} encoder. Use model.head=classifier, or a "
                "Llama-family model."
            )
        super().check_model(model_config, model_name)  # e.g. T5: no causal LM class

    def prepare(self, tokenizer) -> None:
        self.prompting = prompting.prompting_for(self.task, self.data, tokenizer)

    def _bound(self) -> prompting.Prompting:
        if self.prompting is None:
            raise RuntimeError("PromptedLMHead.prepare(tokenizer) must be called first")
        return self.prompting

    def cache_key(self) -> list:
        return self._bound().key()

    def featurize(self, raw, tokenizer, max_length: int, split: str, causal: bool):
        return prompting.featurize(self.task, raw, tokenizer, max_length, split, self._bound())

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)

    def loss(self, model, inputs: dict) -> torch.Tensor:
        return prompting.target_loss(model, inputs)  # vocabulary logits on target tokens only

    def reports_zero_shot(self) -> bool:
        return self.task.kind == "classification"

    def evaluate(self, model, tokenizer, raw, features, batch_size, progress, predict=None):
        return prompting.evaluate(
            self.task, model, tokenizer, raw, features, self._bound(), batch_size, progress
        )

    def logits(self, output, batch: dict) -> torch.Tensor:
        """The next-token logits after each prompt: [b, vocab] at each row's last real position."""
        last = batch["attention_mask"].sum(1).to(output.logits.device) - 1
        return output.logits[torch.arange(len(last), device=last.device), last]

    def score_logits(self, model, tokenizer, raw, features, outs, batch_size: int) -> dict:
        # Verbalizer scores and generations need the model itself, as training's evaluation did.
        return self.evaluate(model, tokenizer, raw, features, batch_size, progress=False)
