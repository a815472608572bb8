"""Head registry: `model.head` name -> Head class. Add your own with `register_head`."""

from __future__ import annotations

from ..config import ExperimentConfig
from ..errors import LoralabError
from ..tasks import Task
from .base import Head
from .classifier import ClassifierHead
from .lm import PromptedLMHead

_HEADS: dict[str, type[Head]] = {}


def register_head(cls: type[Head]) -> type[Head]:
    """Make `cls` available as `model.head=<cls.name>` (usable as a class decorator)."""
    _HEADS[cls.name] = cls
    return cls


def head_names() -> list[str]:
    return list(_HEADS)


def check_head(name: str) -> None:
    """A clear error for a `model.head` nobody registered."""
    if name not in _HEADS:
        raise LoralabError(
            f"model.head={name!r} is not a known head; known heads: {', '.join(_HEADS)} (add "
            "your own with loralab.heads.register_head)."
        )


def check_config(cfg: ExperimentConfig) -> None:
    """`model.head` is registered and takes the run's data settings (before anything runs)."""
    check_head(cfg.model.head)
    _HEADS[cfg.model.head].check_data(cfg.data)


def head_for(cfg: ExperimentConfig, task: Task) -> Head:
    """The head object of a run's config, bound to its task (not yet to a tokenizer)."""
    check_head(cfg.model.head)
    return _HEADS[cfg.model.head](task, cfg.data)


register_head(ClassifierHead)
register_head(PromptedLMHead)

__all__ = [
    "ClassifierHead", "Head", "PromptedLMHead", "check_config", "check_head", "head_for", "head_names",
    "register_head",
]  # fmt: skip
