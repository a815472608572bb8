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

The CPU dropouts draw their masks with `keep_mask`: four elements per 64-bit draw (the
distribution of PyTorch's `bernoulli_` up to p's rounding to 2^-16, other draws, 3.7-4× faster on
both CPU makers we build on). A fused dropout's numbers equal PyTorch's given the same mask.

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


_LANES = 2**16  # a mask element is one 16-bit lane of a 64-bit draw


def keep_mask(like: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A dropout's keep mask shaped like `like` (bool) and its keep probability 1 - q.

    PyTorch's CPU `bernoulli_` costs ~9 ns per element on the AMD EPYC build machines (one draw
    each) and ~4.6 on an AMX Xeon (MKL's generator); here each 64-bit draw serves four elements
    as signed 16-bit lanes (~2 and ~1.25 ns), and q is p rounded to a multiple of 2^-16
    (0.05 → 0.0500031). The draws come from the global generator, so `manual_seed` and the
    Trainer's seed govern them.
    """
    dropped = min(round(p * _LANES), _LANES - 1)
    words = torch.empty((like.numel() + 3) // 4, dtype=torch.int64, device=like.device)
    lanes = words.random_(-(2**63), None).view(torch.int16)[: like.numel()]
    # A lane is uniform on [-2^15, 2^15): below -2^15 + dropped with probability dropped/2^16.
    return (lanes >= dropped - _LANES // 2).view(like.shape), 1 - dropped / _LANES


class _MaskDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        # PyTorch's dropout arithmetic: noise (0 or 1 in x's dtype) divided by the keep
        # probability, times x; only the mask is drawn differently (`keep_mask`).
        mask, keep = keep_mask(x, p)
        if ctx.needs_input_grad[0]:  # not in a LoRA model's first layer (frozen embeddings)
            ctx.save_for_backward(mask)
            # The kept noise value, 1/keep rounded in x's dtype as the division below rounds it.
            ctx.scale = torch.ones((), dtype=x.dtype).div_(keep)
        return x * mask.to(x.dtype).div_(keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return (grad * mask).mul_(ctx.scale), None  # = grad * noise: x·1·s = x·s, x·0 = ±0


class _DropoutLinearFn(torch.autograd.Function):
    """`A(dropout(x.to(A's dtype)))` for a bias-free A, keeping only x (as it came in) and a
    1-byte mask.

    The backward pass rebuilds the noise from the mask (the same values: 0 or 1/keep rounded
    in A's dtype) and runs the products and casts autograd runs for the unfused ops, in the
    dtype autocast gave the forward's product, so every gradient is the one autograd computes,
    bit for bit (the tests compare them). Written out rather than recomputed under autograd:
    that cost ~0.3 ms of Python per call, 60 calls per SmolLM2 step. (Redrawing the noise
    from a saved generator state would keep less, but a draw costs more than the mask's byte
    saves.)
    """

    @staticmethod
    def forward(ctx, x, weight, p: float):
        mask, keep = keep_mask(x, p)
        # The dtype of A's product: autocast runs it in its own dtype (fp64 it leaves alone).
        amp = torch.is_autocast_enabled("cpu") and weight.dtype != torch.float64
        ctx.keep, ctx.run = keep, torch.get_autocast_dtype("cpu") if amp else weight.dtype
        ctx.save_for_backward(x, weight, mask)
        return nn.functional.linear(_dropped(x, mask, keep, weight.dtype, ctx.run), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mask = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])  # [tokens, r]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # through A, the autocast cast, the noise, x's cast
            grad_in = grad2d.mm(weight.to(ctx.run)).view(x.shape)
            grad_x = _dropped(grad_in, mask, ctx.keep, weight.dtype, x.dtype)
        if ctx.needs_input_grad[1]:  # [r, in] = grad^T @ the dropped-out x, as A saw it
            seen = _dropped(x, mask, ctx.keep, weight.dtype, ctx.run)
            grad_w = grad2d.t().mm(seen.reshape(-1, seen.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None


def _dropped(t: torch.Tensor, mask: torch.Tensor, keep: float, wide, out) -> torch.Tensor:
    """`(t.to(wide) * noise).to(out)`, noise = mask as 0 or 1/keep in `wide`: what PEFT's
    dropout (in the fp32 of A's weight) and autocast's cast of its output compute.

    Where `t` already has `out`'s dtype (bf16 activations) the same numbers come from two bf16
    ops: a product with a 0-dim `wide` scale runs in fp32 and rounds once to bf16, as the cast
    of the fp32 product does; times the mask (0 or 1) keeps it, or gives the same signed zero.
    That skips three casts and an fp32 tensor per call (the tests compare both bit for bit).
    """
    if t.dtype == out and out != wide and out in (torch.bfloat16, torch.float16):
        return (t * torch.ones((), dtype=wide).div_(keep)).mul_(mask)
    return (t.to(wide) * mask.to(wide).div_(keep)).to(out)


def _dropout_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    p = self.loralab_dropout
    if not self.training or x.device.type != "cpu":  # eval: no dropout; CUDA: PyTorch's own
        x = nn.functional.dropout(x.to(self.weight.dtype), p, self.training)
        return nn.functional.linear(x, self.weight, self.bias)
    return _DropoutLinearFn.apply(x, self.weight, p)


class MaskDropout(nn.Dropout):
    """`nn.Dropout` that keeps a 1-byte mask for backward on CPU (masks from `keep_mask`)."""

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
    activation inside); such a module keeps its own forward. Compared in eval and in training
    mode (a dropout of the MLP's own fires only in training: Seed-OSS's residual dropout), each
    side from the same seed inside a forked random state: the global stream is not touched.
    """
    weight = next((p for p in module.gate_proj.parameters() if p.is_floating_point()), None)
    width = getattr(module.gate_proj, "in_features", None)
    if weight is None or not isinstance(width, int):
        return False
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(1, 3, width, generator=gen, device=weight.device).to(weight.dtype)
    was_training = module.training
    # manual_seed reseeds every CUDA device too, wherever the module is: fork all of them.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        for training in (False, True):
            module.train(training)
            outs = []
            for forward in (type(module).forward, _gated_forward):
                with torch.no_grad(), torch.random.fork_rng(devices=devices):
                    torch.manual_seed(0)  # the same dropout masks for both, if they draw alike
                    outs.append(forward(module, x))
            if not torch.equal(*outs):
                return False
        return True
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
            if type(lora_a) is nn.Linear and lora_a.bias is None and key not in variants:
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
