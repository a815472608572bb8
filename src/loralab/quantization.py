"""A quantized frozen base (`model.quantization`): what is stored, how to read it back.

`int8`: weight-only int8 (one scale per output row) of the base's Linear layers through
torchao, on any device; activations and the LoRA branch stay in full precision. `nf4`: 4-bit
NormalFloat through bitsandbytes (QLoRA), on CUDA GPUs only. The task head and the output
embeddings are never quantized; the adapters are ordinary fp32 PEFT factors on top.

Weights are quantized when the base is loaded (`loralab.models.load_for_task`), deterministically,
so every later load (merge, analysis) stores the same bytes that training saw.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .errors import LoralabError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI fails fast without it
    import torch
    import torch.nn as nn

METHODS = ("none", "int8", "nf4")


class _DropImportNoise(logging.Filter):
    """Drops the warnings torchao's import logs on machines without its CUDA kernels."""

    NOISE = ("Failed to load", "is an Enum subclass and is now natively supported")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in str(record.msg) for n in self.NOISE)


# Once torchao is installed, transformers and PEFT import it in every run, quantized or not;
# its import then logs that CUDA kernel files do not load (on a CPU) and torch warns about its
# enum registrations. Neither concerns the user: drop exactly those records.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_DropImportNoise())
# PEFT warns, for each torchao LoRA layer it builds, that the layer cannot merge in place.
# loralab never merges into the int8 weights (`loralab merge` dequantizes first): not news.
warnings.filterwarnings("ignore", message=r"TorchaoLoraLinear was instantiated without")
PACKAGES = {"int8": "torchao", "nf4": "bitsandbytes"}
STREAMS = 4  # runs of tensors hashed apart, then together: a fixed number, whatever the threads
INSTALL = "pip install 'loralab[quant]'"


def check(method: str, train_method: str = "lora", cuda: bool | None = None) -> None:
    """User errors of `model.quantization` before any model is loaded.

    A quantized base only makes sense frozen (LoRA); NF4 needs a CUDA GPU and bitsandbytes,
    int8 needs torchao.
    """
    import torch

    if method == "none":
        return
    if method not in METHODS:
        raise LoralabError(
            f"model.quantization must be one of {', '.join(METHODS)}, not {method!r}."
        )
    if train_method != "lora":
        raise LoralabError(
            f"model.quantization={method} quantizes the frozen base of a LoRA run; full fine-tuning "
            f"(train.method={train_method}) trains every weight, which cannot be stored quantized. "
            "Use train.method=lora, or model.quantization=none."
        )
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if method == "nf4" and not cuda:
        raise LoralabError(
            "model.quantization=nf4 needs bitsandbytes' 4-bit kernels, which run on CUDA GPUs; "
            "this machine has none. On a CPU use model.quantization=int8 (torchao weight-only "
            "int8, CPU and GPU)."
        )
    package = PACKAGES[method]
    if importlib.util.find_spec(package) is None:
        raise LoralabError(
            f"model.quantization={method} needs the `{package}` package, which is not installed: "
            f"{INSTALL}."
        )


def load_kwargs(method: str) -> dict:
    """Extra `from_pretrained` arguments: NF4 is quantized by transformers while it loads.

    transformers keeps the output embeddings and the last module (the task head) unquantized.
    """
    import torch

    if method != "nf4":
        return {}
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def kept_modules(model: nn.Module, heads: list[str]) -> set[str]:
    """Names of the Linear modules that stay full precision: the task heads (new or not) and
    the output embeddings (often tied to the input embeddings)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kept = set()
    for name, module in model.named_modules():
        if module is out_emb or set(heads).intersection(name.split(".")):
            kept.add(name)
    return kept


def quantize_base(model: nn.Module, method: str, heads: list[str]) -> int:
    """Quantize the base's Linear layers in place (int8; NF4 was done while loading).

    Returns how many Linear layers hold quantized weights afterwards.
    """
    import torch.nn as nn

    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        kept = kept_modules(model, heads)
        quantize_(
            model,
            Int8WeightOnlyConfig(),
            filter_fn=lambda m, name: isinstance(m, nn.Linear) and name not in kept,
        )
    return sum(1 for m in model.modules() if is_quantized(getattr(m, "weight", None)))


def is_quantized(t) -> bool:
    """Whether `t` is a quantized weight (a torchao tensor subclass or a bitsandbytes Params4bit)."""
    if t is None:
        return False
    return hasattr(t, "quant_state") or _is_torchao(t)


def _is_torchao(t) -> bool:
    if "torchao" not in sys.modules:  # nothing quantized it: no need to import it (slow)
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(t, TorchAOBaseTensor)


def dequantized(w: torch.Tensor) -> torch.Tensor:
    """The full-precision weight a quantized one stands for ([out, in]); others as they are."""
    if _is_torchao(w):
        return w.dequantize()
    if hasattr(w, "quant_state"):  # bitsandbytes Params4bit: packed uint8 + absmax per block
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state)
    return w


def dequantize_(model: nn.Module) -> int:
    """Replace every quantized Linear by an fp32 nn.Linear holding its dequantized weight, in
    place (the same values the quantized layer multiplies with). Returns how many."""
    import torch.nn as nn

    quantized = [
        (name, m) for name, m in model.named_modules() if is_quantized(getattr(m, "weight", None))
    ]
    for name, module in quantized:
        w = dequantized(module.weight).float()
        linear = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device=w.device)
        linear.weight = nn.Parameter(w, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    # An NF4 load leaves transformers' marks of a bitsandbytes model (its quantizer, the config's
    # quantization entry): casts of it are refused and an export would carry the entry. The
    # quantizer's own remover drops them, as for a model loaded dequantized.
    for m in list(model.modules()):
        if (quantizer := getattr(m, "hf_quantizer", None)) is not None:
            quantizer.remove_quantization_config(m)
    return len(quantized)


def logical_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per byte."""
    import torch

    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return p.numel()


def stored_tensors(t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The plain tensors a weight is stored as: (suffix, tensor); for a quantized weight its
    int8/uint8 data and scales (torchao: qdata, scale, ...; bitsandbytes: data, absmax)."""
    if _is_torchao(t):
        names, _ = t.__tensor_flatten__()
        return [(f".{n}", getattr(t, n)) for n in names if getattr(t, n) is not None]
    state = getattr(t, "quant_state", None)
    if state is not None:
        return [("", t.data), (".absmax", state.absmax)]
    return [("", t)]


def hash_tensor(h: hashlib._Hash, name: str, t: torch.Tensor) -> None:
    """Feed `t`'s stored bytes (quantized: its data and scales) into `h` under `name`."""
    import torch

    for suffix, part in stored_tensors(t):
        part = part.detach().cpu().contiguous()
        h.update((name + suffix).encode())
        h.update(str(part.dtype).encode())
        h.update(part.reshape(-1).view(torch.uint8).numpy())  # its buffer: no copy of the bytes


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Bit-identical check: a SHA-256 over `STREAMS` SHA-256s, each of the exact bytes of one run
    of the tensors in name order (runs of about equal size); a quantized weight contributes the
    bytes it is stored as (int8 data and scales).

    The runs are hashed at once on torch's threads (hashlib lets go of the GIL while it hashes):
    SmolLM2-135M's 270 MB base take 0.22 s on one thread of a Xeon, and a training run hashes
    its base at the start, at step 0 and at the end. The value does not depend on the threads.
    """
    import torch

    names = sorted(tensors)
    sizes = [sum(p.numel() * p.element_size() for _, p in stored_tensors(tensors[n])) for n in names]  # fmt: skip
    total, runs, done = max(sum(sizes), 1), [[] for _ in range(STREAMS)], 0
    for name, size in zip(names, sizes, strict=True):
        runs[min(done * STREAMS // total, STREAMS - 1)].append(name)
        done += size

    def digest(run: list[str]) -> bytes:
        h = hashlib.sha256()
        for name in run:
            hash_tensor(h, name, tensors[name])
        return h.digest()

    with ThreadPoolExecutor(min(STREAMS, max(1, torch.get_num_threads()))) as pool:
        return hashlib.sha256(b"".join(pool.map(digest, runs))).hexdigest()


def describe(model: nn.Module, method: str) -> dict:
    """What summary.json records: the method, its backend, how many Linear layers are stored
    quantized and the bytes all parameters take as stored (MB)."""
    if method == "none":
        return {"method": "none"}
    stored = sum(
        part.numel() * part.element_size()
        for p in model.parameters()
        for _, part in stored_tensors(p)
    )
    # A PEFT LoRA layer shows its base layer's weight as its own: count the base layer only.
    layers = sum(
        1
        for m in model.modules()
        if not hasattr(m, "base_layer") and is_quantized(getattr(m, "weight", None))
    )
    return {
        "method": method,
        "backend": PACKAGES[method],
        "quantized_layers": layers,
        "stored_weights_mb": stored / 2**20,
    }
