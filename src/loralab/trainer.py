"""The Trainer loralab trains with: token counts, a stop on a non-finite loss, a resumable
length-grouped sampler, a whole-run loss sum in every checkpoint, and a head's own loss."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from . import distributed, precision, rundir, tracking
from .callbacks import TokenCounts
from .checkpoints import read_progress
from .config import ExperimentConfig
from .data import lengths
from .errors import TrainingDiverged
from .stopping import EvaluationCut


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

    def __init__(self, *args, loss_fn=None, tokens: TokenCounts | None = None,
                 loraplus_lr_ratio: float | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        # Every loss here is a mean over its micro-batch (the models' classification and span
        # losses ignore `num_items_in_batch`, and so do the heads' own): the Trainer must divide
        # it by the accumulation steps. For a model whose forward takes **kwargs (Llama) it
        # would not, and the loss and gradient came out `grad_accum` times too large.
        self.model_accepts_loss_kwargs = False
        self.loraplus_lr_ratio = loraplus_lr_ratio  # None: one learning rate for every parameter
        self.tokens = tokens if tokens is not None else TokenCounts()
        self.loss_fn = loss_fn  # the head's loss; None: the model's own
        # Sum of every training_step loss since step 0, also across resumes (float64, on the
        # device: no sync per step). The Trainer's own train_loss covers only this process.
        self.loss_sum_start = 0.0
        self.loss_sum = None
        # Training time (wall, CPU) of earlier attempts up to the checkpoint resumed from, and
        # the clocks when this attempt began: each checkpoint records the whole run's times.
        self.time_before = (0.0, 0.0)
        self.clock0 = (time.time(), time.process_time())
        # Wall time outside training (start-up, zero-shot) of this attempt and of the earlier
        # attempts up to the checkpoint resumed from: a resumed run's wall time counts them all.
        self.setup_s = 0.0
        self.setup_before = 0.0
        self.tokens_before = (0, 0)  # (real, padded) of the earlier attempts, every process
        # What a resume must find unchanged (`checkpoints.check_same_run`), in every checkpoint.
        self.run_facts: dict = {}
        self._flop_weights = None  # (input name, non-embedding weight count), counted once
        self.first_step_at = None  # Unix time at which this process began its first step
        self.first_step_before = None  # ... the attempt that saved the checkpoint resumed from
        self.pending_before = None  # the resumed checkpoint's open log window (`Progress.pending`)
        self.eval_owed = None  # the step of the periodic evaluation a stop cut short
        # A head that scores the dev set with its own loop (generation, verbalizers) sets this:
        # the periodic evaluations (`train.eval_steps`) call it instead of the predict loop.
        self.own_eval: Callable[[], dict] | None = None

    def floating_point_ops(self, inputs: dict) -> int:
        """The stock count (6 · input tokens · non-embedding weights) with the weights counted once,
        not at every step (~20 ms a step on SmolLM2, 2% of a 1-thread LoRA step)."""
        if self._flop_weights is None:
            count = getattr(self.model, "num_parameters", None)
            self._flop_weights = (
                getattr(self.model, "main_input_name", "input_ids"),
                count(exclude_embeddings=True) if count else 0,
            )
        name, weights = self._flop_weights
        return 6 * inputs[name].numel() * weights if name in inputs else 0

    def create_optimizer(self, model=None):
        """The stock optimizer; under LoRA+ its B matrices learn at `loraplus_lr_ratio`× the rate."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = loraplus_groups(opt_model, decay, self.args, self.loraplus_lr_ratio)
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        # Grouped by the global batch: under data parallelism each process then takes its slice
        # of the very batches a single process with the same global batch would see.
        world = self.args.world_size
        if self.args.train_sampling_strategy == "group_by_length":
            # The features' own `length` column (len(input_ids)), read through Arrow: the
            # Trainer's copy has lost it with the unused columns and would take every feature's
            # input_ids row by row instead (0.15 s for 4,000 features at each run's start).
            known = lengths(self.train_dataset)
            if known is not None and len(known) == len(train_dataset or self.train_dataset):
                batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
                return SeededLengthGroupedSampler(batch * world, known, self.args.seed)
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            return SeededLengthGroupedSampler(sampler.batch_size * world, sampler.lengths, self.args.seed)  # fmt: skip
        return sampler

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's files: a checkpoint complete enough to pass the check on
        # resume (trainer_state.json is written last) always has its loss sum.
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        total = float(self.loss_sum) if self.loss_sum is not None else self.loss_sum_start
        # Each process summed its own batches' losses (the run's figure is their mean) and
        # counted its own tokens (the run's are their sum).
        pending = float(self._tr_loss) if hasattr(self, "_tr_loss") else 0.0  # since the last log
        total, real, padded, pending = distributed.total([total, self.tokens.real, self.tokens.padded, pending])  # fmt: skip
        total, pending = total / distributed.world_size(), pending / distributed.world_size()
        wall, cpu = self.training_time()
        if distributed.is_main():
            tracking.write_json(
                folder / rundir.LOSS_FILE,
                {"global_step": self.state.global_step, "loss_sum": total,
                 "train_time_s": wall, "train_cpu_time_s": cpu,
                 "setup_time_s": self.setup_before + self.setup_s,
                 "tokens_real": self.tokens_before[0] + int(real),
                 "tokens_padded": self.tokens_before[1] + int(padded),
                 "first_step_at": self.stepping_since(), "pending_loss": pending,
                 "last_logged_step": getattr(self, "_globalstep_last_logged", self.state.global_step),
                 "eval_owed": self.eval_owed, **self.run_facts},
            )  # fmt: skip
        t0 = time.time()
        super()._save_checkpoint(model, trial)
        self.tokens.paused_s += time.time() - t0  # not the steps' time (`TokenCounts.paused_s`)

    def training_time(self) -> tuple[float, float]:
        """(wall s, CPU s) of training so far over the whole run: the attempts before the
        checkpoint this one resumed from (what they did after their last checkpoint was lost
        and is not counted), plus this attempt."""
        return (self.time_before[0] + time.time() - self.clock0[0],
                self.time_before[1] + time.process_time() - self.clock0[1])  # fmt: skip

    def resume_from(self, checkpoint: Path) -> None:
        """Take the earlier attempts' loss sum, times and tokens from the checkpoint this attempt
        resumes from. Without them (an older checkpoint) the figures cover this attempt only;
        train_loss then is the Trainer's own (the steps after the resume)."""
        before = read_progress(checkpoint)
        self.loss_sum_start = before.loss_sum if before.loss_sum is not None else float("nan")
        self.time_before = before.time or (0.0, 0.0)
        self.setup_before = before.setup_s
        self.tokens_before = before.tokens
        self.first_step_before = before.first_step_at
        self.pending_before = before.pending
        self.eval_owed = before.eval_owed

    def stepping_since(self) -> float | None:
        """Unix time this attempt began its first step; with no step (resumed from the final
        checkpoint) the saving attempt's, so that the run stays dated (`records` dedupes by it)."""
        return self.first_step_at if self.first_step_at is not None else self.first_step_before

    def earlier_wall(self) -> float:
        """Wall s of the attempts before this one, up to the checkpoint resumed from: their
        training and their start-up (what they did after that checkpoint is lost)."""
        return self.time_before[0] + self.setup_before

    def whole_run_loss(self) -> float | None:
        """Mean training loss over every step of the run (including those before a resume)."""
        # No step this attempt (resumed from the last checkpoint): the sum it saved.
        total = self.loss_sum if self.loss_sum is not None else self.loss_sum_start
        if not self.state.global_step:
            return None
        mean = float(total) / self.state.global_step
        return mean if math.isfinite(mean) else None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The stock evaluation, or the head's own scoring (`own_eval`) logged the same way;
        its time counts as paused training (`TokenCounts.paused_s`)."""
        t0 = time.time()
        try:
            if self.own_eval is None:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.own_eval().items()}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(
                self.args, self.state, self.control, metrics
            )
            return metrics
        except EvaluationCut:  # stopped while scoring: this step is saved owing the evaluation
            self.eval_owed = self.state.global_step
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
            raise  # `GracefulStop.on_save` has raised `Stopped` before this
        finally:
            self.tokens.paused_s += time.time() - t0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_fn is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.loss_fn(model, dict(inputs))
        if not return_outputs:
            return loss
        # A prediction step wants the outputs too: the model's, on the inputs without labels.
        return loss, model(**{k: v for k, v in inputs.items() if k != "labels"})

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

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # The stock closing `train_loss` covers only the steps since a resume; the run's own
        # covers all (under several processes the summary's figure, summed over them, is it).
        if "train_loss" in logs and distributed.world_size() == 1:
            whole = self.whole_run_loss()
            logs = {**logs, "train_loss": whole} if whole is not None else logs
        super().log(logs, start_time)

    def _run_epoch(self, *args, **kwargs):
        if self.eval_owed is not None:  # resumed from a stop that cut this step's evaluation
            if self.eval_owed == self.state.global_step:
                self.evaluate()
            self.eval_owed = None
        # Resumed from the last checkpoint (the final evaluation died): the stock loop would
        # train one step past max_steps in an epoch it resumes mid-way, checking only after it.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        if self.pending_before is not None:  # resumed between two logged steps: the Trainer
            loss, step = self.pending_before  # would average the next log over fewer steps
            self._tr_loss += loss
            self._globalstep_last_logged, self.pending_before = step, None
        return super()._run_epoch(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.first_step_at is None:  # start-up ends here (benchmarks/startup.py reads it)
            self.first_step_at = time.time()
        self.tokens.count(inputs.get("attention_mask"))
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


def loraplus_groups(model, decay: set[str], args: TrainingArguments, ratio: float) -> list[dict]:
    """Optimizer parameter groups for LoRA+: (weight decay or not) × (B matrices or the rest).

    Only `lora_B` weights get `ratio`× the learning rate; A, DoRA magnitudes, biases and trained
    heads keep the base rate (PEFT's `create_loraplus_optimizer` would also speed up every 1-D
    parameter and drop the weight decay). The scheduler scales each group from its own rate.
    """
    lr, wd = args.learning_rate, args.weight_decay
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((".lora_B." in name, name in decay), []).append(p)
    # The rest first: the Trainer logs the first group's rate as the run's learning rate.
    order = [(False, True), (False, False), (True, True), (True, False)]
    return [
        {"params": groups[key], "weight_decay": wd if key[1] else 0.0,
         "lr": lr * ratio if key[0] else lr}
        for key in order if key in groups
    ]  # fmt: skip


def training_args(cfg: ExperimentConfig, run_dir: Path, quiet: bool) -> TrainingArguments:
    """The Trainer's arguments for a run of `cfg` writing checkpoints under `run_dir`."""
    tr = cfg.train
    return TrainingArguments(
        output_dir=str(run_dir / rundir.CHECKPOINT_DIR),
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
        # Fused AdamW (the stock Trainer default on torch >= 2.8): one pass over the parameters;
        # a full fine-tuning step of SmolLM2 on 1 CPU thread 2.9 -> 2.1 s. Same maths as foreach.
        optim="adamw_torch_fused",
        seed=tr.seed,
        **_checkpointing_args(tr.gradient_checkpointing),
        bf16=precision.uses_bf16(cfg.train.precision),
        # transformers refuses bf16 without a GPU unless told the run is on the CPU on purpose.
        # and accelerate sets up data parallelism on CPUs (gloo) only when told so as well.
        use_cpu=not torch.cuda.is_available()
        and (precision.uses_bf16(cfg.train.precision) or distributed.world_size() > 1),
        eval_strategy="steps" if tr.eval_steps else "no",
        eval_steps=tr.eval_steps,
        save_strategy="steps",
        save_steps=tr.save_steps,
        save_total_limit=2,
        logging_steps=tr.logging_steps,
        # A non-finite loss stops the run inside training_step (TrainingDiverged), so the
        # Trainer's own NaN/inf filter never sees one: off, it costs no second host sync a step.
        logging_nan_inf_filter=False,
        report_to="none",
        disable_tqdm=quiet,
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        length_column_name="length",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=True,
        # Each process's loss is the mean over its own batch and DDP averages the gradients,
        # which equals one process on the global batch. (transformers would otherwise scale the
        # loss by the process count for models that take loss kwargs but average themselves.)
        average_tokens_across_devices=False,
        ddp_find_unused_parameters=False,  # a frozen base is not "unused": it needs no grad
    )


def _checkpointing_args(on: bool) -> dict:
    """The Trainer's activation-checkpointing arguments (named `gradient_checkpointing*` before
    transformers 5.x renamed them). Non-reentrant: it needs no input that requires grad, and a
    LoRA model's embeddings are frozen."""
    fields = TrainingArguments.__dataclass_fields__
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}
