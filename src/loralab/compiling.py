"""Regional compilation: the model's repeated blocks (its decoder layers) through inductor.

Compiling the whole model through the Trainer (`torch_compile`) took 336-467 s per sequence
length on 2 CPU cores. The layers of a transformer share one code path, so compiling the
layer's forward once serves all of them, and dynamic shapes let one graph serve every batch
length: ~40 s the first time on SmolLM2-135M, 5-10 s once inductor's on-disk cache
(TORCHINDUCTOR_CACHE_DIR, /tmp/torchinductor_$USER by default) holds it. A layer called with a
KV cache (generation) runs eagerly.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import sys
import types

import torch
from torch import nn

from . import probecache
from .errors import LoralabError

CACHE_FILE = "compiled.json"
# Planned optimiser steps from which `auto` compiles. Measured on the README's SST-2 LoRA run
# (SmolLM2-135M, batch 16, 2-core AMX Xeon; benchmarks/compile_cost.py): a step took 0.056-0.08 s
# less compiled; the first 30 steps took 39-43 s longer with an empty inductor cache (break-even
# at 540-690 steps), 4-5 s longer with a warm one (break-even at 65 steps).
MIN_STEPS_COLD = 600
MIN_STEPS_WARM = 100
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # by model and version


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The longest `nn.ModuleList` of two or more same-class modules (the layers), or []."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len(module) > len(best):
            if len({type(m) for m in module}) == 1:
                best = list(module)
    return best


def decide(setting: bool | str, steps: int, key: str, eager: str | None = None) -> dict:
    """{"compile": bool, "reason"} for a run of `steps` optimiser steps.

    `setting`: `train.compile` (True, False or "auto"); `key`: what makes a compile reusable
    (see `signature`); `eager`: why `auto` stays eager for this run whatever its length (a
    setting compiled layers are not tested with, or where they were measured not to pay). Auto
    compiles long runs, and shorter ones once this machine has compiled the
    same model before (inductor's cache then holds the kernels).
    """
    if setting is not None and setting != "auto":
        if setting and compiler() is None:
            raise LoralabError(
                "train.compile=true needs a C++ compiler for inductor's kernels, and none was "
                f"found ({os.environ.get('CXX') or 'g++'} is not on PATH). Install g++ (e.g. "
                "`apt install g++`) or set CXX to one, or leave train.compile at auto or false."
            )
        return {"compile": bool(setting), "reason": "set in the config"}
    if compiler() is None:
        return {"compile": False, "reason": "no C++ compiler for inductor (g++ or $CXX)"}
    if eager:
        return {"compile": False, "reason": eager}
    warm = compiled_before(key)
    need = MIN_STEPS_WARM if warm else MIN_STEPS_COLD
    cached = "compiled before on this machine" if warm else "not compiled before here"
    on = steps >= need
    return {"compile": on, "reason": f"{steps} steps {'≥' if on else '<'} {need} ({cached})"}


def compiler() -> str | None:
    """The C++ compiler inductor would build its CPU kernels with (`$CXX`, else g++), or None."""
    return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"))


def signature(model: str, method: str, precision: str, attention: str, graph: str = "") -> str:
    """The cache key of `decide`: the same model, method, kernels and `graph` (the settings the
    layers' graph depends on, e.g. LoRA's rank and targets) on this machine."""
    return "|".join(
        [probecache.machine(), torch.__version__, model, method, precision, attention, graph]
    )


def _inductor_dir() -> str:
    """Inductor's on-disk cache folder (as it resolves it), without creating it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())


def remember(key: str) -> None:
    """Record that this machine compiled `key` (so `auto` counts on a warm cache next time)."""
    probecache.store(CACHE_FILE, key, {"inductor_cache": _inductor_dir()})


def compiled_before(key: str) -> bool:
    """Whether `remember(key)` ran here with the inductor cache in use now, and it is still there
    (a cleared /tmp or another TORCHINDUCTOR_CACHE_DIR starts cold)."""
    where = (probecache.read(CACHE_FILE).get(key) or {}).get("inductor_cache")
    return bool(where) and where == _inductor_dir() and os.path.isdir(where)


def _no_kv_cache(module, args, kwargs):
    # Training and scoring build no KV cache: one would reach every layer as an argument, and
    # the compiled layer would then be specialised per layer (a recompile each).
    if all(kwargs.get(k) is None for k in _CACHE_KWARGS):
        kwargs["use_cache"] = False
    return args, kwargs


def _dispatch(compiled, self, *args, **kwargs):
    if any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return type(self).forward(self, *args, **kwargs)  # generation: shapes change per token
    return compiled(self, *args, **kwargs)


def compile_blocks(model: nn.Module) -> int:
    """Compile the repeated blocks' forward in place (one graph for all); returns how many."""
    blocks = repeated_blocks(model)
    if not blocks:
        return 0
    # A fresh start for each model: dynamo keeps compiled variants per code object, and runs in
    # one process (a sweep's trials) would otherwise pile up variants to its recompile limit.
    torch.compiler.reset()
    # Kernels that follow the thread count at run time: compiled at one thread they would stay
    # serial when a study run is lent a core. Measured free: a compiled SmolLM2 LoRA step took
    # 0.439 s either way at 1 thread, 0.285 vs 0.280 s at 2 (AMX Xeon). Inductor's cache then
    # also serves processes of either thread count.
    options = {"cpp.dynamic_threads": True}
    compiled = torch.compile(type(blocks[0]).forward, dynamic=True, options=options)
    for block in blocks:
        block.forward = types.MethodType(functools.partial(_dispatch, compiled), block)
    for module in model.modules():  # the stack that owns the blocks, e.g. LlamaModel
        owns = any(child is blocks[0] for child in module.modules() if child is not module)
        if owns and "use_cache" in inspect.signature(module.forward).parameters:
            module.register_forward_pre_hook(_no_kv_cache, with_kwargs=True)
    return len(blocks)
