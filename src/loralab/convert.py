"""GGUF checkpoints -> ordinary transformers folders (`loralab convert`, `--model FILE.gguf`).

transformers reads GGUF files of many families (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, GPT-2,
…) and dequantises them on load; the result is saved as a plain fp32 folder, with a model card
and a marker file that say where it came from and which quantization it was dequantised from.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from .cache import cache_dir
from .errors import LoralabError

MARKER = "loralab_gguf.json"
_FULL = {"F32", "F16", "BF16", "F64"}  # tensor types that are not quantized


def quantization(gguf: Path) -> dict:
    """The file type a GGUF declares and how many tensors it stores in each type."""
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(gguf)
    except (ValueError, OSError) as exc:
        raise LoralabError(
            f"'{gguf}' is not a readable GGUF file ({exc}); pass a .gguf checkpoint as written by "
            "llama.cpp's converters."
        ) from exc
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    field = reader.fields.get("general.file_type")
    file_type = None
    if field is not None:
        value = int(field.parts[field.data[0]][0])
        names = {m.value: m.name for m in LlamaFileType}
        file_type = names.get(value, str(value)).removeprefix("MOSTLY_")
    quantized = [t for t, _ in counts.most_common() if t not in _FULL]
    main = quantized[0] if quantized else (counts.most_common(1)[0][0] if counts else "none")
    return {"quantization": main, "file_type": file_type, "tensor_types": dict(counts)}


def _supported() -> list[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))


@contextlib.contextmanager
def _tensor_bar(show: bool):
    """transformers' GGUF reader draws a bare tqdm bar per file, with no switch of its own:
    `--quiet` (progress off) swaps in a disabled one for the load."""
    import transformers.modeling_gguf_pytorch_utils as reader

    bar = reader.tqdm
    if not show:
        reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def _load(gguf: Path, progress: bool = True):
    """(model, tokenizer) dequantised to fp32 by transformers."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from . import quantization  # noqa: F401  (its import filters torchao's import-time noise)

    where, name = gguf.parent, gguf.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
    except (ValueError, KeyError) as exc:
        raise LoralabError(
            f"transformers cannot read the architecture of '{gguf}' ({exc}). GGUF files it reads: "
            f"{', '.join(_supported())}."
        ) from exc
    auto = AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModel
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    with _tensor_bar(progress):
        model = auto.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    # The weights are dequantised already; the GGUF entry would make later loads look for the
    # .gguf file again, so the saved config must not carry it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:
        tok.model_max_length = limit  # GGUF leaves it "infinite"
    return model, tok


def _card(gguf: Path, info: dict, model) -> str:
    types = ", ".join(f"{t} ×{n}" for t, n in info["tensor_types"].items())
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [loralab, gguf, dequantized]",
            "---",
            f"# {gguf.stem} (dequantised from GGUF)",
            "",
            f"Converted by `loralab convert` from `{gguf.name}`: a {model.config.model_type} "
            f"model ({type(model).__name__}), dequantised to float32 from **{info['quantization']}** "
            f"(GGUF file type {info['file_type'] or 'not stated'}; tensors: {types}).",
            "",
            "The weights carry the quantization's rounding: this is the quantized model in fp32, "
            "not the original full-precision checkpoint.",
            "",
        ]
    )


def convert_gguf(gguf: str | Path, out: str | Path, progress: bool = True) -> Path:
    """Dequantise `gguf` into the new folder `out` (model, tokenizer, README.md, marker)."""
    gguf, out = Path(gguf).expanduser(), Path(out).expanduser()
    if not gguf.is_file():
        state = "is a folder" if gguf.is_dir() else "does not exist"
        raise LoralabError(f"GGUF file '{gguf}' {state}; pass the path of a .gguf file.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        state = "is not empty" if out.is_dir() else "is a file"
        raise LoralabError(f"Output folder '{out}' {state}; choose a new folder.")
    info = quantization(gguf)
    if progress:
        from rich.console import Console

        Console(stderr=True).print(
            f"[bold]loralab[/bold]: dequantising {gguf.name} ({info['quantization']}) to float32"
        )
    model, tok = _load(gguf, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card(gguf, info, model))
        marker = {"source": str(gguf.resolve()), "dequantized": True, **info}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp is owner-only; a cache may be shared
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cached_conversion(gguf: Path, progress: bool = True) -> Path:
    """`--model FILE.gguf`: converted once into the cache, keyed by name, size and mtime."""

    stat = gguf.stat()
    folder = cache_dir() / "models" / f"gguf-{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (folder / MARKER).is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted earlier conversion
    try:
        return convert_gguf(gguf, folder, progress)
    except (LoralabError, OSError):
        if (folder / MARKER).is_file():  # another process converted it first
            return folder
        raise
