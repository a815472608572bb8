"""LoRA spec -> `peft.LoraConfig`, with target-module presets resolved per architecture."""

from __future__ import annotations

import torch.nn as nn

from .config import LoraConfig as LoraSpec
from .errors import LoralabError

PRESETS = ("standard", "extended", "all-linear")

# Module-name suffixes per architecture family. PEFT matches a list entry when a module's full
# name equals it or ends with "." + it, so BERT's "attention.output.dense" never hits the pooler.
_LLAMA = {
    "standard": ["q_proj", "v_proj"],
    "extended": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
_BERT = {
    "standard": ["query", "value"],
    "extended": ["query", "key", "value", "attention.output.dense"],
    "all-linear": [
        "query",
        "key",
        "value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ],
}
# GPT-2 fuses q, k, v into one Conv1D (c_attn): the closest to "query+value" is c_attn itself.
_GPT2 = {
    "standard": ["c_attn"],
    "extended": ["c_attn", "attn.c_proj"],
    "all-linear": ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
FAMILIES: dict[str, dict[str, list[str]]] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2"), _LLAMA
    ),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "deberta", "electra", "camembert"), _BERT),
    "gpt2": _GPT2,
}
# Conv1D layers store weights transposed; PEFT needs to be told.
_FAN_IN_FAN_OUT = {"gpt2"}


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the Linear / Conv1D layers that LoRA can adapt."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def resolve_targets(
    spec: LoraSpec, model: nn.Module, exclude: list[str] | None = None
) -> list[str]:
    """Preset or explicit list -> module-name suffixes; each must match at least one module."""
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    linear = [n for n in linear_module_names(model) if not _in_excluded(n, exclude or [])]
    target = spec.target
    if isinstance(target, str) and target in PRESETS:
        family = FAMILIES.get(model_type)
        if family is None:
            raise LoralabError(
                f"Preset '{target}' is not defined for model type '{model_type}'. Pass an explicit "
                f"module list instead, e.g. lora.target=[{', '.join(sorted({n.split('.')[-1] for n in linear})[:6])}]."
            )
        keys = list(family[target])
    elif isinstance(target, str):
        raise LoralabError(
            f"Unknown LoRA target preset '{target}'. Use one of {', '.join(PRESETS)} or a list of "
            "module names, e.g. lora.target=[q_proj,v_proj]."
        )
    else:
        keys = list(target)
    unmatched = [k for k in keys if not any(_matches(n, k) for n in linear)]
    if unmatched:
        names = sorted({n.split(".")[-1] for n in linear})
        raise LoralabError(
            f"LoRA target module(s) {unmatched} match no linear layer of this {model_type} model. "
            f"Its linear layers are named: {', '.join(names)}."
        )
    return keys


def _in_excluded(name: str, exclude: list[str]) -> bool:
    return any(name == e or name.startswith(e + ".") or f".{e}." in f".{name}." for e in exclude)


def adapted_modules(
    model: nn.Module, keys: list[str], exclude: list[str] | None = None
) -> list[str]:
    """Full names of the layers `keys` select (before wrapping)."""
    return [
        n
        for n in linear_module_names(model)
        if any(_matches(n, k) for k in keys) and not _in_excluded(n, exclude or [])
    ]


def to_peft_config(
    spec: LoraSpec, model: nn.Module, modules_to_save: list[str], task_type: str | None
):
    """Build the `peft.LoraConfig` for `model` (heads in `modules_to_save` train fully)."""
    from peft import LoraConfig

    keys = resolve_targets(spec, model, exclude=modules_to_save)
    model_type = getattr(model.config, "model_type", "")
    kwargs = dict(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=keys,
        bias=spec.bias,
        use_rslora=spec.use_rslora,
        use_dora=spec.use_dora,
        init_lora_weights=spec.init_lora_weights,
        modules_to_save=list(modules_to_save) or None,
        fan_in_fan_out=model_type in _FAN_IN_FAN_OUT,
        task_type=task_type,
    )
    kwargs.update(spec.extra)
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise LoralabError(f"PEFT rejected the LoRA options {spec.extra or kwargs}: {e}") from None


def apply_lora(
    spec: LoraSpec, model: nn.Module, modules_to_save: list[str], task_type: str | None = None
):
    """Wrap `model` with LoRA adapters; the base is frozen, adapters and heads train."""
    from peft import get_peft_model

    from .console import known_warnings_silenced

    cfg = to_peft_config(spec, model, modules_to_save, task_type)
    with known_warnings_silenced():
        return get_peft_model(model, cfg)
