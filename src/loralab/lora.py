"""LoRA spec -> `peft.LoraConfig`, with target-module presets resolved from the model's own layers.

Presets are read off the linear layers of the transformer blocks (their names, their place in
an attention or MLP module, their shapes), so a family loralab has never seen works as long as
its layers are named like any of the common ones. `FAMILIES` holds per-`model_type` overrides,
and PEFT's own default target table is the fallback for `standard` when no layer is recognised.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch.nn as nn

from . import residual
from .config import LORA_PRESETS as PRESETS
from .config import LoraSettings as LoraSpec
from .errors import LoralabError
from .lora_extra import check_extra

# Per-`model_type` overrides: {model_type: {preset: [module-name suffixes]}}. Empty on purpose:
# every family tested (Llama, Gemma 2 and 3, Qwen2, Mistral, Phi-3, GPT-NeoX, BERT, GPT-2) is
# read correctly from its layers; add an entry only for a model whose layer names mislead.
FAMILIES: dict[str, dict[str, list[str]]] = {}

# Last name component -> role, inside an attention module. PEFT matches a target entry when a
# module's full name equals it or ends with "." + it.
_ATTENTION_NAMES = {
    "q": {"q_proj", "query", "q", "q_lin", "wq", "query_proj"},
    "k": {"k_proj", "key", "k", "k_lin", "wk", "key_proj"},
    "v": {"v_proj", "value", "v", "v_lin", "wv", "value_proj"},
    "qkv": {"qkv_proj", "c_attn", "query_key_value", "wqkv", "qkv", "in_proj", "qkv_lin"},
    "o": {"o_proj", "out_proj", "dense", "c_proj", "o", "wo", "out_lin", "o_lin"},
}
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_INDEX = re.compile(r"^\d+$")


@dataclass(frozen=True)
class Layer:
    """One Linear / Conv1D layer: full name, its name inside the block, role, shape."""

    name: str
    local: str  # the name after the block index ("self_attn.q_proj"); "" outside the blocks
    role: str  # q | k | v | qkv | o | other (in attention) | mlp (other in-block) | outside
    in_features: int
    out_features: int
    conv1d: bool


def _shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, is_conv1d); GPT-2's Conv1D stores its weight as [in, out]."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1], True
    return module.in_features, module.out_features, False


def _name_role(local: str) -> str:
    """A layer's role from its name inside the block alone (a fused q/k/v name gives `qkv`)."""
    if not local:
        return "outside"  # embeddings, pooler, heads: not part of any transformer block
    *path, last = local.split(".")
    if not any(_ATTENTION.search(p) for p in path):
        return "mlp"
    for role, names in _ATTENTION_NAMES.items():
        if last.lower() in names:
            return role
    return "other"


def _role(local: str, fan_in: int, fan_out: int) -> str:
    """What a layer does, from its name inside the block and (fused q/k/v) its shape."""
    role = _name_role(local)
    # A fused q/k/v projection is wider than its input (3× for multi-head attention).
    return "other" if role == "qkv" and fan_out <= fan_in else role


def block_local(name: str) -> str:
    """The part of a module name after its block index ("model.layers.3.self_attn.q_proj" ->
    "self_attn.q_proj"); "" outside the blocks. The block index is the first numeric part."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if _INDEX.match(p)), None)
    return ".".join(parts[index + 1 :]) if index is not None else ""


def role_of(name: str) -> str:
    """A layer's role from its full module name alone: q | k | v | qkv | o | other | mlp |
    outside (as `linear_layers` gives it, without the shape check on fused q/k/v)."""
    return _name_role(block_local(name))


def linear_layer(name: str, module: nn.Module) -> Layer | None:
    """`module` (named `name` in its model) as a `Layer` with its role, None when it is not a
    Linear / Conv1D layer. The one place a layer's role is decided."""
    from transformers.pytorch_utils import Conv1D

    if not isinstance(module, (nn.Linear, Conv1D)):
        return None
    local = block_local(name)  # model.layers.3.…, transformer.h.3.…
    fan_in, fan_out, conv1d = _shape(module)
    return Layer(name, local, _role(local, fan_in, fan_out), fan_in, fan_out, conv1d)


def linear_layers(model: nn.Module) -> list[Layer]:
    """Every Linear / Conv1D layer of `model`, in module order, with its role."""
    layers = (linear_layer(name, module) for name, module in model.named_modules())
    return [layer for layer in layers if layer is not None]


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # a convolution's kernel is 3-d or more: not a stack


def stacked_weights(model: nn.Module) -> list[str]:
    """Block-local names of weights inside the blocks that hold a stack of matrices (ndim >= 3,
    e.g. a mixture of experts' `mlp.experts.gate_up_proj`): no preset reaches them."""
    names: dict[str, None] = {}
    for owner, module in model.named_modules():
        if isinstance(module, _CONVS):
            continue
        for name, p in module.named_parameters(prefix=owner, recurse=False):
            if p.ndim >= 3 and block_local(name):
                names[block_local(name)] = None
    return list(names)


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the Linear / Conv1D layers that LoRA can adapt."""
    return [layer.name for layer in linear_layers(model)]


def layer_names(layers: list[Layer]) -> list[str]:
    """Distinct layer names with the block index written as N: every name, once per block kind."""
    seen: dict[str, None] = {}
    for layer in layers:
        seen[re.sub(r"\.\d+\.", ".N.", layer.name, count=1)] = None
    return list(seen)


def preset_layers(layers: list[Layer], preset: str) -> list[Layer] | None:
    """The layers a preset selects, or None when the model lacks the roles it needs.

    standard = query + value (or the fused q/k/v projection); extended = + key + attention
    output; all-linear = every linear layer inside the transformer blocks.
    """
    by_role = {r: [x for x in layers if x.role == r] for r in ("q", "k", "v", "qkv", "o")}
    if preset == "all-linear":
        chosen = [x for x in layers if x.role != "outside"]
        return chosen or None
    if by_role["q"] and by_role["v"]:
        qv = by_role["q"] + by_role["v"]
        qkv = by_role["q"] + by_role["k"] + by_role["v"] if by_role["k"] else None
    elif by_role["qkv"]:
        qv = qkv = by_role["qkv"]
    else:
        return None
    if preset == "standard":
        return qv
    return qkv + by_role["o"] if qkv and by_role["o"] else None


def _suffix_keys(chosen: list[Layer], universe: list[Layer]) -> list[str]:
    """Shortest name suffixes that select exactly `chosen` among `universe` (PEFT's matching)."""
    wanted = {x.name for x in chosen}
    keys: list[str] = []
    for layer in chosen:
        parts = layer.name.split(".")
        for n in range(1, len(parts) + 1):
            key = ".".join(parts[-n:])
            if all(u.name in wanted for u in universe if _matches(u.name, key)):
                break
        if key not in keys:
            keys.append(key)
    return keys


def _peft_default(model_type: str) -> list[str] | None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    return table.get(model_type)


def _preset_keys(target: str, model_type: str, layers: list[Layer]) -> list[str]:
    override = FAMILIES.get(model_type, {}).get(target)
    if override:
        return list(override)
    chosen = preset_layers(layers, target)
    if chosen:
        return _suffix_keys(chosen, layers)
    fallback = _peft_default(model_type) if target == "standard" else None
    if fallback and all(any(_matches(x.name, k) for x in layers) for k in fallback):
        return list(fallback)
    raise LoralabError(
        f"Preset '{target}' needs query and value projections (or a fused q/k/v projection"
        f"{', plus key and attention output' if target == 'extended' else ''}), and none of this "
        f"{model_type} model's linear layers is recognised as one. Pass an explicit module list "
        f"instead, e.g. lora.target=[q_proj,v_proj] with names from its linear layers: "
        f"{', '.join(layer_names(layers))}."
    )


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def resolve_targets(
    spec: LoraSpec, model: nn.Module, exclude: list[str] | None = None
) -> list[str]:
    """Preset or explicit list -> module-name suffixes; each must match at least one module."""
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    layers = [x for x in linear_layers(model) if not _in_excluded(x.name, exclude or [])]
    target = spec.target
    if isinstance(target, str) and target in PRESETS:
        keys = _preset_keys(target, model_type, layers)
        if target == "all-linear" and (stacked := stacked_weights(model)):
            warnings.warn(
                f"lora.target=all-linear adapts the linear layers of this {model_type} model's "
                f"blocks; its stacked expert weights ({', '.join(stacked)}: one tensor per block "
                "holding every expert) are not linear layers and stay frozen. PEFT adapts such "
                'weights through lora.extra={"target_parameters": [...]}.',
                stacklevel=2,
            )
    elif isinstance(target, str):
        raise LoralabError(
            f"Unknown LoRA target preset '{target}'. Use one of {', '.join(PRESETS)} or a list of "
            "module names, e.g. lora.target=[q_proj,v_proj]."
        )
    else:
        keys = list(target)
    unmatched = [k for k in keys if not any(_matches(x.name, k) for x in layers)]
    if unmatched:
        raise LoralabError(
            f"LoRA target module(s) {unmatched} match no linear layer of this {model_type} model. "
            f"Its linear layers are named: {', '.join(layer_names(layers))} (N: the block "
            "number). A target is a name's ending, e.g. q_proj or self_attn.q_proj."
        )
    return keys


def check_init(spec: LoraSpec) -> None:
    """Refuse an `init_lora_weights` name this PEFT does not know, before the model or data
    load: PEFT's LoraConfig takes any string and fails only when it builds the layers, so one
    layer of 8 is built here. Other refusals (e.g. `loftq` without its config in `lora.extra`)
    are left to the real build, which has the whole LoRA section."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .console import known_warnings_silenced

    check_extra(spec)
    init = spec.init_lora_weights
    if not isinstance(init, str):
        return
    probe = torch.nn.Sequential(torch.nn.Linear(8, 8))
    try:
        with known_warnings_silenced():
            get_peft_model(probe, LoraConfig(r=2, target_modules=["0"], init_lora_weights=init))
    except ValueError as e:
        if "unknown initialization" in str(e).lower():
            known = [re.sub(r"\[.*?\]", "N", n) for n in peft_initialisations()]  # pissa_niter_N
            raise LoralabError(
                f"lora.init_lora_weights={init!r} is not an initialisation this PEFT knows: use "
                f"true (the default: Kaiming-uniform A, zero B), false, or one of {', '.join(known)}."
            ) from None
    except Exception:  # noqa: BLE001 - whatever else the probe trips on, the real build reports
        pass


def check_targets(
    spec: LoraSpec, config, auto_class, trust_remote_code: bool = False
) -> list[str] | None:
    """Resolve the LoRA targets on a weightless skeleton of the model (meta device).

    Runs before any weights or data are loaded, so a preset or module name that fits no layer
    fails in a second. None when the skeleton cannot be built (the later check still runs).
    """
    import torch

    try:
        with torch.device("meta"):
            skeleton = auto_class.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, RuntimeError, NotImplementedError):
        return None  # e.g. a head this architecture lacks: reported where the model loads
    return resolve_targets(spec, skeleton)


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
    layers = linear_layers(model)
    conv1d = any(x.conv1d for x in layers if any(_matches(x.name, k) for k in keys))
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
        fan_in_fan_out=conv1d,  # Conv1D (GPT-2) stores weights transposed; PEFT must be told
        task_type=task_type,
    )
    extra = dict(spec.extra)
    # A user's own modules_to_save come on top of the freshly initialised heads, which must
    # train whatever else does (PEFT re-adds only the heads it knows by name).
    more = extra.pop("modules_to_save", None) or []
    if isinstance(more, str):
        more = [more]
    saved = list(dict.fromkeys([*modules_to_save, *more]))
    kwargs.update(extra, modules_to_save=saved or None)
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise LoralabError(f"PEFT rejected the LoRA options {spec.extra or kwargs}: {e}") from None


def apply_lora(
    spec: LoraSpec, model: nn.Module, modules_to_save: list[str], task_type: str | None = None
):
    """Wrap `model` with LoRA adapters; the base is frozen, adapters and heads train.

    PiSSA/OLoRA: PEFT rewrites the adapted base weights to a residual; A₀, B₀ are recorded on
    the returned model so that `residual.save_adapter` saves the update relative to W.
    """
    from peft import get_peft_model

    from .console import known_warnings_silenced

    cfg = to_peft_config(spec, model, modules_to_save, task_type)
    before = None
    if residual.converts(cfg.init_lora_weights):  # PEFT is about to rewrite these weights
        before = residual.pretrained_weights(model, adapted_modules(model, cfg.target_modules,
                                                                   exclude=modules_to_save))  # fmt: skip
    with known_warnings_silenced():
        try:
            peft_model = get_peft_model(model, cfg)
        except ValueError as e:  # options PEFT checks only when it builds the layers
            known = ", ".join(["true", "false", *peft_initialisations()])
            raise LoralabError(
                f"PEFT refused the LoRA settings (lora.init_lora_weights="
                f"{spec.init_lora_weights!r}, lora.extra={spec.extra}): {e}"
                + (
                    f". lora.init_lora_weights takes one of: {known}."
                    if "init" in str(e).lower()
                    else ""
                )
            ) from None
    if before is not None:
        residual.record(peft_model, cfg.init_lora_weights, before)
    return peft_model


def peft_initialisations() -> list[str]:
    """The named initialisations this PEFT's `LoraConfig.init_lora_weights` accepts (its type
    annotation lists them), for the error that refuses another."""
    import typing

    from peft import LoraConfig

    names = []
    for arg in typing.get_args(typing.get_type_hints(LoraConfig).get("init_lora_weights")):
        names += [a for a in typing.get_args(arg) if isinstance(a, str)]
    return names
