"""`lora.extra`: PEFT LoraConfig options loralab has no key of its own for, checked before
anything loads."""

from __future__ import annotations

from .config import LoraSettings
from .errors import LoralabError

# PEFT options that loralab sets from its own keys: in `lora.extra` they would change the
# adapter behind the back of the config, summary and report (a run labelled r=8 trained at r=2).
OWN_OPTIONS = {"r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
               "target_modules": "lora.target", "bias": "lora.bias", "use_rslora": "lora.use_rslora",
               "use_dora": "lora.use_dora", "init_lora_weights": "lora.init_lora_weights",
               "fan_in_fan_out": None, "task_type": None}  # fmt: skip


def check_extra(spec: LoraSettings) -> None:
    """Refuse `lora.extra` keys that loralab sets itself, and a modules_to_save that is not a
    list of module names."""
    shadowed = [k for k in spec.extra if k in OWN_OPTIONS]
    if shadowed:
        own = [f"{k} -> {OWN_OPTIONS[k]}" if OWN_OPTIONS[k] else f"{k} (set from the model)" for k in shadowed]  # fmt: skip
        raise LoralabError(
            f"lora.extra sets {', '.join(shadowed)}, which loralab sets from its own keys (the "
            f"config, summary and report would name other values than the adapter has): use "
            f"{'; '.join(own)}."
        )
    more = spec.extra.get("modules_to_save")
    if more is not None and not (
        isinstance(more, str) or isinstance(more, list) and all(isinstance(m, str) for m in more)
    ):
        raise LoralabError(
            f"lora.extra.modules_to_save must be a module name or a list of them, got {more!r}."
        )
