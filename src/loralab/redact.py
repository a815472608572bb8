"""Masking credentials (URL passwords, tokens, API keys) in text that is written to disk or W&B."""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# Environment variables whose values are secrets wherever they turn up.
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")

_PATTERNS = [
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@"), r"\1" + MASK + "@"),
    # Hugging Face access tokens
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), "hf_" + MASK),
    # --name value / --name=value / NAME=value where the name ends in a secret's word. A plain
    # word before a space is text, not a flag ("the key idea", ".../monkey train.lr=3e-4").
    (
        re.compile(
            r"((?<![A-Za-z0-9_.-])(?:--?[A-Za-z0-9_.-]*(?:token|key|secret|password|passwd|pwd)(?:=|\s+)"
            r"|[A-Za-z0-9_.-]*(?:token|key|secret|password|passwd|pwd)=))(?!-)\S+",
            re.IGNORECASE,
        ),
        r"\1" + MASK,
    ),
]


def mask_secrets(text: str) -> str:
    """`text` with URL passwords, tokens and key values replaced by ***."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def mask_tree(value: Any) -> Any:
    """A copy of a JSON-like value with every string masked."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {k: mask_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_tree(v) for v in value]
    return value
