"""The identity of a run: everything that defines its result except its seed; runs pool only
when their identities are equal. Torch-free, so that `loralab report` starts fast."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ExperimentConfig, to_dict

if TYPE_CHECKING:
    from .data import Splits

# Settings that do not change what a run computes (where it writes, how often it logs/saves).
NOT_IDENTITY = {
    # (gradient checkpointing recomputes the same activations: it changes memory, not results;
    # compiled layers compute the same ops, rounded in another order, dropout drawn elsewhere)
    "train": (
        "seed",
        "save_steps",
        "logging_steps",
        "eval_steps",
        "eval_batch_size",
        "gradient_checkpointing",
        "compile",
    ),
    "data": ("data_dir", "train_file", "eval_file"),  # replaced by the data's fingerprint
    "model": ("trust_remote_code", "attention"),  # attention kernels compute the same thing
}


def identity(
    cfg: ExperimentConfig, splits: Splits, precision: str, processes: int = 1,
    retrained: list[str] | tuple = (),
) -> dict:  # fmt: skip
    """The config with data paths replaced by content fingerprints, `auto` values resolved
    (`precision`: 'bf16' or 'fp32', as the run computes), and the run/tracking sections and
    bookkeeping intervals dropped. LoRA settings are absent for full fine-tuning (they do not
    apply); `processes` > 1 (data parallel: each step sees processes × batch_size) is recorded.
    `retrained`: checkpoint modules a LoRA run trains in full because their shipped weights never
    trained (`models.untrained_modules`: the built-in MiniLM's pooler), recorded as
    model.retrained; LoRA runs from before loralab trained them keep them frozen and never pool
    with these.
    """
    d = to_dict(cfg)
    d.pop("run", None)
    d.pop("tracking", None)
    for section, keys in NOT_IDENTITY.items():
        for k in keys:
            d[section].pop(k, None)
    if cfg.train.method != "lora":
        d.pop("lora")
    elif cfg.lora.loraplus_lr_ratio is None:  # off: identities from before LoRA+ stay the same
        d["lora"].pop("loraplus_lr_ratio")
    if cfg.model.quantization == "none":  # identities from before the option stay the same
        d["model"].pop("quantization", None)
    d["train"]["lr"] = cfg.lr
    d["train"]["precision"] = precision
    d["data"]["max_length"] = splits.max_length
    d["data"]["fingerprint"] = splits.fingerprint
    evaluated = getattr(splits, "eval_raw", None)  # None: rebuilt from an old summary (first N)
    if evaluated is not None and len(evaluated) < (splits.fingerprint or {}).get("eval_rows", 0):
        # a capped dev set is spread over the split (`data.spread`); capped runs from before
        # took its first N, so the two never pool
        d["data"]["eval_subset"] = "spread"
    if splits.fingerprint:  # the rows stand for the files: where they lie does not count
        d["data"]["task"] = without_path(cfg.data.task)
    if retrained and cfg.train.method == "lora":  # full fine-tuning trains them anyway
        d["model"]["retrained"] = sorted(retrained)
    if processes > 1:
        d["train"]["processes"] = processes
    return d


def without_path(task: str) -> str:
    """A task reference without where its files lie (`tasks.custom_spec.without_folder`): the
    fingerprint stands for the rows, so the same files in two folders pool."""
    from .tasks.custom_spec import without_folder

    return without_folder(task)


def short_fingerprint(fp: dict | str) -> str:
    """'1a2b3c4d/5e6f7a8b': the first hex digits of the train and eval rows' SHA-256."""
    if isinstance(fp, dict):
        return "/".join(str(fp.get(f"{s}_sha256", "?"))[:8] for s in ("train", "eval"))
    return str(fp)[:8]
