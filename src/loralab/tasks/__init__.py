"""Task registry: name -> Task object (text keys, labels, head kind, metric, loader).

Besides the built-in names, a task reference can describe a user's own data (`csv:PATH`,
`tsv:PATH`, `jsonl:PATH`, `hub:ORG/NAME`, or a task YAML file): see `tasks/custom.py`.
"""

from __future__ import annotations

from ..errors import LoralabError
from .base import MODEL_COLUMNS, Task
from .custom import load_custom
from .custom_spec import absolute_ref, is_custom_ref, short_name
from .glue import glue_tasks

_REGISTERED: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make `task` available by its name (`data.task=<task.name>`), beside the built-in ones."""
    _REGISTERED[task.name] = task
    return task


def registry() -> dict[str, Task]:
    from .squad_v2 import SquadV2Task

    squad = SquadV2Task(
        name="squad_v2",
        prompt='Context: {context}\nQuestion: {question}\nAnswer with words from the context, or "unanswerable":',
        prompt_fields=("context", "question"),
    )
    return {**glue_tasks(), "squad_v2": squad, **_REGISTERED}


def get_task(name: str) -> Task:
    tasks = registry()
    if name in tasks:
        return tasks[name]
    if is_custom_ref(name):
        return load_custom(name)
    raise LoralabError(
        f"Unknown task '{name}'. Known tasks: {', '.join(tasks)}; or your own data as "
        "csv:PATH, tsv:PATH, jsonl:PATH (a folder with train/dev files, or the training file), "
        "hub:ORG/NAME, or a task YAML file (docs/tasks.md, 'Bring your own data')."
    )


def task_label(name: str, unique: bool = False) -> str:
    """A short, file-system-safe name for a task reference (run folders, caches, tables).

    `unique`: custom references get a hash suffix, so two data sets named alike never share
    a name (sweep points are keyed by it).
    """
    if not is_custom_ref(name):
        return name
    if not unique:
        return short_name(name)
    import hashlib

    return f"{short_name(name)}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


__all__ = [
    "MODEL_COLUMNS",
    "Task",
    "absolute_ref",
    "get_task",
    "is_custom_ref",
    "register_task",
    "registry",
    "task_label",
]
