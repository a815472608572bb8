"""Task registry: name -> Task object (text keys, labels, head kind, metric, loader)."""

from __future__ import annotations

from ..errors import LoralabError
from .base import MODEL_COLUMNS, Task
from .glue import glue_tasks


def registry() -> dict[str, Task]:
    from .squad_v2 import SquadV2Task

    squad = SquadV2Task(
        name="squad_v2",
        prompt='Context: {context}\nQuestion: {question}\nAnswer with words from the context, or "unanswerable":',
        prompt_fields=("context", "question"),
    )
    return {**glue_tasks(), "squad_v2": squad}


def get_task(name: str) -> Task:
    tasks = registry()
    if name not in tasks:
        raise LoralabError(f"Unknown task '{name}'. Known tasks: {', '.join(tasks)}.")
    return tasks[name]


__all__ = ["MODEL_COLUMNS", "Task", "get_task", "registry"]
