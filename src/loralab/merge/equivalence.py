"""Merge equivalence: the adapter model (fp32, unmerged: the reference) and each merged variant
on the same length-sorted dev batches, compared output by output.

It only counts as evidence when the adapter visibly changes the outputs: a fresh adapter
(B = 0) is an identity, and a merge that dropped it entirely would "pass" (see `bounds`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from .. import precision, residual, tracking
from ..analysis import base_weight
from ..data import FEATURES_VERSION
from ..heads import Head
from ..models import canonical
from ..runs import load_adapter_model
from .bounds import INFORMATIVE_FACTOR, equivalence_bound, overall_status, verdict
from .inputs import Loaded, device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def merge(model: nn.Module) -> nn.Module:
    """Fold ΔW = s·B·A into each base weight and drop the PEFT wrappers (head included)."""
    return model.merge_and_unload()


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """LoRA layers off, trained head kept: what the model computes without the LoRA update.

    A model training a PiSSA/OLoRA init holds the residual W − s·B₀·A₀ as its base, so there
    the layers keep running with A₀, B₀ put back: the pretrained W, not the residual.
    """
    from peft.tuners.lora import LoraLayer

    if residual.initial_adapter(model) is not None:
        with residual.initial_factors(model):
            yield
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


@torch.inference_mode()
def forward_all(model: nn.Module, batches: list[dict], head: Head) -> list[torch.Tensor]:
    """Per batch: what `head` compares, as fp32 on CPU (`Head.logits`: classifier [batch, labels];
    QA [batch, 2, seq], start/end; prompted LM [batch, vocab] after each prompt)."""
    dev = next(model.parameters()).device
    outs = []
    for batch in batches:
        out = model(**{k: v.to(dev) for k, v in batch.items()})
        outs.append(head.logits(out, batch).float().cpu())
    return outs


def compare(ref: list[torch.Tensor], out: list[torch.Tensor]) -> dict:
    """max |Δ|; max relative |Δ| (per example, over its largest |logit|); changed argmaxes.
    A NaN anywhere makes the maxima NaN (torch's max keeps it; Python's max(0.0, nan) is 0.0)."""
    abs_max, rel_max = [], []
    changed = total = 0
    for r, o in zip(ref, out, strict=True):
        d = (o - r).abs().flatten(1)
        abs_max.append(d.max())
        scale = r.abs().flatten(1).amax(1).clamp_min(1e-12)
        rel_max.append((d.amax(1) / scale).max())
        flips = (o.argmax(-1) != r.argmax(-1)).reshape(len(r), -1).any(1)
        changed += int(flips.sum())
        total += len(r)
    return {
        "max_abs_diff": float(torch.stack(abs_max).max()),
        "max_rel_diff": float(torch.stack(rel_max).max()),
        "changed_predictions": changed / total,
    }


def native_bf16() -> bool:
    """Whether this device has bf16 kernels; CPUs without them run bf16 matmuls ~100× slower."""
    return precision.native_bf16()


def variants(dtype: str, native: bool = True) -> dict[str, tuple[str, Callable]]:
    """name -> (dtype, build from a freshly loaded fp32 adapter model).

    Without native bf16 the bf16 variants keep their bf16-rounded weights but compute in fp32
    (`native=False`): the merge's rounding is still measured, the activation rounding is not.
    """
    bf16 = torch.bfloat16
    done = (lambda m: m) if native else (lambda m: m.float())
    out: dict = {}
    if dtype in ("fp32", "both"):
        out["fp32 merge"] = ("fp32", merge)
    if dtype in ("bf16", "both"):
        out["bf16 adapter (unmerged)"] = ("bf16", lambda m: done(m.to(bf16)))
        out["bf16 merge in bf16"] = ("bf16", lambda m: done(merge(m.to(bf16))))
        out["bf16 merge in fp32, then cast"] = ("bf16", lambda m: done(merge(m).to(bf16)))
    return out


def lora_update_norms(model: nn.Module, adapter: str = "default") -> dict:
    """How many adapted layers compute no update, and the trained heads.

    A LoRA layer with B = 0 adds nothing. A DoRA layer with B = 0 still rescales W's rows by
    magnitude / ‖W‖, so it is an identity only while its magnitudes are the initial ‖W‖ rows.
    """
    from peft.utils import ModulesToSaveWrapper

    layers = [
        m for m in model.modules()
        if isinstance(getattr(m, "lora_B", None), nn.ModuleDict) and adapter in m.lora_B
    ]  # fmt: skip
    zero = [m for m in layers if _adds_nothing(m, adapter)]
    heads = [
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, ModulesToSaveWrapper)
    ]
    return {"layers": len(layers), "zero_B_layers": len(zero), "heads": heads}


def _adds_nothing(module: nn.Module, adapter: str) -> bool:
    """B = 0 and, for DoRA, magnitudes still ‖W‖ per output row (PEFT's initial value)."""
    if torch.any(module.lora_B[adapter].weight):
        return False
    magnitudes = getattr(module, "lora_magnitude_vector", None)
    if not magnitudes or adapter not in magnitudes:
        return True
    m = magnitudes[adapter].weight.detach().float().flatten()
    norms = torch.linalg.norm(base_weight(module), dim=1)
    return m.shape == norms.shape and torch.allclose(m, norms, rtol=1e-4, atol=1e-6)


def quantized_base(run: Loaded, ref_out: list[torch.Tensor]) -> dict | None:
    """For a run on a quantized base: what the reference is, and how far the adapter on the
    quantized base (as trained: int8/NF4 kernels) is from it. None for an fp32/bf16 base."""
    method = run.cfg.model.quantization
    if method == "none":
        return None
    as_trained = load_adapter_model(run.cfg, run.task, run.run_dir, run.tokenizer).to(device())
    diff = compare(ref_out, forward_all(as_trained, run.batches, run.head))
    note = (
        f"The base was stored quantized ({method}): the reference and every merge use the "
        f"dequantized base (the stored {method} weights expanded to fp32), so the equivalence "
        "is stated against the dequantized base. The adapter on the quantized base, as "
        f"trained, differs from the reference by max |Δ| {diff['max_abs_diff']:.3g}."
    )
    return {"method": method, "reference": "fp32 adapter on the dequantized base",
            "quantized_vs_dequantized": diff, "note": note}  # fmt: skip


def check_equivalence(run: Loaded, dtype: str, tol: dict[str, float]) -> dict:
    """Each merged variant vs the fp32 adapter model on the dev batches, with verdicts."""
    task, ref = run.task, run.reference
    ref_out = forward_all(ref, run.batches, run.head)
    with lora_disabled(ref):
        effect = compare(ref_out, forward_all(ref, run.batches, run.head))
    # The PEFT task wrapper should only route inputs to the model it wraps; some drop inputs
    # (PEFT 0.21's question-answering wrapper loses token_type_ids), which a merge then "fixes".
    # Such a wrapper misroutes every batch, so two batches are enough to see it.
    unwrapped = compare(ref_out[:2], forward_all(ref.get_base_model(), run.batches[:2], run.head))
    ref_metrics = run.score(ref, ref_out)
    rows = {}
    native = native_bf16()
    scale = float(torch.stack([o.abs().max() for o in ref_out]).max())
    adapter_error = None  # the unmerged bf16 adapter's error: the row before the bf16 merges
    for name, (dt, build) in variants(dtype, native).items():
        model = build(run.adapter_model())
        outs = forward_all(model, run.batches, run.head)
        row = {"dtype": dt, **compare(ref_out, outs), "tolerance": tol[dt]}
        row["bound"] = equivalence_bound(dt, tol[dt], scale, adapter_error)
        row["metrics"] = run.score(model, outs)
        row["metric_delta"] = row["metrics"][task.primary_metric] - ref_metrics[task.primary_metric]
        row["status"] = verdict(name, row, row["bound"], effect["max_abs_diff"])
        if "unmerged" in name:
            adapter_error = row["max_abs_diff"]
        rows[name] = row
    status = overall_status(rows)
    notes = []
    update = lora_update_norms(ref)
    if update["zero_B_layers"] == update["layers"]:
        notes.append(
            f"All {update['layers']} LoRA layers have B = 0: the adapter is an identity (a fresh, "
            "untrained adapter), so the merge check proves nothing."
        )
    elif status == "uninformative":
        notes.append(
            f"The LoRA update moves the logits by at most {effect['max_abs_diff']:.3g}, less than "
            f"{INFORMATIVE_FACTOR:g}× the tolerance: a merge that lost the adapter would pass too."
        )
    quantized = quantized_base(run, ref_out)
    if quantized:
        notes.append(quantized["note"])
    if unwrapped["max_abs_diff"] > equivalence_bound("fp32", tol["fp32"], scale):
        notes.append(
            f"The PEFT wrapper ({type(ref).__name__}) gives other outputs than the model it "
            f"wraps on the same inputs (max |Δ| {unwrapped['max_abs_diff']:.3g}): it does not pass "
            "every input on (PEFT's question-answering wrapper drops token_type_ids). The adapter "
            "was trained and evaluated that way; the merged model uses all inputs, so they differ."
        )
    return {
        "status": status,
        "run_dir": str(run.run_dir),
        "task": task.name,
        "model": run.cfg.model.name,
        "model_source": canonical(run.cfg.model.name),
        "primary_metric": task.primary_metric,
        "examples": len(run.raw),
        "features": len(run.feats),
        # Featurisation can change after a run was trained (then the dev inputs differ from
        # training's eval; the merge check itself is unaffected: both sides see the same inputs).
        "features_version": FEATURES_VERSION,
        "device": device().type,
        "bf16_compute": "native" if native else "emulated: bf16-rounded weights, fp32 arithmetic",
        "reference": {"name": "fp32 adapter (unmerged)", "metrics": ref_metrics},
        "lora_effect": {**effect, **update, "informative_factor": INFORMATIVE_FACTOR},
        "logit_scale": scale,
        "wrapper_vs_unwrapped": unwrapped,
        "base_quantization": run.cfg.model.quantization,
        **({"quantized_base": quantized} if quantized else {}),
        "variants": rows,
        "notes": notes,
        "versions": tracking.versions(),
    }
