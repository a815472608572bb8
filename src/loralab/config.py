"""Typed experiment configuration: nested dataclasses, YAML round-trip, dotted overrides.

An experiment is model + task + method + hyper-parameters + seed. Each section is a dataclass
whose fields carry their documentation; `validate()` names the bad key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .coerce import coerce
from .errors import LoralabError

Method = Literal["lora", "full"]
LORA_PRESETS = ("standard", "extended", "all-linear")  # `lora.target` names; lora.py resolves them
Precision = Literal["auto", "fp32", "bf16"]
WandbMode = Literal["disabled", "offline", "online", "auto"]


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """Built-in name (see `loralab models`), a hub id, a local folder or a .gguf file."""
    head: str = "classifier"
    """`classifier`: sequence-classification / span-extraction head; `lm`: the causal LM itself
    (prompted); or a head you registered with `loralab.heads.register_head`."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust the model's author."""
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    """Attention kernel for training: `auto` times both at the run's batch shape (CPU; cached)
    and takes the faster; GPUs use `sdpa`. Same results either way, only speed differs."""
    quantization: Literal["none", "int8", "nf4"] = "none"
    """Store the frozen base quantized (LoRA only): `int8` weight-only (torchao; CPU and GPU) or
    `nf4` 4-bit (bitsandbytes; CUDA GPUs). Adapters and the task head stay full precision."""


@dataclass
class LoraSettings:
    """The `lora` section. (Not `peft.LoraConfig`, which `lora.py` builds from it.)"""

    r: int = 8
    """Rank of the update ΔW = (alpha/r)·B·A."""
    alpha: float = 16.0
    """Scaling numerator; the update is scaled by alpha/r."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input, in [0, 1)."""
    target: str | list[str] = "standard"
    """Preset (`standard`, `extended`, `all-linear`) or an explicit list of module names."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train alongside the adapters."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    init_lora_weights: bool | str = True
    """PEFT init: True = Kaiming-uniform A, zero B; or a PEFT variant name (`gaussian`, `pissa`,
    `olora`, ...). PiSSA/OLoRA adapters are saved as plain LoRA of rank 2r on the original base."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al., 2024): B matrices learn at this multiple of the A matrices' learning
    rate (the paper suggests 16); None = off, one learning rate for all."""
    extra: dict = field(default_factory=dict)
    """Other `peft.LoraConfig` options, passed through unchanged."""


@dataclass
class DataConfig:
    task: str = "sst2"
    """Task: sst2, mrpc, rte, squad_v2, or your own data: csv:PATH, tsv:PATH, jsonl:PATH,
    hub:ORG/NAME (options after `?`) or a task YAML file (docs/tasks.md: "Bring your own data")."""
    data_dir: str | None = None
    """Folder with the task's files in their original names/formats; None = the Hugging Face hub."""
    train_file: str | None = None
    """Explicit training file (SQuAD v2 JSON, GLUE TSV); overrides data_dir."""
    eval_file: str | None = None
    """Explicit evaluation file; overrides data_dir."""
    max_length: int | None = None
    """Maximum tokens per example (SQuAD v2: per window); None = task default (128; RTE 256; SQuAD 384)."""
    doc_stride: int = 128
    """SQuAD v2: tokens of overlap between the windows of a long context."""
    max_train_examples: int | None = None
    """Cap on training examples (first N after a seeded shuffle); None = all."""
    max_eval_examples: int | None = None
    """Cap on evaluation examples (N spread evenly over the dev set); None = the full dev set."""
    group_by_length: bool = True
    """Batch examples of similar length together (much less padding than random order)."""
    prompt: str | None = None
    """`model.head: lm`: prompt template overriding the task's (fields like {text_a}, {question})."""
    verbalizers: list[str] | None = None
    """`model.head: lm`: answer word per label overriding the task's (e.g. [" bad", " good"])."""
    chat_template: bool = True
    """`model.head: lm`: wrap the prompt in the tokenizer's chat template when it has one."""


@dataclass
class TrainConfig:
    method: Method = "lora"
    """`lora` (frozen base + adapters) or `full` fine-tuning."""
    lr: float | None = None
    """Peak learning rate; None = 3e-4 for LoRA, 3e-5 for full fine-tuning."""
    epochs: float = 1.0
    """Passes over the training set."""
    max_steps: int = -1
    """Stop after this many optimiser steps (overrides epochs); -1: train for `epochs`."""
    batch_size: int = 16
    """Examples per forward pass and process (the same for both methods); an optimiser step
    sees batch_size × grad_accum of them per process."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    eval_batch_size: int = 64
    """Examples per evaluation batch."""
    warmup_ratio: float = 0.06
    """Linear warm-up as a share of all steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    seed: int = 42
    """Seed for initialisation, shuffling and dropout."""
    precision: Precision = "auto"
    """`fp32`; `bf16` (autocast; LoRA also stores the frozen base in bf16, adapters and head
    fp32); `auto` = bf16 on GPUs that support it, fp32 on CPUs without bf16 instructions, and
    on CPUs with AVX512-BF16/AMX whichever a ~1 s probe of model-shaped products times faster
    (cached per machine; small models get fp32). `LORALAB_PRECISION` forces what `auto` picks."""
    save_steps: int = 100
    """Checkpoint every N optimiser steps (a killed run resumes from the last one)."""
    logging_steps: int = 10
    """Log training loss every N steps."""
    eval_steps: int | None = None
    """Evaluate every N steps as well as at the end; None = only at the end."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them all: the
    activation memory of a step falls to about one layer's, for ~30% more compute. Same results."""
    compile: bool | Literal["auto"] = "auto"
    """Compile the layers with torch.compile (inductor): SmolLM2-135M's benchmark steps ran
    1.39-1.46× faster on 2 CPU cores (the main command's 1.21×) after a ~40 s first compile
    (~4 s from inductor's cache), in bf16. `auto`: bf16 runs of ≥ 600 optimiser steps, or ≥ 100
    once compiled here; not in fp32 on a CPU (measured no faster), not on GPUs, with
    checkpointing or a quantized base (docs/configuration.md)."""


@dataclass
class TrackingConfig:
    wandb: WandbMode = "disabled"
    """Weights & Biases: `online` (needs WANDB_API_KEY or `wandb login`), `offline`, `auto`
    (online with an API key, offline without one), or `disabled`."""
    project: str = "loralab"
    """W&B project name."""
    log_every: int = 50
    """Steps between adapter statistics logs."""


@dataclass
class RunConfig:
    output_dir: str = "runs"
    """Folder under which each run gets its own subfolder."""
    name: str | None = None
    """Run folder name; None = task-method-model-sSEED-YYYYMMDD-HHMMSS."""


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def lr(self) -> float:
        """The effective learning rate (method default when unset)."""
        if self.train.lr is not None:
            return self.train.lr
        return 3e-4 if self.train.method == "lora" else 3e-5


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (YAML-safe) of a config."""
    return dataclasses.asdict(cfg)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(data: dict | None, cls: type = ExperimentConfig, prefix: str = "") -> Any:
    """Build a config dataclass from a nested dict; unknown keys and bad values are errors."""
    data = data or {}
    if not isinstance(data, dict):
        raise LoralabError(f"Config section '{prefix or 'root'}' must be a mapping, got {data!r}.")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise LoralabError(f"Unknown config key '{full}'. Known keys here: {', '.join(names)}.")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(value, tp, prefix=f"{full}.")
        else:
            kwargs[key] = coerce(value, tp, full)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# YAML and overrides


def load_yaml(
    path: str | Path, what: str = "Config file", example: str = "configs/sst2.yaml"
) -> dict:
    """Read a YAML mapping (safe loader: no code execution); errors call it `what`."""
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise LoralabError(f"{what} '{path}' {state}. Pass a YAML file, e.g. {example}.")
    try:
        with open(path, encoding="utf-8") as fh:  # a stream: YAML's error marks name the file
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:  # PyYAML's lines, joined into the one paragraph of an error
        raise LoralabError(f"{what} '{path}' is not valid YAML: {' '.join(str(e).split())}") from None  # fmt: skip
    except UnicodeDecodeError as e:
        raise LoralabError(f"{what} '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML.") from None  # fmt: skip
    except OSError as e:
        raise LoralabError(f"Cannot read {what.lower()} '{path}': {e.strerror or e}.") from None
    if not isinstance(data, dict):
        raise LoralabError(f"{what} '{path}' must hold a mapping of sections, not {type(data).__name__}.")  # fmt: skip
    return data


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _text_field(parts: list[str]) -> str | None:
    """ "text" / "optional" when the dotted key names a `str` / `str | None` field, else None."""
    cls: Any = ExperimentConfig
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None
        tp = _hints(cls).get(part)
        if tp is None:
            return None
        if i == len(parts) - 1:
            if tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):  # fmt: skip
                return "text"  # a choice of words too: `yes` must not become True
            return "optional" if tp == (str | None) else None
        cls = tp
    return None


def _text_value(raw: str, optional: bool) -> str | None:
    """A text field's override, taken as typed: YAML would turn `007` into 7, `no` into False and
    `Mood: {text_a}` into a mapping. Quotes are still removed; null/~/empty clear an optional one."""
    text = raw.strip()
    if not text or (optional and text in ("null", "Null", "NULL", "~")):
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            quoted = yaml.safe_load(text)
        except yaml.YAMLError:
            quoted = None
        if isinstance(quoted, str):
            return quoted
    return text


def parse_overrides(items: list[str]) -> dict:
    """`["lora.r=16", "train.lr=3e-4"]` -> nested dict. Values are parsed as YAML scalars/lists,
    except for text fields (run.name, data.prompt, ...), which keep the text as typed."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise LoralabError(
                f"Override '{item}' is not of the form section.key=value (e.g. lora.r=16)."
            )
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise LoralabError(
                f"Override key '{key}' must name a section and a key, e.g. lora.r or train.lr."
            )
        text_kind = _text_field(parts)
        if text_kind:
            value = _text_value(raw, optional=text_kind == "optional")
        elif re.fullmatch(r"[+-]?0[0-9]+", raw.strip()):  # YAML 1.1 would read 064 as octal (52)
            value = int(raw.strip(), 10)
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def merge_dicts(base: dict, extra: dict) -> dict:
    """Recursive merge; `extra` wins."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def build_config(
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    **sections: dict,
) -> ExperimentConfig:
    """Defaults <- YAML file <- keyword sections (from CLI flags) <- dotted overrides; validated."""
    data = load_yaml(config_file) if config_file else {}
    for name, value in data.items():  # merged with the flags, a scalar section would vanish
        if name in ExperimentConfig.__dataclass_fields__ and not isinstance(value, dict | None):
            raise LoralabError(f"Config file '{config_file}': section '{name}' must be a mapping of {name}.* keys (e.g. `{name}: {{...}}`), got {value!r}.")  # fmt: skip
    for name, values in sections.items():
        data = merge_dicts(data, {name: {k: v for k, v in values.items() if v is not None}})
    data = merge_dicts(data, parse_overrides(overrides or []))
    cfg = from_dict(data)
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Range checks the types alone cannot express."""
    lo, tr, da = cfg.lora, cfg.train, cfg.data
    if lo.r <= 0:
        raise LoralabError(f"lora.r must be a positive integer (e.g. 4, 8, 16), got {lo.r}.")
    if not (math.isfinite(lo.alpha) and lo.alpha > 0):
        raise LoralabError(f"lora.alpha must be positive (default 16 = 2·r), got {lo.alpha}.")
    if not 0 <= lo.dropout < 1:
        raise LoralabError(f"lora.dropout must be in [0, 1) (default 0.05), got {lo.dropout}.")
    if (lp := lo.loraplus_lr_ratio) is not None and not (math.isfinite(lp) and lp > 0):
        raise LoralabError(f"lora.loraplus_lr_ratio must be a positive number (LoRA+ suggests 16) or null, got {lp}.")  # fmt: skip
    if isinstance(lo.target, list) and not lo.target:
        raise LoralabError("lora.target is an empty list: name a preset or at least one module.")
    if isinstance(lo.target, str) and lo.target not in LORA_PRESETS:
        raise LoralabError(
            f"Unknown LoRA target preset '{lo.target}'. Use one of {', '.join(LORA_PRESETS)} or a "
            "list of module names, e.g. lora.target=[q_proj,v_proj]."
        )
    if tr.lr is not None and not (math.isfinite(tr.lr) and tr.lr > 0):
        raise LoralabError(f"train.lr must be a positive number (e.g. 3e-4), got {tr.lr}.")
    for key in ("batch_size", "grad_accum", "eval_batch_size", "save_steps", "logging_steps"):
        if getattr(tr, key) <= 0:
            raise LoralabError(f"train.{key} must be a positive integer, got {getattr(tr, key)}.")
    if tr.eval_steps is not None and tr.eval_steps <= 0:
        raise LoralabError(f"train.eval_steps must be positive or null, got {tr.eval_steps}.")
    for key in ("weight_decay", "max_grad_norm"):
        if not (math.isfinite(getattr(tr, key)) and getattr(tr, key) >= 0):
            raise LoralabError(
                f"train.{key} must be zero or positive (0 turns it off), got {getattr(tr, key)}."
            )
    if cfg.run.name is not None and (
        not cfg.run.name or Path(cfg.run.name).name != cfg.run.name or cfg.run.name in (".", "..")
    ):
        raise LoralabError(
            f"run.name must be a plain folder name (it is created under run.output_dir), got "
            f"{cfg.run.name!r}: to put runs elsewhere, set run.output_dir (--output-dir)."
        )
    if not 0 <= tr.seed < 2**32:  # numpy's seeds, which the Trainer sets from it
        raise LoralabError(f"train.seed must be in [0, 2^32) (default 42), got {tr.seed}.")
    if not math.isfinite(tr.epochs):
        raise LoralabError(f"train.epochs must be a finite number (e.g. 1 or 3), got {tr.epochs}.")
    if tr.max_steps == 0 or tr.max_steps < -1:  # both used to mean "no cap", silently
        raise LoralabError(f"train.max_steps must be a positive number of optimiser steps, or -1 (the default) to train for train.epochs, got {tr.max_steps}.")  # fmt: skip
    if not tr.epochs > 0 and tr.max_steps <= 0:
        raise LoralabError(f"train.epochs must be positive (or set train.max_steps), got {tr.epochs}.")  # fmt: skip
    if not 0 <= tr.warmup_ratio < 1:
        raise LoralabError(
            f"train.warmup_ratio must be in [0, 1) (default 0.06), got {tr.warmup_ratio}."
        )
    if da.max_length is not None and da.max_length < 16:
        raise LoralabError(f"data.max_length must be at least 16 tokens, got {da.max_length}.")
    if da.doc_stride < 0:
        raise LoralabError(f"data.doc_stride must be zero or positive, got {da.doc_stride}.")
    for key in ("max_train_examples", "max_eval_examples"):
        v = getattr(da, key)
        if v is not None and v <= 0:
            raise LoralabError(f"data.{key} must be a positive integer or null, got {v}.")
    if cfg.tracking.log_every <= 0:
        raise LoralabError(f"tracking.log_every must be positive, got {cfg.tracking.log_every}.")
