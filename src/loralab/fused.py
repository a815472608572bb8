"""Leaner autograd for two small ops of every training step: same numbers, less saved memory.

A training step keeps, for the backward pass, every tensor an op saved. Two of those are
larger than they need to be, and both are replaced here with functions whose forward and
backward are bit-identical to PyTorch's (the tests compare them):

- the gated MLP of Llama-family models, `down(silu(gate(x)) * up(x))`, saves `gate(x)`,
  `up(x)` *and* `silu(gate(x))`; `SiluMul` saves the first two and recomputes the SiLU in the
  backward pass (one element-wise op). Per token and layer that is one intermediate-sized
  tensor less: ~90 MB on SmolLM2-135M at 16 × 66 tokens, for LoRA and full fine-tuning alike.
- each LoRA module computes `A(dropout(x))`: PyTorch keeps the dropout's output for A's weight
  gradient and its noise tensor (4 bytes per element in fp32) for x's. Fused, A keeps x, which
  the query and value adapters of a layer share, and a 1-byte mask, and recomputes the rest in
  the backward pass (SmolLM2-135M's q/v adapters at 16 × 66 tokens in bf16: 73 MB kept where
  PyTorch keeps 214; LoRA only). On CUDA the dropout is PyTorch's own.
  `MaskDropout`, a dropout that keeps a 1-byte mask, serves LoRA modules whose A is not a
  plain Linear.

`LORALAB_FUSED=0` leaves both off (for benchmarks that measure what they save).
"""

from __future__ import annotations

import os
import types

import torch
from torch import nn

ENV = "LORALAB_FUSED"


def enabled() -> bool:
    """False when `LORALAB_FUSED=0` asks for PyTorch's own ops."""
    return os.environ.get(ENV, "1").strip() != "0"


class SiluMul(torch.autograd.Function):
    """silu(gate) * up that saves gate and up only. Shapes: gate, up [..., intermediate]."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:  # the same kernels autograd would run for silu then mul
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * nn.functional.silu(gate)
        return grad_gate, grad_up


class _MaskDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        # PyTorch's CPU dropout: Bernoulli(1 - p) noise in x's dtype, divided by 1 - p, times x.
        noise = torch.empty_like(x).bernoulli_(1 - p)
        if ctx.needs_input_grad[0]:  # not in a LoRA model's first layer (frozen embeddings)
            ctx.save_for_backward(noise.bool())
            # The kept noise value, 1/(1-p) rounded in x's dtype as the division below rounds it.
            ctx.scale = torch.ones((), dtype=x.dtype).div_(1 - p)
        return x * noise.div_(1 - p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return (grad * mask).mul_(ctx.scale), None  # = grad * noise: x·1·s = x·s, x·0 = ±0


def _cast_dropout_linear(x, weight, bias, noise) -> torch.Tensor:
    """What PEFT's LoRA layer does on the way into A: x to A's dtype, dropout, A."""
    return nn.functional.linear(x.to(weight.dtype) * noise, weight, bias)


class _DropoutLinearFn(torch.autograd.Function):
    """`A(dropout(x.to(A's dtype)))` keeping only x (as it came in) and a 1-byte mask.

    The backward pass rebuilds the noise from the mask (the same values: 0 or 1/(1-p) rounded
    in A's dtype) and runs the same ops under the forward's autocast, so every gradient is the
    one autograd computes for the unfused ops, bit for bit. (Redrawing the noise from a saved
    generator state would keep less, but a CPU Bernoulli draw costs ~6 ns per element: on
    SmolLM2 at 16 × 66 tokens that doubled the dropouts' 0.2 s per step.)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, p: float):
        noise = torch.empty_like(x, dtype=weight.dtype).bernoulli_(1 - p)
        ctx.p, ctx.amp = p, (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        ctx.save_for_backward(x, weight, bias, noise.bool())
        return _cast_dropout_linear(x, weight, bias, noise.div_(1 - p))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        needs = ctx.needs_input_grad[:3]
        *saved, mask = ctx.saved_tensors
        enabled, dtype = ctx.amp
        with torch.enable_grad(), torch.autocast("cpu", dtype=dtype, enabled=enabled):
            x, weight, bias = (
                None if t is None else t.detach().requires_grad_(need)
                for t, need in zip(saved, needs, strict=True)
            )
            noise = mask.to(weight.dtype).div_(1 - ctx.p)
            out = _cast_dropout_linear(x, weight, bias, noise)
        wanted = [t for t, need in zip((x, weight, bias), needs, strict=True) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return (*(next(grads) if need else None for need in needs), None)


def _dropout_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    p = self.loralab_dropout
    if not self.training or x.device.type != "cpu":  # eval: no dropout; CUDA: PyTorch's own
        x = nn.functional.dropout(x.to(self.weight.dtype), p, self.training)
        return nn.functional.linear(x, self.weight, self.bias)
    return _DropoutLinearFn.apply(x, self.weight, self.bias, p)


class MaskDropout(nn.Dropout):
    """`nn.Dropout` that keeps a 1-byte mask for backward on CPU (same draws, same numbers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return _MaskDropoutFn.apply(x, self.p)


def _is_silu(act) -> bool:
    """nn.SiLU or transformers' SiLUActivation (a plain `F.silu`), nothing else."""
    kind = type(act)
    if kind is nn.SiLU:
        return True
    return kind.__name__ == "SiLUActivation" and kind.__module__ == "transformers.activations"


def _gated_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _computes_the_same(module: nn.Module) -> bool:
    """Whether the module's own forward and `_gated_forward` agree bit for bit on a small input.

    A family may keep the attribute names and add something (a scale, a dropout, another
    activation inside); such a module keeps its own forward. Eval mode and a private generator:
    no dropout fires and the global random stream is not touched.
    """
    weight = next((p for p in module.gate_proj.parameters() if p.is_floating_point()), None)
    width = getattr(module.gate_proj, "in_features", None)
    if weight is None or not isinstance(width, int):
        return False
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(1, 3, width, generator=gen, device=weight.device).to(weight.dtype)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return torch.equal(type(module).forward(module, x), _gated_forward(module, x))
    except (RuntimeError, TypeError, ValueError):  # e.g. a forward that wants more arguments
        return False
    finally:
        module.train(was_training)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Give every Llama-style SiLU-gated MLP the `SiluMul` forward; returns how many.

    A module qualifies when it has `gate_proj`, `up_proj`, `down_proj` and a plain SiLU
    `act_fn` (Llama, Mistral, Qwen2, SmolLM2), and its own forward gives the same numbers as
    `down(silu(gate(x)) * up(x))` on a test input; others (GELU-gated Gemma, encoders) keep
    theirs.
    """
    n = 0
    for module in model.modules():
        gated = all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj"))
        if gated and _is_silu(getattr(module, "act_fn", None)) and _computes_the_same(module):
            module.forward = types.MethodType(_gated_forward, module)
            n += 1
    return n


def compact_dropouts(model: nn.Module) -> int:
    """Give each LoRA module's dropout the leaner autograd above; returns how many.

    Plain LoRA with a Linear A computes `A(dropout(x.to(A's dtype)))`: A takes the cast and
    the dropout into its own forward and the dropout slot becomes the identity; where all of a
    module's adapters are fused, PEFT's own cast is turned off, so that the saved x is the one
    the layer received (bf16 under a bf16 base: half the bytes, and shared by the query and
    value adapters). LoRA variants (DoRA and others use the dropped-out x themselves) and other
    kinds of A get `MaskDropout`.
    """
    n = 0
    for module in model.modules():
        drops, factors = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(drops, nn.ModuleDict) or not isinstance(factors, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        every = True  # every adapter of the module casts x itself
        for key, drop in drops.items():
            lora_a = factors[key] if key in factors else None
            if type(drop) is not nn.Dropout or drop.inplace or drop.p == 0:
                every = every and hasattr(lora_a, "loralab_dropout")  # fused before, or not
                continue
            if type(lora_a) is nn.Linear and key not in variants:
                lora_a.loralab_dropout = drop.p
                lora_a.forward = types.MethodType(_dropout_linear_forward, lora_a)
                drops[key] = nn.Identity()
            else:
                drops[key] = MaskDropout(drop.p)
                every = False
            n += 1
        if every and hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False  # each fused A casts x itself
    return n
