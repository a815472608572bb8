"""The prompted causal-LM formulation's machinery: prompts, verbalizers, target-only loss,
verbalizer scoring and generation (the head object itself is in `heads/lm.py`).

GLUE labels are verbalizer words; the prediction is the label whose continuation the model finds
most likely (summed log-probability), so every example gets a valid label. SQuAD v2 is answered
by greedy generation, with a fixed word for "no answer".
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import stopping
from ..config import DataConfig
from ..errors import LoralabError

UNANSWERABLE = "unanswerable"
# Tokens kept from the end of a prompt whose template alone is over budget: the instruction and
# the assistant header of a chat template live there.
_TAIL = 24
# How an over-long prompt is shortened (`_fitted`), in the feature-cache key: features cut by
# an earlier rule (the middle of the rendered prompt) are not reused.
_FIT_RULE = "fields-from-their-end"


@dataclass(frozen=True)
class Prompting:
    template: str
    verbalizers: tuple[str, ...]  # one per label (GLUE); empty for generation tasks
    chat: bool
    # The tokenizer's chat template when `chat`: in the cache key, as a base and an instruct
    # model can share a tokenizer.json and differ only in it.
    chat_template: str | None = None

    def key(self) -> list:
        return [self.template, list(self.verbalizers), self.chat, self.chat_template, _FIT_RULE]


def prompting_for(task, cfg: DataConfig, tokenizer) -> Prompting:
    """The task's prompt and verbalizers, with config overrides, checked against the tokenizer."""
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise LoralabError(
            f"data.prompt is empty; drop it to use {task.name}'s own prompt ({task.prompt!r}), "
            "or give a template with its fields."
        )
    template = cfg.prompt or task.prompt
    required = set(task.prompt_fields)
    try:  # as each example will be rendered: stray braces or a format spec fail here, not later
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        template.format(**dict.fromkeys(fields | required, "x"))
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise LoralabError(
            f"Prompt template {template!r} for {task.name} is not a valid template ({e}): it "
            f"takes the fields {', '.join('{' + f + '}' for f in sorted(required))} as they are, "
            "and literal braces are written twice ({{ and }})."
        ) from None
    if not required <= fields or not fields <= required:
        raise LoralabError(
            f"Prompt template {template!r} for {task.name} must use exactly the fields "
            f"{', '.join('{' + f + '}' for f in sorted(required))}; it uses {sorted(fields) or 'none'}."
        )
    chat = bool(cfg.chat_template and getattr(tokenizer, "chat_template", None))
    verbalizers = tuple(cfg.verbalizers or task.verbalizers)
    if cfg.verbalizers and task.kind != "classification":
        raise LoralabError(
            f"data.verbalizers name an answer word per label; {task.name} has no labels (its "
            "answers are generated), so they would be ignored. Drop them."
        )
    if task.kind == "classification":
        if len(verbalizers) != task.num_labels:
            raise LoralabError(
                f"{task.name} has {task.num_labels} labels ({', '.join(task.label_names)}) but "
                f"{len(verbalizers)} verbalizers were given: {list(verbalizers)}."
            )
        ids = [tuple(target_ids(tokenizer, v, chat)) for v in verbalizers]
        for word, tokens in zip(verbalizers, ids, strict=True):
            if not tokens:
                raise LoralabError(f"Verbalizer {word!r} tokenises to nothing; use a real word.")
        if len(set(ids)) != len(ids):
            raise LoralabError(
                f"Two labels of {task.name} share a verbalizer ({list(verbalizers)}): each label "
                "needs its own word, or predictions cannot tell them apart."
            )
    return Prompting(template, verbalizers, chat, tokenizer.chat_template if chat else None)


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of the prompt, ending where the answer starts."""
    if chat:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def target_ids(tokenizer, word: str, chat: bool) -> list[int]:
    """Answer tokens. After a chat header the answer starts a fresh line, so no leading space."""
    return tokenizer(word.lstrip() if chat else word, add_special_tokens=False)["input_ids"]


def _fit(prompt: list[int], budget: int) -> list[int]:
    """Shorten a prompt to `budget` tokens, cutting from the middle (the text), keeping both ends."""
    if len(prompt) <= budget:
        return prompt
    tail = min(_TAIL, budget // 2)
    return prompt[: budget - tail] + prompt[-tail:]


def _fitted(task, p: Prompting, row: dict, tokenizer, budget: int) -> list[int]:
    """The example's prompt ids within `budget` tokens. One over budget is shortened inside its
    fields, the longest first, from its end: the template's words, each field's start and a
    short field (the SQuAD question, a pair's shorter sentence) stay whole. Cutting the
    rendered prompt in its middle joined the start of a pair's second sentence to its end (a
    sentence the data never said) and dropped SQuAD questions."""
    values = {f: row[f].strip() for f in task.prompt_fields}
    ids = prompt_ids(tokenizer, p.template.format(**values), p.chat)
    if len(ids) <= budget:
        return ids
    toks = {f: tokenizer(v, add_special_tokens=False)["input_ids"] for f, v in values.items()}
    for _ in range(4):  # the cut text re-encoded can take a token or two more than its ids
        for _ in range(len(ids) - budget):
            longest = max(toks, key=lambda f: len(toks[f]))
            if not toks[longest]:
                return _fit(ids, budget)  # the template alone is over budget
            toks[longest].pop()
        # A cut inside a multi-byte character (byte-level BPE) decodes to U+FFFD: not data.
        values = {f: tokenizer.decode(t).rstrip("\ufffd").strip() for f, t in toks.items()}
        ids = prompt_ids(tokenizer, p.template.format(**values), p.chat)
        if len(ids) <= budget:
            return ids
    return _fit(ids, budget)


def featurize(task, raw, tokenizer, max_length: int, split: str, p: Prompting):
    """Prompt (+ target for training) token ids; `labels` is -100 except on the target tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": [], "length": []}
        if split == "eval":
            out.pop("labels")
        rows = [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
        for row in rows:
            if split == "eval":
                ids, labels = _fitted(task, p, row, tokenizer, max_length), None
            else:
                target = target_ids(tokenizer, _answer(task, p, row), p.chat) + eos
                target = target[: max_length // 2]
                ids = _fitted(task, p, row, tokenizer, max_length - len(target)) + target
                labels = [-100] * (len(ids) - len(target)) + target
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["length"].append(len(ids))
            if labels is not None:
                out["labels"].append(labels)
        if split == "eval":
            out["label"] = batch["label"] if "label" in batch else [-1] * len(rows)
            if "id" in batch:
                out["example_id"] = batch["id"]
        return out

    return raw.map(
        encode, batched=True, remove_columns=raw.column_names, desc=f"Prompting {task.name}"
    )


def _answer(task, p: Prompting, row: dict) -> str:
    if task.kind == "classification":
        return p.verbalizers[row["label"]]
    texts = row["answers"]["text"]
    return " " + (texts[0].strip() if texts else UNANSWERABLE)


# -- loss and scoring ---------------------------------------------------------------------------
def _base(model):
    """The causal LM inside a (PEFT-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def target_log_probs(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled tokens, computing vocabulary logits only there.

    input_ids/attention_mask/labels: [B, T]. Returns (logp [N], row index [N]) for the N target
    tokens. The decoder's hidden states are cut down to the N positions that predict a target
    before the model's own output path runs on them (its head with tied weights, logit scaling,
    `final_logit_softcapping`), so the vocabulary-wide projection runs on N rows, not B·T.
    """
    base = _base(model)
    targets = labels[:, 1:]
    mask = targets != -100

    def keep_targets(_module, _args, out):
        # position t predicts token t+1: the hidden states at the targets' previous positions
        out.last_hidden_state = out.last_hidden_state[:, :-1][mask].unsqueeze(0)
        return out

    hook = base.get_decoder().register_forward_hook(keep_targets)
    try:
        logits = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        hook.remove()
    logits = logits[0].float()
    logp = F.log_softmax(logits, dim=-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[mask]
    return logp, rows


def target_loss(model, inputs: dict) -> torch.Tensor:
    """Mean cross-entropy over target tokens only."""
    logp, _ = target_log_probs(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    )
    return -logp.mean()


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield range(i, min(i + size, n))


def _pad(seqs: list[list[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


@torch.no_grad()
def score_verbalizers(
    model, tokenizer, features, p: Prompting, batch_size: int, progress: bool = True
):
    """Summed log-probability of each label's verbalizer after each prompt: [N, num_labels]."""
    from tqdm.auto import tqdm

    cands = [target_ids(tokenizer, v, p.chat) for v in p.verbalizers]
    device = next(model.parameters()).device
    model.eval()
    prompts = features["input_ids"]
    scores = np.zeros((len(prompts), len(cands)))
    per_batch = max(1, batch_size // len(cands))
    for idx in tqdm(
        list(_batches(len(prompts), per_batch)), desc="Scoring verbalizers", disable=not progress
    ):
        stopping.poll()  # a stop during a periodic evaluation cuts it here
        seqs, labels = [], []
        for i in idx:
            for c in cands:
                seqs.append(prompts[i] + c)
                labels.append([-100] * len(prompts[i]) + c)
        ids, mask = _pad(seqs, tokenizer.pad_token_id)
        lab, _ = _pad(labels, -100)
        lab[mask == 0] = -100
        logp, rows = target_log_probs(model, ids.to(device), mask.to(device), lab.to(device))
        summed = torch.zeros(len(seqs), device=device).index_add_(0, rows, logp)
        scores[idx.start : idx.stop] = summed.view(len(idx), len(cands)).cpu().numpy()
    return scores


@torch.no_grad()
def generate_answers(
    model, tokenizer, features, batch_size: int, max_new_tokens: int = 24, progress: bool = True
):
    """Greedy answers (KV cache, left-padded batches); `unanswerable` becomes the empty string."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.eval()
    prompts = features["input_ids"]
    out = {}
    for idx in tqdm(
        list(_batches(len(prompts), batch_size)), desc="Generating answers", disable=not progress
    ):
        stopping.poll()
        ids, mask = _pad([prompts[i] for i in idx], tokenizer.pad_token_id, left=True)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(idx):
            text = tokenizer.decode(gen[row, ids.shape[1] :], skip_special_tokens=True)
            out[features["example_id"][i]] = normalise_generation(text)
    return out


def normalise_generation(text: str) -> str:
    """First line of the generated text; the 'unanswerable' word maps to the empty prediction."""
    text = text.strip().split("\n")[0].strip()
    return "" if text.lower().rstrip(".!") == UNANSWERABLE else text


def evaluate(
    task, model, tokenizer, raw, features, p: Prompting, batch_size: int, progress: bool = True
) -> dict:
    """Task metrics of the LM formulation (same metric names as the classifier head)."""
    if task.kind == "classification":
        preds = score_verbalizers(model, tokenizer, features, p, batch_size, progress).argmax(-1)
        return task.label_metrics(preds, np.asarray(features["label"]))
    answers = generate_answers(model, tokenizer, features, batch_size, progress=progress)
    return task.answer_metrics(answers, raw)
