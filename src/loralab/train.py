"""One run: build model and data, train with the HF Trainer, evaluate, write the run directory.

LoRA and full fine-tuning share every line here except the wrapping step in `build_model`.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler

from . import accounting, precision, tracking
from .callbacks import TrackingCallback
from .checkpoints import LOSS_FILE, newest_good_checkpoint, read_loss_sum, trim_metrics
from .config import ExperimentConfig, from_dict, load_yaml, to_dict, validate
from .data import FEATURES_VERSION, Splits, load_splits, model_inputs
from .errors import LoralabError, TrainingDiverged
from .redact import mask_secrets
from .study import layout
from .tasks import Task, get_task


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    summary: dict


@dataclass
class BuiltModel:
    model: torch.nn.Module
    tokenizer: object
    heads: list[str]
    causal: bool


def _auto_class(task: Task, head: str = "classifier"):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
    )

    if head == "lm":
        return AutoModelForCausalLM
    if task.kind == "classification":
        return AutoModelForSequenceClassification
    return AutoModelForQuestionAnswering


def _peft_task_type(task: Task, head: str = "classifier") -> str:
    if head == "lm":
        return "CAUSAL_LM"
    # PEFT's QUESTION_ANS wrapper drops token_type_ids (BERT segment ids) on the way to the
    # model; the plain wrapper passes every input through, and modules_to_save works the same.
    return "SEQ_CLS" if task.kind == "classification" else None


def is_causal(config) -> bool:
    """Decoder-only models read a sequence left to right (no [CLS] summary at position 0)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def build_model(
    cfg: ExperimentConfig,
    task: Task,
    tokenizer,
    progress: bool = True,
    attention: str | None = None,
) -> BuiltModel:
    """Load the base with the task head; wrap with LoRA (frozen base) or leave all trainable.

    `attention`: the attention kernel (`eager`/`sdpa`); None = `model.attention` when set
    explicitly, else transformers' default.
    """
    from .lora import apply_lora
    from .models import load_model

    head = cfg.model.head
    kwargs = (
        {"num_labels": task.num_labels} if task.kind == "classification" and head != "lm" else {}
    )
    attention = attention or (None if cfg.model.attention == "auto" else cfg.model.attention)
    if attention:
        kwargs["attn_implementation"] = attention
    model, heads = load_model(
        cfg.model.name,
        _auto_class(task, head),
        trust_remote_code=cfg.model.trust_remote_code,
        progress=progress,
        **kwargs,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    causal = is_causal(model.config)
    if cfg.train.method == "lora":
        model = apply_lora(cfg.lora, model, heads, task_type=_peft_task_type(task, head))
        if _precision(cfg, model.config):
            precision.cast_frozen(model)  # the frozen base needs no fp32 master copy
            precision.bridge_dtypes(model, heads)  # callable outside the trainer's autocast too
    return BuiltModel(model, tokenizer, heads, causal)


def _precision(cfg: ExperimentConfig, model_config=None) -> bool:
    """True when bf16 autocast is on (`auto`: measured on this machine, see precision.decide)."""
    shape = precision.model_shape(model_config) if model_config is not None else None
    return precision.resolve(cfg.train.precision, shape) == "bf16"


def choose_attention(cfg: ExperimentConfig, model_config, splits: Splits) -> dict:
    """The attention kernel for this run: set in the config, or measured at the median length."""
    from . import attention

    if cfg.model.attention != "auto":
        return {"implementation": cfg.model.attention, "reason": "set in the config"}
    lengths = sorted(splits.train["length"]) if "length" in splits.train.column_names else [128]
    median = lengths[len(lengths) // 2] if lengths else 128
    shape = attention.attention_shape(model_config, cfg.train.batch_size, median)
    dtype = torch.bfloat16 if _precision(cfg) else torch.float32
    return attention.decide(shape, dtype)


def resolve_precision(cfg: ExperimentConfig, model_config) -> tuple[ExperimentConfig, dict]:
    """A copy of `cfg` with `train.precision` resolved for this model and machine, and why."""
    decision = precision.decide(cfg.train.precision, precision.model_shape(model_config))
    train_cfg = dataclasses.replace(cfg.train, precision=decision["precision"])
    return dataclasses.replace(cfg, train=train_cfg), decision


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped batches whose order depends on (seed, epoch) alone.

    The stock sampler draws from the global RNG when an epoch starts; after a resume in a later
    epoch that RNG is not where the uninterrupted run had it, so the batches (and the adapter)
    would differ. Its own generator, reseeded per epoch, makes any resume exact.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class LoralabTrainer(Trainer):
    """The stock Trainer plus token counting, a stop on a non-finite loss, a (seed, epoch)-seeded
    length-grouped sampler and a whole-run loss sum kept in every checkpoint."""

    def __init__(self, *args, lm_loss: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_real = 0
        self.tokens_padded = 0
        self.lm_loss = lm_loss
        # Sum of every training_step loss since step 0, also across resumes (float64, on the
        # device: no sync per step). The Trainer's own train_loss covers only this process.
        self.loss_sum_start = 0.0
        self.loss_sum = None

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            return SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, self.args.seed)
        return sampler

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's files: a checkpoint complete enough to pass the check on
        # resume (trainer_state.json is written last) always has its loss sum.
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        total = float(self.loss_sum) if self.loss_sum is not None else self.loss_sum_start
        tracking.write_json(
            folder / LOSS_FILE, {"global_step": self.state.global_step, "loss_sum": total}
        )
        super()._save_checkpoint(model, trial)

    def whole_run_loss(self) -> float | None:
        """Mean training loss over every step of the run (including those before a resume)."""
        if self.loss_sum is None or not self.state.global_step:
            return None
        mean = float(self.loss_sum) / self.state.global_step
        return mean if math.isfinite(mean) else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.lm_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from .lm import target_loss

        loss = target_loss(model, inputs)  # vocabulary logits on target tokens only
        return (loss, None) if return_outputs else loss

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        # accelerate autocasts only model.forward; the LM loss calls the decoder and the output
        # projection directly, so training and prediction steps get the context here as well.
        return precision.autocast(self.args.bf16, self.args.device)

    def _get_eval_sampler(self, eval_dataset):
        # transformers 5 shuffles evaluation with a length-grouped sampler when training groups
        # by length, which breaks the row order that task.score() relies on. Our evaluation set
        # is already sorted by length, so sequential order is both correct and efficient.
        return (
            torch.utils.data.SequentialSampler(eval_dataset) if eval_dataset is not None else None
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.tokens_real += int(mask.sum())
            self.tokens_padded += mask.numel()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_sum is None:
            self.loss_sum = torch.tensor(
                self.loss_sum_start, dtype=torch.float64, device=loss.device
            )
        self.loss_sum = self.loss_sum + loss.detach().to(torch.float64)
        if not torch.isfinite(loss).all():
            raise TrainingDiverged(
                f"The training loss became {loss.item()} at step {self.state.global_step + 1}: the run "
                "stopped. Checkpoints saved so far are kept. Lower train.lr, or check the data."
            )
        return loss


def _training_args(cfg: ExperimentConfig, run_dir: Path, quiet: bool) -> TrainingArguments:
    tr = cfg.train
    return TrainingArguments(
        output_dir=str(run_dir / tracking.CHECKPOINT_DIR),
        per_device_train_batch_size=tr.batch_size,
        per_device_eval_batch_size=tr.eval_batch_size,
        gradient_accumulation_steps=tr.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=tr.epochs,
        max_steps=tr.max_steps,
        lr_scheduler_type="linear",
        warmup_steps=tr.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=tr.weight_decay,
        max_grad_norm=tr.max_grad_norm,
        optim="adamw_torch",
        seed=tr.seed,
        bf16=_precision(cfg),
        # transformers refuses bf16 without a GPU unless told the run is on the CPU on purpose.
        use_cpu=_precision(cfg) and not torch.cuda.is_available(),
        eval_strategy="steps" if tr.eval_steps else "no",
        eval_steps=tr.eval_steps,
        save_strategy="steps",
        save_steps=tr.save_steps,
        save_total_limit=2,
        logging_steps=tr.logging_steps,
        report_to="none",
        disable_tqdm=quiet,
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        length_column_name="length",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=True,
    )


def _console(quiet: bool):
    from rich.console import Console

    return None if quiet else Console(stderr=True)


def train(
    cfg: ExperimentConfig,
    resume: str | Path | None = None,
    quiet: bool = False,
    callbacks: list | None = None,
    checkpoint: str | Path | None = None,
) -> RunResult:
    """Run one experiment and return its run directory, eval metrics and summary.

    `resume` is the run folder to train in (see `resume()`), `checkpoint` the one to continue
    from (None: from step 0).

    `callbacks` are extra `transformers.TrainerCallback`s (e.g. for live tracking or tests); one
    with a `trainer` attribute is given the Trainer (its token counters, for benchmarks).
    """
    from transformers import AutoConfig

    from .lora import check_targets
    from .models import load_tokenizer, resolve

    validate(cfg)
    tracking.preflight(cfg)
    # Before any slow work: the run folder must be creatable and writable.
    where = "The run folder" if resume else "--output-dir"
    tracking.check_writable(resume or cfg.run.output_dir, where)
    _absolute_data_paths(cfg)
    start = time.time()
    task = get_task(cfg.data.task)
    console = _console(quiet)

    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(
        cfg.model.name, trust_remote_code=cfg.model.trust_remote_code, progress=not quiet
    )
    # Labels (QA span positions, the null index) are absolute positions: pad on the right.
    tokenizer.padding_side = "right"
    config = AutoConfig.from_pretrained(
        resolve(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code
    )
    cfg, precision_decision = resolve_precision(cfg, config)
    prompting = None
    if cfg.model.head == "lm":
        from .lm import prompting_for

        if not is_causal(config):
            raise LoralabError(
                f"--head lm needs a causal (decoder) language model; {cfg.model.name} is a "
                f"{config.model_type} encoder. Use --head classifier, or a Llama-family model."
            )
        prompting = prompting_for(task, cfg.data, tokenizer)
    if cfg.train.method == "lora":  # targets vs the model's layers, before weights and data
        check_targets(
            cfg.lora, config, _auto_class(task, cfg.model.head), cfg.model.trust_remote_code
        )
    # Data first: a bad data file should fail before the slower model load.
    splits = load_splits(
        task, cfg.data, tokenizer, cfg.train.seed, causal=is_causal(config), prompting=prompting
    )
    attention = choose_attention(cfg, config, splits)
    set_seed(cfg.train.seed)
    built = build_model(
        cfg, task, tokenizer, progress=not quiet, attention=attention["implementation"]
    )

    run_dir = (
        Path(resume) if resume else tracking.create_run_dir(resolved_config(cfg, splits.max_length))
    )
    return _run(
        cfg,
        task,
        built,
        splits,
        run_dir,
        resume is not None,
        console,
        quiet,
        start,
        callbacks or [],
        prompting,
        {"precision": precision_decision, "attention": attention},
        checkpoint,
    )


def _run(
    cfg,
    task,
    built: BuiltModel,
    splits: Splits,
    run_dir: Path,
    resuming: bool,
    console,
    quiet,
    start,
    extra,
    prompting=None,
    kernels=None,
    checkpoint=None,
):
    model = built.model
    lm_head = prompting is not None
    params = accounting.parameter_counts(model, built.heads)
    base = accounting.base_parameters(model)
    checksum_before = accounting.checksum(base) if cfg.train.method == "lora" else None

    tracker = tracking.Tracker(run_dir, cfg, resuming=resuming)
    tracking_cb = TrackingCallback(
        tracker, cfg.tracking.log_every, params, checksum_before, console
    )
    trainer = LoralabTrainer(
        model=model,
        args=_training_args(cfg, run_dir, quiet),
        train_dataset=model_inputs(splits.train),
        data_collator=_collator(built.tokenizer, lm_head),
        processing_class=built.tokenizer,
        # The LM formulation is scored by its own loop (verbalizers / generation), at the end.
        eval_dataset=model_inputs(splits.eval) if cfg.train.eval_steps and not lm_head else None,
        compute_metrics=(lambda p: task.score(splits.eval_raw, splits.eval, p.predictions)),
        callbacks=[tracking_cb, *extra],
        lm_loss=lm_head,
    )
    tracking_cb.trainer = trainer
    for cb in extra:  # callbacks that ask for it (a `trainer` attribute) get the trainer too
        if hasattr(cb, "trainer"):
            cb.trainer = trainer
    if quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    else:  # the bar itself carries loss, lr and tok/s instead of a printed dict per log step
        from transformers.trainer_callback import ProgressCallback

        from .callbacks import LiveProgress

        trainer.remove_callback(ProgressCallback)
        live = LiveProgress()
        live.trainer = trainer
        trainer.add_callback(live)
    checkpoint = str(checkpoint) if checkpoint else None
    if checkpoint:
        start = read_loss_sum(Path(checkpoint))
        # A checkpoint from an older loralab has no loss sum: train_loss then covers the
        # steps after the resume only (the Trainer's own figure).
        trainer.loss_sum_start = start if start is not None else float("nan")
    summary = _base_summary(cfg, run_dir, params, splits, model)
    summary["resumed_from"] = checkpoint
    summary["precision_decision"] = (kernels or {}).get("precision")
    summary["attention"] = (kernels or {}).get("attention")
    summary["new_modules"] = built.heads  # freshly initialised (trained in full) head modules
    evaluate = _evaluator(cfg, task, built, splits, trainer, prompting, quiet)
    if lm_head and task.kind == "classification" and not resuming:
        # The untrained model's score: the reference line fine-tuning must beat.
        summary["zero_shot"] = evaluate()
        tracker.log({f"zero_shot/{k}": v for k, v in summary["zero_shot"].items()}, 0)
        if console is not None:
            console.print(f"[bold]zero-shot[/]: {_fmt(summary['zero_shot'])}")

    t0 = time.time()
    try:
        train_out = trainer.train(resume_from_checkpoint=checkpoint)
    except BaseException as e:
        # Keep what was saved; say in the summary why the run stopped.
        status = "diverged" if isinstance(e, TrainingDiverged) else "failed"
        summary.update(
            status=status, error=f"{type(e).__name__}: {e}", wall_time_s=time.time() - start
        )
        tracking.write_json(run_dir / tracking.SUMMARY_FILE, summary)
        tracker.finish(failed=True)
        raise
    train_time = time.time() - t0

    t1 = time.time()
    metrics = evaluate()
    eval_time = time.time() - t1
    tracker.log({f"eval/{k}": v for k, v in metrics.items()}, trainer.state.global_step)
    if console is not None:
        console.print(
            f"[bold green]final eval[/] ({len(splits.eval_raw)} examples): {_fmt(metrics)}"
        )

    _save_weights(cfg, trainer, built, run_dir)
    verification = {}
    if cfg.train.method == "lora":
        checksum_after = accounting.checksum(accounting.base_parameters(model))
        verification = {
            **accounting.frozen_base_report(model),
            "base_checksum_before": checksum_before,
            "base_checksum_after": checksum_after,
            "base_unchanged": checksum_before == checksum_after,
        }
    summary.update(
        status="completed",
        metrics=metrics,
        train_loss=trainer.whole_run_loss() or train_out.training_loss,
        steps=trainer.state.global_step,
        wall_time_s=time.time() - start,
        train_time_s=train_time,
        eval_time_s=eval_time,
        tokens={"real": trainer.tokens_real, "padded": trainer.tokens_padded},
        tokens_per_s={
            "real": trainer.tokens_real / train_time if train_time else 0.0,
            "padded": trainer.tokens_padded / train_time if train_time else 0.0,
        },
        peak_memory_mb=tracking.peak_memory_mb(),
        verification=verification,
    )
    tracking.write_json(run_dir / tracking.SUMMARY_FILE, summary)
    if cfg.train.method == "lora":  # canonical base id, model card
        from .artefacts import finish_adapter

        finish_adapter(run_dir, cfg, task, summary)
    tracker.summary(
        {f"eval/{k}": v for k, v in metrics.items()}
        | {f"verification/{k}": v for k, v in verification.items() if isinstance(v, bool)}
    )
    tracker.finish()
    return RunResult(run_dir, metrics, summary)


def _absolute_data_paths(cfg: ExperimentConfig) -> None:
    """Store data paths absolute, so a run directory can be re-read from any working directory."""
    from .tasks import absolute_ref

    cfg.data.task = absolute_ref(cfg.data.task)
    for key in ("data_dir", "train_file", "eval_file"):
        value = getattr(cfg.data, key)
        if value:
            setattr(cfg.data, key, str(Path(value).expanduser().resolve()))


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _collator(tokenizer, lm_head: bool):
    if lm_head:  # pads `labels` with -100 as well
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    return DataCollatorWithPadding(tokenizer)


def _evaluator(cfg, task, built: BuiltModel, splits: Splits, trainer, prompting, quiet: bool):
    """A no-argument function returning the task metrics of the model as it is now."""
    if prompting is not None:
        from . import lm

        def lm_eval():
            with precision.autocast(_precision(cfg), next(built.model.parameters()).device):
                return lm.evaluate(
                    task, built.model, built.tokenizer, splits.eval_raw, splits.eval, prompting,
                    cfg.train.eval_batch_size, progress=not quiet,
                )  # fmt: skip

        return lm_eval

    def classifier_eval():
        pred = trainer.predict(model_inputs(splits.eval))
        return task.score(splits.eval_raw, splits.eval, pred.predictions)

    return classifier_eval


def _base_summary(
    cfg: ExperimentConfig, run_dir: Path, params: dict, splits: Splits, model
) -> dict:
    return {
        "status": "running",
        "run_dir": str(run_dir),
        "task": cfg.data.task,
        "method": cfg.train.method,
        "model": cfg.model.name,
        "model_source": _model_source(cfg.model.name),
        "head": cfg.model.head,
        "seed": cfg.train.seed,
        "lr": cfg.lr,
        "lora": to_dict(cfg.lora) if cfg.train.method == "lora" else None,
        "examples": {"train": len(splits.train_raw), "eval": len(splits.eval_raw)},
        "features": {"train": len(splits.train), "eval": len(splits.eval)},
        "max_length": splits.max_length,
        "features_version": FEATURES_VERSION,
        "data_fingerprint": splits.fingerprint,
        "majority_baseline": get_task(cfg.data.task).majority_baseline(splits.eval_raw),
        "identity": identity(cfg, splits),
        "params": params,
        "precision": "bf16" if _precision(cfg) else "fp32",
        "layout": layout.record(),  # worker processes side by side, threads in this one
        "param_dtypes": precision.dtypes(model),
        "versions": tracking.versions(),
        "git_commit": tracking.git_commit(),
        # Credentials on the command line (--storage URL passwords, tokens) never get stored.
        "command": mask_secrets(" ".join(sys.argv)),
    }


def _model_source(name: str) -> dict:
    from .models import canonical

    return canonical(name)


# Settings that do not change what a run computes (where it writes, how often it logs/saves).
_NOT_IDENTITY = {
    "train": ("seed", "save_steps", "logging_steps", "eval_steps", "eval_batch_size"),
    "data": ("data_dir", "train_file", "eval_file"),  # replaced by the data's fingerprint
    "model": ("trust_remote_code", "attention"),  # attention kernels compute the same thing
}


def identity(cfg: ExperimentConfig, splits: Splits) -> dict:
    """Everything that defines a run's result except its seed: runs pool only when equal.

    The config with data paths replaced by content fingerprints, `auto` values resolved, and
    the run/tracking sections and bookkeeping intervals dropped. LoRA settings are absent for
    full fine-tuning (they do not apply).
    """
    d = to_dict(cfg)
    d.pop("run", None)
    d.pop("tracking", None)
    for section, keys in _NOT_IDENTITY.items():
        for k in keys:
            d[section].pop(k, None)
    if cfg.train.method != "lora":
        d.pop("lora")
    d["train"]["lr"] = cfg.lr
    d["train"]["precision"] = "bf16" if _precision(cfg) else "fp32"
    d["data"]["max_length"] = splits.max_length
    d["data"]["fingerprint"] = splits.fingerprint
    return d


def resolved_config(cfg: ExperimentConfig, max_length: int) -> ExperimentConfig:
    """A copy of `cfg` with the values left to defaults (lr, max_length, precision) filled in,
    as the run folder's config.yaml records them; loading it back gives the same run."""
    import copy

    out = copy.deepcopy(cfg)
    out.train.lr = cfg.lr
    out.data.max_length = max_length
    out.train.precision = "bf16" if _precision(cfg) else "fp32"
    return out


def _save_weights(
    cfg: ExperimentConfig, trainer: Trainer, built: BuiltModel, run_dir: Path
) -> None:
    """Adapter (PEFT format) for LoRA, the whole model for full; written to a temp dir, then renamed."""
    final = run_dir / (tracking.ADAPTER_DIR if cfg.train.method == "lora" else tracking.MODEL_DIR)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{final.name}.tmp-"))
    from .console import library_bars_off

    with library_bars_off():
        if cfg.train.method == "lora":
            built.model.save_pretrained(str(tmp))
        else:
            trainer.save_model(str(tmp))
    built.tokenizer.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def resume(
    run_dir: str | Path,
    quiet: bool = False,
    restart: bool = False,
    trust_remote_code: bool = False,
) -> RunResult:
    """Continue a killed run from its newest intact checkpoint, with the config it was started
    with (damaged checkpoints are skipped with a warning).

    Without a usable checkpoint this is a user error, unless `restart`: then the run trains
    again from step 0 in the same folder (its metrics.jsonl starts afresh). Remote code follows
    `trust_remote_code` (the command line), never the folder's config.
    """
    from .checkpoints import warn
    from .runs import command_line_trust

    run_dir = tracking.open_run_dir(run_dir)
    _check_not_finished(run_dir)
    cfg = from_dict(load_yaml(run_dir / tracking.CONFIG_FILE))
    command_line_trust(cfg, trust_remote_code, run_dir / tracking.CONFIG_FILE)
    checkpoint, skipped = newest_good_checkpoint(run_dir)
    warn(skipped)
    if checkpoint is None and not restart:
        why = "all of its checkpoints are damaged" if skipped else "it has no checkpoint"
        raise LoralabError(
            f"Cannot resume '{run_dir}': {why} ({tracking.CHECKPOINT_DIR}/checkpoint-N is written "
            f"every train.save_steps={cfg.train.save_steps} steps). Nothing was changed. Add "
            "--restart to train it again from step 0 in the same folder, or start a new run."
        )
    if checkpoint is None:
        warn([f"restarting '{run_dir}' from step 0 (--restart): its metrics.jsonl starts afresh"])
        shutil.rmtree(run_dir / tracking.CHECKPOINT_DIR, ignore_errors=True)  # none was usable
    trim_metrics(run_dir, None if checkpoint is None else int(checkpoint.name.split("-")[-1]))
    return train(cfg, resume=run_dir, quiet=quiet, checkpoint=checkpoint)


def _check_not_finished(run_dir: Path) -> None:
    """A completed run is not resumed; a damaged summary.json only gets a warning (it is
    rewritten when the resumed run finishes)."""
    from .checkpoints import warn

    summary_path = run_dir / tracking.SUMMARY_FILE
    if not summary_path.is_file():
        return
    try:
        status = tracking.read_json(summary_path).get("status")
    except LoralabError as e:
        warn([f"ignoring a damaged summary.json ({e})"])
        return
    if status == "completed":
        raise LoralabError(
            f"Run '{run_dir}' already finished (summary.json says completed); nothing to resume."
        )
