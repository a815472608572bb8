"""PiSSA / OLoRA: initialisations that rewrite the frozen base, and saving them as plain LoRA.

With `init_lora_weights: pissa` (or `olora`) PEFT sets A₀, B₀ from W's principal directions and
replaces the adapted base weights by the residual W_res = W − s·B₀·A₀ when it wraps the model.
The trained model is W_res + s·B·A, so an adapter saved as is fits only that residual, never the
pretrained weights that merge, analyze and evaluation load. As PEFT documents
(`save_pretrained(path_initial_model_for_weight_conversion=...)`), the update relative to W,
s·(B·A − B₀·A₀) = s·[B | −B₀]·[A; A₀], is saved instead: a plain LoRA adapter of rank 2r.

`record` keeps A₀, B₀ (and checks W_res + s·B₀·A₀ against W) right after wrapping;
`save_adapter` writes the converted adapter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import quantization

# Initialisations whose residual base PEFT can convert back (a prefix: pissa_niter_16 too).
CONVERTED_INITS = ("pissa", "olora")
# The attribute of the PeftModel that holds its `InitialAdapter`.
ATTRIBUTE = "loralab_initial_adapter"
WEIGHTS = "adapter_model.safetensors"


@dataclass
class InitialAdapter:
    """A₀/B₀ of a residual initialisation, and how exactly W_res + s·B₀·A₀ gives back W."""

    init: str
    state: dict[str, torch.Tensor]  # PEFT state-dict keys (lora_A/lora_B only) -> CPU copies
    pretrained_checksum: str  # SHA-256 of the adapted layers' pretrained weights, before PEFT
    max_abs_error: float  # max |W − (W_res + s·B₀·A₀)| over the adapted layers, fp32

    def report(self) -> dict:
        """What summary.json's verification says about the rewritten base."""
        return {
            "init": self.init,
            "pretrained_checksum": self.pretrained_checksum,
            "reconstruction_max_abs_error": self.max_abs_error,
            "note": (
                f"init_lora_weights={self.init!r} replaced the adapted layers' base weights by "
                "the residual W - s·B0·A0 when the adapter was created: base_checksum_* are of "
                "that residual, which training left unchanged. adapter/ holds the update "
                "relative to the pretrained weights, s·(B·A - B0·A0), as a rank-2r LoRA "
                "adapter, so it reproduces the trained model on the unmodified base (up to "
                "reconstruction_max_abs_error)."
            ),
        }


def converts(init) -> bool:
    """True for an `init_lora_weights` that rewrites the base and is converted on save."""
    return isinstance(init, str) and init.lower().startswith(CONVERTED_INITS)


def pretrained_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the named layers' weights, [out, in] as stored, before PEFT wraps them."""
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().clone() for n in names}


def record(peft_model: nn.Module, init: str, before: dict[str, torch.Tensor]) -> InitialAdapter:
    """Keep A₀, B₀ on `peft_model` (attribute `ATTRIBUTE`); `before`: `pretrained_weights`."""
    from peft import get_peft_model_state_dict

    # A₀, B₀, and DoRA's initial magnitudes (with them W_res + s·B₀·A₀ gives W back exactly).
    state = {
        k: v.detach().to("cpu", copy=True)
        for k, v in get_peft_model_state_dict(peft_model).items()
        if ".lora_A." in k or ".lora_B." in k or k.endswith(".lora_magnitude_vector")
    }
    with torch.no_grad():
        error = _reconstruction_error(peft_model, before)
    checksum = quantization.checksum(before)
    snapshot = InitialAdapter(init, state, checksum, error)
    setattr(peft_model, ATTRIBUTE, snapshot)
    return snapshot


def _reconstruction_error(peft_model: nn.Module, before: dict[str, torch.Tensor]) -> float:
    """max |W − (W_res + s·B₀·A₀)| over the adapted layers (fp32)."""
    error = 0.0
    for name, module in peft_model.named_modules():
        short = name.removeprefix("base_model.model.")
        if short not in before or not hasattr(module, "lora_A"):
            continue
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        W_res = module.get_base_layer().weight
        delta = B.float() @ A.float()  # [out, in]; GPT-2's Conv1D stores [in, out]
        delta = delta.T if getattr(module, "fan_in_fan_out", False) else delta
        rebuilt = W_res.float() + module.scaling["default"] * delta
        error = max(error, float((rebuilt - before[short].float()).abs().max()))
    return error


def initial_adapter(model: nn.Module) -> InitialAdapter | None:
    """The recorded A₀/B₀ of a residual initialisation, or None (any other adapter)."""
    return getattr(model, ATTRIBUTE, None)


@contextmanager
def initial_factors(model: nn.Module) -> Iterator[None]:
    """Every adapted layer's A, B (and DoRA magnitudes) set back to the recorded initial ones
    meanwhile: the model then computes W_res + s·B₀·A₀ = the pretrained W (the trained heads
    kept)."""
    snapshot = initial_adapter(model)
    kept = []
    with torch.no_grad():
        for name, module in model.named_modules():
            for part, key in (("lora_A", f"{name}.lora_A.weight"), ("lora_B", f"{name}.lora_B.weight"),
                              ("lora_magnitude_vector", f"{name}.lora_magnitude_vector")):  # fmt: skip
                initial = snapshot.state.get(key)
                if initial is not None:
                    weight = getattr(module, part)["default"].weight
                    kept.append((weight, weight.detach().clone()))
                    weight.copy_(initial.to(weight))
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, trained in kept:
                weight.copy_(trained)


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """`model.save_pretrained(path)`; a residual initialisation is saved as plain LoRA of rank
    2r against the pretrained weights.

    The conversion is PEFT's (`LoraModel.subtract_mutated_init` and the config changes of
    `save_pretrained(path_initial_model_for_weight_conversion=...)`), done on the saved files:
    PEFT's own path loads A₀/B₀ as a second adapter, which fails with a trained head
    (modules_to_save) and drops heads and DoRA magnitudes from the file.
    """
    from safetensors.torch import load_file, save_file

    model.save_pretrained(str(path))
    snapshot = initial_adapter(model)
    if snapshot is None:
        return
    weights = Path(path) / WEIGHTS
    state = load_file(str(weights))
    for key, init in snapshot.state.items():
        if ".lora_A." in key:  # [r, in] -> [2r, in]: [A; A0]
            state[key] = torch.cat([state[key], init.to(state[key].dtype)], dim=0).contiguous()
        elif ".lora_B." in key:  # [out, r] -> [out, 2r]: [B | -B0]
            state[key] = torch.cat([state[key], -init.to(state[key].dtype)], dim=1).contiguous()
    save_file(state, str(weights), metadata={"format": "pt"})
    _convert_config(Path(path) / "adapter_config.json")


def _convert_config(path: Path) -> None:
    """Rank 2r, same scaling (alpha·2, or alpha·√2 under rsLoRA), a plain init: loading it no
    longer redoes the decomposition on the pretrained base."""
    config = json.loads(path.read_text())
    config["init_lora_weights"] = True
    config["r"] *= 2
    config["lora_alpha"] *= 2**0.5 if config.get("use_rslora") else 2
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            config[key] = {k: 2 * v for k, v in config[key].items()}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
