"""Loading a tokenizer and a model (any head class), and the one way to open a model for a task."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from ..console import library_bars_off
from ..errors import LoralabError
from ..quantization import check as check_quantization
from ..quantization import load_kwargs as quantized_load_kwargs
from ..quantization import quantize_base
from .build import resolve
from .registry import builtin_names, check_hub_model, untrained_modules


def _load_error(
    name: str, where: Path | str, exc: Exception, settings: dict | None = None
) -> LoralabError:
    """`settings`: what loralab passed to from_pretrained besides the model; a ValueError may be
    about one of them rather than the folder, so the message names them too."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc):
        hint = "the model ships its own code: add --trust-remote-code if you trust it"
    elif isinstance(where, Path):
        hint = ("check the folder's files (a model folder holds config.json with its "
                "model_type, the weights, and the tokenizer's files)")  # fmt: skip
    else:
        hint = ("hub ids need network access to huggingface.co (or a filled Hugging Face "
                f"cache); offline, use a local folder or a built-in model: {builtin_names()}")  # fmt: skip
    shown = {k: v for k, v in (settings or {}).items() if k not in _PLUMBING}
    if isinstance(exc, ValueError) and shown:
        listed = ", ".join(f"{k}={_short(v)}" for k, v in shown.items())
        hint += f"; or one of the settings it was loaded with does not suit it ({listed})"
    return LoralabError(f"Could not load model '{name}' ({first}); {hint}.")


# from_pretrained arguments loralab always passes: not settings a user could change.
_PLUMBING = ("dtype", "use_safetensors", "output_loading_info", "key_mapping")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# What transformers raises for a model folder or hub id it cannot read: missing or damaged
# files (OSError; safetensors' own error), a config without a known model_type or a tokenizer
# it cannot build (ValueError), custom code without trust (ValueError).
LOAD_ERRORS = (OSError, ValueError)


def _safetensors_error() -> tuple:
    try:
        from safetensors import SafetensorError

        return (SafetensorError,)
    except ImportError:
        return ()


def load_config(name: str, trust_remote_code: bool = False, progress: bool = True):
    """The model's transformers config, a folder or hub id that cannot give one a user error."""
    from transformers import AutoConfig

    where = resolve(name, progress)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as exc:
        raise _load_error(name, where, exc) from exc


def load_tokenizer(name: str, trust_remote_code: bool = False, progress: bool = True):
    """AutoTokenizer for `name`, with a pad token guaranteed (falls back to eos, then unk)."""
    from transformers import AutoTokenizer

    where = resolve(name, progress)
    if isinstance(where, str):  # a hub id: downloadable now or cached, else fail at once
        check_hub_model(where)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as exc:
        raise _load_error(name, where, exc) from exc
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise LoralabError(
                f"The tokenizer of model '{name}' has no pad, eos or unk token to pad batches "
                "with; use a model whose tokenizer defines one of them."
            )
        tok.pad_token = fallback
    return tok


def new_module_names(missing_keys: Iterable[str], base_model_prefix: str = "") -> list[str]:
    """Module names (for PEFT modules_to_save) of weights that were missing from a checkpoint.

    "bert.pooler.dense.weight" -> "pooler", "classifier.bias" -> "classifier", "score.weight"
    -> "score": drop the parameter name, then the base-model prefix, keep the first component.
    """
    names: list[str] = []
    for key in missing_keys:
        parts = key.split(".")[:-1]
        if base_model_prefix and len(parts) > 1 and parts[0] == base_model_prefix:
            parts = parts[1:]
        if parts and parts[0] not in names:
            names.append(parts[0])
    return names


def _prefix_mapping(missing: Iterable[str], unexpected: Iterable[str], prefix: str) -> dict:
    """{r"^other\\.": "prefix."} when the checkpoint holds the base model under another name."""
    missing = set(missing)
    for key in unexpected:
        head, _, rest = key.partition(".")
        if prefix and rest and head != prefix and f"{prefix}.{rest}" in missing:
            return {rf"^{re.escape(head)}\.": f"{prefix}."}
    return {}


class _Hold(logging.Filter):
    """Logging filter that keeps records aside instead of emitting them."""

    def __init__(self, into: list):
        super().__init__()
        self.into = into

    def filter(self, record: logging.LogRecord) -> bool:
        self.into.append(record)
        return False


def load_model(
    name: str, auto_class, trust_remote_code: bool = False, progress: bool = True, **kwargs
):
    """Load `name` with `auto_class` (e.g. AutoModelForSequenceClassification).

    Returns (model, new_modules): new_modules are the modules whose weights were not in the
    checkpoint (freshly initialised heads), or whose weights there never trained (a built-in's
    `untrained`), to be trained via PEFT modules_to_save.
    """
    where = resolve(name, progress)
    if isinstance(where, str):
        check_hub_model(where)
    if isinstance(where, Path) and any(where.glob("*.safetensors")):
        kwargs.setdefault("use_safetensors", True)  # never unpickle when safetensors exist
    # fp32 master weights whatever the checkpoint stores: transformers 5 loads a bf16 checkpoint
    # (most hub models) in bf16, where full fine-tuning's small updates round away and the new
    # head trains in bf16. A LoRA base's bf16 copy is made afterwards (`precision.cast_frozen`).
    import torch

    kwargs.setdefault("dtype", torch.float32)

    def load(**extra):
        try:
            with library_bars_off():  # "Loading weights" takes a blink; not a phase to show
                return auto_class.from_pretrained(
                    where, trust_remote_code=trust_remote_code, output_loading_info=True, **extra
                )
        except (*LOAD_ERRORS, *_safetensors_error()) as exc:
            raise _load_error(name, where, exc, kwargs | extra) from exc

    # transformers logs a load report (missing/unexpected keys); hold it back until we know
    # whether this load is kept, so a discarded attempt does not print a misleading report.
    held: list[logging.LogRecord] = []
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hold = _Hold(held)
    hf_logger.addFilter(hold)
    try:
        model, info = load(**kwargs)
    finally:
        hf_logger.removeFilter(hold)
    prefix = getattr(model, "base_model_prefix", "")
    mapping = _prefix_mapping(info["missing_keys"], info["unexpected_keys"], prefix)
    if mapping and "key_mapping" not in kwargs:
        # Some heads name their base model differently from the checkpoint (transformers'
        # LlamaForQuestionAnswering uses `transformer.` while causal LM checkpoints hold
        # `model.`), which would silently leave the whole base model random: map and reload.
        model, info = load(key_mapping=mapping, **kwargs)
    else:
        for record in held:
            hf_logger.handle(record)
    # Heads re-initialised for a shape mismatch (ignore_mismatched_sizes) are new as well.
    missing = set(info.get("missing_keys", ())) | {k[0] for k in info.get("mismatched_keys", ())}
    order = list(model.state_dict())  # sets are unordered: report in the model's order
    missing_ordered = sorted(missing, key=lambda k: order.index(k) if k in order else len(order))
    new_modules = new_module_names(missing_ordered, prefix)
    shipped = _untrained_in(untrained_modules(name), order, prefix)
    new_modules += [m for m in shipped if m not in new_modules]
    if getattr(model.config, "pad_token_id", None) is None:
        tok = load_tokenizer(name, trust_remote_code=trust_remote_code, progress=progress)
        model.config.pad_token_id = tok.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            if model.generation_config.pad_token_id is None:
                model.generation_config.pad_token_id = tok.pad_token_id
    return model, new_modules


def _untrained_in(untrained: tuple[str, ...], keys: list[str], prefix: str) -> list[str]:
    """The never-trained modules `untrained` (a built-in's `untrained_modules`) that hold weights
    among state-dict `keys` (a head class may not have them: BERT's QA class has no pooler)."""
    present = new_module_names(keys, prefix) if untrained else []  # top-level weight holders
    return [m for m in untrained if m in present]


def retrained_modules(name: str, auto_class, **kwargs) -> tuple[str, ...]:
    """The modules a run of `name` loaded with `auto_class` (`kwargs`: a head's model_kwargs)
    trains in full because their shipped weights never trained, as `load_model` adds them:
    decided from the model's config on the meta device (no weights read)."""
    untrained = untrained_modules(name)
    return (
        _retrained(name, untrained, auto_class, tuple(sorted(kwargs.items()))) if untrained else ()
    )


@functools.lru_cache(maxsize=16)
def _retrained(name: str, untrained: tuple, auto_class, kwargs: tuple) -> tuple[str, ...]:
    """`retrained_modules`, once per model, declaration, class and arguments (a study's worker
    asks for every finished point it reuses)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve(name, progress=False), **dict(kwargs))
    with torch.device("meta"):
        model = auto_class.from_config(config)
    keys = list(model.state_dict())
    return tuple(_untrained_in(untrained, keys, getattr(model, "base_model_prefix", "")))


def is_causal(config) -> bool:
    """Decoder-only models read a sequence left to right (no [CLS] summary at position 0)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_for_task(
    model_cfg, head, tokenizer=None, progress: bool = True, attention: str | None = None,
    quiet_load_report: bool = False,
):  # fmt: skip
    """The base model of `model_cfg` (a config's `model` section) with `head`'s model class.

    Returns (model, new_modules) as `load_model` does, with the pad token set from `tokenizer`.
    `attention`: the attention kernel (`eager`/`sdpa`), None = transformers' default.
    `quiet_load_report`: hide transformers' missing-keys report (a saved adapter brings the
    head, so the report would be wrong).
    With `model_cfg.quantization` int8/nf4 the base's Linear layers come back quantized (the
    heads and output embeddings do not; see `loralab.quantization`).
    """
    from transformers.utils import logging as hf_logging

    check_quantization(model_cfg.quantization)
    kwargs = dict(head.model_kwargs()) | quantized_load_kwargs(model_cfg.quantization)
    if attention:
        kwargs["attn_implementation"] = attention
    level = hf_logging.get_verbosity()
    if quiet_load_report:
        hf_logging.set_verbosity_error()
    try:
        model, new_modules = load_model(
            model_cfg.name, head.auto_class(), trust_remote_code=model_cfg.trust_remote_code,
            progress=progress, **kwargs,
        )  # fmt: skip
    finally:
        hf_logging.set_verbosity(level)
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.quantization != "none":
        quantize_base(model, model_cfg.quantization, new_modules)
    return model, new_modules
